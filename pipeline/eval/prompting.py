"""How evaluation asks a model for its answer to an instruction: in the format the run was trained
in (docs/study.md section 1 for the Alpaca template).

- ``alpaca`` (runs on Alpaca-format data, the paper's grid, and baselines):
  :func:`pipeline.preprocess.render_source`; the tokenizer adds BOS when generating.
- ``chat_template`` (runs on chat data, ``dataset.source.format=messages``): the instruction (and
  its input after a blank line, as chat data holds them in one user message) as one user message,
  rendered by the evaluated model's own chat template with the assistant turn opened
  (``add_generation_prompt=True``); the template writes the special tokens, so none are added
  again. No system message is added.

The generated answers of AlpacaEval and PandaLM (the comparator's too, so both sides of a pairwise
comparison are asked the same way) follow the run's style; the memorization metric renders chat
records as they were trained (:func:`chat_context`). lm-eval's benchmarks keep their own prompts.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from omegaconf import OmegaConf

from pipeline.preprocess import render_source

ALPACA = "alpaca"
CHAT = "chat_template"


def style_of(run_cfg: Any) -> str:
    """The run's prompt style: ``chat_template`` for a run trained on chat data, else ``alpaca``."""
    if run_cfg is None:
        return ALPACA
    fmt = OmegaConf.select(run_cfg, "dataset.source.format", default=None) if OmegaConf.is_config(run_cfg) else None
    return CHAT if fmt == "messages" else ALPACA


def user_message(instruction: str, input: str = "") -> str:
    return instruction + (f"\n\n{input}" if input else "")


def render(style: str, tokenizer, instruction: str, input: str = "") -> str:
    """The prompt text of one instruction in ``style`` (see the module docstring)."""
    if style == CHAT:
        return chat_context(tokenizer, [{"role": "user", "content": user_message(instruction, input)}])
    return render_source({"instruction": instruction, "input": input})


def chat_context(tokenizer, messages: Sequence[Mapping[str, str]]) -> str:
    """``messages`` in the tokenizer's chat template, ending with the opened assistant turn."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"the model's tokenizer {getattr(tokenizer, 'name_or_path', '?')} has no chat template: "
            "a run trained on chat data (format: messages) is prompted through it"
        )
    msgs = [{"role": m["role"], "content": m["content"]} for m in messages]
    return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)


def add_special_tokens(style: str) -> bool:
    """Whether generation should add the tokenizer's special tokens (the chat template wrote them)."""
    return style != CHAT

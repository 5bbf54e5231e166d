"""Judges in their own format: the judge's prompt rendered through its tokenizer's chat template.

The paper's judges have fixed prompt formats (PandaLM-7B its own, Mixtral-8x7B-Instruct ``[INST]``).
With ``prompt_style: chat_template`` any instruct model with a chat template can judge instead:

- the task text stays the study's (PandaLM: ``build_pandalm_prompt`` with the answer format spelt
  out, as for Mixtral; AlpacaEval: the Mixtral/guanaco prompt, written in ChatML in
  ``evaluators/chat_template/basic_prompt.txt`` as alpaca_eval's own chat prompts are);
- it becomes chat messages (PandaLM: one user message; AlpacaEval: the ChatML turns, read with
  alpaca_eval's ``prompt_to_chatml``), rendered with the judge tokenizer's
  ``apply_chat_template(messages, add_generation_prompt=True)``;
- the rendered text is tokenized WITHOUT adding special tokens again (the template writes the BOS
  token where the model wants one; adding another would change what the judge reads), decoded
  greedily by :func:`pipeline.eval.generation.generate`.

A tokenizer without a chat template is an error naming the model (choose a fixed format instead).
Used by :mod:`pipeline.eval.pandalm` (judge configs with ``prompt: chat_template``) and
:mod:`pipeline.eval.alpacaeval` (evaluator ``chat_template``: :func:`alpaca_eval_completions` is its
``fn_completions``).
"""

from __future__ import annotations

import time
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple


from pipeline.eval import generation

PROMPT_STYLE = "chat_template"


class ChatTemplateError(RuntimeError):
    """The judge cannot be prompted through a chat template (one line, names the model)."""


def render(tokenizer, messages: Sequence[Mapping[str, str]], who: str) -> str:
    """``messages`` in the judge's chat template, ending with the assistant turn's opening."""
    if not getattr(tokenizer, "chat_template", None):
        raise ChatTemplateError(
            f"{who}: prompt style chat_template needs a tokenizer with a chat template, and "
            f"{getattr(tokenizer, 'name_or_path', '?')} has none (choose a judge with a fixed format)"
        )
    msgs = [{"role": str(m["role"]), "content": str(m["content"])} for m in messages]
    return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)


def load(model_id: str, revision: Optional[str], dtype: str, device: str, who: str) -> Tuple[Any, Any]:
    """``(model, tokenizer)`` of a judge, on ``device`` (``auto``: CUDA when present), in eval mode."""
    try:
        return generation.load_judge(model_id, revision, dtype, device)
    except OSError as e:
        raise ChatTemplateError(f"{who}: cannot load {model_id} (revision {revision}): {str(e).splitlines()[0]}") from e


def alpaca_eval_completions(
    prompts: Sequence[str],
    model_name: Optional[str] = None,
    revision: Optional[str] = None,
    max_new_tokens: int = 50,
    batch_size: int = 1,
    dtype: str = "bfloat16",
    device: str = "auto",
    **decoding: Any,
) -> Dict[str, List]:
    """alpaca_eval ``fn_completions`` of the ``chat_template`` evaluator: each ChatML prompt (the
    evaluator's template, filled by alpaca_eval) becomes messages, rendered by the judge's own chat
    template, decoded greedily (``decoding`` adds generation settings)."""
    from alpaca_eval.utils import prompt_to_chatml

    who = "AlpacaEval judge (eval.judge=chat_template)"
    if not model_name:
        raise ChatTemplateError(f"{who}: no judge model: set eval.judge_model=<hub id or local folder>")
    t0 = time.time()
    model, tok = load(str(model_name), revision, dtype, device, who)
    try:
        rendered = [render(tok, prompt_to_chatml(p), who) for p in prompts]
        gens = generation.generate(
            model,
            tok,
            rendered,
            max_new_tokens=int(max_new_tokens),
            batch_size=int(batch_size),
            gen_kwargs=decoding,
            add_special_tokens=False,
            desc="AlpacaEval judging",
        )
    finally:
        del model
        generation.release()
    dt = (time.time() - t0) / max(1, len(prompts))
    return {
        "completions": [g.text for g in gens],
        "price_per_example": [0.0] * len(gens),
        "time_per_example": [dt] * len(gens),
    }

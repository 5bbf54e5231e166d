"""Chat-format examples (a list of messages with roles) rendered by the model's own chat template,
with the role of every token: the ground work for ``format: messages`` datasets (docs/study.md
section 1 defines the weights for Alpaca-format data; this carries the same rule to conversations).

- :func:`check_messages`: the problems of one conversation (unknown role, empty content, a system
  message that is not first, user and assistant not alternating, no assistant turn, a conversation
  ending on a user turn), each naming the message index and field.
- :func:`render`: ``tokenizer.apply_chat_template`` of the conversation, tokenized once, and a
  completion mask over its tokens. The completion is each counted assistant turn's text as the
  template writes it, from the end of the turn's opening (what ``add_generation_prompt=True`` adds:
  prompt) to the end of the turn, end-of-turn token included; whitespace the template writes after
  the end-of-turn token belongs to the prompt. Which assistant turns count: ``all`` (default) or the
  ``last`` one. Everything else (system, user, template tokens) is prompt.
- The boundaries come from rendering each message prefix separately (the rendering of
  ``messages[:i]`` with the generation prompt must be a prefix of the whole rendering: a template that
  is not is an error), mapped to tokens through the fast tokenizer's character offsets.

Weights then follow :func:`pipeline.loss.token_weights`: prompt targets PLW, completion targets
``completion_weight`` (:func:`weights`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Mapping, Sequence

import torch

from pipeline.loss import token_weights

ROLES = ("system", "user", "assistant")
COMPLETION_TURNS = ("all", "last")


class ChatError(ValueError):
    """A conversation or template that cannot be rendered with roles (one line, naming what)."""


def check_messages(messages: Any) -> List[str]:
    """The problems of one conversation, each ``"message <i>: field '<f>': why"`` (empty: fine)."""
    if not isinstance(messages, list) or not messages:
        return ["field 'messages': expected a non-empty list of {role, content} objects"]
    out: List[str] = []
    roles = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            out.append(f"message {i}: expected an object with 'role' and 'content', got {type(m).__name__}")
            continue
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            out.append(f"message {i}: field 'role': {role!r} is not one of {', '.join(ROLES)}")
        if not isinstance(content, str) or not content.strip():
            out.append(f"message {i}: field 'content': empty or not a string")
        roles.append(role)
    if out:
        return out
    if "system" in roles[1:]:
        out.append(f"message {roles.index('system', 1)}: field 'role': a system message must come first")
    turns = roles[1:] if roles[0] == "system" else roles
    for j, r in enumerate(turns):
        want = "user" if j % 2 == 0 else "assistant"
        if r != want:
            i = j + (len(roles) - len(turns))
            out.append(f"message {i}: field 'role': {r!r} where {want!r} was expected (user and assistant alternate)")
            break
    if "assistant" not in roles:
        out.append("field 'messages': no assistant turn (nothing to learn)")
    elif roles[-1] != "assistant":
        out.append(f"message {len(roles) - 1}: field 'role': the conversation ends on a user turn (nothing to learn)")
    return out


@dataclass
class ChatExample:
    input_ids: List[int]
    completion_mask: List[bool]  # per token: part of a counted assistant turn
    text: str  # the rendered conversation


def _template(tokenizer, messages: Sequence[Mapping[str, str]], generation_prompt: bool) -> str:
    msgs = [{"role": m["role"], "content": m["content"]} for m in messages]
    return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt)


def render(tokenizer, messages: Sequence[Mapping[str, str]], completion_turns: str = "all") -> ChatExample:
    """The conversation's tokens and completion mask (see the module docstring)."""
    if completion_turns not in COMPLETION_TURNS:
        raise ChatError(f"completion turns must be one of {COMPLETION_TURNS}, got {completion_turns!r}")
    problems = check_messages(list(messages))
    if problems:
        raise ChatError(problems[0])
    if not getattr(tokenizer, "chat_template", None):
        raise ChatError(f"the tokenizer {getattr(tokenizer, 'name_or_path', '?')} has no chat template")
    if not getattr(tokenizer, "is_fast", False):
        raise ChatError("role boundaries need a fast tokenizer (character offsets)")
    full = _template(tokenizer, messages, False)
    assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    counted = assistant if completion_turns == "all" else assistant[-1:]
    spans = []
    for i in counted:
        start = _template(tokenizer, messages[:i], True)
        end = _template(tokenizer, messages[: i + 1], False)
        if not (full.startswith(start) and full.startswith(end) and len(start) <= len(end)):
            raise ChatError(
                f"the chat template of {getattr(tokenizer, 'name_or_path', '?')} does not render message "
                f"prefixes as prefixes of the conversation (message {i}): roles cannot be located"
            )
        stop = len(end.rstrip())  # whitespace after the end-of-turn token: prompt
        spans.append((len(start), stop))
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
    mask = [any(a <= s < b for a, b in spans) for s, _e in offsets]
    return ChatExample(ids, mask, full)


def weights(example: ChatExample, plw: float, completion_weight: float = 1.0) -> torch.Tensor:
    """Per-token weights in the unshifted convention (position 0 has no target): prompt targets
    ``plw``, completion targets ``completion_weight`` (:func:`pipeline.loss.token_weights`)."""
    comp = torch.tensor(example.completion_mask, dtype=torch.bool)
    pos = torch.arange(comp.numel())
    prompt = (~comp) & (pos >= 1)
    return token_weights(prompt, comp & (pos >= 1), plw, completion_weight)

"""Turn Alpaca-schema records into token ids, labels and per-token prompt-loss weights.

Pure functions, no I/O. This module decides which targets are prompt and which are completion
tokens; the weights themselves come from :func:`pipeline.loss.token_weights` (the weight rule, where
PLW enters), which :func:`build_example` calls. The rendering and tokenisation follow Stanford
Alpaca's ``train.py`` (commit 761dc5b) exactly (docs/study.md section 1):

* prompt (``source``) = ``PROMPT_DICT["prompt_input"]`` when ``input != ""``, else ``prompt_no_input``;
* completion (``target``) = ``output + tokenizer.eos_token`` (directly after ``### Response:``);
* ``source + target`` and ``source`` alone are each tokenised with
  ``tokenizer(text, max_length=model_max_length, truncation=True)``; the first ``len(source ids)``
  positions of the full sequence are prompt tokens (BOS included), the rest completion tokens.

Alignment convention (the one every consumer of these examples must follow)
---------------------------------------------------------------------------
All per-example sequences have the same length ``L = len(input_ids)`` and are *unshifted*, exactly
like Hugging Face ``labels``: ``labels[j]``, ``weights[j]`` and ``prompt_mask[j]`` describe the loss
term whose TARGET is ``input_ids[j]`` (predicted by the logits at position ``j - 1``).

* ``j == 0`` has no target: ``labels[0] = -100``, ``weights[0] = 0``, ``prompt_mask[0] = False``.
* ``1 <= j < n_prompt``: the target is a prompt token -> ``weights[j] = plw``, ``prompt_mask[j] = True``.
* ``j >= n_prompt``: the target is a completion token -> ``weights[j] = completion_weight``.
  (:func:`pipeline.loss.token_weights` applies these two rules.)
* padding (added by :class:`Collator`): ``labels = -100``, ``weights = 0``, ``prompt_mask = False``,
  ``attention_mask = 0``.
* ``labels[j] = input_ids[j]`` for every target position, except that with
  ``mask_zero_weight_labels=True`` (the default) positions whose weight is 0 get ``-100``. Hence at
  PLW = 0 ``labels`` is token-for-token Alpaca's (prompt masked, BOS included), and
  ``model(input_ids, labels=labels).loss`` is Alpaca's loss. Pass ``mask_zero_weight_labels=False``
  to keep the prompt labels at PLW = 0 so the unweighted prompt-token CE can still be logged
  (their weight is 0, so loss and gradients are unchanged).

:func:`pipeline.loss.weighted_causal_lm_loss` consumes ``labels``/``weights``/``prompt_mask`` in this
convention (it shifts internally, like ``LlamaForCausalLM``).

Truncation: an instance whose completion tokens are all cut off by ``model_max_length`` (its prompt
alone fills the budget) is counted in :class:`TruncationReport`; the policy decides what happens:
``keep`` (Alpaca: keep it, all its targets are prompt targets), ``drop`` (remove it),
``truncate_prompt_left`` (drop prompt tokens from the left, right after BOS, until the whole
completion fits; if the completion alone is longer than ``model_max_length - 1`` the prompt is
reduced to BOS and the completion is right-truncated). Chat records (``messages``) under
``truncate_prompt_left`` first lose whole oldest exchanges (:func:`chat_instance`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch

from pipeline import chat
from pipeline.loss import IGNORE_INDEX, token_weights

# stanford_alpaca train.py @ 761dc5b, verbatim.
PROMPT_DICT = {
    "prompt_input": (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
    ),
    "prompt_no_input": (
        "Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Response:"
    ),
}

TRUNCATION_POLICIES = ("keep", "drop", "truncate_prompt_left")

ROLE_PROMPT = "prompt"
ROLE_COMPLETION = "completion"
ROLE_PAD = "pad"


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------
def render_source(record: Mapping[str, Any]) -> str:
    """The prompt text of an Alpaca record (``prompt_no_input`` only when ``input == ""``)."""
    inp = record.get("input", "")
    if inp is None:
        inp = ""
    template = PROMPT_DICT["prompt_no_input"] if inp == "" else PROMPT_DICT["prompt_input"]
    return template.format_map({"instruction": record["instruction"], "input": inp})


def render_target(record: Mapping[str, Any], eos_token: str) -> str:
    """The completion text: ``output + eos_token`` (no separator after ``### Response:``)."""
    return f"{record['output']}{eos_token}"


def render(record: Mapping[str, Any], eos_token: str) -> Tuple[str, str]:
    return render_source(record), render_target(record, eos_token)


# --------------------------------------------------------------------------------------------
# Tokenisation (PLW-independent, so it can be cached once per dataset x tokenizer x max length)
# --------------------------------------------------------------------------------------------
@dataclass
class TokenizedInstance:
    input_ids: List[int]
    n_prompt: int  # leading prompt positions (BOS included), <= len(input_ids)
    truncated: bool = False  # model_max_length cut something
    lost_completion: bool = False  # truncation removed every completion token (before the policy)
    prompt_tokens_dropped_left: int = 0  # by truncate_prompt_left
    # chat records: the role of every token (True: a counted assistant turn; pipeline/chat.py); the
    # prompt is then not a prefix and ``n_prompt`` is the first completion position
    completion_mask: Optional[List[bool]] = None
    turns_dropped: int = 0  # chat records: oldest exchanges dropped by truncate_prompt_left

    @property
    def n_completion(self) -> int:
        if self.completion_mask is not None:
            return sum(self.completion_mask)
        return len(self.input_ids) - self.n_prompt


@dataclass
class TruncationReport:
    policy: str = "keep"
    model_max_length: int = 512
    n_instances: int = 0
    n_truncated: int = 0  # any token cut by model_max_length
    n_lost_completion: int = 0  # every completion token cut (counted before the policy acts)
    n_dropped: int = 0  # removed by policy "drop"
    n_prompt_left_truncated: int = 0  # rescued by policy "truncate_prompt_left"
    n_kept_without_completion: int = 0  # kept with zero completion tokens (policy "keep")
    n_turns_dropped: int = 0  # chat: conversations whose oldest exchanges "truncate_prompt_left" dropped
    examples_lost_completion: List[int] = field(default_factory=list)  # indices (first 20)

    def summary(self) -> str:
        return (
            f"{self.n_instances} instances, model_max_length={self.model_max_length}: "
            f"{self.n_truncated} truncated, {self.n_lost_completion} lost every completion token "
            f"(policy {self.policy}: {self.n_dropped} dropped, {self.n_prompt_left_truncated} "
            f"prompt-left-truncated, {self.n_kept_without_completion} kept without completion)"
            + (f"; {self.n_turns_dropped} conversations lost their oldest turns" if self.n_turns_dropped else "")
        )

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def _ids(tokenizer, text: str, max_length: Optional[int]) -> List[int]:
    if max_length is None:
        return list(tokenizer(text).input_ids)
    return list(tokenizer(text, max_length=max_length, truncation=True).input_ids)


def tokenize_instance(
    record: Mapping[str, Any], tokenizer, model_max_length: int = 512, truncation: str = "keep"
) -> Optional[TokenizedInstance]:
    """Tokenise one record as Alpaca does; apply the truncation ``policy``.

    Returns ``None`` when the policy is ``drop`` and the instance lost every completion token.
    """
    source, target = render(record, tokenizer.eos_token)
    full = _ids(tokenizer, source + target, model_max_length)
    n_src = len(_ids(tokenizer, source, model_max_length))
    return _finish_instance(source, target, full, n_src, tokenizer, model_max_length, truncation)


def _finish_instance(
    source: str, target: str, full: List[int], n_src: int, tokenizer, model_max_length: int, truncation: str
) -> Optional[TokenizedInstance]:
    if truncation not in TRUNCATION_POLICIES:
        raise ValueError(f"truncation policy must be one of {TRUNCATION_POLICIES}, got {truncation!r}")
    n_prompt = min(n_src, len(full))
    lost = n_prompt >= len(full)
    # Right truncation cut something iff the sequence fills the budget and the untruncated one is
    # longer; only pay for the untruncated tokenisation when the budget is full.
    truncated = False
    untrunc: Optional[List[int]] = None
    if len(full) >= model_max_length:
        untrunc = _ids(tokenizer, source + target, None)
        truncated = len(untrunc) > len(full)
    inst = TokenizedInstance(list(full), n_prompt, truncated=truncated, lost_completion=lost)
    if not lost or truncation == "keep":
        return inst
    if truncation == "drop":
        return None
    # truncate_prompt_left: splice at token level (no re-tokenisation).
    assert untrunc is not None
    n_src_full = len(_ids(tokenizer, source, None))
    prompt, completion = untrunc[:n_src_full], untrunc[n_src_full:]
    new_prompt, dropped = _cut_prompt_left(prompt, len(completion), tokenizer.bos_token_id, model_max_length)
    ids = (new_prompt + completion)[:model_max_length]
    return TokenizedInstance(
        ids, len(new_prompt), truncated=True, lost_completion=True, prompt_tokens_dropped_left=dropped
    )


def _cut_prompt_left(prompt: List[int], n_completion: int, bos_id, model_max_length: int) -> Tuple[List[int], int]:
    """``prompt`` with tokens dropped from the left, right after a leading BOS, so that it and
    ``n_completion`` tokens fit ``model_max_length`` (down to BOS alone); returns it and the number
    of tokens dropped."""
    head = prompt[:1] if prompt and bos_id is not None and prompt[0] == bos_id else []
    body = prompt[len(head) :]
    budget = max(model_max_length - len(head) - n_completion, 0)  # prompt-body tokens that fit
    kept_body = body[len(body) - budget :] if budget > 0 else []
    return head + kept_body, len(body) - len(kept_body)


def _batched_tokenize(records: Iterable[Mapping[str, Any]], tokenizer, model_max_length: int, batch_size: int):
    """Yield ``(source, target, full_ids, n_source_ids)``; batched calls give the same ids as single ones."""
    buf: List[Tuple[str, str]] = []

    def flush():
        srcs = [s for s, _ in buf]
        fulls = [s + t for s, t in buf]
        f_ids = tokenizer(fulls, max_length=model_max_length, truncation=True).input_ids
        s_ids = tokenizer(srcs, max_length=model_max_length, truncation=True).input_ids
        for (s, t), f, si in zip(buf, f_ids, s_ids):
            yield s, t, list(f), len(si)

    for rec in records:
        buf.append(render(rec, tokenizer.eos_token))
        if len(buf) >= batch_size:
            yield from flush()
            buf = []
    if buf:
        yield from flush()


def chat_instance(
    record: Mapping[str, Any],
    tokenizer,
    model_max_length: int = 512,
    truncation: str = "keep",
    completion_turns: str = "all",
) -> Optional[TokenizedInstance]:
    """A chat record (``messages``) rendered by the tokenizer's chat template with the role of every
    token (:func:`pipeline.chat.render`; ``completion_turns``: which assistant turns are the
    completion), then fitted into ``model_max_length``:

    - ``keep`` / ``drop``: cut on the right, as for Alpaca records; ``drop`` removes an instance
      that lost every completion token.
    - ``truncate_prompt_left``: the prompt is cut from the left, by whole turns first: the oldest
      exchanges (a user message and its answer; a system message stays) are dropped until the
      conversation fits or only the last exchange is left, so the final answer is not cut while
      older turns could go. If the last exchange alone still loses its whole answer, its prompt
      tokens are cut from the left after BOS as for Alpaca records.
    """
    msgs = list(record["messages"])
    ex = chat.render(tokenizer, msgs, completion_turns)
    dropped_turns = dropped_tokens = 0
    if truncation == "truncate_prompt_left" and len(ex.input_ids) > model_max_length:
        head = msgs[:1] if msgs[0]["role"] == "system" else []
        turns = msgs[len(head) :]
        n_before = len(ex.input_ids)
        while len(ex.input_ids) > model_max_length and len(turns) > 2:
            turns = turns[2:]  # the oldest user message and its answer
            dropped_turns += 1
            ex = chat.render(tokenizer, head + turns, completion_turns)
        dropped_tokens = n_before - len(ex.input_ids) if dropped_turns else 0
    ids, mask = ex.input_ids[:model_max_length], ex.completion_mask[:model_max_length]
    truncated = len(ex.input_ids) > model_max_length or dropped_turns > 0
    lost = not any(mask[1:])
    if lost and truncation == "drop":
        return None
    if lost and truncation == "truncate_prompt_left":
        ids, mask, cut = _chat_cut_prompt_left(ex, tokenizer, model_max_length)
        dropped_tokens += cut
    n_prompt = mask.index(True) if True in mask else len(ids)
    return TokenizedInstance(
        ids,
        n_prompt,
        truncated=truncated,
        lost_completion=lost,
        prompt_tokens_dropped_left=dropped_tokens,
        completion_mask=mask,
        turns_dropped=dropped_turns,
    )


def _chat_cut_prompt_left(
    ex: "chat.ChatExample", tokenizer, model_max_length: int
) -> Tuple[List[int], List[bool], int]:
    """The last exchange with its prompt tokens cut from the left (after BOS) so its answer fits
    (Alpaca's ``truncate_prompt_left`` at token level, :func:`_cut_prompt_left`); returns ids,
    mask, tokens removed."""
    ids, mask = ex.input_ids, ex.completion_mask
    first = mask.index(True)
    prompt, dropped = _cut_prompt_left(ids[:first], len(ids) - first, tokenizer.bos_token_id, model_max_length)
    new_ids = (prompt + ids[first:])[:model_max_length]
    new_mask = ([False] * len(prompt) + mask[first:])[:model_max_length]
    return new_ids, new_mask, dropped


def _tokenize_each(records, tokenizer, model_max_length: int, truncation: str, completion_turns: str = "all"):
    """Yield one instance (or None: dropped) per record: chat records through the chat template."""
    for r in records:
        if "messages" in r:
            yield chat_instance(r, tokenizer, model_max_length, truncation, completion_turns)
        else:
            yield tokenize_instance(r, tokenizer, model_max_length, truncation)


def tokenize_records(
    records: Iterable[Mapping[str, Any]],
    tokenizer,
    model_max_length: int = 512,
    truncation: str = "keep",
    batch_size: int = 512,
    completion_turns: str = "all",
) -> Tuple[List[TokenizedInstance], TruncationReport]:
    """Tokenise many records (batched; chat records one by one through the chat template, with
    ``completion_turns`` of their assistant turns as the completion); returns the kept instances
    and a :class:`TruncationReport`."""
    report = TruncationReport(policy=truncation, model_max_length=model_max_length)
    if truncation not in TRUNCATION_POLICIES:
        raise ValueError(f"truncation policy must be one of {TRUNCATION_POLICIES}, got {truncation!r}")
    out: List[TokenizedInstance] = []
    records = list(records)
    if any("messages" in r for r in records):
        instances = _tokenize_each(records, tokenizer, model_max_length, truncation, completion_turns)
    else:
        instances = (
            _finish_instance(source, target, full, n_src, tokenizer, model_max_length, truncation)
            for source, target, full, n_src in _batched_tokenize(records, tokenizer, model_max_length, batch_size)
        )
    for i, inst in enumerate(instances):
        report.n_instances += 1
        if inst is None:
            report.n_truncated += 1
            report.n_lost_completion += 1
            report.n_dropped += 1
            if len(report.examples_lost_completion) < 20:
                report.examples_lost_completion.append(i)
            continue
        report.n_truncated += int(inst.truncated)
        report.n_turns_dropped += int(inst.turns_dropped > 0)
        if inst.lost_completion:
            report.n_lost_completion += 1
            if len(report.examples_lost_completion) < 20:
                report.examples_lost_completion.append(i)
            if inst.prompt_tokens_dropped_left or truncation == "truncate_prompt_left":
                report.n_prompt_left_truncated += 1
            else:
                report.n_kept_without_completion += 1
        out.append(inst)
    return out, report


# --------------------------------------------------------------------------------------------
# Labels and weights
# --------------------------------------------------------------------------------------------
def build_example(
    input_ids: Sequence[int],
    n_prompt: int,
    plw: float,
    completion_weight: float = 1.0,
    mask_zero_weight_labels: bool = True,
    completion_mask: Optional[Sequence[bool]] = None,
) -> Dict[str, torch.Tensor]:
    """``input_ids``, ``labels``, ``weights``, ``prompt_mask`` for one sequence (see module docstring).

    ``n_prompt`` = number of leading prompt positions (BOS included); chat data gives the role of
    every token instead (``completion_mask``; the prompt is everything else). The weights are
    :func:`pipeline.loss.token_weights` of the prompt-target and completion-target masks.
    """
    ids = torch.as_tensor(list(input_ids), dtype=torch.long)
    L = ids.numel()
    n_prompt = max(0, min(int(n_prompt), L))
    pos = torch.arange(L)
    if completion_mask is not None:
        comp = torch.as_tensor(list(completion_mask), dtype=torch.bool)
        prompt_mask = (~comp) & (pos >= 1)
        completion_mask = comp & (pos >= 1)
    else:
        prompt_mask = (pos < n_prompt) & (pos >= 1)
        completion_mask = pos >= max(n_prompt, 1)  # position 0 has no target
    weights = token_weights(prompt_mask, completion_mask, plw, completion_weight)
    labels = ids.clone()
    if L:
        labels[0] = IGNORE_INDEX
    if mask_zero_weight_labels:
        labels[weights == 0] = IGNORE_INDEX
    return {"input_ids": ids, "labels": labels, "weights": weights, "prompt_mask": prompt_mask}


def build_examples(
    instances: Iterable[TokenizedInstance],
    plw: float,
    completion_weight: float = 1.0,
    mask_zero_weight_labels: bool = True,
) -> List[Dict[str, torch.Tensor]]:
    return [
        build_example(t.input_ids, t.n_prompt, plw, completion_weight, mask_zero_weight_labels, t.completion_mask)
        for t in instances
    ]


def preprocess_records(
    records: Iterable[Mapping[str, Any]],
    tokenizer,
    *,
    plw: float,
    completion_weight: float = 1.0,
    model_max_length: int = 512,
    truncation: str = "keep",
    mask_zero_weight_labels: bool = True,
    completion_turns: str = "all",
) -> Tuple[List[Dict[str, torch.Tensor]], TruncationReport]:
    """Render, tokenise, truncate and weight records in one go (``tokenize_records`` + ``build_examples``)."""
    instances, report = tokenize_records(
        records, tokenizer, model_max_length, truncation, completion_turns=completion_turns
    )
    return build_examples(instances, plw, completion_weight, mask_zero_weight_labels), report


# --------------------------------------------------------------------------------------------
# Collation
# --------------------------------------------------------------------------------------------
@dataclass
class Collator:
    """Right-pads a list of :func:`build_example` dicts into a batch.

    Pads ``input_ids`` with ``pad_token_id``, ``labels`` with -100, ``weights`` with 0,
    ``prompt_mask`` with False; ``attention_mask`` comes from the true lengths (not from
    ``input_ids != pad``, so a pad id equal to a real token id is harmless).
    """

    pad_token_id: int
    pad_to_multiple_of: Optional[int] = None

    def __call__(self, examples: Sequence[Mapping[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("empty batch")
        lengths = [int(torch.as_tensor(e["input_ids"]).numel()) for e in examples]
        T = max(lengths)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            T = ((T + m - 1) // m) * m
        B = len(examples)
        batch = {
            "input_ids": torch.full((B, T), int(self.pad_token_id), dtype=torch.long),
            "labels": torch.full((B, T), IGNORE_INDEX, dtype=torch.long),
            "weights": torch.zeros((B, T), dtype=torch.float32),
            "prompt_mask": torch.zeros((B, T), dtype=torch.bool),
            "attention_mask": torch.zeros((B, T), dtype=torch.long),
        }
        for i, (e, n) in enumerate(zip(examples, lengths)):
            batch["input_ids"][i, :n] = torch.as_tensor(e["input_ids"])
            batch["labels"][i, :n] = torch.as_tensor(e["labels"])
            batch["weights"][i, :n] = torch.as_tensor(e["weights"], dtype=torch.float32)
            if "prompt_mask" in e:
                batch["prompt_mask"][i, :n] = torch.as_tensor(e["prompt_mask"], dtype=torch.bool)
            batch["attention_mask"][i, :n] = 1
        return batch


# --------------------------------------------------------------------------------------------
# Inspection
# --------------------------------------------------------------------------------------------
def inspect_examples(
    examples: Sequence[Mapping[str, Any]],
    tokenizer,
    max_examples: Optional[int] = None,
) -> List[Dict[str, Any]]:
    """Per-token rows ``{example, position, token, token_id, role, weight, label, is_target}``.

    Accepts a list of :func:`build_example` dicts or one collated batch (a dict of 2-D tensors).
    ``role`` is the role of the token at that position (prompt / completion / pad; position 0, BOS,
    is a prompt token that is never a target); ``weight`` is the weight of the loss term whose
    target is this token. Rows serialise to JSONL as they are (see :func:`rows_to_jsonl`).
    """
    if isinstance(examples, Mapping):  # collated batch
        b = examples
        seqs = []
        for i in range(b["input_ids"].shape[0]):
            n = int(b["attention_mask"][i].sum()) if "attention_mask" in b else b["input_ids"].shape[1]
            seqs.append({k: b[k][i] for k in ("input_ids", "labels", "weights", "prompt_mask") if k in b} | {"_len": n})
        examples = seqs
    rows: List[Dict[str, Any]] = []
    for ei, e in enumerate(examples):
        if max_examples is not None and ei >= max_examples:
            break
        ids = torch.as_tensor(e["input_ids"]).tolist()
        labels = torch.as_tensor(e["labels"]).tolist()
        weights = torch.as_tensor(e["weights"], dtype=torch.float32).tolist()
        pm = torch.as_tensor(e["prompt_mask"]).tolist() if "prompt_mask" in e else None
        n = e.get("_len", len(ids))
        # n_prompt: first completion-target position (prompt_mask is False at 0 and for completion).
        if pm is not None:
            n_prompt = 1 + sum(1 for j in range(1, n) if pm[j]) if n else 0
        else:
            n_prompt = next((j for j in range(1, n) if labels[j] != IGNORE_INDEX), n)
        for j, tid in enumerate(ids):
            if j >= n:
                role = ROLE_PAD
            elif j < n_prompt:
                role = ROLE_PROMPT
            else:
                role = ROLE_COMPLETION
            if role == ROLE_PAD:
                tok = "<pad>"
            else:
                tok = tokenizer.convert_ids_to_tokens(int(tid))
                tok = tok if isinstance(tok, str) else repr(tok)
            rows.append(
                {
                    "example": ei,
                    "position": j,
                    "token": tok,
                    "token_id": int(tid),
                    "role": role,
                    "weight": float(weights[j]),
                    "label": int(labels[j]),
                    "is_target": bool(j >= 1 and role != ROLE_PAD and labels[j] != IGNORE_INDEX),
                }
            )
    return rows


def rows_to_jsonl(rows: Iterable[Mapping[str, Any]]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def format_rows(rows: Sequence[Mapping[str, Any]]) -> str:
    """A plain fixed-width table of :func:`inspect_examples` rows for a terminal."""
    header = f"{'ex':>3} {'pos':>4} {'token':<20} {'id':>7} {'role':<10} {'weight':>10} {'label':>7}"
    lines = [header, "-" * len(header)]
    for r in rows:
        tok = r["token"].replace("\n", "\\n")
        tok = tok if len(tok) <= 20 else tok[:19] + "…"
        lines.append(
            f"{r['example']:>3} {r['position']:>4} {tok:<20} {r['token_id']:>7} {r['role']:<10} "
            f"{r['weight']:>10.4g} {r['label']:>7}"
        )
    return "\n".join(lines)

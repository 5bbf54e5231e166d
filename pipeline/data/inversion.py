"""Prompt inversion (docs/study.md section 4; paper appendix A). Pure functions: no I/O, no tokenizer.

Token lengths come from a *length function* ``LengthFn = Callable[[Sequence[str]], List[int]]``
(a batch of texts -> token counts). The pipeline passes the LLaMA tokenizer's counts of each field
text on its own (``add_special_tokens=False``: no template, no BOS/EOS); tests pass trivial ones
(e.g. words). An instance's prompt = instruction + input tokens, completion = output tokens,
``R_g = completion / prompt``; a dataset's ``R_g = sum(completion) / sum(prompt)``.

- :func:`invert`: one record -> its prompt-inverted record (the original instruction becomes the
  completion, the original output the input; a fixed instruction asks for the prompt).
- Short (``target_rg=None``): invert every instance with ``R_g > 1``.
- Medium/Tiny (``target_rg=t``): choose instances so that the dataset R_g is within ``tolerance``
  (relative) of ``t``. With ``f = C - t * P`` (linear in the choice), inverting instance i changes
  f by ``d_i``. The candidates are the instances whose ``d_i`` moves f toward 0; they are taken in
  the order of ``sha256(seed, record content)`` (independent of file order and of the Python
  version), and the shortest prefix whose cumulative change makes f cross 0 is found; of the two
  prefixes at the crossing, the one whose R_g is closer to t is chosen. An unreachable target
  raises :class:`InversionError` giving the achievable range (exact, by Dinkelbach's method).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

# Bump when anything here changes which records are produced (part of the processed-dataset hash).
TRANSFORM_VERSION = 1

INSTRUCTION_NO_INPUT = "Predict the prompt that generated the following AI output."
INSTRUCTION_WITH_INPUT = (
    "Predict the prompt that generated the below AI output given the following context. Context: {input}"
)

Record = Dict[str, Any]
LengthFn = Callable[[Sequence[str]], List[int]]


class InversionError(ValueError):
    """The requested target R_g cannot be reached (the message gives the achievable range)."""


def per_text(fn: Callable[[str], int]) -> LengthFn:
    """Turn a one-text length function into a batch one (for tests and simple uses)."""
    return lambda texts: [int(fn(t)) for t in texts]


def invertible(record: Record) -> bool:
    """Alpaca records always; chat records when single-turn (one user message and its answer, a
    system message allowed): a multi-turn conversation has no single prompt to predict."""
    if "messages" not in record:
        return True
    return [m["role"] for m in record["messages"] if m["role"] != "system"] == ["user", "assistant"]


def invert(record: Record) -> Record:
    """The prompt-inverted record (``inverted: True``); other keys of ``record`` are not kept.

    A single-turn chat record becomes the conversation asking for the prompt: the user message is
    the fixed instruction, a blank line and the original answer; the answer is the original user
    message (a chat record's user message holds instruction and input together, so the instruction
    without context is used); a system message stays."""
    if "messages" in record:
        if not invertible(record):
            raise InversionError("only single-turn conversations can be prompt-inverted")
        msgs = record["messages"]
        system = [m for m in msgs if m["role"] == "system"]
        user = next(m["content"] for m in msgs if m["role"] == "user")
        answer = next(m["content"] for m in msgs if m["role"] == "assistant")
        ask = f"{INSTRUCTION_NO_INPUT}\n\n{answer}"
        return {
            "instruction": ask,
            "input": "",
            "output": user,
            "inverted": True,
            "messages": [*system, {"role": "user", "content": ask}, {"role": "assistant", "content": user}],
        }
    ins, inp, out = record["instruction"], record.get("input", ""), record["output"]
    new_ins = INSTRUCTION_NO_INPUT if inp == "" else INSTRUCTION_WITH_INPUT.format(input=inp)
    return {"instruction": new_ins, "input": out, "output": ins, "inverted": True}


@dataclass(frozen=True)
class Lengths:
    instruction: int
    input: int
    output: int

    @property
    def prompt(self) -> int:
        return self.instruction + self.input

    @property
    def completion(self) -> int:
        return self.output

    @property
    def rg(self) -> float:
        return ratio(self.completion, self.prompt)


def ratio(completion: float, prompt: float) -> float:
    """completion / prompt; 0/0 = nan, x/0 = inf."""
    if prompt == 0:
        return math.nan if completion == 0 else math.inf
    return completion / prompt


def measure(records: Sequence[Record], length: LengthFn, completion_turns: str = "all") -> List[Lengths]:
    """Token lengths of each field of each record (one batched call per field).

    Chat records (``messages``): each message's content alone; the counted assistant contents
    (``completion_turns``: all of them, or the last) are the completion, every other content the
    prompt (``instruction``; ``input`` 0), the template excluded as for Alpaca (docs/study.md
    section 1)."""
    if any("messages" in r for r in records):
        return [
            _chat_lengths(r, length, completion_turns) if "messages" in r else measure([r], length)[0] for r in records
        ]
    ins = length([r["instruction"] for r in records])
    inp = length([r.get("input", "") for r in records])
    out = length([r["output"] for r in records])
    return [Lengths(a, b, c) for a, b, c in zip(ins, inp, out)]


def _chat_lengths(record: Record, length: LengthFn, completion_turns: str = "all") -> Lengths:
    msgs = record["messages"]
    n = length([m["content"] for m in msgs])
    answers = [k for k, m in zip(n, msgs) if m["role"] == "assistant"]
    completion = sum(answers) if completion_turns == "all" else answers[-1]
    return Lengths(sum(n) - completion, 0, completion)


def inverted_lengths(records: Sequence[Record], orig: Sequence[Lengths], length: LengthFn) -> List[Lengths]:
    """Token lengths of every record's inverted version, reusing the original fields' counts.

    Only the new instruction is measured (the new input is the old output, the new output the old
    instruction; each field is measured on its own, so their counts carry over exactly). Chat
    records are measured whole (their new user message holds the old answer); a multi-turn one
    cannot be inverted and keeps its lengths (it is never chosen).
    """
    if any("messages" in r for r in records):
        return [
            (_chat_lengths(invert(r), length) if invertible(r) else o)
            if "messages" in r
            else inverted_lengths([r], [o], length)[0]
            for r, o in zip(records, orig)
        ]
    new_ins = length([invert(r)["instruction"] for r in records])
    return [Lengths(a, o.output, o.instruction) for a, o in zip(new_ins, orig)]


def dataset_rg(lengths: Sequence[Lengths]) -> float:
    return ratio(sum(x.completion for x in lengths), sum(x.prompt for x in lengths))


def order_key(record: Record, seed: int) -> str:
    """The candidate order for target selection: sha256 of the seed and the record's content."""
    fields = [record["instruction"], record.get("input", ""), record["output"]]
    if "messages" in record:  # chat: the whole conversation
        fields.append(record["messages"])
    content = json.dumps(fields, ensure_ascii=False)
    return hashlib.sha256(f"{int(seed)}\n{content}".encode("utf-8")).hexdigest()


def select_short(orig: Sequence[Lengths], records: Optional[Sequence[Record]] = None) -> List[bool]:
    """Short datasets: invert every instance whose R_g > 1 (completion > prompt tokens) and that
    can be inverted (:func:`invertible`; ``records`` omitted: all can)."""
    ok = [True] * len(orig) if records is None else [invertible(r) for r in records]
    return [x.completion > x.prompt and o for x, o in zip(orig, ok)]


def _totals(orig: Sequence[Lengths], inv: Sequence[Lengths], choice: Sequence[bool]) -> Tuple[int, int]:
    c = p = 0
    for o, v, ch in zip(orig, inv, choice):
        x = v if ch else o
        c += x.completion
        p += x.prompt
    return c, p


def achievable_range(orig: Sequence[Lengths], inv: Sequence[Lengths]) -> Tuple[float, float]:
    """The lowest and highest dataset R_g over every choice of instances to invert (exact).

    Dinkelbach's method: for the minimum, start at t = R_g(no inversion), choose per instance the
    version minimising ``c - t p``, set t to the resulting dataset R_g, repeat until it stops falling.
    """

    def extreme(sign: int) -> float:
        c, p = _totals(orig, inv, [False] * len(orig))
        t = ratio(c, p)
        for _ in range(1000):
            choice = []
            for o, v in zip(orig, inv):
                a = o.completion - t * o.prompt
                b = v.completion - t * v.prompt
                choice.append(b < a if sign < 0 else b > a)
            c, p = _totals(orig, inv, choice)
            t_new = ratio(c, p)
            if (sign < 0 and not t_new < t) or (sign > 0 and not t_new > t):
                return t
            t = t_new
        return t

    return extreme(-1), extreme(+1)


@dataclass
class Selection:
    """Which instances to invert and what that gives."""

    invert: List[bool]
    rg_before: float
    rg_after: float
    target_rg: Optional[float] = None
    tolerance: Optional[float] = None
    n_candidates: int = 0
    info: Dict[str, Any] = field(default_factory=dict)

    @property
    def n_inverted(self) -> int:
        return sum(self.invert)


def select_for_target(
    records: Sequence[Record],
    orig: Sequence[Lengths],
    inv: Sequence[Lengths],
    target_rg: float,
    tolerance: float,
    seed: int,
) -> Selection:
    """Choose instances to invert so the dataset R_g is within ``tolerance`` (relative) of the target.

    See the module docstring for the algorithm. Deterministic in (records, lengths, target, seed);
    the result does not depend on the order of the records.
    """
    if not (target_rg > 0 and math.isfinite(target_rg)):
        raise InversionError(f"target R_g must be a positive number, got {target_rg}")
    if not 0 < tolerance < 1:
        raise InversionError(f"tolerance must be in (0, 1), got {tolerance}")
    n = len(records)
    if n == 0:
        raise InversionError("no records to choose from")
    t = float(target_rg)
    c0, p0 = _totals(orig, inv, [False] * n)
    rg0 = ratio(c0, p0)

    def close(rg: float) -> bool:
        return abs(rg - t) <= tolerance * t

    choice = [False] * n
    if close(rg0):
        return Selection(choice, rg0, rg0, t, tolerance, 0, {"prefix": 0})

    f0 = c0 - t * p0
    d = [(v.completion - o.completion) - t * (v.prompt - o.prompt) for o, v in zip(orig, inv)]
    want_down = f0 > 0  # R_g too high: take instances that lower f
    cands = [i for i in range(n) if (d[i] < 0 if want_down else d[i] > 0)]
    cands.sort(key=lambda i: (order_key(records[i], seed), i))

    f = f0
    crossing = None
    for k, i in enumerate(cands):
        f_next = f + d[i]
        if (f_next <= 0) if want_down else (f_next >= 0):
            crossing = k
            break
        f = f_next
    if crossing is None:
        lo, hi = achievable_range(orig, inv)
        raise InversionError(
            f"target R_g {t:g} is not reachable by inverting instances of this dataset: the achievable "
            f"dataset R_g range is [{lo:.4f}, {hi:.4f}] (no inversion: {rg0:.4f}); choose a target in "
            f"that range (dataset.transform.target_rg)"
        )

    # Prefix lengths `crossing` (f still on the starting side) and `crossing + 1` (crossed).
    best = None
    for k in (crossing, crossing + 1):
        ch = [False] * n
        for i in cands[:k]:
            ch[i] = True
        c, p = _totals(orig, inv, ch)
        rg = ratio(c, p)
        if best is None or abs(rg - t) < abs(best[1] - t):
            best = (ch, rg, k)
    choice, rg, k = best
    if not close(rg):
        lo, hi = achievable_range(orig, inv)
        raise InversionError(
            f"target R_g {t:g} could not be met within tolerance {tolerance:g}: the closest choice in "
            f"seed order gives {rg:.4f} (instances are too coarse near the target; achievable range "
            f"[{lo:.4f}, {hi:.4f}]); raise dataset.transform.tolerance or change the seed"
        )
    return Selection(choice, rg0, rg, t, tolerance, len(cands), {"prefix": k})


def apply_selection(records: Sequence[Record], choice: Sequence[bool]) -> List[Record]:
    """Records with the chosen ones inverted; every record carries an ``inverted`` flag."""
    out = []
    for r, ch in zip(records, choice):
        if ch:
            out.append(invert(r))
        else:
            keep = {
                "instruction": r["instruction"],
                "input": r.get("input", ""),
                "output": r["output"],
                "inverted": False,
            }
            if "messages" in r:
                keep["messages"] = r["messages"]
            out.append(keep)
    return out


def transform(
    records: Sequence[Record],
    length: LengthFn,
    target_rg: Optional[float] = None,
    tolerance: float = 0.01,
    seed: int = 0,
    orig: Optional[Sequence[Lengths]] = None,
    completion_turns: str = "all",
) -> Tuple[List[Record], List[Lengths], Selection]:
    """Prompt-invert a dataset: Short (``target_rg=None``) or to a target R_g.

    Returns the new records (with ``inverted`` flags), their token lengths, and the selection.
    ``orig`` may pass precomputed lengths of ``records``. Chat records: single-turn ones can be
    inverted (:func:`invert`); ``completion_turns`` defines the completion of multi-turn ones.
    """
    orig = list(orig) if orig is not None else measure(records, length, completion_turns)
    inv = inverted_lengths(records, orig, length)
    if target_rg is None:
        choice = select_short(orig, records)
        c, p = _totals(orig, inv, choice)
        sel = Selection(choice, dataset_rg(orig), ratio(c, p), None, None, sum(choice))
    else:
        sel = select_for_target(records, orig, inv, target_rg, tolerance, seed)
    new_records = apply_selection(records, sel.invert)
    new_lengths = [v if ch else o for o, v, ch in zip(orig, inv, sel.invert)]
    return new_records, new_lengths, sel

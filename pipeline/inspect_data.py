"""See how instances are tokenized and weighted before spending GPU hours on them.

Usage::

    python -m pipeline.inspect_data dataset=<name> model=<name> plw=0.1 [n=3] [offset=0] [out=path.jsonl]
                                    [table=true] [color=auto|always|never] [hydra overrides ...]
    make inspect-data OVERRIDES="dataset=shared_alpaca52k model=tiny plw=0.1 n=2"

For ``n`` instances (from record ``offset`` of the processed dataset) it prints

* the rendered text, prompt and completion in different colours (or labelled ``PROMPT``/``COMPLETION``
  without colour), with the per-token weight each part gets;
* a token table: position, token, id, role (prompt / completion), weight and label, with every
  prompt/completion boundary marked by a line (``format_rows`` of :mod:`pipeline.preprocess`);

then the truncation report of the whole dataset at ``train.model_max_length`` under
``train.truncation`` (how many instances were cut, how many lost every completion token and what the
policy did with them). The same token rows (``inspect_examples``: ``example, position, token,
token_id, role, weight, label, is_target`` plus ``record`` and ``source_index``) go to a JSONL file
(``out=``; default ``<paths.reports_dir>/inspect_data/<dataset>__<model>__plw<plw>.jsonl``) and the
report and per-instance summaries to ``<out>.meta.json``.

Chat data (``dataset.source.format=messages``) is rendered by the model's chat template with the role
of every token (:mod:`pipeline.chat`): the counted assistant turns (``dataset.completion_turns``: all,
or the last) are completion, everything else (system, user, earlier answers under ``last``, template
tokens) prompt, so a conversation shows several prompt and completion parts in order.

Weights are the training weights (docs/study.md section 1): :func:`pipeline.preprocess.build_example`,
i.e. the weight rule :func:`pipeline.loss.token_weights`. The weight on a row is the weight of the loss
term whose *target* is that token; position 0 (BOS, or the first prompt token when the tokenizer adds
none) has no target (weight 0); prompt targets get ``plw``, completion targets ``completion_weight`` (1).
Only the model's tokenizer is loaded (no weights), so this works for 7B configs too as long as their
tokenizer is available offline (``model.tokenizer=/path/to/folder``).
The pad token a training run may add (Alpaca's ``[PAD]``) never occurs in rendered text, so it
changes no id shown here.

Exit status: 0 ok; 1 data, tokenizer or chat-template problem (one line; for data it names file, record
and field); 2 bad arguments or config.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from tqdm.auto import tqdm

from pipeline import cli
from pipeline.chat import ChatError
from pipeline.config import load_config
from pipeline.data.build import load_dataset
from pipeline.data.inversion import InversionError
from pipeline.data.records import DataError
from pipeline.data.sources import SourceError
from pipeline.models import ModelLoadError, load_tokenizer_for
from pipeline.preprocess import (
    ROLE_COMPLETION,
    ROLE_PROMPT,
    TokenizedInstance,
    TruncationReport,
    build_example,
    format_rows,
    inspect_examples,
    rows_to_jsonl,
    tokenize_records,
)
from pipeline.runs import atomic_write_text
from pipeline.tokenizer import TokenizerError

log = logging.getLogger(__name__)

EXTRA_KEYS = ("n", "offset", "out", "table", "color")
SCAN_BATCH = 1024
# the counters of a TruncationReport, summed over the batches of a scan
_COUNTS = tuple(f.name for f in fields(TruncationReport) if f.name.startswith("n_"))

_ANSI = {
    "prompt": "\033[36m",
    "completion": "\033[32m",
    "boundary": "\033[1;33m",
    "dim": "\033[2m",
    "bold": "\033[1m",
    "reset": "\033[0m",
}


class UsageError(cli.UsageError):
    """A bad command-line argument (not a config key)."""


# --------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------
def split_args(argv: Sequence[str]) -> Tuple[Dict[str, Any], List[str]]:
    """Separate this command's own keys (``n``, ``offset``, ``out``, ``table``, ``color``) from the
    Hydra overrides; returns ``(options, overrides)`` with validated option values."""
    opts: Dict[str, Any] = {"n": 3, "offset": 0, "out": None, "table": True, "color": "auto"}
    rest: List[str] = []
    for a in argv:
        key, sep, value = a.partition("=")
        if not sep or key not in EXTRA_KEYS:
            rest.append(a)
            continue
        if key in ("n", "offset"):
            try:
                v = int(value)
            except ValueError:
                raise UsageError(f"argument '{key}': expected an integer, got {value!r}") from None
            if v < (1 if key == "n" else 0):
                raise UsageError(f"argument '{key}': must be >= {1 if key == 'n' else 0}, got {v}")
            opts[key] = v
        elif key == "table":
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise UsageError(f"argument 'table': expected true or false, got {value!r}")
            opts[key] = value.lower() in ("true", "1", "yes")
        elif key == "color":
            if value not in ("auto", "always", "never"):
                raise UsageError(f"argument 'color': expected auto, always or never, got {value!r}")
            opts[key] = value
        else:
            if not value:
                raise UsageError("argument 'out': empty path")
            opts[key] = value
    return opts, rest


def default_out(cfg) -> Path:
    plw = f"{float(cfg.plw):g}"
    name = f"{cfg.dataset.name}__{cfg.model.name}__plw{plw}.jsonl"
    return Path(str(cfg.paths.reports_dir)).expanduser() / "inspect_data" / re.sub(r"[^\w.+-]", "_", name)


# --------------------------------------------------------------------------------------------
# Pure pieces
# --------------------------------------------------------------------------------------------
def scan_truncation(
    records: Sequence[Mapping[str, Any]],
    tokenizer,
    model_max_length: int,
    truncation: str,
    progress: bool = True,
    completion_turns: str = "all",
):
    """The :class:`~pipeline.preprocess.TruncationReport` of all ``records`` (batched, with progress;
    chat records with ``completion_turns`` of their assistant turns as the completion)."""
    total = TruncationReport(policy=truncation, model_max_length=model_max_length)
    bar = tqdm(
        total=len(records),
        desc="tokenizing (truncation report)",
        unit="inst",
        disable=not progress,
        file=sys.stderr,
        leave=False,
    )
    for start in range(0, len(records), SCAN_BATCH):
        chunk = records[start : start + SCAN_BATCH]
        _, rep = tokenize_records(chunk, tokenizer, model_max_length, truncation, completion_turns=completion_turns)
        for k in _COUNTS:
            setattr(total, k, getattr(total, k) + getattr(rep, k))
        room = 20 - len(total.examples_lost_completion)
        total.examples_lost_completion += [start + i for i in rep.examples_lost_completion[: max(room, 0)]]
        bar.update(len(chunk))
    bar.close()
    return total


def inspect_instances(
    records: Sequence[Mapping[str, Any]],
    indices: Sequence[int],
    tokenizer,
    *,
    plw: float,
    completion_weight: float,
    model_max_length: int,
    truncation: str,
    completion_turns: str = "all",
) -> Tuple[List[Dict[str, Any]], List[Dict[str, Any]]]:
    """Token rows (``inspect_examples`` + ``record``/``source_index``) and one summary per instance,
    tokenized as training tokenizes them (:func:`pipeline.preprocess.tokenize_records`: chat records
    through the chat template, ``completion_turns`` of their assistant turns the completion)."""
    rows: List[Dict[str, Any]] = []
    summaries: List[Dict[str, Any]] = []
    for k, idx in enumerate(indices):
        rec = records[idx]
        kept, _ = tokenize_records([rec], tokenizer, model_max_length, truncation, completion_turns=completion_turns)
        inst = kept[0] if kept else None
        summ: Dict[str, Any] = {
            "example": k,
            "record": idx,
            "source_index": rec.get("source_index"),
            "inverted": bool(rec.get("inverted", False)),
        }
        if inst is None:
            summ.update(dropped=True, tokens=0)
            summaries.append(summ)
            continue
        ex = build_example(inst.input_ids, inst.n_prompt, plw, completion_weight, completion_mask=inst.completion_mask)
        ex_rows = inspect_examples([ex], tokenizer)
        for r in ex_rows:
            r["role"] = _role(r, inst)
            r["weight"] = _shortest(r["weight"])
            r["example"] = k
            r["record"] = idx
            r["source_index"] = rec.get("source_index")
        rows += ex_rows
        summ.update(
            dropped=False,
            tokens=len(inst.input_ids),
            prompt_tokens=len(inst.input_ids) - inst.n_completion,
            completion_tokens=inst.n_completion,
            truncated=inst.truncated,
            lost_completion=inst.lost_completion,
            prompt_tokens_dropped_left=inst.prompt_tokens_dropped_left,
            prompt_targets=sum(1 for r in ex_rows if r["role"] == ROLE_PROMPT and r["position"] >= 1),
            completion_targets=sum(1 for r in ex_rows if r["role"] == ROLE_COMPLETION),
            weight_sum=float(ex["weights"].sum()),
        )
        summaries.append(summ)
    return rows, summaries


def _role(row: Mapping[str, Any], inst: TokenizedInstance) -> str:
    """The role of a row's token: Alpaca instances as ``inspect_examples`` says (the prompt is a
    prefix); chat instances from their completion mask (prompt and completion alternate)."""
    if inst.completion_mask is None:
        return row["role"]
    return ROLE_COMPLETION if inst.completion_mask[row["position"]] else ROLE_PROMPT


def _runs(rows: Sequence[Mapping[str, Any]]) -> List[Tuple[str, List[Mapping[str, Any]]]]:
    """The rows split into runs of one role, in order; an instance without completion tokens ends
    with an empty completion run (its boundary is still shown, after the prompt)."""
    runs: List[Tuple[str, List[Mapping[str, Any]]]] = []
    for r in rows:
        if runs and runs[-1][0] == r["role"]:
            runs[-1][1].append(r)
        else:
            runs.append((r["role"], [r]))
    if not any(role == ROLE_COMPLETION for role, _ in runs):
        runs.append((ROLE_COMPLETION, []))
    return runs


def _boundary(before: str, after: str, width: int) -> str:
    mark = f" {before} \u25b2 | \u25bc {after} "
    return "=" * 4 + mark + "=" * max(0, width - 4 - len(mark))


def _shortest(w: float) -> float:
    """The float32 weight as the shortest decimal that round-trips in float32 (0.1, not 0.10000000149)."""
    return float(str(np.float32(w)))


def _paint(text: str, style: str, color: bool) -> str:
    return f"{_ANSI[style]}{text}{_ANSI['reset']}" if color else text


def format_instance(
    rows: Sequence[Mapping[str, Any]],
    summary: Mapping[str, Any],
    tokenizer,
    *,
    plw: float,
    completion_weight: float,
    table: bool = True,
    color: bool = False,
) -> str:
    """Terminal view of one instance: header, coloured text, token table with the boundary marked."""
    head = (
        f"=== example {summary['example']}: record {summary['record']}"
        f" (source_index {summary.get('source_index')}, {'inverted' if summary.get('inverted') else 'not inverted'})"
    )
    if summary.get("dropped"):
        return (
            _paint(head + " ===", "bold", color) + "\n  dropped by train.truncation=drop (its prompt fills "
            "model_max_length, no completion token left)"
        )
    lines = [
        _paint(head + " ===", "bold", color),
        f"  {summary['tokens']} tokens = {summary['prompt_tokens']} prompt (first token: no target) + "
        f"{summary['completion_tokens']} completion; truncated: {'yes' if summary['truncated'] else 'no'}"
        + (", lost every completion token" if summary["lost_completion"] else "")
        + (
            f", {summary['prompt_tokens_dropped_left']} prompt tokens dropped from the left"
            if summary["prompt_tokens_dropped_left"]
            else ""
        ),
        f"  loss terms: {summary['prompt_targets']} prompt targets x {plw:g} (PLW), "
        f"{summary['completion_targets']} completion targets x {completion_weight:g}; "
        f"sum of weights {summary['weight_sum']:.6g}",
    ]
    runs = _runs(rows)
    weight = {ROLE_PROMPT: plw, ROLE_COMPLETION: completion_weight}
    texts = [(role, tokenizer.decode([r["token_id"] for r in run], skip_special_tokens=False)) for role, run in runs]
    if color:
        lines.append(
            f"  text ({_paint('prompt, weight ' + format(plw, 'g'), 'prompt', True)} | "
            f"{_paint('completion, weight ' + format(completion_weight, 'g'), 'completion', True)}):"
        )
        lines.append(_paint("\u2016", "boundary", True).join(_paint(t, role, True) for role, t in texts))
    else:
        for role, t in texts:
            lines.append(f"  {role.upper()} (targets weighted {weight[role]:g}):")
            lines.append(t)
    if table:
        body = format_rows([]).splitlines()
        width = len(body[0])
        for i, (role, run) in enumerate(runs):
            if i:
                body.append(_paint(_boundary(runs[i - 1][0], role, width), "boundary", color))
            body += [_paint(x, role, color) for x in format_rows(run).splitlines()[2:]]
        lines += ["  " + x for x in body]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------
def run(opts: Mapping[str, Any], overrides: Sequence[str], stream=None) -> Path:
    """Compose the config, inspect, print to ``stream`` and write the JSONL; returns its path."""
    stream = stream or sys.stdout
    cfg = load_config(list(overrides))
    color = opts["color"] == "always" or (
        opts["color"] == "auto" and hasattr(stream, "isatty") and stream.isatty() and not os.environ.get("NO_COLOR")
    )
    tokenizer = load_tokenizer_for(cfg.model)
    records, meta = load_dataset(cfg)
    plw, cw = float(cfg.plw), float(cfg.completion_weight)
    max_len, policy = int(cfg.train.model_max_length), str(cfg.train.truncation)
    if opts["offset"] >= len(records):
        raise UsageError(
            f"argument 'offset': {opts['offset']} but dataset '{cfg.dataset.name}' has {len(records)} records"
        )
    indices = list(range(opts["offset"], min(opts["offset"] + opts["n"], len(records))))
    turns = str(cfg.dataset.completion_turns)
    rows, summaries = inspect_instances(
        records,
        indices,
        tokenizer,
        plw=plw,
        completion_weight=cw,
        model_max_length=max_len,
        truncation=policy,
        completion_turns=turns,
    )
    report = scan_truncation(records, tokenizer, max_len, policy, progress=True, completion_turns=turns)

    w = stream.write
    w(f"dataset {cfg.dataset.name}: {len(records)} records ({meta.get('dir', '?')})\n")
    w(
        f"model {cfg.model.name}: tokenizer {type(tokenizer).__name__}, bos={tokenizer.bos_token!r} "
        f"eos={tokenizer.eos_token!r}\n"
    )
    chat = any("messages" in r for r in records)
    w(
        f"plw={plw:g} completion_weight={cw:g} model_max_length={max_len} truncation={policy}"
        + (f" completion_turns={turns} (chat data)" if chat else "")
        + "\n\n"
    )
    for s in summaries:
        w(
            format_instance(
                [r for r in rows if r["example"] == s["example"]],
                s,
                tokenizer,
                plw=plw,
                completion_weight=cw,
                table=opts["table"],
                color=color,
            )
            + "\n\n"
        )
    w(_paint("truncation report (whole dataset): ", "bold", color) + report.summary() + "\n")
    if report.examples_lost_completion:
        w(
            f"  records that lost every completion token (first {len(report.examples_lost_completion)}): "
            f"{report.examples_lost_completion}\n"
        )

    out = Path(opts["out"]).expanduser() if opts["out"] else default_out(cfg)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, rows_to_jsonl(rows))
    sidecar = out.with_name(out.name + ".meta.json")
    atomic_write_text(
        sidecar,
        json.dumps(
            {
                "dataset": str(cfg.dataset.name),
                "dataset_dir": meta.get("dir"),
                "records": len(records),
                "model": str(cfg.model.name),
                "plw": plw,
                "completion_weight": cw,
                "model_max_length": max_len,
                "completion_turns": turns if chat else None,
                "truncation": report.to_dict(),
                "instances": summaries,
            },
            indent=2,
        )
        + "\n",
    )
    w(f"\nwrote {len(rows)} token rows to {out}\n      report and summaries to {sidecar}\n")
    return out


def main(argv: Optional[List[str]] = None) -> int:
    _, argv = cli.parse(cli.parser("python -m pipeline.inspect_data", __doc__), argv)
    cli.setup_logging()

    def body() -> int:
        opts, overrides = split_args(argv)
        run(opts, overrides)
        return 0

    return cli.run(
        body, user_errors=(SourceError, DataError, InversionError, TokenizerError, ModelLoadError, ChatError)
    )


if __name__ == "__main__":
    sys.exit(main())

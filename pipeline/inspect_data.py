"""See how instances are tokenized and weighted before spending GPU hours on them.

Usage::

    python -m pipeline.inspect_data dataset=<name> model=<name> plw=0.1 [n=3] [offset=0] [out=path.jsonl]
                                    [table=true] [color=auto|always|never] [hydra overrides ...]
    make inspect-data OVERRIDES="dataset=shared_alpaca52k model=tiny plw=0.1 n=2"

For ``n`` instances (from record ``offset`` of the processed dataset) it prints

* the rendered text, prompt and completion in different colours (or labelled ``PROMPT``/``COMPLETION``
  without colour), with the per-token weight each part gets;
* a token table: position, token, id, role (prompt / completion), weight and label, with the
  prompt/completion boundary marked by a line (``format_rows`` of :mod:`pipeline.preprocess`);

then the truncation report of the whole dataset at ``train.model_max_length`` under
``train.truncation`` (how many instances were cut, how many lost every completion token and what the
policy did with them). The same token rows (``inspect_examples``: ``example, position, token,
token_id, role, weight, label, is_target`` plus ``record`` and ``source_index``) go to a JSONL file
(``out=``; default ``<paths.reports_dir>/inspect_data/<dataset>__<model>__plw<plw>.jsonl``) and the
report and per-instance summaries to ``<out>.meta.json``.

Weights are the training weights (docs/study.md section 1): :func:`pipeline.preprocess.build_example`,
i.e. the weight rule :func:`pipeline.loss.token_weights`. The weight on a row is the weight of the loss
term whose *target* is that token; position 0 (BOS, or the first prompt token when the tokenizer adds
none) has no target (weight 0); prompt targets get ``plw``, completion targets ``completion_weight`` (1).
Only the model's tokenizer is loaded (no weights), so this works for 7B configs too as long as their
tokenizer is available offline (``model.tokenizer=/path/to/folder``).
The pad token a training run may add (Alpaca's ``[PAD]``) never occurs in rendered text, so it
changes no id shown here.

Exit status: 0 ok; 1 data or tokenizer problem (the message names file, record and field); 2 bad
arguments or config.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from tqdm.auto import tqdm

from pipeline import cli
from pipeline.config import load_config
from pipeline.data.build import load_dataset
from pipeline.data.inversion import InversionError
from pipeline.data.records import DataError
from pipeline.data.sources import SourceError
from pipeline.models import ModelLoadError, load_tokenizer_for
from pipeline.preprocess import (
    ROLE_COMPLETION,
    ROLE_PROMPT,
    TruncationReport,
    build_example,
    format_rows,
    inspect_examples,
    rows_to_jsonl,
    tokenize_instance,
    tokenize_records,
)
from pipeline.runs import atomic_write_text
from pipeline.tokenizer import TokenizerError

log = logging.getLogger(__name__)

EXTRA_KEYS = ("n", "offset", "out", "table", "color")
SCAN_BATCH = 1024

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
    records: Sequence[Mapping[str, Any]], tokenizer, model_max_length: int, truncation: str, progress: bool = True
):
    """The :class:`~pipeline.preprocess.TruncationReport` of all ``records`` (batched, with progress)."""
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
        _, rep = tokenize_records(chunk, tokenizer, model_max_length, truncation)
        for k in (
            "n_instances",
            "n_truncated",
            "n_lost_completion",
            "n_dropped",
            "n_prompt_left_truncated",
            "n_kept_without_completion",
        ):
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
) -> Tuple[List[Dict[str, Any]], List[Dict[str, Any]]]:
    """Token rows (``inspect_examples`` + ``record``/``source_index``) and one summary per instance."""
    rows: List[Dict[str, Any]] = []
    summaries: List[Dict[str, Any]] = []
    for k, idx in enumerate(indices):
        rec = records[idx]
        inst = tokenize_instance(rec, tokenizer, model_max_length, truncation)
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
        ex = build_example(inst.input_ids, inst.n_prompt, plw, completion_weight)
        ex_rows = inspect_examples([ex], tokenizer)
        for r in ex_rows:
            r["weight"] = _shortest(r["weight"])
            r["example"] = k
            r["record"] = idx
            r["source_index"] = rec.get("source_index")
        rows += ex_rows
        summ.update(
            dropped=False,
            tokens=len(inst.input_ids),
            prompt_tokens=inst.n_prompt,
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
    p_ids = [r["token_id"] for r in rows if r["role"] == ROLE_PROMPT]
    c_ids = [r["token_id"] for r in rows if r["role"] == ROLE_COMPLETION]
    p_txt = tokenizer.decode(p_ids, skip_special_tokens=False)
    c_txt = tokenizer.decode(c_ids, skip_special_tokens=False)
    if color:
        lines.append(
            f"  text ({_paint('prompt, weight ' + format(plw, 'g'), 'prompt', True)} | "
            f"{_paint('completion, weight ' + format(completion_weight, 'g'), 'completion', True)}):"
        )
        lines.append(
            _paint(p_txt, "prompt", True) + _paint("\u2016", "boundary", True) + _paint(c_txt, "completion", True)
        )
    else:
        lines.append(f"  PROMPT (targets weighted {plw:g}):")
        lines.append(p_txt)
        lines.append(f"  COMPLETION (targets weighted {completion_weight:g}):")
        lines.append(c_txt)
    if table:
        prompt_rows = [r for r in rows if r["role"] == ROLE_PROMPT]
        comp_rows = [r for r in rows if r["role"] == ROLE_COMPLETION]
        body = format_rows(prompt_rows).splitlines() if prompt_rows else format_rows([]).splitlines()
        width = len(body[0])
        mark = " prompt \u25b2 | \u25bc completion "
        boundary = "=" * 4 + mark + "=" * max(0, width - 4 - len(mark))
        if color:
            body = body[:2] + [_paint(x, "prompt", True) for x in body[2:]]
        body.append(_paint(boundary, "boundary", color))
        if comp_rows:
            comp = format_rows(comp_rows).splitlines()[2:]
            body += [_paint(x, "completion", color) for x in comp]
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
    rows, summaries = inspect_instances(
        records, indices, tokenizer, plw=plw, completion_weight=cw, model_max_length=max_len, truncation=policy
    )
    report = scan_truncation(records, tokenizer, max_len, policy, progress=True)

    w = stream.write
    w(f"dataset {cfg.dataset.name}: {len(records)} records ({meta.get('dir', '?')})\n")
    w(
        f"model {cfg.model.name}: tokenizer {type(tokenizer).__name__}, bos={tokenizer.bos_token!r} "
        f"eos={tokenizer.eos_token!r}\n"
    )
    w(f"plw={plw:g} completion_weight={cw:g} model_max_length={max_len} truncation={policy}\n\n")
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

    return cli.run(body, user_errors=(SourceError, DataError, InversionError, TokenizerError, ModelLoadError))


if __name__ == "__main__":
    sys.exit(main())

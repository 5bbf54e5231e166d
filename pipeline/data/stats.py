"""Dataset statistics (the paper's Table 1).

CLI::

    python -m pipeline.data.stats stats_datasets=[alpaca_data,alpaca_data_short] [overrides]
    make table1-shared                      # the real data in ../shared, offline

Without ``stats_datasets`` the composed ``dataset`` is used. Each dataset is built (or read) through
:func:`pipeline.data.build.load_dataset`; the table is printed and written to
``paths.reports_dir/table1.csv`` and ``table1.md``. A dataset that fails (e.g. a download that is
not possible offline) is reported with its error and the command exits with status 1 after writing
the rows of the others.

Definitions (docs/study.md section 1):

- token counts of each field text alone (``add_special_tokens=False``: no template, no BOS/EOS),
  with ``dataset.transform.tokenizer`` or else ``paths.llama_tokenizer``;
- instruction / input / completion: mean and standard deviation per instance. The standard
  deviation is the *sample* standard deviation (``ddof=1``; ``ddof=0`` differs by a factor
  sqrt(n/(n-1)), i.e. < 0.001% for the paper's 52k instances); undefined (nan) for n = 1;
- total tokens = sum of instruction + input + completion tokens (template and EOS excluded; this
  reproduces the paper: 52002 * (13.40 + 6.25 + 64.51) ~= 4,376,482);
- R_g = total completion tokens / total prompt (instruction + input) tokens;
- mean ratio = arithmetic mean of per-instance ``completion / prompt``; geo ratio = their geometric
  mean, ``exp(mean(log r))``. Ratios that are 0 (empty completion, kept with
  ``dataset.empty_output=keep``) or not finite (a prompt of 0 tokens) have no logarithm: they are
  left out of the geometric mean (and non-finite ones also out of the arithmetic mean) and counted
  in the ``ratio_excluded`` column;
- inverted = instances prompt-inverted by the transform; dropped = records removed for an empty
  output (``dataset.empty_output=drop``); duplicates = records equal to an earlier one in
  (instruction, input, output), kept as the file has them (every statistic counts them, as the
  paper's counts do); paper R_g = ``dataset.paper_rg``.
"""

from __future__ import annotations

import csv
import io
import math
import sys
import traceback
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from pipeline import cli
from pipeline.config import ConfigError, load_config, validate
from pipeline.data.build import load_dataset
from pipeline.data.inversion import InversionError, Lengths, measure
from pipeline.data.records import DataError
from pipeline.data.sources import SourceError
from pipeline.data.tokens import get_tokenizer, length_fn, resolve_tokenizer_spec
from pipeline.tokenizer import TokenizerError

DDOF = 1


def _expected_errors():
    return (ConfigError, InversionError, DataError, SourceError, TokenizerError)


@dataclass
class DatasetStats:
    dataset: str
    n: int
    instruction_mean: float
    instruction_std: float
    input_mean: float
    input_std: float
    completion_mean: float
    completion_std: float
    total_tokens: int
    rg: float
    paper_rg: Optional[float]
    mean_ratio: float
    geo_mean_ratio: float
    ratio_excluded: int
    n_inverted: int
    n_dropped: int
    tokenizer: str = ""
    n_duplicates: int = 0  # records equal to an earlier one (instruction, input, output); kept


def mean_std(xs: Sequence[float], ddof: int = DDOF) -> Tuple[float, float]:
    n = len(xs)
    if n == 0:
        return math.nan, math.nan
    m = math.fsum(xs) / n
    if n - ddof <= 0:
        return m, math.nan
    return m, math.sqrt(math.fsum((x - m) ** 2 for x in xs) / (n - ddof))


def compute_stats(
    name: str,
    lengths: Sequence[Lengths],
    n_inverted: int = 0,
    n_dropped: int = 0,
    paper_rg: Optional[float] = None,
    tokenizer: str = "",
    ddof: int = DDOF,
    n_duplicates: int = 0,
) -> DatasetStats:
    """Table 1 row from per-instance token lengths (pure; see module docstring)."""
    ins = [x.instruction for x in lengths]
    inp = [x.input for x in lengths]
    out = [x.output for x in lengths]
    prompt = sum(ins) + sum(inp)
    comp = sum(out)
    ratios = [x.completion / x.prompt if x.prompt else math.inf for x in lengths]
    finite = [r for r in ratios if math.isfinite(r)]
    positive = [r for r in finite if r > 0]
    im, isd = mean_std(ins, ddof)
    pm, psd = mean_std(inp, ddof)
    cm, csd = mean_std(out, ddof)
    return DatasetStats(
        dataset=name,
        n=len(lengths),
        instruction_mean=im,
        instruction_std=isd,
        input_mean=pm,
        input_std=psd,
        completion_mean=cm,
        completion_std=csd,
        total_tokens=prompt + comp,
        rg=comp / prompt if prompt else math.nan,
        paper_rg=paper_rg,
        mean_ratio=math.fsum(finite) / len(finite) if finite else math.nan,
        geo_mean_ratio=math.exp(math.fsum(math.log(r) for r in positive) / len(positive)) if positive else math.nan,
        ratio_excluded=len(ratios) - len(positive),
        n_inverted=n_inverted,
        n_dropped=n_dropped,
        tokenizer=tokenizer,
        n_duplicates=n_duplicates,
    )


def record_lengths(
    records, tok, fingerprint: Optional[str], meta, desc: str = "", completion_turns: str = "all"
) -> List[Lengths]:
    """Token lengths of processed records; reuses the counts stored by the transform when they were
    made with the same tokenizer (same fingerprint), otherwise tokenizes (chat records: the
    ``completion_turns`` assistant turns are the completion)."""
    stored = (meta.get("tokenizer") or {}).get("fingerprint")
    if stored is not None and stored == fingerprint and all("tokens" in r for r in records):
        return [Lengths(r["tokens"]["instruction"], r["tokens"]["input"], r["tokens"]["output"]) for r in records]
    return measure(records, length_fn(tok, desc=desc or "token lengths"), completion_turns)


def dataset_stats(cfg) -> DatasetStats:
    """Build/read ``cfg.dataset`` and compute its row."""
    cfg = validate(cfg)  # a typed Config passes through
    records, meta = load_dataset(cfg)
    spec = resolve_tokenizer_spec(cfg)
    tok, fp = get_tokenizer(spec)
    lengths = record_lengths(
        records, tok, fp, meta, desc=f"{cfg.dataset.name}: token lengths", completion_turns=cfg.dataset.completion_turns
    )
    c = meta["counts"]
    return compute_stats(
        cfg.dataset.name,
        lengths,
        c["inverted"],
        c["dropped_empty_output"],
        cfg.dataset.paper_rg,
        spec,
        n_duplicates=c.get("duplicates", 0),  # folders built before duplicates were counted: 0
    )


# ------------------------------------------------------------------------------------------------
# Output
# ------------------------------------------------------------------------------------------------
def _f(x: Optional[float], nd: int = 2) -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and math.isnan(x):
        return "nan"
    return f"{x:.{nd}f}"


def to_markdown(rows: Sequence[DatasetStats]) -> str:
    head = [
        "dataset",
        "n",
        "instruction",
        "input",
        "completion",
        "total tokens",
        "R_g",
        "paper R_g",
        "mean ratio",
        "geo ratio",
        "inverted",
        "dropped",
        "duplicates",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for r in rows:
        cells = [
            r.dataset,
            str(r.n),
            f"{_f(r.instruction_mean)} ({_f(r.instruction_std)})",
            f"{_f(r.input_mean)} ({_f(r.input_std)})",
            f"{_f(r.completion_mean)} ({_f(r.completion_std)})",
            f"{r.total_tokens:,}",
            _f(r.rg, 3),
            _f(r.paper_rg, 3),
            _f(r.mean_ratio, 3),
            _f(r.geo_mean_ratio, 3) + (f" ({r.ratio_excluded} excl.)" if r.ratio_excluded else ""),
            str(r.n_inverted),
            str(r.n_dropped),
            str(r.n_duplicates),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def to_csv(rows: Sequence[DatasetStats]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=[f.name for f in fields(DatasetStats)], lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow(asdict(r))
    return buf.getvalue()


def write_tables(rows: Sequence[DatasetStats], reports_dir) -> Tuple[Path, Path]:
    d = Path(reports_dir)
    d.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = d / "table1.csv", d / "table1.md"
    csv_path.write_text(to_csv(rows))
    tokenizers = sorted({r.tokenizer for r in rows})
    md_path.write_text(
        "# Table 1: dataset statistics\n\nMean (sample std) tokens per instance of each field alone "
        "(no template, no BOS/EOS); total = instruction + input + completion tokens; R_g = total completion "
        "/ total prompt tokens; mean/geo ratio = arithmetic/geometric mean of per-instance ratios. "
        f"Tokenizer: {', '.join(tokenizers)}.\n\n" + to_markdown(rows)
    )
    return csv_path, md_path


def main(argv: Optional[List[str]] = None) -> int:
    _, argv = cli.parse(cli.parser("python -m pipeline.data.stats", __doc__), argv)
    try:
        base = load_config(argv)
    except cli.CONFIG_ERRORS as e:  # they name the key
        print(f"error: {e}", file=sys.stderr)
        return 2
    names = list(base.stats_datasets)
    if names:
        rest = [a for a in argv if not a.lstrip("+~").startswith(("dataset=", "stats_datasets="))]
        cfgs = [(n, lambda n=n: load_config([*rest, f"dataset={n}"])) for n in names]
    else:
        cfgs = [(base.dataset.name, lambda: base)]
    _EXPECTED = _expected_errors()
    rows: List[DatasetStats] = []
    failures: List[Tuple[str, str]] = []
    for name, make_cfg in cfgs:
        try:
            rows.append(dataset_stats(make_cfg()))
        except Exception as e:  # report every dataset, then fail
            failures.append((name, f"{type(e).__name__}: {e}"))
            print(f"error: dataset {name}: {type(e).__name__}: {e}", file=sys.stderr)
            if not isinstance(e, _EXPECTED):
                traceback.print_exc()
    if rows:
        csv_path, md_path = write_tables(rows, base.paths.reports_dir)
        print(to_markdown(rows))
        print(f"written: {csv_path}\n         {md_path}")
    if failures:
        print(f"{len(failures)} dataset(s) failed: {', '.join(n for n, _ in failures)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

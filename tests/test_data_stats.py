"""Table 1 statistics: hand-computed rows, and the real data checked against an independent
computation (the `sentencepiece` package on tokenizer.model and plain Python, not the HF tokenizer)."""

from __future__ import annotations

import csv
import io
import json
import math
import statistics

import pytest

from pipeline.config import load_config
from pipeline.data.inversion import Lengths
from pipeline.data.stats import compute_stats, dataset_stats, main, mean_std, to_csv, to_markdown


def test_compute_stats_by_hand():
    ls = [Lengths(2, 0, 6), Lengths(1, 2, 1), Lengths(3, 1, 0)]
    s = compute_stats("toy", ls, n_inverted=1, n_dropped=2, paper_rg=0.5)
    assert s.n == 3 and s.total_tokens == 16
    assert s.instruction_mean == 2 and s.instruction_std == 1.0  # sample std (ddof=1)
    assert s.input_mean == 1 and s.completion_mean == pytest.approx(7 / 3)
    assert s.rg == 7 / 9
    assert s.mean_ratio == pytest.approx((3 + 1 / 3 + 0) / 3)
    assert s.geo_mean_ratio == pytest.approx(math.sqrt(3 * 1 / 3))  # the 0 ratio is left out ...
    assert s.ratio_excluded == 1  # ... and counted
    assert (s.n_inverted, s.n_dropped, s.paper_rg) == (1, 2, 0.5)
    assert mean_std([1, 2, 3, 4], ddof=0)[1] == pytest.approx(statistics.pstdev([1, 2, 3, 4]))
    assert math.isnan(mean_std([5])[1])
    md = to_markdown([s])
    assert "| toy | 3 | 2.00 (1.00) | 1.00 (1.00) | 2.33 (3.21) | 16 | 0.778 | 0.500 |" in md


def test_paper_total_tokens_definition():
    """Total = n * (instruction + input + completion means): the paper's AlpacaData row."""
    assert round(52002 * (13.40 + 6.25 + 64.51)) == pytest.approx(4_376_482, rel=1e-4)


def _independent(path, sp, invert_short=False):
    """Plain Python + sentencepiece: per-field token counts, optional Short inversion, Table 1 numbers."""
    A = "Predict the prompt that generated the following AI output."
    B = "Predict the prompt that generated the below AI output given the following context. Context: "
    rows = [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]
    n_tok = lambda s: len(sp.encode(s))  # noqa: E731
    triples = []
    for r in rows:
        i, x, o = n_tok(r["instruction"]), n_tok(r.get("input", "")), n_tok(r["output"])
        if invert_short and o > i + x:
            new_ins = A if r.get("input", "") == "" else B + r["input"]
            i, x, o = n_tok(new_ins), n_tok(r["output"]), n_tok(r["instruction"])
        triples.append((i, x, o))
    n = len(triples)
    cols = list(zip(*triples))
    means = [sum(c) / n for c in cols]
    stds = [statistics.stdev(c) for c in cols]
    total = sum(map(sum, cols))
    rg = sum(cols[2]) / (sum(cols[0]) + sum(cols[1]))
    return n, means, stds, total, rg


@pytest.mark.shared
@pytest.mark.parametrize(
    "name,file,short",
    [
        ("shared_alpaca52k", "alpaca52k_torchtune_tiny.jsonl", False),
        ("shared_alpaca52k_short", "alpaca52k_torchtune_tiny.jsonl", True),
        ("shared_seed_tasks", "stanford_alpaca_seed_tasks.jsonl", False),
    ],
)
def test_stats_match_an_independent_sentencepiece_computation(
    name, file, short, tmp_path, instructions_dir, llama_tokenizer_dir
):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(llama_tokenizer_dir / "tokenizer.model"))
    n, means, stds, total, rg = _independent(instructions_dir / file, sp, short)
    s = dataset_stats(load_config([f"dataset={name}", f"paths.data_dir={tmp_path}"]))
    assert s.n == n and s.total_tokens == total
    assert [s.instruction_mean, s.input_mean, s.completion_mean] == pytest.approx(means, abs=1e-9)
    assert [s.instruction_std, s.input_std, s.completion_std] == pytest.approx(stds, abs=1e-9)
    assert s.rg == pytest.approx(rg, abs=1e-12)


@pytest.mark.shared
def test_stats_cli_writes_csv_and_markdown(tmp_path, instructions_dir, llama_tokenizer_dir, capsys):
    rc = main(
        [
            "stats_datasets=[shared_alpaca52k,shared_alpaca52k_short]",
            f"paths.data_dir={tmp_path / 'd'}",
            f"paths.reports_dir={tmp_path / 'r'}",
            f"paths.llama_tokenizer={llama_tokenizer_dir}",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0 and "| shared_alpaca52k | 100 |" in out and "| shared_alpaca52k_short | 100 |" in out
    rows = list(csv.DictReader(open(tmp_path / "r" / "table1.csv")))
    assert [r["dataset"] for r in rows] == ["shared_alpaca52k", "shared_alpaca52k_short"]
    assert rows[0]["paper_rg"] == "3.27" and rows[1]["n_inverted"] == "64" and rows[0]["n_dropped"] == "0"
    assert float(rows[0]["rg"]) == pytest.approx(4.254, abs=1e-3)
    md = (tmp_path / "r" / "table1.md").read_text()
    assert "sample std" in md and "| shared_alpaca52k_short | 100 |" in md


@pytest.mark.shared
def test_stats_cli_reports_a_failing_dataset_and_exits_1(tmp_path, instructions_dir, llama_tokenizer_dir, capsys):
    rc = main(
        [
            "stats_datasets=[shared_seed_tasks,alpaca_data]",
            f"paths.data_dir={tmp_path / 'd'}",
            f"paths.reports_dir={tmp_path / 'r'}",
        ]
    )
    cap = capsys.readouterr()
    assert rc == 1 and "| shared_seed_tasks | 175 |" in cap.out
    assert "dataset alpaca_data: SourceError: HF_HUB_OFFLINE=1" in cap.err and "1 dataset(s) failed" in cap.err


@pytest.mark.shared
def test_dropped_and_kept_empty_outputs_are_reported(tmp_path, llama_tokenizer_dir):
    p = tmp_path / "e.jsonl"
    p.write_text('{"instruction": "Say hi.", "output": "Hi there!"}\n{"instruction": "Say nothing.", "output": ""}\n')
    base = [
        "dataset=local_jsonl",
        f"dataset.source.path={p}",
        f"paths.data_dir={tmp_path}",
        f"paths.llama_tokenizer={llama_tokenizer_dir}",
    ]
    s = dataset_stats(load_config([*base, "dataset.empty_output=drop"]))
    assert s.n == 1 and s.n_dropped == 1 and s.ratio_excluded == 0
    s = dataset_stats(load_config([*base, "dataset.empty_output=keep"]))
    assert s.n == 2 and s.n_dropped == 0 and s.ratio_excluded == 1
    assert s.mean_ratio == pytest.approx(s.geo_mean_ratio / 2)  # the 0 ratio counts in the arithmetic mean


@pytest.mark.shared
def test_duplicate_records_are_a_table1_column(tmp_path, llama_tokenizer_dir):
    p = tmp_path / "d.jsonl"
    a = {"instruction": "Say hi.", "output": "Hi there!"}
    b = {"instruction": "Count to three.", "output": "One, two, three."}
    p.write_text("".join(json.dumps(r) + "\n" for r in (a, b, a, a)))
    cfg = load_config(
        [
            "dataset=local_jsonl",
            f"dataset.source.path={p}",
            f"paths.data_dir={tmp_path}",
            f"paths.llama_tokenizer={llama_tokenizer_dir}",
        ]
    )
    s = dataset_stats(cfg)
    assert s.n == 4 and s.n_duplicates == 2  # kept and counted: every statistic includes them
    md = to_markdown([s])
    assert md.splitlines()[0].endswith("| dropped | duplicates |") and md.splitlines()[2].endswith("| 0 | 2 |")
    assert list(csv.DictReader(io.StringIO(to_csv([s]))))[0]["n_duplicates"] == "2"

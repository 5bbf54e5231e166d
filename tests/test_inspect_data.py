"""python -m pipeline.inspect_data: token rows, weights and boundary against independent tokenizer calls."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.inspect_data import main, split_args

# The Alpaca templates written out here (not imported), so the boundary is checked independently.
WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the "
    "request.\n\n### Instruction:\n{instruction}\n\n### Response:"
)

RECORDS = [
    {"instruction": "Add the two numbers.", "input": "2 and 3", "output": "The sum is 5."},
    {"instruction": "Say hello.", "input": "", "output": "Hello there!"},
    {"instruction": "Repeat: " + "lorem ipsum " * 60, "input": "", "output": "Cut off."},  # prompt > 64 tokens
]


@pytest.fixture(scope="module")
def smol_tokenizer():
    from pipeline.config import load_config
    from pipeline.models import load_tokenizer_for

    return load_tokenizer_for(load_config(["model=tiny"]).model)


def source_of(rec):
    return (WITH_INPUT if rec["input"] else NO_INPUT).format(**rec)


def read_rows(path: Path):
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    by_ex = {}
    for r in rows:
        by_ex.setdefault(r["example"], []).append(r)
    return by_ex


def check_instance(rows, rec, tok, plw, max_len):
    """Rows of one instance against the tokenizer called directly on the rendered text."""
    source = source_of(rec)
    full = tok(source + rec["output"] + tok.eos_token).input_ids[:max_len]
    n_prompt = min(len(tok(source).input_ids), len(full))
    assert [r["position"] for r in rows] == list(range(len(full)))
    assert [r["token_id"] for r in rows] == full
    roles = [r["role"] for r in rows]
    assert roles == ["prompt"] * n_prompt + ["completion"] * (len(full) - n_prompt)
    # the boundary is where the rendered prompt ends
    assert tok.decode(full[:n_prompt]) == tok.decode(tok(source).input_ids[:max_len])
    assert rows[0]["weight"] == 0.0 and rows[0]["label"] == -100 and not rows[0]["is_target"]
    for r in rows[1:]:
        assert r["weight"] == (plw if r["role"] == "prompt" else 1.0), r
        assert r["label"] == r["token_id"] and r["is_target"]
    return n_prompt


def test_local_jsonl_rows_weights_boundary_and_truncation(tmp_path, smol_tokenizer, capsys):
    src = tmp_path / "mine.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    out = tmp_path / "inspect" / "rows.jsonl"
    rc = main(
        [
            "dataset=local_jsonl",
            f"dataset.source.path={src}",
            "model=tiny",
            "plw=0.25",
            "n=3",
            f"out={out}",
            f"paths.data_dir={tmp_path / 'data'}",
            "train.model_max_length=64",
            "color=never",
        ]
    )
    printed = capsys.readouterr().out
    assert rc == 0, printed
    by_ex = read_rows(out)
    assert sorted(by_ex) == [0, 1, 2]
    for k, rec in enumerate(RECORDS):
        assert {r["record"] for r in by_ex[k]} == {k}
        n_prompt = check_instance(by_ex[k], rec, smol_tokenizer, 0.25, 64)
        if k == 2:
            assert n_prompt == 64  # the prompt fills the budget: no completion target (policy keep)
    meta = json.loads(out.with_name(out.name + ".meta.json").read_text())
    assert meta["truncation"]["n_instances"] == 3 and meta["truncation"]["n_lost_completion"] == 1
    assert meta["truncation"]["examples_lost_completion"] == [2]
    assert [i["completion_tokens"] for i in meta["instances"]][2] == 0
    # terminal: the boundary line, both parts of the text, the weights, the truncation report
    assert printed.count("prompt \u25b2 | \u25bc completion") == 3
    assert "PROMPT (targets weighted 0.25)" in printed and "### Response:" in printed
    assert "1 lost every completion token" in printed and "kept without completion" in printed
    assert "\033[" not in printed


def test_shared_dataset_with_tiny_model(tmp_path, instructions_dir, smol_tokenizer, capsys):
    out = tmp_path / "rows.jsonl"
    rc = main(
        [
            "dataset=shared_alpaca52k",
            "model=tiny",
            "plw=0.1",
            "n=2",
            "offset=1",
            f"out={out}",
            f"paths.data_dir={tmp_path / 'data'}",
            "color=always",
        ]
    )
    printed = capsys.readouterr().out
    assert rc == 0, printed
    lines = (instructions_dir / "alpaca52k_torchtune_tiny.jsonl").read_text().splitlines()
    raw = [json.loads(x) for x in lines[1:3]]
    by_ex = read_rows(out)
    assert sorted(by_ex) == [0, 1]
    for k, rec in enumerate(raw):
        rec = {"instruction": rec["instruction"], "input": rec.get("input") or "", "output": rec["output"]}
        assert {r["record"] for r in by_ex[k]} == {k + 1}
        check_instance(by_ex[k], rec, smol_tokenizer, 0.1, 512)
    assert "\033[36m" in printed and "\033[32m" in printed  # coloured prompt / completion
    assert "truncation report (whole dataset)" in printed and "100 instances" in printed


def test_bad_arguments_and_bad_data(tmp_path, capsys):
    with pytest.raises(ValueError, match="argument 'n'"):
        split_args(["n=abc"])
    opts, rest = split_args(["n=2", "out=x.jsonl", "plw=0.1", "model=tiny"])
    assert opts["n"] == 2 and opts["out"] == "x.jsonl" and rest == ["plw=0.1", "model=tiny"]
    assert main(["model=tiny", "n=0"]) == 2 and "argument 'n': must be >= 1" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(RECORDS[0]) + "\n" + json.dumps({"instruction": "x", "input": ""}) + "\n")
    rc = main(
        [
            "dataset=local_jsonl",
            f"dataset.source.path={bad}",
            "model=tiny",
            f"paths.data_dir={tmp_path / 'data'}",
            f"out={tmp_path / 'o.jsonl'}",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 1 and str(bad) in err and "record 1" in err and "output" in err
    assert not (tmp_path / "o.jsonl").exists()

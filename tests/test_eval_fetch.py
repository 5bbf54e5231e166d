"""`make fetch-data`: the mirror's layout and byte format; offline it reports, never crashes."""

from __future__ import annotations

import json

import pytest

from pipeline.eval import fetch


def test_layout_comes_from_the_task_templates():
    assert fetch.targets("wmt16_ro_en") == [
        ("validation", "wmt16/ro-en/validation.jsonl"),
        ("test", "wmt16/ro-en/test.jsonl"),
    ]
    assert fetch.targets("truthfulqa_mc2") == [("validation", "truthfulqa/multiple_choice/validation.jsonl")]
    assert ("test", "arc_challenge/test.jsonl") in fetch.targets("arc_challenge")
    from pipeline.eval import benchmarks as B

    harness = [n for n, b in B.BENCHMARKS.items() if b.kind == "harness"]
    assert sorted(fetch.HUB) == sorted(harness)  # every lm-eval benchmark has a source


@pytest.mark.parametrize(
    "rel",
    [
        "arc_challenge/test.jsonl",
        "piqa/validation.jsonl",
        "winogrande/validation.jsonl",
        "truthfulqa/generation/validation.jsonl",
        "truthfulqa/multiple_choice/validation.jsonl",
    ],
)
def test_writer_reproduces_the_shared_mirror_bytes(shared_dir, tmp_path, rel):
    src = shared_dir / "data" / "benchmarks" / rel
    rows = [json.loads(x) for x in src.read_text(encoding="utf-8").splitlines()]
    n, sha = fetch.write_jsonl(rows, tmp_path / rel)
    assert n == len(rows) and (tmp_path / rel).read_bytes() == src.read_bytes()
    import hashlib

    assert sha == hashlib.sha256(src.read_bytes()).hexdigest()


def test_offline_fetch_reports_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    failures = fetch.fetch(tmp_path, only=["piqa", "nonsense"])
    assert set(failures) == {"piqa", "nonsense"} and failures["nonsense"] == "unknown benchmark"
    assert failures["piqa"]  # the reason (e.g. ConnectionError / offline mode) is kept
    assert not (tmp_path / "piqa").exists()


def test_cli_needs_a_mirror_folder(capsys):
    assert fetch.main(["eval.data_dir=null"]) == 2
    assert "eval.data_dir" in capsys.readouterr().err

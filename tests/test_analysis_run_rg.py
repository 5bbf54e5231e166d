"""The analysis stage records each finished run's training-set R_g in run.json (the GAM's r)."""
from __future__ import annotations

import json

from omegaconf import OmegaConf

from pipeline.analysis.run_rg import fill_missing_r_g, runs_missing_r_g
from pipeline.config import load_config


def _run(root, name, state, cfg, meta):
    d = root / name
    d.mkdir(parents=True)
    (d / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    (d / "run.json").write_text(json.dumps(meta))
    (d / "status.json").write_text(json.dumps({"state": state}))
    return d


def test_fill_missing_r_g_uses_the_runs_own_dataset(tmp_path, shared_dir, llama_tokenizer_dir):
    from pipeline.data.stats import dataset_stats

    base = [f"paths.data_dir={tmp_path / 'data'}", f"paths.shared_dir={shared_dir}",
            f"paths.llama_tokenizer={llama_tokenizer_dir}"]
    cfg = load_config(["dataset=shared_alpaca52k", *base])
    short = load_config(["dataset=shared_alpaca52k_short", *base])
    runs = tmp_path / "runs"
    a = _run(runs, "a", "done", cfg, {"run_id": "a"})
    b = _run(runs, "b", "done", short, {"run_id": "b"})
    c = _run(runs, "c", "running", cfg, {"run_id": "c"})
    d = _run(runs, "d", "done", cfg, {"run_id": "d", "r_g": 9.5})
    assert runs_missing_r_g(runs) == [a, b]

    n, problems = fill_missing_r_g(runs)
    assert (n, problems) == (2, [])
    rg_a = json.loads((a / "run.json").read_text())["r_g"]
    rg_b = json.loads((b / "run.json").read_text())["r_g"]
    assert rg_a == dataset_stats(cfg).rg and rg_b == dataset_stats(short).rg
    assert rg_a > 1 > rg_b  # AlpacaData rows have long completions; their Short version does not
    assert "r_g" not in json.loads((c / "run.json").read_text())  # not finished: untouched
    assert json.loads((d / "run.json").read_text())["r_g"] == 9.5  # present: untouched
    assert json.loads((a / "run.json").read_text())["run_id"] == "a"  # other keys kept


def test_a_run_whose_dataset_cannot_be_built_is_reported(tmp_path):
    cfg = load_config(["dataset=local_jsonl", f"dataset.source.path={tmp_path / 'gone.jsonl'}",
                       f"paths.data_dir={tmp_path / 'data'}"])
    runs = tmp_path / "runs"
    a = _run(runs, "a", "done", cfg, {"run_id": "a"})
    n, problems = fill_missing_r_g(runs)
    assert n == 0 and len(problems) == 1
    assert str(a / "config.yaml") in problems[0] and "gone.jsonl" in problems[0]

"""A non-editable install works from any directory: the configs, the task/judge files and the R code
ship inside the package (found through it, never through the checkout)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pipeline.analysis.rbridge import r_unavailable_reason

REPO = Path(__file__).resolve().parent.parent

SCRIPT = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import pipeline
    from pipeline.config import CONF_DIR, load_config, validate
    from pipeline.data.build import build
    from pipeline.analysis import rbridge

    out = {"package": str(Path(pipeline.__file__).resolve().parent), "conf": str(CONF_DIR)}
    # 1. compose and validate a config (Hydra reads the packaged conf/)
    cfg = load_config(["dataset=local_jsonl", "dataset.source.path=" + sys.argv[1],
                       "paths.llama_tokenizer=" + sys.argv[2], "model=tinylm_b", "plw=0.1"])
    validate(cfg)
    out["runs_dir"] = cfg.paths.runs_dir
    # 2. build a dataset from a local file
    res = build(cfg)
    out["records"] = len(res.records)
    out["processed"] = str(res.folder)
    # 3. the R bridge sources the packaged R files and evaluates one of their functions
    formula = rbridge.r_call("plw_glmm_formula")
    import rpy2.robjects as ro
    out["formula"] = " ".join(ro.r["deparse"](formula))
    print("RESULT " + json.dumps(out))
""")


@pytest.mark.shared
def test_non_editable_install_runs_from_another_directory(tmp_path, llama_tokenizer_dir):
    if r_unavailable_reason():
        pytest.skip(f"R is not available: {r_unavailable_reason()}")
    # build from a copy of the checkout (a build writes build/ and *.egg-info beside the sources)
    src = tmp_path / "src"
    top_level = {".git", ".venv", "data", "runs", "reports", "outputs", "build", ".pytest_cache"}
    shutil.copytree(
        REPO,
        src,
        symlinks=True,
        ignore=lambda d, names: [
            n for n in names if (Path(d) == REPO and n in top_level) or n == "__pycache__" or n.endswith(".egg-info")
        ],
    )
    target = tmp_path / "site"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(target),
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    installed = target / "pipeline"
    assert (installed / "conf" / "config.yaml").is_file() and not (installed / "conf").is_symlink()
    assert sorted(p.name for p in (installed / "analysis" / "R").glob("*.R")) == ["capture.R", "gam.R", "glmm.R"]

    data = tmp_path / "my.jsonl"
    rows = [
        {"instruction": f"Say {w} twice.", "input": "" if i % 2 else "loudly", "output": f"{w} {w}"}
        for i, w in enumerate(["yes", "no", "maybe", "never"])
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYTHONPATH", "PLW_DATA_DIR", "PLW_RUNS_DIR", "PLW_REPORTS_DIR")
    }
    env.update(PYTHONPATH=str(target), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    # -P: the working directory is not put on sys.path; PYTHONPATH (the install) comes before the
    # editable checkout that the test environment also has.
    proc = subprocess.run(
        [sys.executable, "-P", "-c", SCRIPT, str(data), str(llama_tokenizer_dir)],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
    assert out["package"] == str(installed.resolve())
    assert Path(out["conf"]).resolve() == (installed / "conf").resolve()
    # outside a checkout, data/runs/reports default to the working directory
    assert Path(out["runs_dir"]).resolve() == (work / "runs").resolve()
    assert Path(out["processed"]).resolve().is_relative_to((work / "data").resolve())
    assert out["records"] == 4
    assert "poly(w_p, 2, raw = TRUE)" in out["formula"] and "(1 | model)" in out["formula"]

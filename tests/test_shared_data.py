"""The demo's inputs outside this workplace (pipeline/shared_data.py, the preflight of pipeline/demo.py).

The fetch is tested offline against a local folder laid out like raw.githubusercontent.com
(``<owner>/<repo>/<commit>/<path>``), holding source files rebuilt here from the ../shared files by
the exact inverse of each conversion (each rebuilt source must have the pinned source sha256, so the
inverse is checked too). The seed tasks' conversion drops fields (``id``, ``name``) and has no exact
inverse: that file is placed in the target folder instead; the benchmark mirror comes from the hub
through pipeline.eval.fetch, replaced here by a stand-in that records what it was asked for.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable, Dict, List

import pytest

from pipeline import demo
from pipeline import shared_data as S

ALPACA_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    "\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. Write a "
    "response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}"
    "\n\n### Response:\n"
)
REPO = Path(__file__).resolve().parent.parent
SEED_TASKS = "data/instructions/stanford_alpaca_seed_tasks.jsonl"


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def _rows(path: Path) -> List[Dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _alpaca(path: Path) -> List[Dict[str, str]]:
    return [{k: r[k] for k in ("instruction", "input", "output")} for r in _rows(path)]


def inv_torchtune(p: Path) -> bytes:
    """The HF ``text`` column back (the Alpaca template + output); one-line JSON array."""
    out = []
    for r in _alpaca(p):
        prompt = ALPACA_PROMPT_INPUT if r["input"] else ALPACA_PROMPT
        out.append({**r, "text": prompt.format(**r) + r["output"]})
    return (json.dumps(out) + "\n").encode()


def inv_llamafactory(p: Path) -> bytes:
    return (json.dumps(_alpaca(p), indent=2, ensure_ascii=False) + "\n").encode()


def inv_dolly(p: Path) -> bytes:
    """``{prompt, response}`` lines as pandas writes them (compact, ASCII, ``/`` escaped)."""
    lines = []
    for r in _rows(p):
        row = {"prompt": ALPACA_PROMPT.format(instruction=r["instruction"]), "response": r["output"]}
        lines.append(json.dumps(row, separators=(",", ":")).replace("/", "\\/") + "\n")
    return "".join(lines).encode()


def inv_alpaca_eval(p: Path) -> bytes:
    return json.dumps(_rows(p), indent=2, separators=(",", ":")).replace("/", "\\/").encode()


INVERSES: Dict[str, Callable[[Path], bytes]] = {
    "torchtune_alpaca_tiny": inv_torchtune,
    "llamafactory_alpaca_en_demo": inv_llamafactory,
    "llmfoundry_dolly_hhrlhf": inv_dolly,
    "json_array_to_jsonl": inv_alpaca_eval,
    "verbatim": lambda p: p.read_bytes(),
}


@pytest.fixture(scope="module")
def raw_mirror(shared_dir: Path, tmp_path_factory) -> Path:
    """A folder laid out like raw.githubusercontent.com with every source that has an exact inverse."""
    root = tmp_path_factory.mktemp("raw")
    for f in S.FILES:
        if f.source is None or f.conversion not in INVERSES:
            continue
        data = INVERSES[f.conversion](shared_dir / f.path)
        assert _sha(data) == f.source.sha256, f"the inverse of {f.conversion} does not rebuild {f.source.path}"
        target = root / f.source.repo / f.source.commit / f.source.path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    return root


def _place(shared_dir: Path, root: Path, paths) -> None:
    for p in paths:
        (root / p).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shared_dir / p, root / p)


BENCHMARK_FILES = [f.path for f in S.FILES if f.conversion == "hub"]


# ---------------------------------------------------------------------------------------------- (a)
def test_missing_is_empty_on_shared(shared_dir):
    assert S.missing(shared_dir) == []


def test_missing_lists_everything_on_an_empty_folder(tmp_path):
    assert S.missing(tmp_path) == [f.path for f in S.FILES]
    assert len(S.FILES) == 24  # 4 instruction sets, 2 judge sets, 4 tokenizer files, 14 benchmark files


def test_missing_checks_bytes_of_pinned_files_only(shared_dir, tmp_path):
    _place(shared_dir, tmp_path, [f.path for f in S.FILES])
    (tmp_path / SEED_TASKS).write_bytes((shared_dir / SEED_TASKS).read_bytes().replace(b"calories", b"Calories", 1))
    bench = tmp_path / BENCHMARK_FILES[0]
    bench.write_text(bench.read_text(encoding="utf-8")[:-1], encoding="utf-8")  # hub copy: presence counts
    assert S.missing(tmp_path) == [SEED_TASKS]


def test_summarize_groups_by_folder():
    lines = S.summarize([f.path for f in S.FILES])
    assert lines[0].startswith("data/instructions/: alpaca52k_torchtune_tiny.jsonl, ")
    assert "data/benchmarks/: arc_challenge, piqa, winogrande, truthfulqa, wmt14, wmt16" in lines
    assert "tokenizers/llama/: tokenizer.model, tokenizer_config.json, special_tokens_map.json, tokenizer.json" in lines


def test_sources_of_the_judge_sets_are_pipeline_eval_fetch_urls():
    from pipeline.eval import fetch as F

    for key in ("alpaca_eval", "pandalm"):
        f = next(f for f in S.FILES if f.path == f"data/{F.URLS[key].target}")
        assert f.source.url() == F.URLS[key].url and f.source.sha256 == F.URLS[key].sha256


# ---------------------------------------------------------------------------------------------- (b)
def test_fetch_from_a_local_mirror_reproduces_shared(shared_dir, raw_mirror, tmp_path, monkeypatch):
    calls = []

    def fake_eval_fetch(root, only=None, force=False):  # the hub, stood in for by ../shared
        calls.append((Path(root), list(only)))
        _place(shared_dir / S.BENCHMARKS, Path(root), [p.removeprefix(S.BENCHMARKS + "/") for p in BENCHMARK_FILES])
        return {}

    monkeypatch.setattr(S.eval_fetch, "fetch", fake_eval_fetch)
    _place(shared_dir, tmp_path, [SEED_TASKS])
    failures = S.fetch(tmp_path, base_url=raw_mirror.as_uri(), progress=False)
    assert failures == {}
    assert calls == [(tmp_path / "data" / "benchmarks", S.benchmark_keys(BENCHMARK_FILES))]
    for f in S.FILES:
        assert S.sha256_file(tmp_path / f.path) == S.sha256_file(shared_dir / f.path), f.path
    assert S.missing(tmp_path) == []
    assert not [p for p in tmp_path.rglob(".*") if p.name != ".gitkeep"]  # no temporary files left


def test_a_corrupted_source_fails_with_its_sha256_and_writes_nothing(shared_dir, raw_mirror, tmp_path):
    target = next(f for f in S.FILES if f.conversion == "torchtune_alpaca_tiny")
    bad = tmp_path / "raw"
    shutil.copytree(raw_mirror, bad)
    src = bad / target.source.repo / target.source.commit / target.source.path
    src.write_bytes(src.read_bytes().replace(b"healthy", b"healthz", 1))
    root = tmp_path / "root"
    _place(shared_dir, root, [f.path for f in S.FILES if f.path != target.path])
    failures = S.fetch(root, base_url=bad.as_uri(), progress=False)
    assert list(failures) == [target.path]
    assert f"sha256 {_sha(src.read_bytes())}, expected {target.source.sha256}" in failures[target.path]
    assert not (root / target.path).exists()
    assert sorted(p.name for p in (root / target.path).parent.iterdir()) == sorted(
        Path(f.path).name for f in S.FILES if f.path.startswith("data/instructions/") and f.path != target.path
    )


def test_a_conversion_giving_other_bytes_writes_nothing(shared_dir, raw_mirror, tmp_path, monkeypatch):
    target = next(f for f in S.FILES if f.path.startswith("data/pandalm/"))
    monkeypatch.setitem(S.CONVERSIONS, "verbatim", lambda b: b + b"\n")
    _place(shared_dir, tmp_path, [f.path for f in S.FILES if f.path != target.path])
    failures = S.fetch(tmp_path, base_url=raw_mirror.as_uri(), progress=False)
    assert list(failures) == [target.path] and "converted file has sha256" in failures[target.path]
    assert not (tmp_path / "data" / "pandalm").exists() or not any((tmp_path / "data" / "pandalm").iterdir())


def test_an_unreachable_source_is_reported(tmp_path):
    target = next(f for f in S.FILES if f.path.startswith("data/pandalm/"))
    with pytest.raises(S.FetchError, match="cannot download file://"):
        S.fetch_file(tmp_path, target, base_url=(tmp_path / "nowhere").as_uri())
    assert not any(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------- (c)
def _demo_env(**extra: str) -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PLW_")}
    env.update(extra)
    return env


def test_demo_offline_without_data_stops_with_one_message(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    env = _demo_env(PLW_SHARED_DIR=str(empty), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    dirs = {k: tmp_path / k for k in ("runs", "reports", "data")}
    cmd = [sys.executable, "-m", "pipeline.demo", "--experiment", "demo_ci"]
    cmd += [f"paths.{k}_dir={v}" for k, v in dirs.items()]
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr
    assert p.stdout == ""
    err = p.stderr.strip()
    assert err.startswith("make demo: ") and err.count("make demo:") == 1, err
    assert f"24 of the demo's input files are missing from {empty.resolve()}" in err
    for line in S.summarize([f.path for f in S.FILES]):
        assert f"  {line}\n" in err + "\n"
    assert err.endswith(f"make fetch-demo-data ROOT={empty.resolve()}")
    assert "Traceback" not in err
    assert not any(d.exists() for d in dirs.values())
    assert sorted(tmp_path.iterdir()) == [empty] and not any(empty.iterdir())


@pytest.fixture
def clone(tmp_path, monkeypatch) -> Dict[str, Path]:
    """A checkout without ../shared: paths.root at tmp/repo (so ../shared is tmp/shared, absent)."""
    for var in ("PLW_SHARED_DIR", "PLW_DATA_DIR", S.BASE_URL_ENV):
        monkeypatch.delenv(var, raising=False)
    return {
        "root": tmp_path / "repo",
        "data": tmp_path / "repo" / "data",
        "fallback": tmp_path / "repo" / "data" / "shared",
    }


def _overrides(clone: Dict[str, Path]) -> List[str]:
    return [f"paths.root={clone['root']}"]


def test_preflight_offline_lists_what_is_missing_and_the_command(clone):
    env = {S.BASE_URL_ENV: (clone["root"] / "nowhere").as_uri()}
    overrides, problem = demo.preflight(_overrides(clone), env)
    assert overrides == _overrides(clone)
    assert problem.startswith("make demo: no complete ") and "is not reachable; 24 of the demo's input" in problem
    assert problem.endswith(": make fetch-demo-data")
    assert not clone["root"].exists()  # nothing written


def test_preflight_uses_a_complete_data_shared(clone, shared_dir):
    _place(shared_dir, clone["fallback"], [f.path for f in S.FILES])
    overrides, problem = demo.preflight(_overrides(clone), {})
    assert problem == ""
    assert overrides == _overrides(clone) + [f"paths.shared_dir={clone['fallback'].resolve()}"]
    assert S.shared_dir_for_demo(_overrides(clone)) == clone["fallback"].resolve()


def test_preflight_fetches_into_data_shared_when_the_sources_answer(clone, shared_dir, raw_mirror, monkeypatch):
    # what the subprocess cannot fetch offline: the hub's benchmarks and the seed tasks (no exact inverse)
    _place(shared_dir, clone["fallback"], [SEED_TASKS, *BENCHMARK_FILES])
    monkeypatch.setenv(S.BASE_URL_ENV, raw_mirror.as_uri())
    overrides, problem = demo.preflight(_overrides(clone), dict(os.environ))
    assert problem == ""
    assert overrides[-1] == f"paths.shared_dir={clone['fallback'].resolve()}"
    assert S.missing(clone["fallback"]) == []


def test_shared_data_main_does_nothing_when_shared_is_complete(shared_dir, capsys):
    assert S.main([f"paths.shared_dir={shared_dir}"]) == 0
    assert capsys.readouterr().out.strip() == f"demo data complete: {shared_dir.resolve()}"

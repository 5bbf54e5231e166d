"""Every entry point reads its command line one way (pipeline/cli.py): ``--help`` works, a stray word
that is neither an option nor a key=value override is refused with exit 2, and a bad config key is
one line naming it (exit 2, no traceback). The console scripts point at those entry points."""

from __future__ import annotations

import importlib
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from pipeline import cli

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
ENTRY_POINTS = sorted(
    set(SCRIPTS.values())
    | {"pipeline.data.build:main", "pipeline.data.stats:main", "pipeline.eval.fetch:main", "pipeline.inspect_data:main"}
)


def _main(target: str):
    module, func = target.split(":")
    return getattr(importlib.import_module(module), func)


def test_console_scripts_cover_the_stages():
    assert {"plw-train", "plw-sweep", "plw-eval", "plw-analysis", "plw-data", "plw-pretrain", "plw-demo"} <= set(
        SCRIPTS
    )


@pytest.mark.parametrize("target", ENTRY_POINTS)
def test_help_exits_zero_and_lists_usage(target, capsys):
    main = _main(target)
    argv = ["build", "--help"] if target == "pipeline.data.cli:main" else ["--help"]
    with pytest.raises(SystemExit) as ei:
        main(argv)
    assert ei.value.code == 0
    assert "usage:" in capsys.readouterr().out


@pytest.mark.parametrize("target", [t for t in ENTRY_POINTS if t not in ("pipeline.data.cli:main",)])
def test_a_stray_word_is_refused(target, capsys):
    command = ["regress"] if target == "pipeline.analysis.__main__:main" else []  # its command is required
    with pytest.raises(SystemExit) as ei:
        _main(target)([*command, "--no-such-option"])
    assert ei.value.code == 2
    assert "--no-such-option" in capsys.readouterr().err


def test_default_command_and_overrides_are_told_apart():
    ap = cli.parser("p", None, commands=("run", "status"), default_command="run")
    ap.add_argument("--dry-run", action="store_true")
    assert cli.parse(ap, ["experiment=demo", "--dry-run"])[0].command == "run"
    args, rest = cli.parse(ap, ["status", "experiment=demo"])
    assert args.command == "status" and rest == ["experiment=demo"]
    assert cli.parse(ap, [])[0].command == "run"


@pytest.mark.parametrize("module", ["pipeline.train", "pipeline.show_config", "pipeline.eval", "pipeline.data.build"])
def test_a_bad_key_is_one_line_without_traceback(module):
    proc = subprocess.run(
        [sys.executable, "-m", module, "train.learning_rte=1"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2, proc.stderr
    assert "learning_rte" in proc.stderr and "Traceback" not in proc.stderr


BAD_KEYS = [
    ("+train.learning_rte=1", "train.learning_rte"),  # the form Hydra's own message suggests for a typo
    ("train.learning_rte=1", "train.learning_rte"),
    ("plw=abc", "plw"),
    ("model=no_such_model", "model"),
]


@pytest.mark.parametrize("bad,key", BAD_KEYS, ids=[b for b, _ in BAD_KEYS])
@pytest.mark.parametrize("target", ENTRY_POINTS)
def test_every_entry_point_refuses_a_bad_key_in_one_line(target, bad, key, capsys):
    command = {"pipeline.analysis.__main__:main": ["regress"], "pipeline.data.cli:main": ["build"]}.get(target, [])
    try:
        rc = _main(target)([*command, bad])
    except SystemExit as e:
        rc = e.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2, err
    assert len(lines) == 1 and f"'{key}'" in lines[0] and "Traceback" not in err, err


def test_train_takes_variant_apart_from_the_config_keys(capsys):
    # `+variant=<name>` names a training variant (pipeline.train strips it); it is not an unknown key
    train = _main("pipeline.train:main")
    assert train(["+variant=wd_005", "plw=abc"]) == 2
    err = capsys.readouterr().err
    assert "'plw'" in err and "variant" not in err


def test_a_missing_source_path_fails_before_a_run_folder_exists(tmp_path, capsys):
    runs = tmp_path / "runs"
    rc = _main("pipeline.train:main")(
        ["dataset=local_jsonl", "model=tiny", "train=cpu_small", f"paths.runs_dir={runs}"]
    )
    assert rc == 2 and "'dataset.source.path'" in capsys.readouterr().err
    assert not runs.exists() or not any(runs.iterdir())

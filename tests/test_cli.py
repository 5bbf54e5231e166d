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

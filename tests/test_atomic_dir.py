"""pipeline.atomic_dir: a folder appears complete (with DONE) or not at all."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.atomic_dir import DONE, building, is_complete, publish

REPO = Path(__file__).resolve().parent.parent


def _debris(parent: Path, final: Path):
    return sorted(p.name for p in parent.iterdir() if p.name != final.name)


def test_building_publishes_with_done_last_and_leaves_no_temporary_folder(tmp_path):
    final = tmp_path / "cache" / "model-abc"
    with building(final, done=lambda tmp: {"files": sorted(p.name for p in tmp.iterdir())}) as tmp:
        assert tmp.parent == final.parent and tmp.name.startswith(".model-abc.tmp-")
        assert not final.exists()
        (tmp / "w.bin").write_bytes(b"123")
    assert is_complete(final) and (final / "w.bin").read_bytes() == b"123"
    assert json.loads((final / DONE).read_text()) == {"files": ["w.bin"]}
    assert _debris(final.parent, final) == []


def test_text_done_is_written_as_is(tmp_path):
    final = tmp_path / "tok"
    with building(final, done="/some/file.gguf\n") as tmp:
        (tmp / "t.json").write_text("{}")
    assert (final / DONE).read_text() == "/some/file.gguf\n"


def test_an_error_while_building_publishes_nothing(tmp_path):
    final = tmp_path / "x"
    with pytest.raises(RuntimeError, match="boom"):
        with building(final) as tmp:
            (tmp / "half").write_text("1")
            raise RuntimeError("boom")
    assert not final.exists() and list(tmp_path.iterdir()) == []


def test_the_first_complete_folder_wins_unless_replace(tmp_path):
    final = tmp_path / "x"
    with building(final, done={"n": 1}) as tmp:
        (tmp / "a").write_text("first")
    with building(final, done={"n": 2}) as tmp:  # another process built the same content meanwhile
        (tmp / "a").write_text("second")
    assert (final / "a").read_text() == "first" and _debris(tmp_path, final) == []
    with building(final, done={"n": 3}, replace=True) as tmp:  # a checkpoint of the same step, rewritten
        (tmp / "a").write_text("third")
    assert (final / "a").read_text() == "third" and json.loads((final / DONE).read_text()) == {"n": 3}


def test_an_incomplete_folder_under_the_final_name_is_an_error(tmp_path):
    final = tmp_path / "x"
    final.mkdir()
    (final / "partial").write_text("?")  # not ours, not complete: never silently replaced
    tmp = tmp_path / ".x.tmp"
    tmp.mkdir()
    with pytest.raises(OSError):
        publish(tmp, final, {})
    assert not is_complete(final)


def test_a_process_killed_while_building_leaves_only_debris(tmp_path):
    final = tmp_path / "x"
    code = (
        f"import time, pathlib; from pipeline.atomic_dir import building\n"
        f"with building(pathlib.Path({str(final)!r})) as tmp:\n"
        f"    (tmp / 'a').write_text('1'); print('ready', flush=True); time.sleep(60)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    time.sleep(0.1)
    assert not final.exists()
    assert [p.name.startswith(".x.tmp-") for p in tmp_path.iterdir()] == [True]


def test_replace_yields_to_a_folder_published_between_its_delete_and_its_rename(tmp_path, monkeypatch):
    """Two processes rebuilding the same content: the one whose rename finds a complete folder (the
    other's, published after this one deleted the old) keeps that folder and returns False."""
    import pipeline.atomic_dir as ad

    final = tmp_path / "x"
    with building(final, done={"n": 1}) as tmp:
        (tmp / "a").write_text("other")
    monkeypatch.setattr(ad.shutil, "rmtree", lambda *a, **k: None)  # "deleted", then republished
    tmp = tmp_path / ".x.tmp-mine"
    tmp.mkdir()
    (tmp / "a").write_text("mine")
    assert publish(tmp, final, {"n": 2}, replace=True) is False
    assert (final / "a").read_text() == "other"

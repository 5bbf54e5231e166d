"""The map of the code stays true: no import cycle in pipeline/, the project's own modules imported at
the top of files (scripts/check_imports.py, also run by `make lint`), and every citation of the study's
definitions points at docs/study.md, which exists and has the cited sections."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _tracked_text_files():
    out = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    for name in out.splitlines():
        p = REPO / name
        if p.is_file() and not p.is_symlink() and p.suffix in {".py", ".md", ".yaml", ".yml", ".R", ".toml", ".txt"}:
            yield p


def test_import_graph_has_no_cycle_and_no_unexplained_lazy_import():
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "check_imports.py"), str(REPO / "pipeline")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout
    assert "cycles 0, unexplained function-level imports 0" in proc.stdout


def test_the_import_checker_finds_a_cycle(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg import b\n")
    (pkg / "b.py").write_text("def f():\n    from pkg import a\n")
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "check_imports.py"), str(pkg)], capture_output=True, text=True
    )
    assert proc.returncode == 1
    assert (
        "import cycle: pkg.a <-> pkg.b" in proc.stdout and "b.py:2: function-level import of pkg, pkg.a" in proc.stdout
    )


def test_citations_point_at_docs_study_sections():
    study = (REPO / "docs" / "study.md").read_text(encoding="utf-8")
    sections = set(re.findall(r"^## (\d+)\. ", study, flags=re.M))
    assert sections == {"1", "2", "3", "4", "5", "6"}
    cited = set()
    for p in _tracked_text_files():
        text = p.read_text(encoding="utf-8", errors="replace")
        assert "SPEC" + ".md" not in text, f"{p.relative_to(REPO)} cites a file users do not have"
        cited.update(re.findall(r"docs/study\.md section (\d+)", text))
    assert cited and cited <= sections, f"cited sections {sorted(cited - sections)} do not exist"

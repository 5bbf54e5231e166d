"""The vLLM generation backend (``eval.backend=vllm``, pipeline/eval/generation.py and harness.py):
refused with one line where it cannot run (no vllm package or no CUDA GPU, as on the development
machine), and, where it can, greedy outputs equal to the HF path's on a tiny model."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from pipeline.config import ConfigError, load_config

HAVE_VLLM = importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()


def test_the_backend_is_checked_before_anything_runs(tmp_path):
    from pipeline.eval.stage import evaluate_all

    with pytest.raises(ConfigError, match="eval.backend"):
        load_config(["eval.backend=tgi"])
    cfg = load_config(["eval=cpu_small", "eval.backend=vllm", f"paths.runs_dir={tmp_path / 'runs'}"])
    if HAVE_VLLM:
        pytest.skip("vllm and a CUDA GPU are present: nothing to refuse")
    with pytest.raises(ConfigError, match="config key 'eval.backend': vllm"):
        evaluate_all(cfg)
    assert not (tmp_path / "runs").exists()  # nothing written


@pytest.mark.skipif(not HAVE_VLLM, reason="needs the vllm package and a CUDA GPU (neither on the CPU CI machine)")
def test_vllm_and_hf_give_the_same_greedy_outputs(tmp_path, model_cache):
    from vllm import LLM

    from pipeline import models
    from pipeline.eval.generation import generate

    cfg = load_config(["model=tiny", f"paths.data_dir={model_cache}"])
    folder = models.pretrained_dir(cfg.model, cfg.paths)
    model, tok = models.load_pretrained(cfg.model, cfg.paths, add_pad_token=False)
    model = model.to("cuda").eval()
    prompts = ["Give three tips for staying healthy.", "What is the capital of France?", "Write a haiku."]
    hf = generate(model, tok, prompts, max_new_tokens=24, show_progress=False)
    llm = LLM(model=str(folder), dtype="float32", seed=0, gpu_memory_utilization=0.3, enforce_eager=True)
    vl = generate(llm, tok, prompts, max_new_tokens=24, show_progress=False)
    assert [g.n_tokens for g in vl] == [g.n_tokens for g in hf]
    assert [g.text for g in vl] == [g.text for g in hf]

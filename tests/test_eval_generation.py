"""Batched generation (left padding) gives the same greedy outputs as one prompt at a time.

Uses the real SmolLM2-135M-Instruct (its dequantised checkpoint is cached in pytest's cache folder,
shared with tests/test_models.py).
"""
from __future__ import annotations

import pytest
import torch

from pipeline.config import load_config
from pipeline.eval import generation as G
from pipeline.preprocess import render_source



@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: on a shared 2-core machine two threads are several times slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

PROMPTS = [render_source({"instruction": i, "input": x}) for i, x in [
    ("Name a primary colour.", ""),
    ("Translate to French.", "Good morning, my friend, how are you today?"),
    ("What is 2 + 2?", ""),
]]


@pytest.fixture(scope="module")
def smollm2(request, tmp_path_factory):
    from pipeline import models

    cache = request.config.cache.mkdir("plw_models") if request.config.cache else tmp_path_factory.mktemp("m")
    cfg = load_config(["model=smollm2_135m", f"paths.data_dir={cache}"])
    folder = models.pretrained_dir(cfg.model, cfg.paths)
    return G.load_for_eval(folder, "float32", "cpu")


def test_batched_equals_one_at_a_time(smollm2):
    model, tok = smollm2
    batched = G.generate(model, tok, PROMPTS, max_new_tokens=8, batch_size=3, show_progress=False)
    single = [G.generate(model, tok, [p], max_new_tokens=8, batch_size=1, show_progress=False)[0] for p in PROMPTS]
    assert [g.text for g in batched] == [g.text for g in single]
    assert [g.n_tokens for g in batched] == [g.n_tokens for g in single]
    assert all(0 < g.n_tokens <= 8 for g in batched)
    assert all(g.finished == (g.n_tokens < 8) for g in batched)
    # the order of the results is the order of the prompts (they are sorted by length inside)
    assert G.generate(model, tok, PROMPTS[::-1], max_new_tokens=8, batch_size=2, show_progress=False)[0].text \
        == batched[-1].text


def test_prompts_longer_than_the_context_are_left_truncated(smollm2):
    model, tok = smollm2
    long = "word " * 50 + PROMPTS[0]
    g = G.generate(model, tok, [long], max_new_tokens=4, max_prompt_tokens=20, show_progress=False)
    assert len(g) == 1 and g[0].n_tokens <= 4


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(G.ModelMissing, match="does not exist"):
        G.load_for_eval(tmp_path / "final")
    (tmp_path / "final").mkdir()
    with pytest.raises(G.ModelMissing, match="no config.json"):
        G.load_for_eval(tmp_path / "final")
    (tmp_path / "final" / "config.json").write_text("{}")
    with pytest.raises(G.ModelMissing, match="no weights"):
        G.load_for_eval(tmp_path / "final")

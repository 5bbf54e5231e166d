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

pytestmark = pytest.mark.usefixtures("one_thread")


PROMPTS = [
    render_source({"instruction": i, "input": x})
    for i, x in [
        ("Name a primary colour.", ""),
        ("Translate to French.", "Good morning, my friend, how are you today?"),
        ("What is 2 + 2?", ""),
    ]
]


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
    assert (
        G.generate(model, tok, PROMPTS[::-1], max_new_tokens=8, batch_size=2, show_progress=False)[0].text
        == batched[-1].text
    )


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


# --------------------------------------------------------------------------------------------
# the SDPA mask built without vmap (generation.fast_causal_masks)
# --------------------------------------------------------------------------------------------
def _mask_cases():
    g = torch.Generator().manual_seed(0)
    for batch, kv, q, offset, skip in __import__("itertools").product(
        [1, 3], [1, 6, 17], [1, 4], [0, 2], [True, False]
    ):
        if q > kv:
            continue
        for pad in (None, "none_padded", "left", "random"):
            if pad is None:
                am = None
            else:
                am = torch.ones(batch, kv + offset, dtype=torch.bool)
                if pad == "left":
                    for b in range(batch):
                        am[b, :b] = False
                elif pad == "random":
                    am = torch.rand(batch, kv + offset, generator=g) > 0.3
            yield dict(
                batch_size=batch,
                cache_position=torch.arange(kv - q, kv) + offset,
                kv_length=kv,
                kv_offset=offset,
                attention_mask=am,
                allow_is_causal_skip=skip,
            )


def test_fast_mask_is_transformers_mask():
    from transformers import masking_utils as mu

    theirs = mu.AttentionMaskInterface._global_mapping["sdpa"]  # transformers' sdpa_mask (vmap)
    n = 0
    for case in _mask_cases():
        a = theirs(mask_function=mu.causal_mask_function, **case)
        b = G.causal_padding_mask(mask_function=mu.causal_mask_function, **case)
        if a is None or b is None:  # SDPA's is_causal path: both must agree on it
            assert a is None and b is None, case
            continue
        assert a.dtype == b.dtype == torch.bool and a.shape == b.shape and torch.equal(a, b), case
        n += 1
    assert n > 50
    # another mask pattern (a sliding window) is transformers' own function's result
    sw = mu.sliding_window_causal_mask_function(3)
    case = dict(
        batch_size=2,
        cache_position=torch.arange(6),
        kv_length=6,
        allow_is_causal_skip=False,
        attention_mask=torch.ones(2, 6, dtype=torch.bool),
    )
    want = theirs(mask_function=sw, **case)
    assert not want[0, 0, 5, 0]  # outside the window
    assert torch.equal(G.causal_padding_mask(mask_function=sw, **case), want)


def test_fast_masks_leave_generation_unchanged(smollm2, monkeypatch):
    import contextlib

    from transformers import masking_utils as mu

    model, tok = smollm2
    calls = []
    real = G.causal_padding_mask
    monkeypatch.setattr(G, "causal_padding_mask", lambda *a, **k: calls.append(1) or real(*a, **k))
    fast = G.generate(model, tok, PROMPTS, max_new_tokens=8, batch_size=3, show_progress=False)
    assert len(calls) >= 8  # the left-padded batch's mask was built by the fast path at every step
    assert "sdpa" not in mu.ALL_MASK_ATTENTION_FUNCTIONS._local_mapping  # restored after generation
    monkeypatch.setattr(G, "fast_causal_masks", contextlib.nullcontext)  # transformers' vmap masks
    slow = G.generate(model, tok, PROMPTS, max_new_tokens=8, batch_size=3, show_progress=False)
    assert [(g.text, g.n_tokens, g.finished) for g in fast] == [(g.text, g.n_tokens, g.finished) for g in slow]
    # and the logits of a padded forward pass are the same tensors
    enc = tok(PROMPTS, return_tensors="pt", padding=True, padding_side="left")
    with torch.no_grad():
        ref = model(**enc).logits
        with G.fast_causal_masks():
            got = model(**enc).logits
    assert torch.equal(ref, got)

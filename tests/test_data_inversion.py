"""Prompt inversion (docs/study.md section 4): hand-computed examples with word counts, then the LLaMA tokenizer."""

from __future__ import annotations

import itertools
import json
import random

import pytest

from pipeline.data.inversion import (
    INSTRUCTION_NO_INPUT,
    InversionError,
    Lengths,
    achievable_range,
    dataset_rg,
    invert,
    inverted_lengths,
    measure,
    order_key,
    per_text,
    select_for_target,
    select_short,
    transform,
)

words = per_text(lambda s: len(s.split()))


def test_invert_texts_follow_the_spec():
    r = {"instruction": "Name a color.", "input": "", "output": "Blue."}
    assert invert(r) == {
        "instruction": "Predict the prompt that generated the following AI output.",
        "input": "Blue.",
        "output": "Name a color.",
        "inverted": True,
    }
    r = {"instruction": "Summarize.", "input": "Long text.", "output": "Short."}
    assert invert(r) == {
        "instruction": "Predict the prompt that generated the below AI output given the following context. "
        "Context: Long text.",
        "input": "Short.",
        "output": "Summarize.",
        "inverted": True,
    }
    assert r == {"instruction": "Summarize.", "input": "Long text.", "output": "Short."}  # pure


RECS = [
    {"instruction": "a b", "input": "", "output": "o o o o o o"},  # prompt 2, completion 6: R_g 3
    {"instruction": "x", "input": "c c", "output": "y"},  # prompt 3, completion 1: R_g 1/3
    {"instruction": "q", "input": "", "output": "z z"},  # prompt 1, completion 2: R_g 2
]


def test_short_by_hand():
    assert len(INSTRUCTION_NO_INPUT.split()) == 9
    orig = measure(RECS, words)
    assert orig == [Lengths(2, 0, 6), Lengths(1, 2, 1), Lengths(1, 0, 2)]
    assert dataset_rg(orig) == 9 / 6
    inv = inverted_lengths(RECS, orig, words)
    # r1 inverted: 14 words of fixed text + "c c" = 16 instruction words, input "y", output "x"
    assert inv == [Lengths(9, 6, 2), Lengths(16, 1, 1), Lengths(9, 2, 1)]
    assert inv == measure([invert(r) for r in RECS], words)  # reusing counts == measuring afresh
    new, lengths, sel = transform(RECS, words)
    assert select_short(orig) == sel.invert == [True, False, True]
    assert [r["inverted"] for r in new] == [True, False, True]
    assert new[1] == dict(RECS[1], inverted=False)
    assert sel.rg_before == 1.5 and sel.rg_after == pytest.approx((2 + 1 + 1) / (15 + 3 + 11))
    assert lengths == [inv[0], orig[1], inv[2]]


def test_instance_with_rg_exactly_one_is_not_inverted():
    assert select_short([Lengths(2, 1, 3), Lengths(2, 1, 4)]) == [False, True]


# Four instances, each prompt 1 / completion 3 (R_g 3); inverted: prompt 3 / completion 1.
FOUR = [{"instruction": f"i{k}", "input": "", "output": f"o{k}"} for k in range(4)]
ORIG4 = [Lengths(1, 0, 3)] * 4
INV4 = [Lengths(2, 1, 1)] * 4


def test_target_by_hand():
    # t = 1: f0 = 12 - 4 = 8, each inversion changes f by (1-3) - (3-1) = -4: two inversions give 8/8.
    sel = select_for_target(FOUR, ORIG4, INV4, 1.0, 0.01, seed=0)
    assert sel.n_inverted == 2 and sel.rg_after == 1.0 and sel.rg_before == 3.0 and sel.n_candidates == 4
    # which two: the first two in sha256(seed, content) order
    first = sorted(range(4), key=lambda i: order_key(FOUR[i], 0))[:2]
    assert [i for i, c in enumerate(sel.invert) if c] == sorted(first)
    # already at the target: nothing inverted
    assert select_for_target(FOUR, ORIG4, INV4, 3.0, 0.01, 0).n_inverted == 0
    # t = 2: prefixes give 3.0 (0 inverted) or 10/6 (1 inverted); 10/6 is closer but 17% off
    with pytest.raises(InversionError, match="within tolerance 0.01.*1.6667"):
        select_for_target(FOUR, ORIG4, INV4, 2.0, 0.01, 0)
    assert select_for_target(FOUR, ORIG4, INV4, 2.0, 0.2, 0).rg_after == pytest.approx(10 / 6)
    # unreachable: all inverted gives 4/12
    with pytest.raises(InversionError, match=r"range is \[0\.3333, 3\.0000\]"):
        select_for_target(FOUR, ORIG4, INV4, 0.2, 0.01, 0)
    with pytest.raises(InversionError, match=r"range is \[0\.3333, 3\.0000\]"):
        select_for_target(FOUR, ORIG4, INV4, 3.5, 0.01, 0)


def test_target_can_raise_rg_too():
    # Short-completion data and a higher target: inversions that raise R_g are the candidates.
    orig = [Lengths(1, 2, 1)] * 4  # R_g 1/3 each
    inv = [Lengths(1, 1, 1)] * 4  # R_g 1/2 each
    sel = select_for_target(FOUR, orig, inv, 0.4, 0.01, 0)  # (4 + 0k) / (12 - k) = 0.4 -> k = 2
    assert sel.n_inverted == 2 and sel.rg_after == pytest.approx(0.4)


def _random_dataset(n, rng):
    recs = [{"instruction": f"ins {k} {rng.random()}", "input": "", "output": f"out {k}"} for k in range(n)]
    orig = [Lengths(rng.randint(1, 30), rng.choice([0, 0, rng.randint(1, 40)]), rng.randint(0, 200)) for _ in range(n)]
    inv = [Lengths(rng.randint(9, 60), o.output, o.instruction) for o in orig]
    return recs, orig, inv


def test_achievable_range_matches_brute_force():
    rng = random.Random(0)
    for _ in range(20):
        recs, orig, inv = _random_dataset(8, rng)
        rgs = []
        for choice in itertools.product([False, True], repeat=8):
            c = sum((v if ch else o).completion for o, v, ch in zip(orig, inv, choice))
            p = sum((v if ch else o).prompt for o, v, ch in zip(orig, inv, choice))
            rgs.append(c / p)
        lo, hi = achievable_range(orig, inv)
        assert lo == pytest.approx(min(rgs)) and hi == pytest.approx(max(rgs))


def test_selection_is_deterministic_order_independent_and_seeded():
    rng = random.Random(1)
    recs, orig, inv = _random_dataset(300, rng)
    lo, hi = achievable_range(orig, inv)
    target = (lo * hi) ** 0.5

    def chosen(seed, perm):
        sel = select_for_target(
            [recs[i] for i in perm], [orig[i] for i in perm], [inv[i] for i in perm], target, 0.01, seed
        )
        assert abs(sel.rg_after - target) <= 0.01 * target
        return {json.dumps(recs[i]) for i, c in zip(perm, sel.invert) if c}

    ident = list(range(300))
    shuffled = ident[:]
    random.Random(2).shuffle(shuffled)
    a = chosen(7, ident)
    assert a == chosen(7, ident) == chosen(7, shuffled)
    assert a != chosen(8, ident)
    # the order key depends on content and seed only (a missing input is the empty input)
    assert order_key({"instruction": "a", "input": "", "output": "b"}, 0) == order_key(
        {"instruction": "a", "output": "b", "other": 1}, 0
    )


def test_order_key_is_pinned():
    import hashlib

    expect = hashlib.sha256('3\n["a", "", "b"]'.encode()).hexdigest()
    assert order_key({"instruction": "a", "input": "", "output": "b"}, 3) == expect


def test_transform_with_target_returns_consistent_lengths():
    recs = [{"instruction": "w " * k, "input": "", "output": "v " * (3 * k + 1)} for k in range(1, 40)]
    new, lengths, sel = transform(recs, words, target_rg=1.0, tolerance=0.05, seed=0)
    assert lengths == measure(new, words)
    assert dataset_rg(lengths) == pytest.approx(sel.rg_after)
    assert abs(sel.rg_after - 1.0) <= 0.05
    assert sum(r["inverted"] for r in new) == sel.n_inverted > 0


# ------------------------------------------------------------------------------------------------
# LLaMA tokenizer on real data (../shared)
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llama_lengths(llama_tokenizer_dir):
    from pipeline.data.tokens import get_tokenizer, length_fn

    tok, _ = get_tokenizer(str(llama_tokenizer_dir))
    return length_fn(tok)


@pytest.mark.shared
def test_llama_lengths_are_field_tokens_without_specials(llama_lengths, llama_tokenizer_dir):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(llama_tokenizer_dir / "tokenizer.model"))
    texts = ["Give three tips for staying healthy.", "", "Hello world", "  spaced\n\ntext ", "über naïve 東京"]
    assert llama_lengths(texts) == [len(sp.encode(t)) for t in texts]
    assert llama_lengths(["Hello world"]) == [2]  # [15043, 3186] without BOS


@pytest.mark.shared
def test_llama_short_and_targets_on_real_data(llama_lengths, instructions_dir):
    from pipeline.data.records import load_records

    recs = load_records(instructions_dir / "alpaca_gpt4_llamafactory_en_demo.jsonl").records
    orig = measure(recs, llama_lengths)
    new, lengths, sel = transform(recs, llama_lengths, orig=orig)
    assert sel.n_inverted == sum(o.output > o.instruction + o.input for o in orig) == 782
    assert sel.rg_before == pytest.approx(8.2500, abs=1e-4) and sel.rg_after == pytest.approx(0.0748, abs=1e-4)
    inv = inverted_lengths(recs, orig, llama_lengths)
    for t in (1.0, 0.07, 3.0):
        s = select_for_target(recs, orig, inv, t, 0.01, 0)
        assert abs(s.rg_after - t) <= 0.01 * t
    with pytest.raises(InversionError, match=r"0\.042 is not reachable.*\[0\.0663, 8\.3200\]"):
        select_for_target(recs, orig, inv, 0.042, 0.01, 0)

"""Mechanism metrics against independent computations (numpy, hand-computed BLEU, direct tensor maths)."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.eval import mechanisms as M


# --------------------------------------------------------------------------------------------
# training-loss RSD
# --------------------------------------------------------------------------------------------
def test_loss_rsd_tumbling_matches_numpy():
    rng = np.random.default_rng(3)
    losses = list(2 + rng.random(23))
    got, per = M.loss_rsd(losses, 5, "tumbling")
    w = np.array(losses[:20]).reshape(4, 5)  # 4 full windows, the last 3 steps dropped
    expect = w.std(axis=1, ddof=1) / w.mean(axis=1)
    assert per == pytest.approx(list(expect), rel=1e-12)
    assert got == pytest.approx(expect.mean(), rel=1e-12)


def test_loss_rsd_rolling_matches_numpy():
    losses = [3.0, 2.5, 2.7, 2.2, 2.4, 2.0, 2.1, 1.9]
    got, per = M.loss_rsd(losses, 5, "rolling")
    wins = np.lib.stride_tricks.sliding_window_view(np.array(losses), 5)
    expect = wins.std(axis=1, ddof=1) / wins.mean(axis=1)
    assert len(per) == 4 and got == pytest.approx(expect.mean(), rel=1e-12)


def test_loss_rsd_hand_value_and_too_short():
    # window [1, 2, 3, 4, 5]: mean 3, sample sd sqrt(2.5)
    assert M.loss_rsd([1, 2, 3, 4, 5])[0] == pytest.approx(math.sqrt(2.5) / 3)
    with pytest.raises(ValueError, match="fewer than one 5-step window"):
        M.loss_rsd([1.0, 2.0, 3.0])


def test_read_losses_last_line_per_step_wins_and_ignores_eval_lines(tmp_path):
    p = tmp_path / "metrics.jsonl"
    lines = [
        {"step": 1, "loss": 3.0},
        {"kind": "train", "step": 2, "loss": 2.0},
        {"step": 2, "eval_loss": 9.0},
        {"kind": "eval", "step": 3, "loss": 9.9},
        {"step": 3, "loss": 1.5},
        {"kind": "train", "step": 2, "loss": 2.5},
    ]  # step 2 logged again after a resume
    p.write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"step": 4, "lo')  # torn last line
    losses, steps = M.read_losses(p)
    assert steps == [1, 2, 3] and losses == [3.0, 2.5, 1.5]


@pytest.mark.parametrize(
    "content,match",
    [
        ('{"step": 1, "loss": 1.0}\nnot json\n{"step": 2, "loss": 1.0}\n', r"metrics.jsonl: line 2 is not valid JSON"),
        ('{"loss": 1.0}\n', r"line 1: field 'step' is missing"),
        ('{"step": 1, "loss": "abc"}\n', r"line 1: fields 'step'/'loss' must be numbers"),
        ('{"step": 1, "loss": NaN}\n', r"line 1: field 'loss' is not finite"),
    ],
)
def test_read_losses_bad_lines_name_file_and_line(tmp_path, content, match):
    p = tmp_path / "metrics.jsonl"
    p.write_text(content)
    with pytest.raises(M.MechanismError, match=match):
        M.read_losses(p)


def test_read_losses_missing_file(tmp_path):
    with pytest.raises(M.MechanismError, match="no such file"):
        M.read_losses(tmp_path / "metrics.jsonl")


# --------------------------------------------------------------------------------------------
# memorization BLEU
# --------------------------------------------------------------------------------------------
def _independent_bleu(hyps, refs):
    """Corpus BLEU-4 by hand (whitespace tokens: the inputs need no 13a splitting; no zero counts)."""
    match, total = [0] * 4, [0] * 4
    hl = rl = 0
    for h, r in zip(hyps, refs):
        ht, rt = h.split(), r.split()
        hl, rl = hl + len(ht), rl + len(rt)
        for n in range(1, 5):
            hc = Counter(tuple(ht[i : i + n]) for i in range(len(ht) - n + 1))
            rc = Counter(tuple(rt[i : i + n]) for i in range(len(rt) - n + 1))
            match[n - 1] += sum(min(c, rc[g]) for g, c in hc.items())
            total[n - 1] += max(0, len(ht) - n + 1)
    logp = sum(math.log(m / t) for m, t in zip(match, total)) / 4
    bp = 1.0 if hl > rl else math.exp(1 - rl / hl)
    return 100 * bp * math.exp(logp)


def test_corpus_bleu_matches_an_independent_computation_and_signature():
    hyps = ["the cat sat on the mat today", "a quick brown fox jumps over the dog", "we like green tea a lot"]
    refs = [
        "the cat sat on the red mat today",
        "the quick brown fox jumps over the lazy dog",
        "we like green tea a lot",
    ]
    got, sig = M.corpus_bleu(hyps, refs)
    assert got == pytest.approx(_independent_bleu(hyps, refs), rel=1e-9)
    assert sig.startswith(M.BLEU_SIGNATURE + "|version:")  # nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp
    assert M.corpus_bleu(refs, refs)[0] == pytest.approx(100.0)


def test_select_prompts_unique_and_seeded():
    recs = [{"instruction": f"task {i % 7}", "input": "", "output": f"out {i}"} for i in range(20)]
    allp = M.select_prompts(recs, 100)
    assert len(allp) == 7 and allp[0][1] == "out 0" and allp[6][1] == "out 6"  # first occurrence's output
    assert "### Instruction:\ntask 3\n\n### Response:" in allp[3][0]
    a, b = M.select_prompts(recs, 3, seed=5), M.select_prompts(recs, 3, seed=5)
    assert a == b and len(a) == 3 and len({p for p, _ in a}) == 3
    assert [allp.index(x) for x in a] == sorted(allp.index(x) for x in a)


# --------------------------------------------------------------------------------------------
# weight distance
# --------------------------------------------------------------------------------------------
def _save(folder: Path, tensors: dict) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"))


def test_weight_distance_matches_direct_computation(tmp_path):
    g = torch.Generator().manual_seed(0)
    base = {
        "embed.weight": torch.randn(10, 4, generator=g),
        "layer.weight": torch.randn(4, 4, generator=g),
        "norm.weight": torch.ones(4),
    }
    trained = {k: v.clone() for k, v in base.items()}
    trained["layer.weight"] += 0.01 * torch.arange(16, dtype=torch.float32).reshape(4, 4)
    trained["norm.weight"] -= 0.5
    trained["embed.weight"] = torch.cat([base["embed.weight"] + 0.1, torch.full((1, 4), 7.0)])  # + a pad row
    trained["only_in_trained"] = torch.zeros(3)
    _save(tmp_path / "a", trained)
    _save(tmp_path / "b", base)
    d = M.weight_distance(tmp_path / "a", tmp_path / "b")
    sums = [0.1 * 40, 0.01 * sum(range(16)), 0.5 * 4]  # embed (pre-trained rows only), layer, norm
    sizes = [40, 16, 4]
    l2sq = 40 * 0.01 + sum((0.01 * i) ** 2 for i in range(16)) + 4 * 0.25
    assert d.n_tensors == 3
    assert d.values["l1_mean"] == pytest.approx(sum(sums) / sum(sizes), rel=1e-6)  # mean absolute change
    assert d.values["l2"] == pytest.approx(math.sqrt(l2sq), rel=1e-6)
    assert d.values["l1_sum_per_tensor"] == pytest.approx(sum(sums) / 3, rel=1e-6)
    assert d.values["l1_mean_per_tensor"] == pytest.approx(sum(a / b for a, b in zip(sums, sizes)) / 3, rel=1e-6)
    assert any("only_in_trained" in n for n in d.notes) and any("embed.weight" in n for n in d.notes)
    same = M.weight_distance(tmp_path / "b", tmp_path / "b")
    assert same.values["l1_mean"] == 0.0 and same.values["l2"] == 0.0


def test_weight_distance_bad_input(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(M.MechanismError, match="no \\*.safetensors"):
        M.weight_distance(tmp_path / "empty", tmp_path / "empty")
    _save(tmp_path / "a", {"w": torch.zeros(2)})
    _save(tmp_path / "b", {"w": torch.zeros(2), "v": torch.zeros(2)})
    with pytest.raises(M.MechanismError, match="no tensor 'v'"):
        M.weight_distance(tmp_path / "a", tmp_path / "b")


def test_summary_distance(tmp_path):
    assert M.summary_distance(tmp_path) is None
    (tmp_path / "train_summary.json").write_text(
        json.dumps(
            {"weight_distance": {"l1_mean": 1.5, "l2": 2.0, "l1_sum_per_tensor": 3.0, "tensors": 7, "note": "x"}}
        )
    )
    s = M.summary_distance(tmp_path)
    assert (s["l1_mean"], s["l2"], s["l1_sum_per_tensor"], s["tensors"]) == (1.5, 2.0, 3.0, 7)
    assert s["source"].endswith("train_summary.json")

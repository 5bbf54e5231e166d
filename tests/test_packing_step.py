"""Padding-free packing across the optimizer step (``train.packing=true``, ``packing_scope=step``,
pipeline/packing.py ``plan_step``): every example of the step lands in exactly one row of at most
``packing_tokens`` tokens, ranks get equal numbers of micro-batches and balanced token counts, the
step's loss and gradient equal the unpacked step's (float64, PLW 0, 0.1 and 1; one rank and two
simulated ranks), no example attends to another, and a packed run resumes bit for bit."""

from __future__ import annotations

import os
import random
import signal

import pytest
import torch

from _train_common import SMALL, comparable, final_weights, overrides, rows, summary, tokenizer_dir
from pipeline import loss as L
from pipeline.packing import PackedCollator, first_fit_decreasing, plan_step
from pipeline.preprocess import Collator
from test_packing import loss_and_grads, make_examples, tiny_model

LENGTHS = [7, 12, 5, 20, 9, 3, 16, 11, 30, 2, 14, 8]  # 137 tokens


def test_plan_step_places_every_example_once_within_the_budget_and_balances_ranks():
    rng = random.Random(0)
    for trial in range(200):
        lengths = [rng.randint(1, 64) for _ in range(rng.randint(1, 40))]
        budget = rng.choice([64, 100, 256])
        world = rng.choice([1, 2, 3, 4])
        plan = plan_step(lengths, budget, world)
        assert plan == plan_step(lengths, budget, world)  # deterministic
        placed = sorted(i for rank in plan for row in rank for i in row)
        assert placed == list(range(len(lengths)))
        assert len({len(rank) for rank in plan}) == 1  # equal micro-batch counts (fillers: [])
        assert all(sum(lengths[i] for i in row) <= budget for rank in plan for row in rank)
        loads = [sum(lengths[i] for row in rank for i in row) for rank in plan]
        biggest_row = max(sum(lengths[i] for i in row) for rank in plan for row in rank)
        assert max(loads) - min(loads) <= biggest_row, (trial, loads)
    # first-fit decreasing by hand: 30 | 20 12 | 16 14 ... into rows of 32
    assert first_fit_decreasing([30, 20, 12, 16, 14, 2], 32) == [[0, 5], [1, 2], [3, 4]]
    with pytest.raises(ValueError, match="example 1 of the step has 40 tokens > train.packing_tokens 32"):
        plan_step([3, 40], 32)


@pytest.mark.parametrize("plw", [0.0, 0.1, 1.0])
def test_a_packed_step_has_the_unpacked_steps_loss_and_gradient(plw):
    model = tiny_model("sdpa")
    exs = make_examples(LENGTHS, plw=plw, mask=False)
    unpacked = [Collator(0)(exs[k : k + 3]) for k in range(0, len(exs), 3)]  # 4 micro-batches of 3
    [rows_] = plan_step([int(e["input_ids"].numel()) for e in exs], 48, 1)
    packed = [PackedCollator(0, 48, attention="position_ids")([exs[i] for i in row]) for row in rows_]
    assert len(packed) < len(unpacked) and all(p["input_ids"].shape[0] == 1 for p in packed)
    assert all("attention_mask" not in p for p in packed)  # padding-free: isolation by position_ids
    lu, gu = loss_and_grads(model, unpacked)
    lp, gp = loss_and_grads(model, packed)
    assert lp == pytest.approx(lu, rel=1e-12)
    for n in gu:
        torch.testing.assert_close(gp[n], gu[n], rtol=1e-9, atol=1e-12, msg=lambda m, n=n: f"{n}: {m}")


def test_two_ranks_average_to_the_single_process_step():
    """Two simulated data-parallel ranks, each with its plan_step rows and the step normaliser
    total_w / 2: the mean of their gradients is the single-process unpacked gradient."""
    model = tiny_model("sdpa")
    exs = make_examples(LENGTHS, plw=0.1, mask=False)
    unpacked = [Collator(0)(exs)]
    lu, gu = loss_and_grads(model, unpacked)
    plan = plan_step([int(e["input_ids"].numel()) for e in exs], 40, 2)
    filler = {k: v[:2] for k, v in exs[0].items()}
    filler["weights"] = torch.zeros(2)
    per_rank = [
        [PackedCollator(0, 40, attention="position_ids")([exs[i] for i in r] or [filler]) for r in rk] for rk in plan
    ]
    # the all-reduced step total (float64 sum of the ranks' weights) over W = 2, as step_normalisers gives
    total_w = sum(float(L.effective_weights(x["labels"], x["weights"].double()).sum()) for rk in per_rank for x in rk)
    assert total_w == pytest.approx(float(L.step_normalisers(unpacked, "weight_sum")[0]), rel=1e-7)
    losses, gs = [], []
    for batches in per_rank:
        d = torch.tensor(total_w / 2, dtype=torch.float64).to(torch.float32)
        loss, g = loss_and_grads(model, batches, dens=[d] * len(batches))
        losses.append(loss)
        gs.append(g)
    assert sum(losses) / 2 == pytest.approx(lu, rel=1e-6)
    for n in gu:
        torch.testing.assert_close((gs[0][n] + gs[1][n]) / 2, gu[n], rtol=1e-6, atol=1e-9)


def test_no_example_attends_to_another():
    model = tiny_model("sdpa")
    exs = make_examples(LENGTHS[:4], plw=0.1)
    row = PackedCollator(0, 64, attention="position_ids")(exs)
    changed = [dict(e) for e in exs]
    changed[1] = {**exs[1], "input_ids": exs[1]["input_ids"].flip(0)}
    row2 = PackedCollator(0, 64, attention="position_ids")(changed)
    with torch.no_grad():  # no cache, as in training: transformers reads packed sequences from positions then
        a = model(input_ids=row["input_ids"], position_ids=row["position_ids"], use_cache=False).logits
        b = model(input_ids=row2["input_ids"], position_ids=row2["position_ids"], use_cache=False).logits
    seg = row["segment_ids"][0]
    assert not torch.allclose(a[0, seg == 1], b[0, seg == 1])  # the perturbed example moved
    for other in (0, 2, 3):
        torch.testing.assert_close(a[0, seg == other], b[0, seg == other], rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------
# through the trainer
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def base(request, tmp_path_factory, module_tmp, shared_dir):
    cache = getattr(request.config, "cache", None)
    cache = cache.mkdir("plw_train") if cache is not None else tmp_path_factory.mktemp("plw_train")
    return {"data_dir": module_tmp("pack_data"), "tokenizer": tokenizer_dir(cache)}


PACK = ["train.packing=true", "train.packing_tokens=256"]


def test_a_packed_run_trains_as_the_unpacked_one_and_resumes_bit_for_bit(base, tmp_path):
    from pipeline.config import load_config
    from pipeline.runs import create_run
    from pipeline.train import Preempted, TrainerCallback, run

    plain = run(load_config(overrides(base, tmp_path / "plain", recipe=SMALL)))
    packed_cfg = load_config(overrides(base, tmp_path / "packed", *PACK, recipe=SMALL))
    packed = run(packed_cfg)
    a, b = rows(plain), rows(packed)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b):  # float32: the same loss terms summed in another order
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5)
        assert y["weight_sum"] == pytest.approx(x["weight_sum"], rel=1e-6)
        assert (y["prompt_tokens"], y["completion_tokens"]) == (x["prompt_tokens"], x["completion_tokens"])

    class Term(TrainerCallback):
        def on_step_end(self, trainer, step, row):
            if step == 1:
                os.kill(os.getpid(), signal.SIGTERM)

    cut_cfg = load_config(overrides(base, tmp_path / "cut", *PACK, recipe=SMALL))
    with pytest.raises(Preempted):
        run(cut_cfg, callbacks=[Term()])
    run(cut_cfg)
    rd = create_run(cut_cfg)
    assert summary(rd)["resumed_from"] == [1]
    assert [comparable(r) for r in rows(rd)] == [comparable(r) for r in b]
    got, want = final_weights(rd), final_weights(packed)
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_step_packing_refuses_a_per_micro_batch_normaliser(tmp_path):
    from pipeline.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="train.packing_scope"):
        load_config(["train.packing=true", "train.loss_normaliser=micro_batch"])
    with pytest.raises(ConfigError, match="train.packing_tokens"):
        load_config(["train.packing=true", "train.packing_tokens=8"])
    load_config(["train.packing=true", "train.packing_scope=micro_batch", "train.loss_normaliser=micro_batch"])


def test_the_default_row_length_follows_the_attention_kernel():
    from types import SimpleNamespace

    from pipeline.packing import default_packing_tokens

    tc = SimpleNamespace(per_device_batch_size=4, model_max_length=512)
    assert default_packing_tokens(tc, tiny_model("sdpa")) == 512  # dense within a row: short rows
    flash = SimpleNamespace(config=SimpleNamespace(_attn_implementation="flash_attention_2"))
    assert default_packing_tokens(tc, flash) == 2048  # varlen: long rows cost nothing extra

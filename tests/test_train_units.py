"""Trainer building blocks, each against an independent computation (fast; no run folders needed).

Data order and partition, checkpoint folders, weight distance, regularizers (Minkowski penalty value
and gradient vs autograd, weight-decay groups, attention dropout), the loss wrapper vs full logits,
launch commands and the distributed config files.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from pipeline import regularizers as R
from pipeline.loss import naive_weighted_loss
from pipeline.trainer import checkpoint as C
from pipeline.trainer import data as D
from pipeline.trainer.distance import weight_distance

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parent.parent
TINY = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    vocab_size=97,
    max_position_embeddings=64,
)


def tiny_llama(tied: bool = False, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**TINY, tie_word_embeddings=tied)).float()


# --------------------------------------------------------------------------------------------
# data order
# --------------------------------------------------------------------------------------------
def test_split_is_deterministic_disjoint_and_sized():
    tr, ev = D.split_indices(100, 0.1, 42)
    assert (tr, ev) == D.split_indices(100, 0.1, 42)
    assert len(ev) == 10 and sorted(tr + ev) == list(range(100))
    assert D.split_indices(100, 0.1, 43)[1] != ev
    assert D.split_indices(100, 0.0, 42) == (list(range(100)), [])
    assert len(D.split_indices(3, 0.01, 0)[1]) == 1  # at least one held out when asked for


def test_each_epoch_visits_every_example_once_in_a_seeded_order():
    n, gb = 10, 4
    assert D.steps_per_epoch(n, gb) == 3 and D.total_steps(n, gb, 2.0) == 6 and D.total_steps(n, gb, 0.5) == 2
    assert D.total_steps(n, gb, 3.0, max_steps=7) == 7
    for epoch in range(2):
        seen = [i for s in range(1 + 3 * epoch, 4 + 3 * epoch) for i in D.step_examples(n, gb, 7, s)]
        assert sorted(seen) == list(range(n))  # last step of the epoch holds the remainder (2)
    assert D.step_examples(n, gb, 7, 1) != D.step_examples(n, gb, 7, 4)  # epochs reshuffle
    assert D.step_examples(n, gb, 7, 2) == D.step_examples(n, gb, 7, 2)
    assert D.step_examples(n, gb, 7, 1) != D.step_examples(n, gb, 8, 1)
    assert len(D.step_examples(n, gb, 7, 3)) == 2
    # a step past the epochs (max_steps) starts the next epoch's order
    assert D.step_examples(n, gb, 7, 7) == D.epoch_order(n, 7, 2)[:4]


@pytest.mark.parametrize(
    "n,world,per_device,accum", [(8, 2, 2, 2), (5, 2, 2, 2), (1, 2, 2, 2), (8, 1, 2, 4), (3, 1, 2, 4)]
)
def test_micro_batches_cover_the_step_once_and_ranks_stay_in_lockstep(n, world, per_device, accum):
    step = list(range(100, 100 + n))
    per_rank = [D.rank_micro_batches(step, world, r, per_device, accum) for r in range(world)]
    assert len({len(m) for m in per_rank}) == 1  # same number of forward passes on every rank
    flat = [i for mbs in per_rank for mb in mbs for i in mb]
    assert sorted(flat) == step
    assert all(len(mb) <= per_device for mbs in per_rank for mb in mbs)
    if n == world * per_device * accum:
        assert all(len(mbs) == accum for mbs in per_rank)


def test_filler_micro_batch_has_no_loss_terms():
    from pipeline.loss import effective_weights
    from pipeline.preprocess import Collator

    b = Collator(pad_token_id=0)([D.filler_example(0)])
    assert float(effective_weights(b["labels"], b["weights"]).sum()) == 0.0


# --------------------------------------------------------------------------------------------
# checkpoint folders
# --------------------------------------------------------------------------------------------
def test_checkpoint_commit_latest_prune_and_debris(tmp_path):
    ck = tmp_path / "checkpoints"
    assert C.latest_checkpoint(ck) is None
    for step in (2, 4, 6):
        tmp = C.tmp_dir(ck, step)
        tmp.mkdir(parents=True)
        (tmp / "payload.bin").write_bytes(b"x" * step)
        C.commit(tmp, step)
        assert not tmp.exists()
    assert C.latest_checkpoint(ck).name == C.checkpoint_name(6) and C.checkpoint_step(C.latest_checkpoint(ck)) == 6
    done = json.loads((ck / C.checkpoint_name(4) / C.DONE).read_text())
    assert done["step"] == 4 and done["files"] == {"payload.bin": 4}
    # a folder without DONE (killed before commit) and a temporary one are not checkpoints
    (ck / C.checkpoint_name(8)).mkdir()
    C.tmp_dir(ck, 10).mkdir()
    assert C.latest_checkpoint(ck).name == C.checkpoint_name(6)
    assert sorted(C.remove_debris(ck)) == sorted([C.checkpoint_name(8), C.tmp_dir(ck, 10).name])
    assert C.prune(ck, keep=2) == [C.checkpoint_name(2)]
    assert [p.name for p in C.complete_checkpoints(ck)] == [C.checkpoint_name(4), C.checkpoint_name(6)]
    assert sorted(p.name for p in ck.iterdir()) == [C.checkpoint_name(4), C.checkpoint_name(6)]


# --------------------------------------------------------------------------------------------
# weight distance
# --------------------------------------------------------------------------------------------
def test_weight_distance_values_and_pad_row():
    ref = {"emb": torch.zeros(3, 2), "w": torch.ones(2, 2)}
    trained = {
        "emb": torch.tensor([[1.0, -1.0], [0.0, 0.0], [0.0, 2.0], [9.0, 9.0]]),  # + a pad row
        "w": torch.ones(2, 2) * 1.5,
    }
    d = weight_distance(trained.get, ref.items())
    diffs = [1, 1, 0, 0, 0, 2, 0.5, 0.5, 0.5, 0.5]
    assert d["elements"] == 10 and d["rows_excluded"] == {"emb": 1}
    assert d["l1_mean"] == pytest.approx(sum(diffs) / 10)
    assert d["l2"] == pytest.approx(sum(x * x for x in diffs) ** 0.5)
    assert d["l1_mean_per_tensor"] == pytest.approx((4 / 6 + 2 / 4) / 2)
    assert d["l1_sum_per_tensor"] == pytest.approx((4 + 2) / 2)
    with pytest.raises(ValueError, match="shape"):
        weight_distance({"emb": torch.zeros(3, 3), "w": torch.ones(2, 2)}.get, ref.items())
    with pytest.raises(KeyError, match="w"):
        weight_distance({"emb": torch.zeros(3, 2)}.get, ref.items())


# --------------------------------------------------------------------------------------------
# regularizers
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("where", ["device", "cpu"])
def test_minkowski_penalty_value_and_gradient_match_autograd(reduction, where):
    model = tiny_llama(tied=True).double()  # float64: the check is not blurred by rounding
    named = R.trainable_parameters(model)
    ref = [p.detach().clone() for _, p in named]
    pen = R.MinkowskiPenalty(named, coef=0.3, reduction=reduction, reference_device=where)
    assert pen.n_tensors == len(ref) and pen.value() == 0.0
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, p in named:
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.01)
            p.view(-1)[0] = 0.0 if p.numel() > 1 else p.view(-1)[0]
    # independent: autograd through the reference definition
    leaves = [p.detach().clone().requires_grad_(True) for _, p in named]
    expected = R.minkowski_penalty(leaves, ref, 0.3, reduction)
    expected.backward()
    # the trainer's path: data gradients already present, the penalty's gradient added to them
    data_grads = [torch.randn(p.shape, generator=g, dtype=p.dtype) for _, p in named]
    for (_, p), dg in zip(named, data_grads):
        p.grad = dg.clone()
    value = pen.apply()
    assert value == pytest.approx(float(expected.detach()), rel=1e-12)
    for (_, p), dg, leaf in zip(named, data_grads, leaves):
        torch.testing.assert_close(p.grad - dg, leaf.grad, rtol=1e-9, atol=1e-15)
    # literal reading of the definition for one tensor
    if reduction == "sum":
        d = [float((p.detach() - r).abs().sum()) for (_, p), r in zip(named, ref)]
        assert value == pytest.approx(0.3 * sum(d) / len(d), rel=1e-12)


def test_weight_decay_groups_follow_hf_trainer():
    model = tiny_llama()
    decay = R.decay_parameter_names(model)
    names = {n for n, _ in R.trainable_parameters(model)}
    assert "model.embed_tokens.weight" in decay and "lm_head.weight" in decay
    assert "model.layers.0.self_attn.q_proj.weight" in decay
    assert not any("norm" in n for n in decay)
    assert {n for n in names if "norm" in n} == names - decay
    groups = R.optimizer_groups(model, 0.1, decay)
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    assert sum(len(g["params"]) for g in groups) == len(names)


def test_attention_dropout_is_active_in_train_mode_only():
    model = tiny_llama()
    assert R.set_attention_dropout(model, 0.5) == TINY["num_hidden_layers"]
    assert model.config.attention_dropout == 0.5
    ids = torch.randint(0, 97, (1, 12), generator=torch.Generator().manual_seed(0))
    model.train()
    a, b = model(input_ids=ids).logits, model(input_ids=ids).logits
    assert not torch.allclose(a, b)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)
    R.set_attention_dropout(model, 0.0)
    model.train()
    assert torch.allclose(model(input_ids=ids).logits, model(input_ids=ids).logits)


# --------------------------------------------------------------------------------------------
# the loss wrapper
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tied", [False, True])
def test_wrapper_loss_and_gradients_equal_full_logits(tied):
    from pipeline.preprocess import Collator, build_example
    from pipeline.loss import WeightedLossModel

    model = tiny_llama(tied=tied).double()
    g = torch.Generator().manual_seed(3)
    exs = [
        build_example(
            torch.randint(0, 97, (L,), generator=g).tolist(), n_prompt=np_, plw=0.2, mask_zero_weight_labels=False
        )
        for L, np_ in ((9, 4), (6, 2), (11, 7))
    ]
    batch = Collator(pad_token_id=0)(exs)
    wrapper = WeightedLossModel(model, label_smoothing=0.1, chunk_size=5)
    out = wrapper(
        input_ids=batch["input_ids"],
        labels=batch["labels"],
        weights=batch["weights"],
        prompt_mask=batch["prompt_mask"],
        attention_mask=batch["attention_mask"],
        normaliser=torch.tensor(7.0),
    )
    out["loss"].backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    ref = naive_weighted_loss(logits, batch["labels"], batch["weights"], 7.0, label_smoothing=0.1)
    ref.backward()
    assert float(out["loss"].detach()) == pytest.approx(float(ref.detach()), rel=1e-10)
    for n, p in model.named_parameters():
        torch.testing.assert_close(got[n], p.grad, rtol=1e-8, atol=1e-12, msg=n)
    assert int(out["prompt_tokens"]) == 3 + 1 + 6 and int(out["completion_tokens"]) == 5 + 4 + 4


# --------------------------------------------------------------------------------------------
# launching and the distributed config files
# --------------------------------------------------------------------------------------------
def test_launch_commands():
    from pipeline.config import load_config
    from pipeline.train import launch_command, resolve_nproc

    cfg = load_config(["model=llama2_7b", "train.launcher=accelerate"])
    cmd = launch_command(cfg, Path("/runs/r1"), 4)
    assert cmd[1:3] == ["-m", "accelerate.commands.launch"] and cmd[-3:] == ["-m", "pipeline.trainer.rank", "/runs/r1"]
    assert cmd[cmd.index("--config_file") + 1] == str(REPO / "conf" / "distributed" / "fsdp.yaml")
    assert cmd[cmd.index("--num_processes") + 1] == "4"
    assert cmd[cmd.index("--fsdp_transformer_layer_cls_to_wrap") + 1] == "LlamaDecoderLayer"
    assert cmd[cmd.index("--mixed_precision") + 1] == "bf16"
    ds = launch_command(load_config(["train.launcher=accelerate", "train.distributed=deepspeed"]), Path("/r"), 2)
    assert ds[ds.index("--config_file") + 1].endswith("deepspeed_zero3.yaml") and "--mixed_precision" not in ds
    tr = launch_command(load_config(["train.launcher=torchrun"]), Path("/r"), 2)
    assert tr[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    assert resolve_nproc(load_config(["train.nproc=3"]).train) == 3
    if not torch.cuda.is_available():
        assert resolve_nproc(load_config([]).train) == 1


def test_accelerate_environment_is_read(monkeypatch):
    from pipeline.trainer.dist import accelerate_settings

    for k, v in {
        "ACCELERATE_USE_FSDP": "true",
        "ACCELERATE_MIXED_PRECISION": "bf16",
        "FSDP_TRANSFORMER_CLS_TO_WRAP": "MistralDecoderLayer",
        "FSDP_RESHARD_AFTER_FORWARD": "false",
        "FSDP_ACTIVATION_CHECKPOINTING": "true",
    }.items():
        monkeypatch.setenv(k, v)
    s = accelerate_settings()
    assert s == {
        "distributed": "fsdp",
        "mixed_precision": "bf16",
        "fsdp_wrap_class": "MistralDecoderLayer",
        "reshard_after_forward": False,
        "activation_checkpointing": True,
    }


def test_distributed_config_files():
    d = REPO / "conf" / "distributed"
    fsdp = yaml.safe_load((d / "fsdp.yaml").read_text())
    assert fsdp["distributed_type"] == "FSDP" and fsdp["mixed_precision"] == "bf16"
    fc = fsdp["fsdp_config"]
    assert fc["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP" and fc["fsdp_reshard_after_forward"] is True
    assert fc["fsdp_transformer_layer_cls_to_wrap"] == "LlamaDecoderLayer"
    ds = yaml.safe_load((d / "deepspeed_zero3.yaml").read_text())
    assert ds["distributed_type"] == "DEEPSPEED"
    assert (REPO / ds["deepspeed_config"]["deepspeed_config_file"]).is_file()
    z3 = json.loads((d / "ds_zero3.json").read_text())
    assert (
        z3["zero_optimization"]["stage"] == 3 and z3["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"]
    )
    assert yaml.safe_load((d / "ddp.yaml").read_text())["distributed_type"] == "MULTI_GPU"


def test_runtime_settings_do_not_change_the_run_id():
    from pipeline.config import load_config
    from pipeline.runs import run_id

    base = ["model=tiny", "dataset=shared_alpaca52k", "train=cpu_small"]
    a = run_id(load_config(base))
    for extra in (
        "train.nproc=4",
        "train.launcher=torchrun",
        "train.eval_steps=3",
        "train.save_total_limit=5",
        "train.resume=false",
        "train.loss_chunk_size=256",
        "train.num_threads=1",
        "train.minkowski_reference=cpu",
        "train.distributed=fsdp",
    ):
        assert run_id(load_config(base + [extra])) == a, extra
    for extra in ("train.max_grad_norm=0.5", "train.minkowski_reduction=mean", "train.adam_epsilon=1e-6"):
        assert run_id(load_config(base + [extra])) != a, extra


def test_fp64_gradient_clipping_matches_torch_in_float64():
    from pipeline.trainer.dist import clip_grad_norm_fp64

    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(s, generator=g, dtype=torch.float64) for s in ((5, 3), (7,), (2, 2, 2))]
    params = [torch.nn.Parameter(torch.zeros_like(x)) for x in grads]
    for p, x in zip(params, grads):
        p.grad = x.clone()
    want = torch.nn.utils.clip_grad_norm_(params, 0.5)
    mine = [x.clone() for x in grads]
    got = clip_grad_norm_fp64(mine, 0.5)
    assert got == pytest.approx(float(want), rel=1e-12)
    for m, p in zip(mine, params):
        torch.testing.assert_close(m, p.grad, rtol=1e-12, atol=0)
    untouched = [x.clone() for x in grads]
    assert clip_grad_norm_fp64(untouched, 0.0) == pytest.approx(float(want), rel=1e-12)  # 0: no clipping
    assert all(torch.equal(a, b) for a, b in zip(untouched, grads))


def test_trackers_are_checked_before_training(tmp_path):
    from pipeline.trainer.reporting import Trackers

    with pytest.raises(ValueError, match="train.report_to': unknown tracker 'tensorbord'"):
        Trackers(["tensorbord"], tmp_path, "r", {})
    with pytest.raises(RuntimeError, match=r"\['wandb'\] not installed \(pip install wandb"):
        Trackers(["wandb"], tmp_path, "r", {})


def _scalars(folder):
    """Every scalar TensorBoard event under ``folder``: {tag: [(step, value), ...]}."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = {}
    for sub in sorted({e.parent for e in folder.rglob("events.out.tfevents.*")}):
        acc = EventAccumulator(str(sub))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, set()).update((e.step, e.value) for e in acc.Scalars(tag))
    return {k: sorted(v) for k, v in out.items()}


def test_tensorboard_events_read_back_and_results_join_the_same_run(tmp_path):
    from pipeline.trainer.reporting import Trackers, log_run_results

    t = Trackers(["tensorboard"], tmp_path, "run-1", {"train": {"learning_rate": 2e-5, "report_to": ["x"]}})
    t.log({"kind": "train", "step": 1, "loss": 2.5, "lr": 1e-5, "skipped": False}, 1)
    t.log({"kind": "train", "step": 2, "loss": 2.0, "lr": 2e-5}, 2)
    t.log({"kind": "eval", "step": 2, "eval_loss": 2.25}, 2)
    t.close()
    # the evaluation, later and in another process, logs into the same tracker run
    log_run_results(["tensorboard"], tmp_path, "run-1", {"results/piqa/acc": 0.625}, 2)
    got = _scalars(tmp_path / "tensorboard")
    assert got["train/loss"] == [(1, 2.5), (2, 2.0)]
    assert got["train/lr"] == [(1, pytest.approx(1e-5)), (2, pytest.approx(2e-5))]
    assert got["eval/eval_loss"] == [(2, 2.25)] and got["results/piqa/acc"] == [(2, 0.625)]
    assert "train/skipped" not in got  # booleans are not metrics


class _Payload:
    """Unpickling it runs code (what a tampered checkpoint could do with weights_only=False)."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_resume_loads_scheduler_and_rng_as_plain_data(tmp_path):
    """scheduler.pt and rng/rank<r>.pt are read with weights_only=True: a checkpoint cannot run
    code on resume; the states written load that way and restore the RNG streams exactly."""
    import random

    import numpy as np
    from transformers import get_scheduler

    from pipeline.trainer.dist import Backend

    def parts():
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 2)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        return model, opt, get_scheduler("cosine", opt, num_warmup_steps=1, num_training_steps=5)

    b = Backend()
    model, opt, sched = parts()
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    sched.step()
    b.save(tmp_path / "ck", model, opt, sched)
    for f in ("scheduler.pt", "rng/rank0.pt"):  # plain data: loads without any allow-list
        torch.load(tmp_path / "ck" / f, weights_only=True)
    want = (np.random.rand(2).tolist(), random.random(), torch.rand(2).tolist())
    model2, opt2, sched2 = parts()
    b.load(tmp_path / "ck", model2, opt2, sched2)
    assert (np.random.rand(2).tolist(), random.random(), torch.rand(2).tolist()) == want
    assert sched2.state_dict() == sched.state_dict()
    # a tampered RNG file is refused, and its code does not run
    torch.save(_Payload(tmp_path / "pwned"), tmp_path / "ck" / "rng" / "rank0.pt")
    with pytest.raises(Exception, match="Weights only load failed"):
        b.load(tmp_path / "ck", *parts())
    assert not (tmp_path / "pwned").exists()


def test_a_skipped_steps_metrics_line_is_left_out_of_the_loss_readers(tmp_path):
    """A step skipped for zero total weight logs ``loss: null``; readers of the loss curve skip it."""
    from pipeline.eval.mechanisms import read_losses
    from pipeline.runs import RunDir, append_jsonl
    from pipeline.trainer.reporting import format_row

    rd = RunDir(tmp_path)
    append_jsonl(rd.metrics, {"kind": "train", "step": 1, "total_steps": 3, "loss": 2.0})
    skipped = {"kind": "train", "step": 2, "total_steps": 3, "epoch": 1.0, "skipped": True, "loss": None, "lr": 1e-3}
    append_jsonl(rd.metrics, skipped)
    append_jsonl(rd.metrics, {"kind": "train", "step": 3, "total_steps": 3, "loss": 1.5})
    assert read_losses(rd.metrics) == ([2.0, 1.5], [1, 3])
    assert "skipped" in format_row(skipped)

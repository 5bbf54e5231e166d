"""The trainer end to end (pipeline.train.run): real tiny LLaMA model, real Alpaca rows, CPU.

Every test trains for real: metrics, checkpoints, resume after SIGKILL and SIGTERM, 2 gloo processes
under FSDP against 1 process, PLW's effect on the gradient, the Minkowski penalty inside training,
failures. Set-up shared with the other trainer tests: tests/_train_common.py.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from _train_common import REPO, SMALL, comparable, final_weights, overrides, rows, summary, tokenizer_dir
from pipeline.train import TrainerCallback

torch.set_num_threads(1)

pytestmark = pytest.mark.shared


# --------------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def base(request, tmp_path_factory, shared_dir):
    cache = getattr(request.config, "cache", None)
    cache = cache.mkdir("plw_train") if cache is not None else tmp_path_factory.mktemp("plw_train")
    return {"data_dir": tmp_path_factory.mktemp("train_data"), "tokenizer": tokenizer_dir(cache)}


def _cfg(base, runs_dir, *extra, recipe=SMALL):
    from pipeline.config import load_config

    return load_config(overrides(base, runs_dir, *extra, recipe=recipe))


@pytest.fixture(scope="module")
def reference(base, module_tmp):
    """The small recipe trained once, uninterrupted, in this process."""
    from pipeline.train import run

    return run(_cfg(base, module_tmp("ref_runs")))


def _stopped_at(cfg, stop_step: int):
    """Train ``cfg`` until ``stop_step``, where a callback asks to stop (a checkpoint is written on the
    way out and Preempted raised); returns the run folder."""
    from pipeline.runs import create_run
    from pipeline.train import Preempted, TrainerCallback, run

    class Stop(TrainerCallback):
        def on_step_end(self, trainer, step, row):
            return step == stop_step

    with pytest.raises(Preempted):
        run(cfg, callbacks=[Stop()])
    return create_run(cfg)


def _assert_same_training(rd, ref, exact=True, rtol=0.0, atol=0.0):
    got, want = rows(rd), rows(ref)
    assert [r["step"] for r in got] == list(range(1, 5)) == [r["step"] for r in want]
    if exact:
        assert [comparable(r) for r in got] == [comparable(r) for r in want]
    else:
        for a, b in zip(got, want):
            for k in ("loss", "prompt_loss", "completion_loss", "penalty", "grad_norm", "lr", "weight_sum"):
                assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-9), (a["step"], k)
    ev, ev_ref = rows(rd, "eval"), rows(ref, "eval")
    assert [r["step"] for r in ev] == [2, 4] == [r["step"] for r in ev_ref]
    for a, b in zip(ev, ev_ref):
        if exact:
            assert a == b
        else:
            for k in ("eval_loss", "eval_prompt_loss", "eval_completion_loss"):
                assert a[k] == pytest.approx(b[k], rel=1e-5), (a["step"], k)
    wa, wb = final_weights(rd), final_weights(ref)
    assert sorted(wa) == sorted(wb)
    for k in wa:
        if exact:
            assert torch.equal(wa[k], wb[k]), k
        else:
            torch.testing.assert_close(wa[k], wb[k], rtol=rtol, atol=atol, msg=k)


# --------------------------------------------------------------------------------------------
# a run writes what the contract says
# --------------------------------------------------------------------------------------------
def test_run_writes_metrics_model_summary_and_status(reference, base):
    from transformers import AutoModelForCausalLM

    from pipeline.train import run

    rd = reference
    st = rd.status()
    assert st["state"] == "done" and st["attempts"] == 1 and st["steps"] == 4
    assert list(rd.checkpoints.iterdir()) == []  # done: the step checkpoints are removed (keep_checkpoints)
    train = rows(rd)
    assert [r["step"] for r in train] == list(range(1, 5))
    for r in train:
        assert r["total_steps"] == 4 and r["examples"] == 4 and r["tokens"] > 0
        assert math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) and r["tokens_per_s"] > 0
        assert r["total_loss"] == pytest.approx(r["loss"] + r["penalty"])
        assert r["prompt_tokens"] > 0 and r["completion_tokens"] > 0
        # weight_sum normaliser: sum of weights = PLW x prompt targets + completion targets
        assert r["weight_sum"] == pytest.approx(0.1 * r["prompt_tokens"] + r["completion_tokens"], rel=1e-6)
    assert train[0]["penalty"] == 0.0 and train[1]["penalty"] > 0  # theta = theta_0 at step 1
    assert train[0]["epoch"] == pytest.approx(1 / 9)  # 36 examples / 4 per step
    # cosine without warmup over 4 steps: lr_k = 1e-4 x (1 + cos(pi (k - 1) / 4)) / 2
    for r in train:
        assert r["lr"] == pytest.approx(1e-4 * (1 + math.cos(math.pi * (r["step"] - 1) / 4)) / 2, rel=1e-9)
    ev = rows(rd, "eval")  # train.eval_steps=2, and at the end
    assert [r["step"] for r in ev] == [2, 4] and all(r["eval_examples"] == 4 for r in ev)
    assert ev[0]["eval_prompt_tokens"] > 0 and math.isfinite(ev[0]["eval_completion_loss"])
    assert ev[1]["eval_loss"] != ev[0]["eval_loss"]
    # final model: loads with transformers, equals the saved weights, computes
    s = summary(rd)
    assert s["steps"] == 4 == s["total_steps"] and s["final_loss"] == train[-1]["loss"]
    assert s["data"]["train_examples"] == 36 and s["data"]["eval_examples"] == 4
    assert s["data"]["truncation"]["n_instances"] == 40 and s["data"]["truncation"]["policy"] == "keep"
    assert s["tokens"] == sum(r["tokens"] for r in train)
    assert s["batch"]["accumulation_steps"] == 2 and s["resumed_from"] == []
    assert s["eval"]["eval_loss"] == ev[-1]["eval_loss"]
    model = AutoModelForCausalLM.from_pretrained(str(rd.final))
    saved = final_weights(rd)
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), saved[name]), name
    with torch.no_grad():
        out = model(input_ids=torch.tensor([[1, 2, 3]]))
    assert torch.isfinite(out.logits).all()
    assert (rd.final / "tokenizer_config.json").is_file()
    conf = json.loads((rd.final / "config.json").read_text())
    assert conf["use_cache"] is True and conf["attention_dropout"] == 0.0  # inference settings restored
    assert conf.get("dtype", conf.get("torch_dtype")) == "float32"
    # weight distance, recomputed independently from the two checkpoints
    from pipeline.models import pretrained_dir
    from safetensors.torch import load_file

    cfg = _cfg(base, rd.path.parent)
    pre = load_file(str(pretrained_dir(cfg.model, cfg.paths) / "model.safetensors"))
    diffs = [(saved[k].double() - pre[k].double()) for k in pre]
    n = sum(d.numel() for d in diffs)
    wd = s["weight_distance"]
    assert wd["elements"] == n and wd["rows_excluded"] == {}
    assert wd["l1_mean"] == pytest.approx(sum(float(d.abs().sum()) for d in diffs) / n, rel=1e-9)
    assert wd["l2"] == pytest.approx(math.sqrt(sum(float(d.pow(2).sum()) for d in diffs)), rel=1e-9)
    assert wd["l1_mean"] > 0
    # a done run is not trained again
    before = rd.metrics.read_text()
    again = run(_cfg(base, rd.path.parent))
    assert again.path == rd.path and rd.metrics.read_text() == before and rd.status()["attempts"] == 1


# --------------------------------------------------------------------------------------------
# step 1 against an independent computation; PLW's effect on the gradient
# --------------------------------------------------------------------------------------------
PLW_RECIPE = [
    x
    for x in SMALL
    if not x.startswith(("train.max_steps", "train.eval_fraction", "train.minkowski", "train.weight_decay", "plw="))
] + ["train.max_steps=1", "train.eval_fraction=0"]


class _Grads(TrainerCallback):
    def __init__(self):
        self.grads = None

    def on_gradients(self, trainer, step):
        if step == 1:
            self.grads = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters()}


@pytest.fixture(scope="module")
def plw_runs(base, module_tmp):
    from pipeline.train import run

    out = {}
    for plw in (0.0, 0.3, 1.0):
        cb = _Grads()
        rd = run(_cfg(base, module_tmp(f"plw{plw}"), f"plw={plw}", recipe=PLW_RECIPE), callbacks=[cb])
        out[plw] = (rd, cb.grads)
    return out


def test_step1_losses_equal_an_independent_computation(plw_runs, base):
    """loss, prompt and completion losses of step 1 from full logits of the pre-trained model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.data.build import load_dataset
    from pipeline.models import pretrained_dir
    from pipeline.preprocess import tokenize_records
    from pipeline.trainer.data import step_examples

    rd, _ = plw_runs[0.3]
    cfg = _cfg(base, rd.path.parent, "plw=0.3", recipe=PLW_RECIPE)
    tok = AutoTokenizer.from_pretrained(str(base["tokenizer"]))
    records, _ = load_dataset(cfg)
    inst, _ = tokenize_records(records, tok, 128, "keep")
    model = AutoModelForCausalLM.from_pretrained(str(pretrained_dir(cfg.model, cfg.paths)), dtype=torch.float32)
    eps, plw = 0.05, 0.3
    num = den = 0.0
    p_sum = c_sum = 0.0
    p_n = c_n = 0
    with torch.no_grad():
        for i in step_examples(len(inst), 4, 42, 1):
            ids = torch.tensor([inst[i].input_ids])
            logits = model(input_ids=ids).logits[0].double()
            ce = F.cross_entropy(logits[:-1], ids[0, 1:], reduction="none", label_smoothing=eps)
            target_pos = torch.arange(1, ids.shape[1])
            is_prompt = target_pos < inst[i].n_prompt
            w = torch.where(is_prompt, plw, 1.0).double()
            num += float((w * ce).sum())
            den += float(w.sum())
            p_sum += float(ce[is_prompt].sum())
            c_sum += float(ce[~is_prompt].sum())
            p_n += int(is_prompt.sum())
            c_n += int((~is_prompt).sum())
    row = rows(rd)[0]
    assert row["prompt_tokens"] == p_n and row["completion_tokens"] == c_n
    assert row["weight_sum"] == pytest.approx(den, rel=1e-6)  # float32 weights, summed in float32
    assert row["loss"] == pytest.approx(num / den, rel=1e-5)
    assert row["prompt_loss"] == pytest.approx(p_sum / p_n, rel=1e-5)
    assert row["completion_loss"] == pytest.approx(c_sum / c_n, rel=1e-5)


def test_plw_weights_the_prompt_gradient(plw_runs):
    """With the weight_sum normaliser the step gradient at PLW p is (p G_p + G_c) / (p N_p + N_c),
    G_p / G_c being the summed gradients of the prompt / completion token losses: recover G_p and G_c
    from the PLW = 0 and PLW = 1 runs and predict the PLW = 0.3 gradient."""
    (r0, g0), (_, g3), (r1, g1) = plw_runs[0.0], plw_runs[0.3], plw_runs[1.0]
    row0, row1 = rows(r0)[0], rows(r1)[0]
    n_p, n_c = row1["prompt_tokens"], row1["completion_tokens"]
    assert row0["weight_sum"] == n_c and row1["weight_sum"] == n_p + n_c
    worst = 0.0
    for name in g0:
        gc = g0[name].double() * n_c
        gp = g1[name].double() * (n_p + n_c) - gc
        pred = (0.3 * gp + gc) / (0.3 * n_p + n_c)
        scale = float(pred.abs().max()) + 1e-12
        worst = max(worst, float((g3[name].double() - pred).abs().max()) / scale)
    assert worst < 1e-4
    # and PLW really matters: the PLW = 0.3 gradient is neither of the others
    name = "lm.model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(g3[name], g0[name], rtol=1e-3) and not torch.allclose(g3[name], g1[name], rtol=1e-3)


# --------------------------------------------------------------------------------------------
# resume: SIGKILL (subprocess) and SIGTERM (in process) give the uninterrupted result exactly
# --------------------------------------------------------------------------------------------
def test_resume_after_sigkill_is_exact(reference, base, tmp_path):
    from pipeline.runs import RunDir
    from pipeline.train import run
    from pipeline.trainer.checkpoint import checkpoint_name

    ov = overrides(base, tmp_path)
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PLW_NO_PROGRESS="1")
    proc = subprocess.run(
        [sys.executable, str(REPO / "tests" / "_train_kill_helper.py"), json.dumps(ov), "3"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=str(REPO),
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    rd = RunDir(next(p for p in tmp_path.iterdir() if (p / "run.json").is_file()))
    assert rd.status()["state"] == "running"  # killed: nobody could say otherwise
    assert [r["step"] for r in rows(rd)] == [1, 2, 3]
    assert sorted(p.name for p in rd.checkpoints.iterdir()) == [checkpoint_name(2)]
    # debris a kill during a checkpoint would leave: a temporary folder and a folder without DONE
    (rd.checkpoints / f".tmp-{checkpoint_name(4)}").mkdir()
    (rd.checkpoints / checkpoint_name(6)).mkdir()
    resumed = run(_cfg(base, tmp_path))
    assert resumed.path == rd.path
    st = rd.status()
    assert st["state"] == "done" and st["attempts"] == 2
    assert summary(rd)["resumed_from"] == [2]
    assert not (rd.checkpoints / f".tmp-{checkpoint_name(4)}").exists()
    assert not (rd.checkpoints / checkpoint_name(6)).exists()
    _assert_same_training(rd, reference, exact=True)


@pytest.mark.parametrize("dropout", [0.0, 0.1], ids=["no_dropout", "attention_dropout"])
def test_sigterm_checkpoints_stops_and_resumes_exactly(reference, base, tmp_path, dropout):
    """With attention dropout the result also depends on the RNG stream: restored from the checkpoint."""
    from pipeline.train import PREEMPTED_EXIT_CODE, Preempted, TrainerCallback, run
    from pipeline.trainer.checkpoint import checkpoint_name

    class Term(TrainerCallback):
        def on_step_end(self, trainer, step, row):
            if step == 1:
                os.kill(os.getpid(), signal.SIGTERM)

    extra = [f"train.attention_dropout={dropout}"] if dropout else []
    if dropout:
        with_dropout = run(_cfg(base, tmp_path / "reference", *extra))
        assert rows(with_dropout)[0]["loss"] != rows(reference)[0]["loss"]  # dropout is on
        reference = with_dropout
    cfg = _cfg(base, tmp_path / "runs", *extra)
    old = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Preempted) as exc:
        run(cfg, callbacks=[Term()])
    assert signal.getsignal(signal.SIGTERM) == old  # handlers restored
    assert exc.value.code == PREEMPTED_EXIT_CODE and exc.value.step == 1 and exc.value.reason == "SIGTERM"
    from pipeline.runs import create_run

    rd = create_run(cfg)
    st = rd.status()
    assert st["state"] == "pending" and st["interrupted"]["step"] == 1
    assert (rd.checkpoints / checkpoint_name(1) / "DONE").is_file()  # written on the way out
    assert [r["step"] for r in rows(rd)] == [1]
    run(cfg)
    assert summary(rd)["resumed_from"] == [1]
    _assert_same_training(rd, reference, exact=True)


def test_resuming_with_another_layout_says_so_and_continues(reference, base, tmp_path, caplog):
    """Each checkpoint records the step layout (runtime settings); resuming with another one (here
    half the micro-batch, twice the accumulation) warns that the run is no longer bit-identical and
    trains on to the uninterrupted run's losses up to rounding. The same layout resumes silently."""
    from pipeline.train import run
    from pipeline.trainer.checkpoint import checkpoint_name, read_state

    cfg = _cfg(base, tmp_path)
    state = read_state(_stopped_at(cfg, 1).checkpoints / checkpoint_name(1))
    assert state["layout"] == {
        "world_size": 1,
        "per_device_batch_size": 2,
        "accumulation_steps": 2,
        "packing": False,
        "packing_scope": None,
        "packing_tokens": None,
    }
    with caplog.at_level("WARNING", logger="pipeline.train"):
        rd = run(_cfg(base, tmp_path, "train.per_device_batch_size=1"))
    [msg] = [r.getMessage() for r in caplog.records if "different layout" in r.getMessage()]
    assert "train.per_device_batch_size: 2 -> 1" in msg and "accumulation steps: 2 -> 4" in msg
    assert "processes" not in msg and "packing" not in msg
    assert summary(rd)["resumed_from"] == [1]
    _assert_same_training(rd, reference, exact=False, rtol=1e-4, atol=1e-6)


def test_keep_checkpoints_keeps_a_done_runs_checkpoints(base, tmp_path, caplog):
    """train.keep_checkpoints=true: the run's checkpoints stay after it is done
    (by default they go: see the reference run); a rerun of the done run leaves them alone."""
    from pipeline.train import run
    from pipeline.trainer.checkpoint import checkpoint_name, complete_checkpoints

    rd = run(_cfg(base, tmp_path, "train.keep_checkpoints=true"))
    assert [p.name for p in complete_checkpoints(rd.checkpoints)] == [checkpoint_name(2)]  # the end saves final/
    with caplog.at_level("INFO", logger="pipeline.train"):
        assert run(_cfg(base, tmp_path)).path == rd.path  # a runtime setting: the same run, done
    assert "nothing to do" in caplog.text
    assert len(complete_checkpoints(rd.checkpoints)) == 1


def test_a_full_disk_while_checkpointing_is_one_clear_error_and_the_rerun_is_exact(
    reference, base, tmp_path, monkeypatch
):
    """ENOSPC while writing checkpoint 2: the partial folder is removed, the run fails with one line
    naming the checkpoint, the free space and where a rerun starts; the metrics so far stay; the rerun
    (disk freed) ends as the uninterrupted run, bit for bit."""
    import errno

    from pipeline.runs import create_run
    from pipeline.train import run
    from pipeline.trainer.checkpoint import StorageFull

    real_save = torch.save

    def full(obj, f, *a, **k):
        if "rng" in str(f):
            real_save(obj, f, *a, **k)  # a partial file, as a full disk leaves
            raise OSError(errno.ENOSPC, "No space left on device", str(f))
        return real_save(obj, f, *a, **k)

    cfg = _cfg(base, tmp_path)
    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(StorageFull) as e:
        run(cfg)
    monkeypatch.setattr(torch, "save", real_save)
    msg = str(e.value)
    assert "\n" not in msg and "checkpoint step-00000002" in msg and "GB free there now" in msg, msg
    assert "it starts over (no checkpoint yet)" in msg
    rd = create_run(cfg)
    assert list(rd.checkpoints.iterdir()) == []  # the partial checkpoint is gone
    st = rd.status()
    assert st["state"] == "failed" and st["error"].splitlines()[0] == f"StorageFull: {msg}"
    assert [r["step"] for r in rows(rd)] == [1, 2]  # what was computed is kept
    run(cfg)
    _assert_same_training(rd, reference, exact=True)


def test_a_full_disk_while_saving_the_final_model_resumes_from_the_last_checkpoint(
    reference, base, tmp_path, monkeypatch
):
    import errno

    from pipeline.runs import create_run
    from pipeline.train import run
    from pipeline.trainer import loop
    from pipeline.trainer.checkpoint import StorageFull

    def full(lm, tokenizer, sd, folder, dtype, extras=None):
        partial = folder.with_name(f".{folder.name}.tmp")
        partial.mkdir()
        (partial / "model.safetensors").write_bytes(b"half")
        raise OSError(errno.EDQUOT, "Disk quota exceeded")

    cfg = _cfg(base, tmp_path)
    monkeypatch.setattr(loop, "save_final", full)
    with pytest.raises(StorageFull, match="while writing the final model .* it resumes from step-00000002"):
        run(cfg)
    monkeypatch.undo()
    rd = create_run(cfg)
    assert not rd.final.exists() and not rd.final.with_name(".final.tmp").exists()
    run(cfg)
    assert summary(rd)["resumed_from"] == [2]
    _assert_same_training(rd, reference, exact=True)


def test_the_command_says_a_full_disk_in_one_line(base, tmp_path, monkeypatch, capsys):
    from pipeline import train
    from pipeline.trainer.checkpoint import StorageFull

    def full(*a, **k):
        raise StorageFull("no space left on the device while writing checkpoint step-00000002 in /x")

    monkeypatch.setattr(train, "run", full)
    assert train.main(overrides(base, tmp_path)) == 1
    err = capsys.readouterr().err.strip()
    assert err == "error: no space left on the device while writing checkpoint step-00000002 in /x"


def test_storage_full_is_told_apart_from_other_errors():
    import errno

    from pipeline.trainer.checkpoint import is_storage_full

    assert is_storage_full(OSError(errno.ENOSPC, "No space left on device"))
    assert is_storage_full(OSError(errno.EDQUOT, "Disk quota exceeded"))
    assert not is_storage_full(OSError(errno.ENOENT, "No such file"))
    assert not is_storage_full(ValueError("no space left"))  # the errno decides, not the words
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as inner:
            raise RuntimeError("writing failed") from inner
    except RuntimeError as outer:
        assert is_storage_full(outer)
    from torch.distributed.checkpoint.api import CheckpointException

    assert is_storage_full(CheckpointException("save failed", {0: (OSError(errno.ENOSPC, "full"), None)}))
    assert not is_storage_full(CheckpointException("save failed", {0: (KeyError("x"), None)}))


def test_layout_changes_of_checkpoints_written_before_layouts_were_recorded():
    from pipeline.trainer.loop import layout_changes

    now = {"world_size": 2, "per_device_batch_size": 4, "accumulation_steps": 1, "packing": False}
    assert layout_changes({"world_size": 2, "accumulation_steps": 1}, now) == []
    assert layout_changes({"world_size": 1, "accumulation_steps": 2}, now) == [
        "processes: 1 -> 2",
        "accumulation steps: 2 -> 1",
    ]
    # packing is part of the run's identity; before step packing it packed per micro-batch
    packed = {**now, "packing": True, "packing_scope": "step", "packing_tokens": 512}
    assert layout_changes({"world_size": 2, "accumulation_steps": 1}, packed) == [
        "train.packing_scope: micro_batch -> step"
    ]
    assert layout_changes({"layout": packed}, packed) == []


def test_a_truncated_checkpoint_shard_falls_back_to_the_previous_checkpoint(reference, base, tmp_path, caplog):
    """The latest checkpoint's DONE marker is intact but a shard lost its tail: resume sets it aside
    (kept, renamed), says so, resumes from the previous one and ends as the uninterrupted run."""
    from pipeline.train import run
    from pipeline.trainer.checkpoint import checkpoint_name

    cfg = _cfg(base, tmp_path)
    rd = _stopped_at(cfg, 3)  # checkpoint at 3 on the way out, beside the regular one at 2
    bad = rd.checkpoints / checkpoint_name(3)
    assert sorted(p.name for p in rd.checkpoints.iterdir()) == [checkpoint_name(2), checkpoint_name(3)]
    shard = max((p for p in (bad / "model_optim").iterdir() if p.suffix == ".distcp"), key=lambda p: p.stat().st_size)
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with caplog.at_level("WARNING", logger="pipeline.train"):
        run(cfg)
    assert any(checkpoint_name(3) in r.getMessage() and "damaged" in r.getMessage() for r in caplog.records)
    assert summary(rd)["resumed_from"] == [2]
    aside = rd.checkpoints / f"damaged-{checkpoint_name(3)}"
    assert (aside / "DONE").is_file()  # moved aside, not deleted
    _assert_same_training(rd, reference, exact=True)


def test_a_damaged_checkpoint_with_an_old_marker_fails_with_the_hint(base, tmp_path):
    """A marker from before checksums (no file list) cannot be verified: DCP's CheckpointException
    (a BaseException) on load becomes the one-paragraph error that names the folder."""
    from pipeline.train import run
    from pipeline.trainer.checkpoint import checkpoint_name

    cfg = _cfg(base, tmp_path)
    bad = _stopped_at(cfg, 1).checkpoints / checkpoint_name(1)
    (bad / "DONE").write_text(json.dumps({"step": 1}))
    for shard in (bad / "model_optim").glob("*.distcp"):
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(RuntimeError, match="cannot resume from checkpoint .*step-00000001.*aside") as exc:
        run(cfg)
    assert "Traceback" not in str(exc.value) and isinstance(exc.value.__cause__, BaseException)


def test_checkpoint_verification_accepts_old_markers_and_names_the_damage(tmp_path):
    import json as _json

    from pipeline.trainer import checkpoint as ckpt

    tmp = ckpt.tmp_dir(tmp_path, 2)
    (tmp / "sub").mkdir(parents=True)
    (tmp / "a.bin").write_bytes(b"x" * 1000)
    (tmp / "sub" / "b.bin").write_bytes(b"y" * 10)
    final = ckpt.commit(tmp, 2)
    assert ckpt.verify(final) is None
    marker = _json.loads((final / "DONE").read_text())
    assert set(marker["checksums"]) == {"a.bin", "sub/b.bin"}
    (final / "sub" / "b.bin").write_bytes(b"z" * 10)  # same size, other bytes
    assert "sub/b.bin" in ckpt.verify(final)
    (final / "a.bin").write_bytes(b"x" * 10)
    assert "a.bin has 10 bytes" in ckpt.verify(final)
    # a marker from before checksums: sizes only, still accepted when they match
    old = {"step": 2, "files": {"a.bin": 10, "sub/b.bin": 10}}
    (final / "DONE").write_text(_json.dumps(old))
    assert ckpt.verify(final) is None
    (final / "DONE").write_text(_json.dumps({"step": 2}))
    assert ckpt.verify(final) is None
    aside = ckpt.move_aside(final)
    assert aside.name == "damaged-" + ckpt.checkpoint_name(2) and not final.exists()
    assert ckpt.complete_checkpoints(tmp_path) == [] and ckpt.remove_debris(tmp_path) == []
    assert aside.is_dir()


# --------------------------------------------------------------------------------------------
# 2 processes (gloo, FSDP) == 1 process
# --------------------------------------------------------------------------------------------
def test_two_fsdp_processes_match_one_process(reference, base, tmp_path, monkeypatch):
    from pipeline.train import run

    monkeypatch.setenv("PLW_NO_PROGRESS", "1")
    rd = run(_cfg(base, tmp_path, "train.nproc=2", "train.distributed=fsdp"))
    assert rd.path.name == reference.path.name  # process count is a runtime setting, not identity
    s = summary(rd)
    assert s["batch"]["world_size"] == 2 and s["batch"]["distributed"] == "fsdp"
    assert s["batch"]["accumulation_steps"] == 1  # 4 = 2 per device x 1 x 2 processes
    assert rd.status()["state"] == "done"
    _assert_same_training(rd, reference, exact=False, rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------------------------
# Minkowski penalty inside training: the logged value against an independent computation
# --------------------------------------------------------------------------------------------
def test_logged_minkowski_penalty_is_the_distance_to_the_pretrained_weights(base, tmp_path):
    from safetensors.torch import load_file

    from pipeline.models import pretrained_dir
    from pipeline.train import TrainerCallback, run

    cfg = _cfg(base, tmp_path, "train.max_steps=3", "train.minkowski_coef=0.5", "train.eval_fraction=0")
    pre = load_file(str(pretrained_dir(cfg.model, cfg.paths) / "model.safetensors"))
    seen = {}

    class Watch(TrainerCallback):
        def on_gradients(self, trainer, step):  # the weights the step's penalty is computed at
            params = {n[len("lm.") :]: p.detach() for n, p in trainer.model.named_parameters()}
            d = [float((params[k].double() - pre[k].double()).abs().sum()) for k in pre]
            seen[step] = 0.5 * sum(d) / len(d)

    rd = run(cfg, callbacks=[Watch()])
    logged = {r["step"]: r["penalty"] for r in rows(rd)}
    assert logged[1] == 0.0 and seen[1] == 0.0
    for step in (2, 3):
        assert logged[step] > 0 and logged[step] == pytest.approx(seen[step], rel=1e-9)


# --------------------------------------------------------------------------------------------
# failures
# --------------------------------------------------------------------------------------------
def test_failure_sets_status_failed_with_the_error(base, tmp_path):
    from pipeline.runs import create_run
    from pipeline.train import TrainerCallback, run

    class Boom(TrainerCallback):
        def on_step_end(self, trainer, step, row):
            if step == 2:
                raise RuntimeError("boom at step 2")

    cfg = _cfg(base, tmp_path)
    with pytest.raises(RuntimeError, match="boom at step 2"):
        run(cfg, callbacks=[Boom()])
    st = create_run(cfg).status()
    assert st["state"] == "failed"
    assert st["error"].startswith("RuntimeError: boom at step 2")
    assert "on_step_end" in st["error"]  # the traceback's tail
    # bad input data: the error names the file
    bad = _cfg(base, tmp_path, "dataset=local_jsonl", f"dataset.source.path={tmp_path / 'missing.jsonl'}")
    with pytest.raises(Exception, match="missing.jsonl"):
        run(bad)
    st = create_run(bad).status()
    assert st["state"] == "failed" and "missing.jsonl" in st["error"]


def _strict_json_files(folder):
    """Every JSON / JSONL file under ``folder`` parses as strict JSON (no NaN, no Infinity)."""

    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    files = [p for p in folder.rglob("*") if p.suffix in (".json", ".jsonl") and p.is_file()]
    for p in files:
        text = p.read_text(encoding="utf-8")
        for chunk in text.splitlines() if p.suffix == ".jsonl" else [text]:
            json.loads(chunk, parse_constant=refuse)
    return {p.name for p in files}


def test_a_run_whose_examples_all_weigh_zero_fails_before_training(base, tmp_path):
    """PLW 0 and every completion cut by truncation: nothing to train; an error naming the dataset,
    the PLW and how many examples lost their completion, not a run of no-op steps marked done."""
    from pipeline.runs import create_run
    from pipeline.trainer.data import ZeroWeightError
    from pipeline.train import run

    cfg = _cfg(base, tmp_path, "plw=0", "train.model_max_length=16")
    with pytest.raises(ZeroWeightError) as e:
        run(cfg)
    msg = str(e.value)
    assert "'shared_alpaca52k'" in msg and "PLW 0 " in msg and "40 of 40 examples lost every completion" in msg
    rd = create_run(cfg)
    st = rd.status()
    assert st["state"] == "failed" and st["error"].startswith("ZeroWeightError: dataset 'shared_alpaca52k'")
    assert not rows(rd) and not (rd.path / "train_summary.json").exists()
    assert "status.json" in _strict_json_files(rd.path)


def test_a_step_whose_examples_all_weigh_zero_is_skipped_and_counted(reference, base, tmp_path):
    """A single optimizer step with total weight 0 is not trained (no update: AdamW would still move
    the weights), is marked in metrics.jsonl and counted in the summary; no file holds NaN."""
    from pipeline.train import TrainerCallback, run
    from pipeline.trainer.data import step_examples

    seen = {}

    class ZeroStep1(TrainerCallback):
        def on_train_begin(self, trainer, start_step):
            for i in step_examples(trainer.n_train, trainer.global_batch, trainer.seed, 1):
                ex = trainer.data.train[i]
                trainer.data.train[i] = {**ex, "weights": torch.zeros_like(ex["weights"])}
            seen["start"] = [p.detach().clone() for p in trainer.lm.parameters()]

        def on_step_end(self, trainer, step, row):
            if step == 1:
                seen["after_1"] = [p.detach().clone() for p in trainer.lm.parameters()]

    rd = run(_cfg(base, tmp_path), callbacks=[ZeroStep1()])
    assert all(torch.equal(a, b) for a, b in zip(seen["start"], seen["after_1"]))
    got = rows(rd)
    assert got[0]["skipped"] is True and got[0]["loss"] is None and got[0]["grad_norm"] is None
    assert got[0]["weight_sum"] == 0.0 and got[0]["examples"] == 4
    assert all("skipped" not in r and isinstance(r["loss"], float) for r in got[1:])
    assert [r["lr"] for r in got] == [r["lr"] for r in rows(reference)]  # the schedule goes on
    s = summary(rd)
    assert s["skipped_steps"] == 1 and s["steps"] == 4 and s["final_loss"] == got[-1]["loss"]
    assert rd.status()["state"] == "done"
    assert {"metrics.jsonl", "train_summary.json", "status.json"} <= _strict_json_files(rd.path)


def test_cli_rejects_a_bad_override_naming_the_key():
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.train", "model=tiny", "train.learning_rte=1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=str(REPO),
    )
    assert proc.returncode == 2
    assert "learning_rte" in proc.stderr


# --------------------------------------------------------------------------------------------
# the real pretrained model
# --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_trains_on_cpu_with_cpu_small(request, tmp_path):
    """SmolLM2-135M-Instruct (GGUF -> safetensors, cached in pytest's cache) trains with train=cpu_small."""
    from pipeline.config import load_config
    from pipeline.train import run

    cache = request.config.cache.mkdir("plw_models")
    rd = run(
        load_config(
            [
                "model=smollm2_135m",
                "dataset=shared_alpaca52k",
                "train=cpu_small",
                f"paths.data_dir={cache}",
                f"paths.runs_dir={tmp_path}",
                "train.num_threads=2",
            ]
        )
    )
    s = summary(rd)
    train = rows(rd)
    assert s["steps"] == 8 and len(train) == 8
    assert all(math.isfinite(r["loss"]) for r in train)
    # a pretrained model: completion loss far below the ~10.8 of a uniform guess over 49k tokens
    assert train[0]["completion_loss"] < 5
    assert s["weight_distance"]["l1_mean"] > 0


def test_packing_hook_gives_the_same_step(plw_runs, base, tmp_path):
    """train.packing=true trains through pipeline.packing.PackedCollator: same loss terms, same step."""
    pytest.importorskip("pipeline.packing")
    from pipeline.train import run

    cb = _Grads()
    rd = run(_cfg(base, tmp_path, "plw=0.3", "train.packing=true", recipe=PLW_RECIPE), callbacks=[cb])
    ref_rd, ref_grads = plw_runs[0.3]
    got, want = rows(rd)[0], rows(ref_rd)[0]
    for k in ("prompt_tokens", "completion_tokens", "tokens"):
        assert got[k] == want[k], k
    for k in ("loss", "prompt_loss", "completion_loss", "weight_sum", "grad_norm"):
        assert got[k] == pytest.approx(want[k], rel=1e-5), k
    for name, g in ref_grads.items():
        torch.testing.assert_close(cb.grads[name], g, rtol=1e-3, atol=1e-7, msg=name)


@pytest.mark.slow
def test_accelerate_launch_with_the_fsdp_config_file(reference, base, tmp_path, monkeypatch):
    """train.launcher=accelerate: `accelerate launch --config_file conf/distributed/fsdp.yaml` starts the
    workers (2 gloo processes here), which take FSDP and the wrap class from accelerate's environment."""
    from pipeline.train import run

    monkeypatch.setenv("PLW_NO_PROGRESS", "1")
    rd = run(_cfg(base, tmp_path, "train.nproc=2", "train.distributed=fsdp", "train.launcher=accelerate"))
    s = summary(rd)
    assert s["batch"]["distributed"] == "fsdp" and s["batch"]["world_size"] == 2
    assert s["batch"]["launcher_settings"]["fsdp_wrap_class"] == "LlamaDecoderLayer"
    _assert_same_training(rd, reference, exact=False, rtol=1e-4, atol=1e-6)


def test_pad_token_row_added_for_training_is_left_out_of_the_distance(base, tmp_path):
    """A tokenizer without a pad token: [PAD] is added with the mean embedding (a new row in both
    embedding matrices); the final model keeps it, the weight distance compares the common rows."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.train import run

    tok = AutoTokenizer.from_pretrained(str(base["tokenizer"]))
    tok.pad_token = None
    nopad = tmp_path / "tokenizer-without-pad"
    tok.save_pretrained(nopad)
    assert AutoTokenizer.from_pretrained(str(nopad)).pad_token is None
    rd = run(
        _cfg(
            base,
            tmp_path / "runs",
            "train.max_steps=1",
            "train.eval_fraction=0",
            f"model.tokenizer={nopad}",
            recipe=PLW_RECIPE,
        )
    )
    s = summary(rd)
    assert s["pad_token"]["token"] == "[PAD]" and s["pad_token"]["id"] == len(tok)
    wd = s["weight_distance"]
    assert wd["rows_excluded"] == {"model.embed_tokens.weight": 1, "lm_head.weight": 1}
    model = AutoModelForCausalLM.from_pretrained(str(rd.final))
    assert model.get_input_embeddings().weight.shape[0] == len(tok) + 1
    assert AutoTokenizer.from_pretrained(str(rd.final)).pad_token == "[PAD]"


@pytest.mark.slow
def test_sigterm_to_the_launching_process_stops_the_workers_after_a_checkpoint(reference, base, tmp_path, monkeypatch):
    """Multi-process: SIGTERM to the process that launched the workers (what SLURM/the sweep signal) is
    forwarded; the workers checkpoint at the next step boundary and exit 75; a rerun resumes."""
    import threading
    import time

    from pipeline.runs import create_run
    from pipeline.train import PREEMPTED_EXIT_CODE, Preempted, run

    monkeypatch.setenv("PLW_NO_PROGRESS", "1")
    cfg = _cfg(base, tmp_path, "train.nproc=2", "train.distributed=fsdp", "train.save_steps=100")
    rd = create_run(cfg)

    def watch():
        deadline = time.time() + 240
        while time.time() < deadline and not rows(rd):
            time.sleep(0.2)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, daemon=True).start()
    with pytest.raises(Preempted) as exc:
        run(cfg)
    assert exc.value.code == PREEMPTED_EXIT_CODE and exc.value.reason == "SIGUSR1"  # as forwarded
    st = rd.status()
    assert st["state"] == "pending" and st["interrupted"]["step"] == exc.value.step >= 1
    assert (rd.checkpoints / f"step-{exc.value.step:08d}" / "DONE").is_file()
    run(cfg)
    assert rd.status()["state"] == "done" and summary(rd)["resumed_from"] == [exc.value.step]
    _assert_same_training(rd, reference, exact=False, rtol=1e-4, atol=1e-6)


def test_rank_runs_a_prepared_run_folder_on_its_own(base, tmp_path):
    """`python -m pipeline.trainer.rank <run>` without a launching parent: reads config.yaml (no
    Hydra), takes the run's lock and keeps status.json itself, exits 0."""
    from pipeline.runs import create_run
    from pipeline.trainer import rank

    cfg = _cfg(base, tmp_path, "plw=0.3", recipe=PLW_RECIPE)
    rd = create_run(cfg)
    assert not rd.launch_config.exists()
    assert rank.main([str(rd.path)]) == 0
    st = rd.status()
    assert st["state"] == "done" and st["attempts"] == 1 and st["steps"] == 1
    assert (rd.final / "model.safetensors").is_file() and len(rows(rd)) == 1
    # a broken run folder: exit 1, the error in the status and in logs/worker-rank0.err
    from omegaconf import OmegaConf

    bad = OmegaConf.load(rd.path / "config.yaml")
    bad.train.learning_rate = -1.0
    (rd.path / "config.yaml").write_text(OmegaConf.to_yaml(bad))
    (rd.path / "status.json").unlink()
    assert rank.main([str(rd.path)]) == 1
    assert "train.learning_rate" in rd.status()["error"]
    assert "train.learning_rate" in (rd.logs / "worker-rank0.err").read_text()


def test_a_run_another_process_executes_is_not_trained_twice(base, tmp_path):
    """The process holding a run's lock owns it: `python -m pipeline.train` on a run another process
    executes (a sweep worker, another terminal) exits 79 without touching it."""
    from pipeline.lifecycle import EXIT_BUSY, RunBusy
    from pipeline.runs import create_run
    from pipeline.train import main, run

    cfg = _cfg(base, tmp_path, "plw=0.4")
    rd = create_run(cfg)
    code = (
        f"import pathlib, time; from pipeline.runs import RunDir\n"
        f"fd = RunDir(pathlib.Path({str(rd.path)!r})).try_lock(); print('held' if fd else 'busy', flush=True)\n"
        f"time.sleep(120)\n"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunBusy):
            run(cfg)
        assert main(overrides(base, tmp_path, "plw=0.4", recipe=SMALL)) == EXIT_BUSY
        assert not rd.status_file.exists() and not rd.metrics.exists()
    finally:
        holder.kill()
        holder.wait()

"""LoRA (train.peft, pipeline/trainer/lora.py) through the real trainer on the tiny model: training
lowers the loss, only the adapters change, the merged final model equals base + adapter, resume after
an interruption is exact, and what this machine cannot do is refused before a run folder exists."""

from __future__ import annotations

import os
import signal

import pytest
import torch

from _train_common import SMALL, comparable, final_weights, overrides, rows, summary, tokenizer_dir

LORA = ["train.peft.enabled=true", "train.peft.r=4", "train.learning_rate=5e-3"]


@pytest.fixture(scope="module")
def base(request, tmp_path_factory, module_tmp, shared_dir):
    cache = getattr(request.config, "cache", None)
    cache = cache.mkdir("plw_train") if cache is not None else tmp_path_factory.mktemp("plw_train")
    return {"data_dir": module_tmp("lora_data"), "tokenizer": tokenizer_dir(cache)}


def _cfg(base, runs_dir, *extra):
    from pipeline.config import load_config

    return load_config(overrides(base, runs_dir, *LORA, *extra, recipe=SMALL))


@pytest.fixture(scope="module")
def lora_run(base, module_tmp):
    from pipeline.train import run

    return run(_cfg(base, module_tmp("lora_runs")))


@pytest.fixture(scope="module")
def pretrained(base, lora_run):
    """The pre-trained model as training starts from it (pad token added), and its tokenizer."""
    from pipeline.config import load_config
    from pipeline.models import load_pretrained

    cfg = load_config(overrides(base, lora_run.path.parent, *LORA, recipe=SMALL))
    return load_pretrained(cfg.model, cfg.paths, dtype=torch.float32)


def _batch(tokenizer, n=8):
    import json

    from pipeline.data.build import load_dataset  # noqa: F401  (the run built it)
    from pipeline.preprocess import Collator, preprocess_records

    recs = [json.loads(x) for x in open(_records_file(), encoding="utf-8").read().splitlines()[:n]]
    examples, _ = preprocess_records(recs, tokenizer, plw=0.1, model_max_length=128)
    return Collator(int(tokenizer.pad_token_id))(examples)


def _records_file():
    from pipeline.config import load_config

    return load_config(["dataset=shared_alpaca52k"]).dataset.source.path


def _loss(model, batch):
    from pipeline.loss import WeightedLossModel

    with torch.no_grad():
        out = WeightedLossModel(model)(
            input_ids=batch["input_ids"],
            labels=batch["labels"],
            weights=batch["weights"],
            attention_mask=batch["attention_mask"],
        )
    return float(out["loss"])


def test_lora_training_lowers_the_loss_and_only_the_adapters_change(lora_run, pretrained):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    base_model, tok = pretrained
    s = summary(lora_run)
    assert s["peft"]["enabled"] and s["peft"]["r"] == 4
    assert 0 < s["peft"]["trainable_parameters"] < s["peft"]["all_parameters"] // 10
    merged = final_weights(lora_run)
    want = dict(base_model.state_dict())
    adapter = load_file(str(lora_run.final / "adapter" / "adapter_model.safetensors"))
    scale = 32.0 / 4
    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    n_targets = 0
    for name, w in merged.items():
        if any(f".{t}." in name for t in targets):
            stem = name[: -len(".weight")]
            a = next(v for k, v in adapter.items() if k.endswith(stem + ".lora_A.weight"))
            b = next(v for k, v in adapter.items() if k.endswith(stem + ".lora_B.weight"))
            torch.testing.assert_close(w, want[name] + scale * (b @ a), rtol=1e-5, atol=1e-6, msg=name)
            assert not torch.equal(w, want[name]), name  # the adapter moved it
            n_targets += 1
        else:  # frozen: embeddings, norms, LM head exactly as pre-trained
            assert torch.equal(w, want[name]), name
    assert n_targets == 2 * 7  # two layers of the tiny model, seven target modules each
    # the merged model's loss on training examples is below the pre-trained one's
    tuned = AutoModelForCausalLM.from_pretrained(str(lora_run.final), dtype=torch.float32)
    batch = _batch(tok)
    assert _loss(tuned, batch) < _loss(base_model, batch) - 1e-3


def test_the_merged_model_equals_base_plus_adapter(lora_run, pretrained):
    import copy

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base_model, tok = pretrained
    with_adapter = PeftModel.from_pretrained(copy.deepcopy(base_model), str(lora_run.final / "adapter")).eval()
    merged = AutoModelForCausalLM.from_pretrained(str(lora_run.final), dtype=torch.float32).eval()
    batch = _batch(tok, n=4)
    with torch.no_grad():
        a = with_adapter(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        b = merged(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_lora_resume_after_an_interruption_is_exact(lora_run, base, tmp_path):
    """Adapter-only checkpoints (the frozen weights come from the pre-trained model again) resume
    to the same losses and the same final and adapter weights, bit for bit."""
    from safetensors.torch import load_file

    from pipeline.runs import create_run
    from pipeline.train import Preempted, TrainerCallback, run

    class Term(TrainerCallback):
        def on_step_end(self, trainer, step, row):
            if step == 1:
                os.kill(os.getpid(), signal.SIGTERM)

    cfg = _cfg(base, tmp_path)
    with pytest.raises(Preempted):
        run(cfg, callbacks=[Term()])
    # the checkpoint holds the adapters (and their optimizer state), not the frozen pre-trained weights
    from torch.distributed.checkpoint import FileSystemReader

    from pipeline.trainer import checkpoint as ckpt

    latest = ckpt.latest_checkpoint(create_run(cfg).checkpoints)
    saved = [k for k in FileSystemReader(str(latest / "model_optim")).read_metadata().state_dict_metadata]
    weights = [k for k in saved if k.startswith("model.")]
    assert weights and all(".lora_A." in k or ".lora_B." in k for k in weights), weights[:5]
    assert sorted(load_file(str(latest / "adapter" / "adapter_model.safetensors"))) == sorted(
        load_file(str(lora_run.final / "adapter" / "adapter_model.safetensors"))
    )
    run(cfg)
    rd = create_run(cfg)
    assert summary(rd)["resumed_from"] == [1]
    assert [comparable(r) for r in rows(rd)] == [comparable(r) for r in rows(lora_run)]
    got, want = final_weights(rd), final_weights(lora_run)
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in got)
    a = load_file(str(rd.final / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(lora_run.final / "adapter" / "adapter_model.safetensors"))
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_what_cannot_run_here_is_refused_before_a_run_folder_exists(base, tmp_path):
    from pipeline.config import ConfigError, load_config
    from pipeline.runs import run_id
    from pipeline.train import run

    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="train.peft.method': qlora .* needs a CUDA GPU"):
            run(_cfg(base, tmp_path, "train.peft.method=qlora"))
    with pytest.raises(ConfigError, match="train.distributed': LoRA .* not fsdp"):
        run(_cfg(base, tmp_path, "train.distributed=fsdp", "train.nproc=2"))
    assert not any(tmp_path.iterdir())  # nothing created
    with pytest.raises(ConfigError, match="train.peft.r"):
        _cfg(base, tmp_path, "train.peft.r=0")
    # identity: LoRA runs are other runs; the peft settings count only when enabled
    plain = load_config(overrides(base, tmp_path, recipe=SMALL))
    off = load_config(overrides(base, tmp_path, "train.peft.r=64", recipe=SMALL))
    assert run_id(plain) == run_id(off) != run_id(_cfg(base, tmp_path))


def test_an_adapter_only_final_is_evaluated_as_base_plus_adapter(lora_run, base, tmp_path):
    """``train.peft.merge=false``: final/ holds the adapter and the tokenizer only; evaluation loads
    the pre-trained model as training did and the adapter over it, and gets the merged run's
    numbers (lm-eval log-likelihoods and greedy generations)."""
    from pipeline.eval.results import read_results
    from pipeline.eval.stage import evaluate_run
    from pipeline.train import run

    cfg = _cfg(base, tmp_path, "train.peft.merge=false")
    rd = run(cfg)
    assert rd.path.name == lora_run.path.name  # merge is not part of the run's identity
    assert (rd.final / "adapter_config.json").is_file() and not (rd.final / "config.json").is_file()
    assert summary(rd)["weight_distance"] == summary(lora_run)["weight_distance"]  # on the merged weights
    ev = [
        "eval=cpu_small",
        "eval.limit=2",
        "eval.max_new_tokens=8",
        "eval.benchmarks=[piqa,alpaca_eval]",
        "eval.mechanisms=[mech_alpacaeval_length]",
    ]
    from pipeline.config import load_config

    merged_cfg = load_config(overrides(base, lora_run.path.parent, *LORA, *ev, recipe=SMALL))
    adapter_cfg = load_config(overrides(base, tmp_path, *LORA, "train.peft.merge=false", *ev, recipe=SMALL))
    a = read_results(evaluate_run(rd.path, adapter_cfg))
    m = read_results(evaluate_run(lora_run.path, merged_cfg))
    key = lambda r: (r["benchmark"], r["metric"])  # noqa: E731
    assert [r["status"] for r in a] == ["ok"] * len(a)
    got, want = {key(r): r["value"] for r in a}, {key(r): r["value"] for r in m}
    assert got.keys() == want.keys()
    for k in got:
        assert got[k] == pytest.approx(want[k], rel=1e-5, abs=1e-6), k

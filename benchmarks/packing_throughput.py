"""Training throughput (real, non-pad tokens per second) with packing vs Alpaca-style dynamic padding.

The examples have the length distribution of the real instruction data in ../shared/data/instructions
(``dataset=shared_alpaca52k,shared_alpaca_gpt4,shared_dolly_hhrlhf``, rendered in the Alpaca template
and tokenised with the LLaMA tokenizer of ../shared/tokenizers/llama at model_max_length 512, as in
the paper), with random token ids from the model's vocabulary (speed does not depend on the ids).
The examples are shuffled (no length sorting, as Alpaca's trainer) and cut into optimizer steps of
``--batch`` x ``--accumulation`` examples; every step is trained on in three layouts, one optimizer
step each, on identical copies of the model:

* ``padded``: :class:`pipeline.preprocess.Collator`, micro-batches of ``--batch`` examples
  right-padded to their longest example (Alpaca's dynamic padding);
* ``packed_mb``: each micro-batch packed into rows of <= 512 tokens with a 4-D block mask
  (``train.packing_scope=micro_batch``);
* ``packed_step``: the whole step packed into padding-free rows of ``--packing-tokens`` (default
  512, the trainer's default for sdpa) tokens, one row per micro-batch, examples kept apart by ``position_ids`` (``train.packing_scope=step``, the
  default with ``train.packing=true``).

Both use :class:`pipeline.loss.WeightedLossModel`, the trainer's path from a model to the loss
(forward + chunked PLW loss + backward, step normalisers) and an AdamW step; the layouts take turns
step by step (which goes first rotates). Throughput = real tokens / process CPU seconds
(``time.process_time``, all threads), against ``padded``. Target: packed_step >= 1.5x padded on
SmolLM2-135M (the fill-ratio bound is about 1.6-1.7x), judged on CPU time (time-slicing by other
processes on a shared machine disturbs it far less than wall time).

    .venv/bin/python benchmarks/packing_throughput.py --quick            # tiny + SmolLM2-135M on CPU
    .venv/bin/python benchmarks/packing_throughput.py --models smollm2_135m --steps 4
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from pipeline.config import load_config  # noqa: E402
from pipeline.data.build import load_dataset  # noqa: E402
from pipeline.loss import WeightedLossModel, step_normalisers  # noqa: E402
from pipeline.models import load_pretrained  # noqa: E402
from pipeline.packing import PackedCollator, plan_step  # noqa: E402
from pipeline.preprocess import Collator, build_example, tokenize_records  # noqa: E402
from pipeline.tokenizer import load_tokenizer  # noqa: E402

TARGET = 1.5
DATASETS = "shared_alpaca52k,shared_alpaca_gpt4,shared_dolly_hhrlhf"


def real_lengths(datasets: str, max_length: int):
    """``[(length, n_prompt)]`` of the rendered instances, LLaMA tokenizer (the paper's)."""
    out, per = [], {}
    tok = None
    for name in [d for d in datasets.split(",") if d]:
        cfg = load_config([f"dataset={name}"])
        if tok is None:
            folder = Path(str(cfg.paths.shared_dir)) / "tokenizers" / "llama"
            if not folder.is_dir():
                raise SystemExit(f"needs the LLaMA tokenizer in {folder} (../shared is absent)")
            tok = load_tokenizer(str(folder))
        records, _ = load_dataset(cfg)
        inst, _ = tokenize_records(records, tok, max_length, "keep")
        per[name] = len(inst)
        out += [(len(t.input_ids), t.n_prompt) for t in inst]
    return out, per


VARIANTS = ("padded", "packed_mb", "packed_step")


def step_batches(kind: str, examples, args, tok):
    """One optimizer step's micro-batches in layout ``kind`` (see the module docstring)."""
    if kind == "packed_step":
        budget = args.packing_tokens or args.max_length  # the trainer's default for sdpa (pipeline.packing)
        [rows] = plan_step([int(e["input_ids"].numel()) for e in examples], budget, 1)
        collate = PackedCollator(tok, budget, attention="position_ids")
        return [collate([examples[i] for i in row]) for row in rows]
    collate = Collator(tok.pad_token_id) if kind == "padded" else PackedCollator(tok, args.max_length)
    return [collate(examples[k : k + args.batch]) for k in range(0, len(examples), args.batch)]


def bench_model(name: str, lengths, args) -> dict:
    cfg = load_config([f"model={name}"])
    base, tok = load_pretrained(cfg.model, cfg.paths)
    base.config.use_cache = False  # as in training (packed sequences are read from position_ids then)
    g = torch.Generator().manual_seed(args.seed)
    vocab = base.get_input_embeddings().weight.shape[0]
    examples = [build_example(torch.randint(0, vocab, (n,), generator=g).tolist(), p, args.plw) for n, p in lengths]
    perm = torch.randperm(len(examples), generator=g).tolist()
    per_step = args.batch * args.accumulation
    steps = [[examples[i] for i in perm[s : s + per_step]] for s in range(0, len(perm) - per_step + 1, per_step)]
    steps = steps[: args.steps + 1]  # +1: warm-up
    models = {k: WeightedLossModel(copy.deepcopy(base).train()) for k in VARIANTS}
    del base
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-5) for k, m in models.items()}
    secs = {k: 0.0 for k in VARIANTS}
    cpu = {k: 0.0 for k in VARIANTS}
    slots = {k: 0 for k in VARIANTS}
    mbs = {k: 0 for k in VARIANTS}
    real = 0

    def step(kind, exs):
        batches = step_batches(kind, exs, args, tok)
        dens = step_normalisers(batches, "weight_sum")
        m, opt = models[kind], opts[kind]
        t0, c0 = time.perf_counter(), time.process_time()
        for b, d in zip(batches, dens):
            m(**b, normaliser=d)["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return (
            time.perf_counter() - t0,
            time.process_time() - c0,
            sum(b["input_ids"].numel() for b in batches),
            len(batches),
        )

    for j, exs in enumerate(tqdm(steps, desc=name, file=sys.stderr, leave=False)):
        order = VARIANTS[j % 3 :] + VARIANTS[: j % 3]  # rotate which variant goes first
        for kind in order:
            dt, dc, n_slots, n_mb = step(kind, exs)
            if j > 0:
                secs[kind] += dt
                cpu[kind] += dc
                slots[kind] += n_slots
                mbs[kind] += n_mb
        if j > 0:
            real += sum(int(torch.as_tensor(e["input_ids"]).numel()) for e in exs)
    return {"model": name, "real": real, "secs": secs, "cpu": cpu, "slots": slots, "mbs": mbs, "steps": len(steps) - 1}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--models", default="tiny,smollm2_135m", help="model config names (conf/model/)")
    ap.add_argument("--datasets", default=DATASETS, help="dataset configs whose lengths are used")
    ap.add_argument("--batch", type=int, default=4, help="examples per micro-batch (the recipe's 4 per device)")
    ap.add_argument("--steps", type=int, default=6, help="timed optimizer steps per model (default 6)")
    ap.add_argument(
        "--accumulation",
        type=int,
        default=8,
        help="micro-batches per optimizer step (the recipe's 128 = 4 x 8 x 4 GPUs: 8)",
    )
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--plw", type=float, default=0.1)
    ap.add_argument(
        "--packing-tokens",
        type=int,
        default=None,
        help="packed_step row length (train.packing_tokens; default: max length, the trainer's default for sdpa)",
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="4 timed steps of 4 micro-batches (SmolLM2: 2 steps)")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    lengths, per = real_lengths(args.datasets, args.max_length)
    ls = [n for n, _ in lengths]
    print(
        f"# lengths: {len(ls)} instances ({', '.join(f'{k} {v}' for k, v in per.items())}), LLaMA tokenizer, "
        f"max_length {args.max_length}: mean {statistics.mean(ls):.0f}, median {statistics.median(ls):.0f}, "
        f"max {max(ls)}"
    )
    print(
        f"# optimizer steps of {args.batch} x {args.accumulation} examples, shuffled, CPU threads={args.threads}; "
        f"the three layouts take turns on the same steps (forward + backward of every micro-batch + AdamW)"
    )
    header = (
        f"| {'model':<13} | {'steps':>5} | {'real tok':>8} | {'fill pad/mb/step':>17} | {'micro-batches':>13} | "
        f"{'padded tok/cpu-s':>16} | {'packed_mb x':>11} | {'packed_step x':>13} | {'step x (wall)':>13} | target |"
    )
    print(header)
    print("|" + "|".join("-" * len(c) for c in header.split("|")[1:-1]) + "|")
    for name in [m for m in args.models.split(",") if m]:
        a = argparse.Namespace(**vars(args))
        if args.quick:
            a.steps = 2 if "smollm2" in name else 4
            a.accumulation = min(a.accumulation, 4)
        r = bench_model(name, lengths, a)
        tpc = {k: r["real"] / r["cpu"][k] for k in VARIANTS}
        tps = {k: r["real"] / r["secs"][k] for k in VARIANTS}
        x_mb, x_step = tpc["packed_mb"] / tpc["padded"], tpc["packed_step"] / tpc["padded"]
        fill = "/".join(f"{r['real'] / r['slots'][k]:.2f}" for k in VARIANTS)
        n_mb = "/".join(str(r["mbs"][k]) for k in VARIANTS)
        print(
            f"| {name:<13} | {r['steps']:>5} | {r['real']:>8} | {fill:>17} | {n_mb:>13} | {tpc['padded']:>16.0f} | "
            f"{x_mb:>10.3f}x | {x_step:>12.3f}x | {tps['packed_step'] / tps['padded']:>12.3f}x | "
            f"{'PASS' if x_step >= TARGET else 'MISS':>6} |",
            flush=True,
        )
    print(
        f"\nfill = real tokens / (rows x row length); x = real tokens per process-CPU-second against 'padded' "
        f"(Alpaca's dynamic padding); packed_mb packs each micro-batch (4-D mask), packed_step the whole step into "
        f"padding-free rows of --packing-tokens tokens (position_ids).\ntarget: packed_step >= {TARGET:g}x "
        f"padded on SmolLM2-135M, judged on process CPU time"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

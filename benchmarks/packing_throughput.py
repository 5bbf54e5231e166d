"""Training throughput (real, non-pad tokens per second) with packing vs Alpaca-style dynamic padding.

The examples have the length distribution of the real instruction data in ../shared/data/instructions
(``dataset=shared_alpaca52k,shared_alpaca_gpt4,shared_dolly_hhrlhf``, rendered in the Alpaca template
and tokenised with the LLaMA tokenizer of ../shared/tokenizers/llama at model_max_length 512, as in
the paper), with random token ids from the model's vocabulary (speed does not depend on the ids).
The examples are shuffled (no length sorting, as Alpaca's trainer) and cut into micro-batches of
``--batch`` examples; every micro-batch is then trained on twice, one optimizer step each:

* ``padded``: :class:`pipeline.preprocess.Collator`, right-padded to the longest example;
* ``packed``: :class:`pipeline.packing.PackedCollator` (rows of <= 512 tokens, examples isolated).

Both use :class:`pipeline.loss.WeightedLossModel`, the trainer's path from a model to the loss
(forward + chunked PLW loss + backward), on identical copies of the model, with an AdamW step every ``--accumulation`` micro-batches (the
recipe accumulates 8; the step's cost does not depend on the layout); the two variants alternate
batch by batch. Throughput = real
tokens / seconds, shown for wall time and for process CPU time (``time.process_time``, all threads).
Target: packed >= 1.5x padded, judged on CPU time (time-slicing by other processes on a shared
machine disturbs it far less than wall time).

    .venv/bin/python benchmarks/packing_throughput.py --quick            # tiny + SmolLM2-135M on CPU
    .venv/bin/python benchmarks/packing_throughput.py --models tiny --batch 8 --batches 40
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
from pipeline.loss import WeightedLossModel  # noqa: E402
from pipeline.models import load_pretrained  # noqa: E402
from pipeline.packing import PackedCollator  # noqa: E402
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


def bench_model(name: str, lengths, args) -> dict:
    cfg = load_config([f"model={name}"])
    base, tok = load_pretrained(cfg.model, cfg.paths)
    g = torch.Generator().manual_seed(args.seed)
    vocab = base.get_input_embeddings().weight.shape[0]
    examples = [build_example(torch.randint(0, vocab, (n,), generator=g).tolist(), p, args.plw) for n, p in lengths]
    perm = torch.randperm(len(examples), generator=g).tolist()
    groups = [[examples[i] for i in perm[s : s + args.batch]] for s in range(0, len(perm) - args.batch + 1, args.batch)]
    groups = groups[: args.batches + 1]  # +1: warm-up
    collate = {"padded": Collator(tok.pad_token_id), "packed": PackedCollator(tok, args.max_length)}
    models = {k: WeightedLossModel(copy.deepcopy(base).train()) for k in collate}
    del base
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-5) for k, m in models.items()}
    secs = {k: 0.0 for k in collate}
    cpu = {k: 0.0 for k in collate}
    cpu_fb = {k: 0.0 for k in collate}  # forward + backward only (what the layout changes)
    slots = {k: 0 for k in collate}
    real = 0

    def step(kind, group, update):
        batch = collate[kind](group)
        m, opt = models[kind], opts[kind]
        t0, c0 = time.perf_counter(), time.process_time()
        m(**batch)["loss"].backward()
        c_fb = time.process_time() - c0
        if update:  # one optimizer step per accumulation cycle, as in the recipe
            opt.step()
            opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0, time.process_time() - c0, c_fb, batch["input_ids"].numel()

    for j, group in enumerate(tqdm(groups, desc=name, file=sys.stderr, leave=False)):
        order = ("padded", "packed") if j % 2 == 0 else ("packed", "padded")
        update = j == 0 or j % args.accumulation == 0 or j == len(groups) - 1
        for kind in order:
            dt, dc, dfb, n_slots = step(kind, group, update)
            if j > 0:
                secs[kind] += dt
                cpu[kind] += dc
                cpu_fb[kind] += dfb
                slots[kind] += n_slots
        if j > 0:
            real += sum(int(torch.as_tensor(e["input_ids"]).numel()) for e in group)
    return {
        "model": name,
        "real": real,
        "secs": secs,
        "cpu": cpu,
        "cpu_fb": cpu_fb,
        "slots": slots,
        "batches": len(groups) - 1,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--models", default="tiny,smollm2_135m", help="model config names (conf/model/)")
    ap.add_argument("--datasets", default=DATASETS, help="dataset configs whose lengths are used")
    ap.add_argument("--batch", type=int, default=4, help="examples per micro-batch (the recipe's 4 per device)")
    ap.add_argument("--batches", type=int, default=20, help="timed micro-batches per model (default 20)")
    ap.add_argument(
        "--accumulation",
        type=int,
        default=8,
        help="micro-batches per optimizer step (the recipe's 128 = 4 x 8 x 4 GPUs: 8)",
    )
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--plw", type=float, default=0.1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="16 timed micro-batches (4 for SmolLM2, accumulation 4)")
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
        f"# {args.batch} examples per micro-batch, shuffled, CPU threads={args.threads}, forward+backward per "
        f"micro-batch, AdamW step every {args.accumulation} micro-batches (--quick: see --help)"
    )
    header = (
        f"| {'model':<13} | {'batches':>7} | {'real tok':>8} | {'padded fill':>11} | {'packed fill':>11} | "
        f"{'padded tok/s':>12} | {'packed tok/s':>12} | {'wall x':>6} | {'padded tok/cpu-s':>16} | "
        f"{'packed tok/cpu-s':>16} | {'cpu x':>6} | {'fwd+bwd cpu x':>13} | target |"
    )
    print(header)
    print("|" + "|".join("-" * len(c) for c in header.split("|")[1:-1]) + "|")
    for name in [m for m in args.models.split(",") if m]:
        a = argparse.Namespace(**vars(args))
        if args.quick:
            a.batches = 4 if "smollm2" in name else 16
            a.accumulation = min(a.accumulation, a.batches)
        r = bench_model(name, lengths, a)
        tps = {k: r["real"] / r["secs"][k] for k in r["secs"]}
        tpc = {k: r["real"] / r["cpu"][k] for k in r["cpu"]}
        ratio, cratio = tps["packed"] / tps["padded"], tpc["packed"] / tpc["padded"]
        fb = r["cpu_fb"]["padded"] / r["cpu_fb"]["packed"]
        print(
            f"| {name:<13} | {r['batches']:>7} | {r['real']:>8} | {r['real'] / r['slots']['padded']:>11.3f} | "
            f"{r['real'] / r['slots']['packed']:>11.3f} | {tps['padded']:>12.0f} | {tps['packed']:>12.0f} | "
            f"{ratio:>5.3f}x | {tpc['padded']:>16.0f} | {tpc['packed']:>16.0f} | {cratio:>5.3f}x | {fb:>12.3f}x | "
            f"{'PASS' if cratio >= TARGET else 'MISS':>6} |",
            flush=True,
        )
    print(
        f"\nfill = real tokens / (rows x padded length); 'fwd+bwd cpu x' leaves out the AdamW steps (same cost "
        f"for both layouts).\ntarget: packed >= {TARGET:g}x padded real tokens per second, judged on process CPU "
        f"time of the whole step ('cpu x'; wall time on a shared machine mostly measures other processes)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Peak memory and time of the chunked PLW loss (pipeline.loss) against the naive full-logits loss.

Both compute ``sum(w * CE) / sum(w)`` from final hidden states ``(1, T, H)`` and an LM head ``(V, H)``,
forward + backward (gradients for hidden states and head):

* ``naive``:   ``logits = hidden @ W.T`` (full ``T x V``), then ``pipeline.loss.naive_weighted_loss``
  (fp32 per-token CE, weighted mean);
* ``chunked``: ``pipeline.loss.weighted_causal_lm_loss`` (never materialises the full logits).

Every configuration runs in a fresh subprocess, so peaks do not leak between them. Peak memory is the
extra memory above the inputs during the first forward + backward: on CUDA
``torch.cuda.max_memory_allocated`` minus the allocation before; on CPU the growth of the process's
maximum resident set size (``resource.getrusage``, the high-water mark; torch returns large CPU
buffers to the OS, so it tracks the allocations). Time is the median of the timed repeats after that
first run, as wall time and as process CPU time (all threads; on a shared CPU machine the time
target is judged on CPU time, which other processes disturb far less). Configurations whose naive
run would not fit in the available memory are skipped.

Target (at vocab 128k x sequence 4096): >= 10x less peak memory than naive, and no slower
(time ratio <= 1.05, i.e. within timing noise).

    .venv/bin/python benchmarks/loss_memory.py --quick          # CPU: hidden 256, seq 512 and 4096
    .venv/bin/python benchmarks/loss_memory.py --device cuda    # GPU: hidden 4096, bf16, seq 512..4096
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pipeline import loss as L  # noqa: E402

TARGET_MEM_RATIO = 10.0
TARGET_TIME_RATIO = 1.05
TARGET_CONFIG = (128256, 4096)


def _available_bytes() -> int:
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


def _naive_estimate(V: int, T: int, H: int, elt: int) -> int:
    """Rough bytes the naive path needs (logits, fp32 copy, log-softmax, gradient)."""
    return T * V * (elt + 4 * 3) + V * H * 8


# --------------------------------------------------------------------------------------------
# Worker (one configuration, fresh process)
# --------------------------------------------------------------------------------------------
def worker(args) -> None:
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    dt = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    V, T, H = args.vocab, args.seq, args.hidden
    g = torch.Generator().manual_seed(0)
    hidden = (torch.randn(1, T, H, generator=g) * 0.5).to(dev, dt).requires_grad_(True)
    weight = (torch.randn(V, H, generator=g) * 0.02).to(dev, dt).requires_grad_(True)
    labels = torch.randint(0, V, (1, T), generator=g).to(dev)
    n_prompt = T // 3
    weights = torch.ones(1, T)
    weights[:, :n_prompt] = args.plw
    weights[:, 0] = 0
    weights = weights.to(dev)

    def step():
        if args.impl == "naive":
            logits = hidden @ weight.t()
            loss = L.naive_weighted_loss(logits, labels, weights)
        else:
            loss = L.weighted_causal_lm_loss(hidden, weight, labels, weights, chunk_size=args.chunk_size).loss
        loss.backward()
        hidden.grad = None
        weight.grad = None
        return float(loss.detach())

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    sync()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0, c0 = time.perf_counter(), time.process_time()
    value = step()
    sync()
    first, first_cpu = time.perf_counter() - t0, time.process_time() - c0
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    times, cpu = [], []
    for _ in range(args.repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        sync()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    print(
        json.dumps(
            {
                "peak_bytes": int(peak),
                "seconds": statistics.median(times) if times else first,
                "cpu_seconds": statistics.median(cpu) if cpu else first_cpu,
                "loss": value,
            }
        )
    )


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------
def run_one(args, impl: str, V: int, T: int) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        "--impl",
        impl,
        "--vocab",
        str(V),
        "--seq",
        str(T),
        "--hidden",
        str(args.hidden),
        "--dtype",
        args.dtype,
        "--device",
        args.device,
        "--threads",
        str(args.threads),
        "--repeats",
        str(args.repeats),
        "--chunk-size",
        str(args.chunk_size),
        "--plw",
        str(args.plw),
    ]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        return {"error": (p.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda")
    ap.add_argument("--vocabs", default="32000,128256", help="comma-separated vocabulary sizes")
    ap.add_argument("--seqs", default=None, help="comma-separated sequence lengths (default 512,1024,2048,4096)")
    ap.add_argument("--hidden", type=int, default=None, help="hidden size (default 4096 on cuda, 256 on cpu)")
    ap.add_argument("--dtype", default=None, help="float32 | bfloat16 (default bfloat16 on cuda, float32 on cpu)")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats after the measured first run (default 3)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    ap.add_argument("--chunk-size", type=int, default=1024, help="tokens per chunk of the chunked loss")
    ap.add_argument("--plw", type=float, default=0.1)
    ap.add_argument("--quick", action="store_true", help="seq 512 and 4096 only, 2 timed repeats")
    # worker mode (internal)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--impl", default="chunked", help=argparse.SUPPRESS)
    ap.add_argument("--vocab", type=int, default=32000, help=argparse.SUPPRESS)
    ap.add_argument("--seq", type=int, default=512, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args)
        return 0

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    cuda = args.device.startswith("cuda")
    args.hidden = args.hidden or (4096 if cuda else 256)
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    args.repeats = args.repeats if args.repeats is not None else (2 if args.quick else 3)
    seqs = [int(s) for s in (args.seqs or ("512,4096" if args.quick else "512,1024,2048,4096")).split(",")]
    vocabs = [int(v) for v in args.vocabs.split(",")]
    elt = 2 if args.dtype == "bfloat16" else 4

    print(
        f"# loss memory/time: device={args.device} hidden={args.hidden} dtype={args.dtype} batch=1 "
        f"chunk={args.chunk_size} threads={args.threads} repeats={args.repeats} (peak = extra over inputs)"
    )
    header = (
        f"| {'vocab':>6} | {'seq':>5} | {'naive MiB':>9} | {'chunked MiB':>11} | {'mem ratio':>9} | "
        f"{'naive s':>8} | {'chunked s':>9} | {'time ratio':>10} | {'cpu-time ratio':>14} | "
        f"{'loss rel diff':>13} | target |"
    )
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    verdicts = []
    for V in vocabs:
        for T in seqs:
            need = _naive_estimate(V, T, args.hidden, elt)
            if not cuda and need > 0.8 * _available_bytes():
                print(
                    f"| {V:>6} | {T:>5} | SKIP: naive needs ~{need / 2**30:.1f} GiB, "
                    f"{_available_bytes() / 2**30:.1f} GiB available |"
                )
                continue
            n = run_one(args, "naive", V, T)
            c = run_one(args, "chunked", V, T)
            if "error" in n or "error" in c:
                print(f"| {V:>6} | {T:>5} | error: {n.get('error') or c.get('error')} |")
                continue
            mem_ratio = n["peak_bytes"] / max(c["peak_bytes"], 1)
            time_ratio = c["seconds"] / n["seconds"]
            cpu_ratio = c["cpu_seconds"] / n["cpu_seconds"]
            judged = time_ratio if cuda else cpu_ratio
            rel = abs(n["loss"] - c["loss"]) / abs(n["loss"])
            is_target = (V, T) == TARGET_CONFIG
            verdict = ""
            if is_target:
                ok = mem_ratio >= TARGET_MEM_RATIO and judged <= TARGET_TIME_RATIO
                verdict = "PASS" if ok else "MISS"
                verdicts.append(verdict)
            print(
                f"| {V:>6} | {T:>5} | {n['peak_bytes'] / 2**20:>9.1f} | {c['peak_bytes'] / 2**20:>11.1f} | "
                f"{mem_ratio:>8.2f}x | {n['seconds']:>8.3f} | {c['seconds']:>9.3f} | {time_ratio:>9.2f}x | "
                f"{cpu_ratio:>13.2f}x | {rel:>13.2e} | {verdict:>6} |",
                flush=True,
            )
    print(
        f"\ntarget at vocab {TARGET_CONFIG[0]} x seq {TARGET_CONFIG[1]}: mem ratio >= {TARGET_MEM_RATIO:g}x "
        f"and {'time' if cuda else 'cpu-time'} ratio (chunked/naive) <= {TARGET_TIME_RATIO:g}x -> "
        f"{verdicts[0] if verdicts else 'not measured'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

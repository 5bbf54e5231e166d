"""Data-stage timings on the real instruction data in ../shared: a cold build against a warm rebuild.

    .venv/bin/python benchmarks/data_stage.py [--datasets shared_alpaca_gpt4,shared_alpaca_gpt4_medium]

For each dataset it builds into a fresh temporary data folder (cold: load, validate, tokenize,
invert, write), then builds again with the same definition (warm: the hash-named folder is reused),
and prints one row per dataset with both times and their ratio. A warm rebuild only verifies and
reads the stored records. Target: at least 10x faster than the cold build for datasets whose build
tokenizes (prompt inversion); for untransformed datasets the ratio is shown for information (their
cold build is little more than parsing). Tokenizer loading is timed separately (it is shared).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.config import PROJECT_ROOT, load_config  # noqa: E402
from pipeline.data.build import build  # noqa: E402
from pipeline.tokenizer import load_tokenizer  # noqa: E402

TARGET_RATIO = 10.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--datasets",
        default="shared_alpaca_gpt4,shared_alpaca_gpt4_short,shared_alpaca_gpt4_medium,shared_dolly_hhrlhf_short",
    )
    ap.add_argument("--shared-dir", default=os.environ.get("PLW_SHARED_DIR", str(PROJECT_ROOT.parent / "shared")))
    args = ap.parse_args()
    shared = Path(args.shared_dir)
    if not (shared / "data" / "instructions").is_dir():
        print(f"needs the real instruction data in {shared}/data/instructions (../shared); not found")
        return 2
    tok_dir = shared / "tokenizers" / "llama"
    t0 = time.perf_counter()
    load_tokenizer(str(tok_dir))
    t_tok = time.perf_counter() - t0

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.datasets.split(","):
            cfg = load_config(
                [
                    f"dataset={name}",
                    f"paths.data_dir={tmp}",
                    f"paths.shared_dir={shared}",
                    f"paths.llama_tokenizer={tok_dir}",
                ]
            )
            t0 = time.perf_counter()
            cold = build(cfg)
            t_cold = time.perf_counter() - t0
            t0 = time.perf_counter()
            warm = build(cfg)
            t_warm = time.perf_counter() - t0
            assert warm.reused and warm.folder == cold.folder
            tokenizes = cfg.dataset.transform.kind != "none"
            rows.append((name, len(cold.records), t_cold, t_warm, t_cold / max(t_warm, 1e-9), tokenizes))

    print(f"tokenizer load (once): {t_tok:.2f} s")
    print(f"| dataset | records | cold build (s) | warm rebuild (s) | cold/warm | target >= {TARGET_RATIO:.0f}x |")
    print("|---|---:|---:|---:|---:|---|")
    for name, n, tc, tw, ratio, tokenizes in rows:
        verdict = ("PASS" if ratio >= TARGET_RATIO else "MISS") if tokenizes else "(no transform)"
        print(f"| {name} | {n} | {tc:.3f} | {tw:.4f} | {ratio:.0f}x | {verdict} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

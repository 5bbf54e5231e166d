"""``python -m pipeline.analysis <command> [options] [key=value overrides]``

Commands:
  regress   collect the run store, aggregates, GLMM per dataset, GAMs, figures, report
            (``make regress``); output in ``analysis.output_dir``. The run store is only read.
  collect   only collect the run store into collected.csv / collected.parquet.
  suggest   recommended PLW for a dataset from a fitted GAM (``make suggest DATA=... TOKENIZER=...``):
            --data FILE [--format alpaca|dolly|ultrafeedback|messages] [--tokenizer SPEC] [--r-g X] [--gam FILE]
            (chat data, format messages: ``analysis.suggest.completion_turns=all|last``)

Overrides are Hydra-style (e.g. ``paths.runs_dir=/scratch/runs analysis.incomplete=intersect``).
Exit status: 0 done, 1 failed (regress: also when any dataset could not be analysed, said in the
last line), 2 bad configuration or arguments.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

from pipeline import cli
from pipeline.analysis.collect import collect_runs, write_collected
from pipeline.analysis.rbridge import RUnavailable
from pipeline.analysis.stage import run_analysis
from pipeline.analysis.paper_guidance import paper_answer
from pipeline.analysis.suggest import dataset_rg, recommend


def unanalysed_datasets(out) -> List[str]:
    """Datasets of a regress whose GLMM was not fitted (skipped for bad input, or failed)."""
    return sorted(ds for ds, r in out.glmm.items() if r.status != "fitted")


def main(argv: Optional[List[str]] = None) -> int:
    ap = cli.parser("python -m pipeline.analysis", __doc__, commands=["regress", "collect", "suggest"])
    ap.add_argument("--data", help="suggest: dataset file (.json/.jsonl/.parquet)")
    ap.add_argument("--format", help="suggest: field mapping (alpaca | dolly | ultrafeedback | messages)")
    ap.add_argument("--tokenizer", help="suggest: tokenizer spec (default paths.llama_tokenizer)")
    ap.add_argument("--r-g", type=float, dest="r_g", help="suggest: use this R_g (no tokenisation)")
    ap.add_argument("--gam", help="suggest: fitted GAM bundle (default analysis.suggest.gam_file)")
    ap.add_argument("--no-figures", action="store_true", help="regress: skip the figures")
    args, overrides = cli.parse(ap, argv)
    try:
        cfg, _ = cli.compose(overrides)
    except cli.CONFIG_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    a = cfg.analysis

    if args.command == "collect":
        df, log = collect_runs(Path(a.runs_dir), p=a.power)
        paths = write_collected(df, Path(a.output_dir))
        for i in log:
            print(i, file=sys.stderr)
        print(
            f"collected {df['run_id'].nunique() if len(df) else 0} run(s) from {a.runs_dir} -> "
            + ", ".join(map(str, paths))
        )
        return 0 if len(df) else 1

    if args.command == "regress":
        try:
            out = run_analysis(a, figures=not args.no_figures)
        except RUnavailable as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        for i in out.issues:
            print(i, file=sys.stderr)
        n = out.tidy["run_id"].nunique() if len(out.tidy) else 0
        print(f"analysed {n} run(s) from {out.runs_dir}; report: {out.out_dir / 'report.md'}")
        for ds, r in out.glmm.items():
            row = r.table_row()
            print(
                f"  GLMM {ds}: {r.status}"
                + (
                    f", p = {row['p_value']:.3g} (Wald chi2, the paper's), calibrated p = "
                    f"{row['p_value_calibrated']:.3g}, b = {row['b_wp']:.3f}, a = {row['a_wp2']:.3f}, "
                    f"converged = {r.converged}; {r.critical.message if r.critical else ''}"
                    if r.status == "fitted"
                    else ""
                )
            )
        for s, g in out.gam.items():
            print(
                f"  GAM {s}: {g.status}"
                + (f" -> {g.rds_path}" if g.rds_path else f" ({'; '.join(g.errors)})" if g.errors else "")
            )
        if not n:
            return 1
        bad = unanalysed_datasets(out)
        if bad:
            print(
                f"error: {len(bad)} of {len(out.glmm)} dataset(s) could not be analysed (no GLMM fit): "
                + ", ".join(bad)
                + f"; see the messages above and section 9 of {out.out_dir / 'report.md'}",
            )
            return 1
        print(f"all {len(out.glmm)} dataset(s) analysed")
        return 0

    # suggest
    s = a.suggest
    data = args.data or s.data
    r_g = args.r_g if args.r_g is not None else s.r_g
    gam_file = Path(args.gam or s.gam_file)
    try:
        if r_g is None:
            if not data:
                print(
                    "error: give the dataset (make suggest DATA=my.jsonl, or --data) or its R_g (--r-g)",
                    file=sys.stderr,
                )
                return 2
            tok = args.tokenizer or s.tokenizer or cfg.paths.llama_tokenizer
            fmt = args.format or s.format
            stats = dataset_rg(Path(data), tok, fmt, s.completion_turns)
            r_g = stats["r_g"]
            turns = "every assistant turn" if s.completion_turns == "all" else "the last assistant turn"
            what = f"message contents alone, {turns} the completion" if fmt == "messages" else "fields alone"
            print(
                f"{data}: {stats['n']} instances, {stats['prompt_tokens']} prompt tokens, "
                f"{stats['completion_tokens']} completion tokens (tokenizer {tok}, {what}, "
                f"no special tokens)"
            )
            print(
                f"R_g = {r_g:.4g} (mean per-instance ratio {stats['mean_ratio']:.4g}, geometric "
                f"mean {stats['geomean_ratio']:.4g})"
            )
        paper = paper_answer(float(r_g))
        rec = own_gam_note = None
        if gam_file.is_file():
            rec = recommend(
                gam_file, float(r_g), w_grid=a.gam.w_grid, tolerance=a.gam.tolerance, flat_fraction=a.gam.flat_fraction
            )
            own_gam_note = rec.not_a_recommendation()
        else:
            own_gam_note = (
                f"No fitted GAM of your own at {gam_file} (`make regress` writes one after a study; "
                f"analysis.suggest.gam_file or --gam points at another)."
            )
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # DataError, TokenizerError, RUnavailable: their messages say what to do
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    if own_gam_note is None:  # a GAM of the user's own study: its answer first, named, then the paper's
        print(rec.text())
        print()
    else:
        print(own_gam_note)
        print()
    print(paper.text())
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Build (or reuse) a processed dataset; the entry point other stages use.

CLI::

    python -m pipeline.data.build dataset=<name> [hydra overrides]      # e.g. make data OVERRIDES=...
    HF_HUB_OFFLINE=1 python -m pipeline.data.build dataset=shared_alpaca_gpt4_short

prints where the processed dataset is and a short summary.

API for other stages::

    from pipeline.data.build import load_dataset
    records, meta = load_dataset(cfg)   # cfg: the composed config (DictConfig) or a typed Config

``records`` is a list of dicts with ``instruction``, ``input``, ``output`` (Alpaca schema, input
``""`` when absent), ``inverted`` (bool), ``source_index`` and, for inverted datasets, ``tokens``;
``meta`` is the folder's meta.json (plus ``meta["dir"]``, the folder). The dataset is built on the
first call (source fetched, validated, transformed) and read from the store afterwards
(see :mod:`pipeline.data.store`).

Steps: source (:mod:`~pipeline.data.sources`) -> raw sha256 -> records and validation
(:mod:`~pipeline.data.records`; ``dataset.empty_output``, ``dataset.max_records``) -> prompt inversion
(:mod:`~pipeline.data.inversion`, token lengths from ``dataset.transform.tokenizer`` or
``paths.llama_tokenizer``) -> the dataset's R_g -> store.

R_g (docs/study.md section 1: total completion tokens / total prompt tokens, each field tokenized
alone, no special tokens) is a property of the processed dataset: ``meta["rg"]`` (a float, or None
with the reason in ``meta["rg_measure"]["error"]`` when the tokenizer cannot be loaded) and
``meta["rg_measure"]`` (prompt and completion token totals, tokenizer spec and fingerprint). Inverted
datasets reuse the transform's counts (the same numbers as ``transform.rg_after``); the others are
tokenized with the same tokenizer (``dataset.transform.tokenizer`` or ``paths.llama_tokenizer``).
Training copies it into the run's ``train_summary.json``; the analysis reads it from there. A folder
built before R_g was recorded (or when the tokenizer was unavailable) gets it added to its meta.json
on its next load.
"""

from __future__ import annotations

import datetime as _dt
import logging
import math
import platform
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import pipeline
from pipeline import cli
from pipeline.config import validate
from pipeline.data import inversion, store
from pipeline.data.records import DataError, load_records
from pipeline.data.sources import RawFile, SourceError, resolve_source
from pipeline.data.tokens import get_tokenizer, length_fn, resolve_tokenizer_spec
from pipeline.tokenizer import TokenizerError

__all__ = ["load_dataset", "build", "prepare", "Prepared", "main", "measure_rg"]

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    """Everything known before building: the raw file, the definition, the target folder."""

    cfg: Any
    raw: RawFile
    definition: Dict[str, Any]
    digest: str
    folder: Path
    tokenizer: Any = None
    tokenizer_spec: Optional[str] = None
    tokenizer_fingerprint: Optional[str] = None


def prepare(cfg) -> Prepared:
    """Fetch the raw file (or find it in the cache), load the tokenizer if the transform needs it,
    and compute the content hash and folder."""
    cfg = validate(cfg)  # a typed Config passes through: validated once, at the entry point
    ds = cfg.dataset
    raw = resolve_source(ds.source, cfg.paths.raw_dir)
    tok = spec = fp = None
    if ds.transform.kind == "invert":
        spec = resolve_tokenizer_spec(cfg)
        tok, fp = get_tokenizer(spec)
    defn = store.definition(
        raw.sha256,
        ds.source.format,
        ds.empty_output,
        ds.max_records,
        ds.transform.kind,
        ds.transform.target_rg,
        ds.transform.tolerance,
        ds.transform.seed,
        fp,
        ds.completion_turns,
    )
    digest = store.content_hash(defn)
    return Prepared(cfg, raw, defn, digest, store.dataset_dir(cfg.paths.processed_dir, ds.name, digest), tok, spec, fp)


def _source_meta(src) -> Dict[str, Any]:
    keys = {"local": ["path"], "url": ["url"], "hf": ["repo_id", "revision", "filename"]}[src.kind]
    d = {"kind": src.kind, "format": src.format, "sha256_expected": src.sha256}
    d.update({k: getattr(src, k) for k in keys})
    return d


def _versions() -> Dict[str, str]:
    out = {"python": platform.python_version(), "pipeline": pipeline.__version__}
    try:
        import transformers

        out["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover
        pass
    return out


def _rg_meta(lengths: List[inversion.Lengths], spec: Optional[str], fingerprint: Optional[str]) -> Dict[str, Any]:
    prompt = sum(x.prompt for x in lengths)
    completion = sum(x.completion for x in lengths)
    rg = inversion.dataset_rg(lengths)
    measure = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "tokenizer": spec,
        "fingerprint": fingerprint,
        "error": None,
    }
    if not math.isfinite(rg):
        measure["error"] = f"R_g undefined: {completion} completion tokens over {prompt} prompt tokens"
        return {"rg": None, "rg_measure": measure}
    return {"rg": rg, "rg_measure": measure}


def measure_rg(cfg, records: List[Dict[str, Any]], meta: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """``{"rg": float | None, "rg_measure": {...}}`` of processed records (see the module docstring).

    Records carrying the transform's ``tokens`` (inverted datasets; tokenizer in ``meta``) are not
    tokenized again. Otherwise the tokenizer of :func:`resolve_tokenizer_spec` counts each field; when
    it cannot be loaded, ``rg`` is None and ``rg_measure["error"]`` says why (the build goes on).
    """
    tok_meta = (meta or {}).get("tokenizer") or {}
    if records and tok_meta.get("fingerprint") and all("tokens" in r for r in records):
        lengths = [
            inversion.Lengths(r["tokens"]["instruction"], r["tokens"]["input"], r["tokens"]["output"]) for r in records
        ]
        return _rg_meta(lengths, tok_meta.get("spec"), tok_meta["fingerprint"])
    cfg = validate(cfg)  # a typed Config passes through: validated once, at the entry point
    spec = resolve_tokenizer_spec(cfg)
    try:
        tok, fp = get_tokenizer(spec)
    except (TokenizerError, OSError, ValueError) as e:
        msg = f"tokenizer {spec} unavailable ({type(e).__name__}: {' '.join(str(e).split())})"
        log.warning("dataset %s: R_g not measured: %s", cfg.dataset.name, msg)
        return {
            "rg": None,
            "rg_measure": {
                "prompt_tokens": None,
                "completion_tokens": None,
                "tokenizer": spec,
                "fingerprint": None,
                "error": msg,
            },
        }
    lengths = inversion.measure(
        records,
        length_fn(tok, desc=f"{cfg.dataset.name}: token lengths (R_g)"),
        cfg.dataset.completion_turns,
    )
    return _rg_meta(lengths, spec, fp)


def _make(p: Prepared) -> Tuple[List[Dict[str, Any]], Dict[str, Any]]:
    ds = p.cfg.dataset
    loaded = load_records(p.raw.path, ds.source.format, ds.empty_output, ds.max_records)
    recs = loaded.records
    transform_meta: Dict[str, Any] = {"kind": ds.transform.kind}
    if ds.transform.kind == "invert":
        lf = length_fn(p.tokenizer, desc=f"{ds.name}: token lengths")
        new, lengths, sel = inversion.transform(
            recs, lf, ds.transform.target_rg, ds.transform.tolerance, ds.transform.seed, None, ds.completion_turns
        )
        for r, src_i, ln in zip(new, loaded.source_index, lengths):
            r["source_index"] = src_i
            r["tokens"] = {"instruction": ln.instruction, "input": ln.input, "output": ln.output}
        out = new
        rg = _rg_meta(lengths, p.tokenizer_spec, p.tokenizer_fingerprint)
        transform_meta.update(
            target_rg=sel.target_rg,
            tolerance=ds.transform.tolerance if sel.target_rg else None,
            seed=ds.transform.seed if sel.target_rg else None,
            version=inversion.TRANSFORM_VERSION,
            rg_before=sel.rg_before,
            rg_after=sel.rg_after,
            n_candidates=sel.n_candidates,
            n_inverted=sel.n_inverted,
            rule="target" if sel.target_rg else "R_g > 1",
        )
    else:
        out = [
            {
                "instruction": r["instruction"],
                "input": r["input"],
                "output": r["output"],
                "inverted": False,
                "source_index": i,
                **({"messages": r["messages"]} if "messages" in r else {}),  # chat data (format: messages)
            }
            for r, i in zip(recs, loaded.source_index)
        ]
        rg = measure_rg(p.cfg, out)
    n_inverted = sum(1 for r in out if r["inverted"])
    meta = {
        "name": ds.name,
        "description": ds.description,
        "hash": p.digest,
        "definition": p.definition,
        "source": _source_meta(ds.source),
        "raw": {
            "path": str(p.raw.path),
            "origin": p.raw.origin,
            "sha256": p.raw.sha256,
            "bytes": p.raw.path.stat().st_size,
        },
        "counts": {
            "raw_records": loaded.n_raw,
            "considered": loaded.n_considered,  # after max_records
            "dropped_empty_output": len(loaded.dropped_empty_output),
            "kept_empty_output": len(loaded.kept_empty_output),
            "records": len(out),
            "inverted": n_inverted,
            # records equal to an earlier one (instruction, input, output), kept as the file has them
            "duplicates": len(loaded.duplicates),
        },
        "dropped_empty_output_indices": loaded.dropped_empty_output,
        "duplicate_indices": loaded.duplicates,
        "kept_empty_output_indices": loaded.kept_empty_output,
        "empty_output": ds.empty_output,
        "max_records": ds.max_records,
        "transform": transform_meta,
        "tokenizer": (
            {"spec": p.tokenizer_spec, "fingerprint": p.tokenizer_fingerprint} if p.tokenizer_fingerprint else None
        ),
        **rg,
        "paper_rg": ds.paper_rg,
        "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": _versions(),
    }
    return out, meta


@dataclass
class BuildResult:
    folder: Path
    records: List[Dict[str, Any]]
    meta: Dict[str, Any]
    reused: bool


def _given_source(meta: Dict[str, Any], p: Prepared) -> None:
    """Make a reused folder's meta name the source this build was given.

    The folder is named by content (the raw file's sha256 and the definition), so two files with
    identical bytes share it; meta.json keeps the file it was built from, and the returned meta says
    which file this run actually read (``raw.path``, ``source``), with the other under
    ``raw.built_from`` when they differ. Nothing is written: meta.json stays as built."""
    given = str(p.raw.path)
    raw = dict(meta.get("raw") or {})
    if raw.get("path") not in (None, given):
        raw["built_from"] = raw["path"]
        log.info(
            "dataset %s: %s has the same bytes as %s, which built %s: reusing it",
            p.cfg.dataset.name,
            given,
            raw["path"],
            p.folder,
        )
    raw.update(path=given, origin=p.raw.origin)
    meta["raw"] = raw
    meta["source"] = _source_meta(p.cfg.dataset.source)


def build(cfg, force: bool = False) -> BuildResult:
    """Build the processed dataset of ``cfg.dataset`` unless a finished folder exists (``force``
    rebuilds it). Raises SourceError (raw file unavailable), DataError (invalid records) or
    InversionError (unreachable target)."""
    p = prepare(cfg)
    if not force and store.is_done(p.folder):
        records, meta = store.read(p.folder)
        if meta.get("rg") is None and not (meta.get("rg_measure") or {}).get("fingerprint"):
            # built before R_g was recorded, or when the tokenizer was unavailable: measure it now
            rg = measure_rg(p.cfg, records, meta)
            if rg["rg"] is not None:
                meta.update(rg)
                try:
                    store.update_meta(p.folder, meta)
                except OSError as e:  # a read-only store: the value is still returned
                    log.warning("dataset %s: cannot record R_g in %s: %s", meta.get("name"), p.folder, e)
        meta["dir"] = str(p.folder)
        _given_source(meta, p)
        return BuildResult(p.folder, records, meta, reused=True)
    records, meta = _make(p)
    store.write(p.folder, records, meta)
    meta = dict(meta, dir=str(p.folder))
    return BuildResult(p.folder, records, meta, reused=False)


def load_dataset(cfg) -> Tuple[List[Dict[str, Any]], Dict[str, Any]]:
    """``(records, meta)`` of ``cfg.dataset``, built on first use (see module docstring)."""
    res = build(cfg)
    return res.records, res.meta


def summary(res: BuildResult) -> str:
    m = res.meta
    c = m["counts"]
    t = m["transform"]
    lines = [
        f"dataset {m['name']}: {c['records']} records ({'reused' if res.reused else 'built'})",
        f"  folder: {res.folder}",
        f"  raw:    {m['raw']['path']} (sha256 {m['raw']['sha256']})",
        f"  counts: raw {c['raw_records']}, considered {c['considered']}, dropped (empty output) "
        f"{c['dropped_empty_output']}, kept empty outputs {c['kept_empty_output']}, "
        f"inverted {c['inverted']}"
        + (f", duplicates {c['duplicates']} (kept; records equal to an earlier one)" if "duplicates" in c else ""),
    ]
    if t["kind"] == "invert":
        target = (
            f"target {t['target_rg']} (tolerance {t['tolerance']}, seed {t['seed']})"
            if t.get("target_rg") is not None
            else "invert every instance with R_g > 1"
        )
        lines.append(
            f"  transform: {target}; dataset R_g {t['rg_before']:.4f} -> {t['rg_after']:.4f} "
            f"(tokenizer {m['tokenizer']['spec']})"
        )
    rm = m.get("rg_measure") or {}
    lines.append(
        f"  R_g:    {m['rg']:.4f} ({rm.get('completion_tokens')} completion / {rm.get('prompt_tokens')} "
        f"prompt tokens, tokenizer {rm.get('tokenizer')})"
        if m.get("rg") is not None
        else f"  R_g:    not measured ({rm.get('error') or 'not recorded'})"
    )
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    ap = cli.parser("python -m pipeline.data.build", __doc__)
    ap.add_argument("--force", action="store_true", help="rebuild even if a finished folder exists")
    args, overrides = cli.parse(ap, argv)

    def body() -> int:
        _, typed = cli.compose(overrides)
        print(summary(build(typed, force=args.force)))
        return 0

    return cli.run(body, user_errors=(SourceError, DataError, inversion.InversionError, TokenizerError))


if __name__ == "__main__":
    sys.exit(main())

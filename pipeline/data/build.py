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
``paths.llama_tokenizer``) -> store.
"""
from __future__ import annotations

import datetime as _dt
import platform
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from omegaconf import DictConfig

from pipeline.data import inversion, store
from pipeline.data.records import DataError, load_records
from pipeline.data.sources import RawFile, SourceError, resolve_source
from pipeline.data.tokens import get_tokenizer, length_fn, resolve_tokenizer_spec

__all__ = ["load_dataset", "build", "prepare", "Prepared", "main"]


def _typed(cfg):
    """A typed Config from a composed DictConfig (validated), or the object itself."""
    if isinstance(cfg, DictConfig):
        from pipeline.config import validate

        return validate(cfg)
    return cfg


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
    cfg = _typed(cfg)
    ds = cfg.dataset
    raw = resolve_source(ds.source, cfg.paths.raw_dir)
    tok = spec = fp = None
    if ds.transform.kind == "invert":
        spec = resolve_tokenizer_spec(cfg)
        tok, fp = get_tokenizer(spec)
    defn = store.definition(raw.sha256, ds.source.format, ds.empty_output, ds.max_records, ds.transform.kind,
                            ds.transform.target_rg, ds.transform.tolerance, ds.transform.seed, fp)
    digest = store.content_hash(defn)
    return Prepared(cfg, raw, defn, digest, store.dataset_dir(cfg.paths.processed_dir, ds.name, digest),
                    tok, spec, fp)


def _source_meta(src) -> Dict[str, Any]:
    keys = {"local": ["path"], "url": ["url"], "hf": ["repo_id", "revision", "filename"]}[src.kind]
    d = {"kind": src.kind, "format": src.format, "sha256_expected": src.sha256}
    d.update({k: getattr(src, k) for k in keys})
    return d


def _versions() -> Dict[str, str]:
    import pipeline

    out = {"python": platform.python_version(), "pipeline": pipeline.__version__}
    try:
        import transformers

        out["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover
        pass
    return out


def _make(p: Prepared) -> Tuple[List[Dict[str, Any]], Dict[str, Any]]:
    ds = p.cfg.dataset
    loaded = load_records(p.raw.path, ds.source.format, ds.empty_output, ds.max_records)
    recs = loaded.records
    transform_meta: Dict[str, Any] = {"kind": ds.transform.kind}
    if ds.transform.kind == "invert":
        lf = length_fn(p.tokenizer, desc=f"{ds.name}: token lengths")
        new, lengths, sel = inversion.transform(recs, lf, ds.transform.target_rg, ds.transform.tolerance,
                                                ds.transform.seed)
        for r, src_i, ln in zip(new, loaded.source_index, lengths):
            r["source_index"] = src_i
            r["tokens"] = {"instruction": ln.instruction, "input": ln.input, "output": ln.output}
        out = new
        transform_meta.update(target_rg=sel.target_rg, tolerance=ds.transform.tolerance if sel.target_rg else None,
                              seed=ds.transform.seed if sel.target_rg else None, version=inversion.TRANSFORM_VERSION,
                              rg_before=sel.rg_before, rg_after=sel.rg_after, n_candidates=sel.n_candidates,
                              n_inverted=sel.n_inverted, rule="target" if sel.target_rg else "R_g > 1")
    else:
        out = [{"instruction": r["instruction"], "input": r["input"], "output": r["output"],
                "inverted": False, "source_index": i} for r, i in zip(recs, loaded.source_index)]
    n_inverted = sum(1 for r in out if r["inverted"])
    meta = {
        "name": ds.name,
        "description": ds.description,
        "hash": p.digest,
        "definition": p.definition,
        "source": _source_meta(ds.source),
        "raw": {"path": str(p.raw.path), "origin": p.raw.origin, "sha256": p.raw.sha256,
                "bytes": p.raw.path.stat().st_size},
        "counts": {
            "raw_records": loaded.n_raw,
            "considered": loaded.n_considered,  # after max_records
            "dropped_empty_output": len(loaded.dropped_empty_output),
            "kept_empty_output": len(loaded.kept_empty_output),
            "records": len(out),
            "inverted": n_inverted,
        },
        "dropped_empty_output_indices": loaded.dropped_empty_output,
        "kept_empty_output_indices": loaded.kept_empty_output,
        "empty_output": ds.empty_output,
        "max_records": ds.max_records,
        "transform": transform_meta,
        "tokenizer": ({"spec": p.tokenizer_spec, "fingerprint": p.tokenizer_fingerprint}
                      if p.tokenizer_fingerprint else None),
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


def build(cfg, force: bool = False) -> BuildResult:
    """Build the processed dataset of ``cfg.dataset`` unless a finished folder exists (``force``
    rebuilds it). Raises SourceError (raw file unavailable), DataError (invalid records) or
    InversionError (unreachable target)."""
    p = prepare(cfg)
    if not force and store.is_done(p.folder):
        records, meta = store.read(p.folder)
        meta["dir"] = str(p.folder)
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
    lines = [f"dataset {m['name']}: {c['records']} records ({'reused' if res.reused else 'built'})",
             f"  folder: {res.folder}",
             f"  raw:    {m['raw']['path']} (sha256 {m['raw']['sha256']})",
             f"  counts: raw {c['raw_records']}, considered {c['considered']}, dropped (empty output) "
             f"{c['dropped_empty_output']}, kept empty outputs {c['kept_empty_output']}, "
             f"inverted {c['inverted']}"]
    if t["kind"] == "invert":
        target = f"target {t['target_rg']} (tolerance {t['tolerance']}, seed {t['seed']})" \
            if t.get("target_rg") is not None else "invert every instance with R_g > 1"
        lines.append(f"  transform: {target}; dataset R_g {t['rg_before']:.4f} -> {t['rg_after']:.4f} "
                     f"(tokenizer {m['tokenizer']['spec']})")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from pipeline.config import ConfigError, load_config
    from pipeline.tokenizer import TokenizerError

    argv = list(sys.argv[1:] if argv is None else argv)
    force = "--force" in argv
    argv = [a for a in argv if a != "--force"]
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    try:
        cfg = load_config(argv)
        res = build(cfg, force=force)
    except (SourceError, DataError, inversion.InversionError, ConfigError, TokenizerError,
            HydraException, OmegaConfBaseException) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(summary(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``make fetch-data`` (``python -m pipeline.eval.fetch [overrides] [--force] [--only=a,b]``): the
offline benchmark mirror.

Downloads every benchmark once (where the hub is reachable) and writes it under ``eval.data_dir``
as JSON Lines in the Hugging Face schema of its dataset (one object per line, UTF-8,
``ensure_ascii=False``), at the paths the task templates read (``pipeline/eval/tasks/*.yaml``
``dataset_kwargs.data_files``; the file name is the HF split)::

    arc_challenge/{train,validation,test}.jsonl      allenai/ai2_arc, ARC-Challenge
    piqa/{train,validation}.jsonl                    baber/piqa (lm-eval's source)
    winogrande/{train,validation}.jsonl              allenai/winogrande, winogrande_xl
    truthfulqa/multiple_choice/validation.jsonl      truthfulqa/truthful_qa, multiple_choice
    truthfulqa/generation/validation.jsonl           truthfulqa/truthful_qa, generation
    wmt14/fr-en/{validation,test}.jsonl              wmt/wmt14, fr-en
    wmt16/{de-en,ro-en}/{validation,test}.jsonl      wmt/wmt16
    alpaca_eval/alpaca_eval_v1.jsonl                 AlpacaEval 1 set with text-davinci-003 outputs
    pandalm/testset-inference-v1.json                PandaLM's test set (verbatim)

The last two come from pinned GitHub commits and are checked against their sha256 (the same files
as ../shared/data; see its MANIFEST.md). ``MANIFEST.json`` in the mirror lists every file with its
rows, sha256 and source. Files already present are kept unless ``--force``. A benchmark that
cannot be fetched is reported (with the reason) and the others are still fetched; the exit status
is 1 if any failed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from pipeline import cli
from pipeline.eval import benchmarks as B
from pipeline.eval.harness import mirror_files
from pipeline.runs import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HubSource:
    path: str
    name: Optional[str] = None
    revision: Optional[str] = None  # null: the default branch (record what you fetched: MANIFEST.json)


def hub_sources() -> Dict[str, HubSource]:
    """benchmark -> its Hugging Face dataset, from each benchmark YAML's ``benchmark.hub``."""
    return {n: HubSource(*b.hub) for n, b in B.registry().items() if b.hub}


def __getattr__(name: str) -> Dict[str, HubSource]:
    if name == "HUB":  # the hub sources as they are declared now
        return hub_sources()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass(frozen=True)
class UrlSource:
    url: str
    sha256: str
    target: str  # relative to the mirror
    jsonl: bool  # convert a JSON array to JSON Lines


URLS: Dict[str, UrlSource] = {
    "alpaca_eval": UrlSource(
        "https://raw.githubusercontent.com/tatsu-lab/alpaca_eval/cd543a149df89434d8a54582c0151c0b945c3d20/"
        "results/text_davinci_003/model_outputs.json",
        "af0bc112f08c88bf589bbfe6fc1036806d0a0f6fec9c4d5a4db860f5afe73b4b",
        "alpaca_eval/alpaca_eval_v1.jsonl",
        True,
    ),
    "pandalm": UrlSource(
        "https://raw.githubusercontent.com/WeOpenML/PandaLM/3871806e72b4832f815ecafd24d3503c73403f48/"
        "data/testset-inference-v1.json",
        "170fef9eb10de404cdb3e2d9c6e3fab5cf656d47bd199cd6b368509e5bfc2967",
        "pandalm/testset-inference-v1.json",
        False,
    ),
}


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def jsonl_text(rows: Iterable[Mapping[str, Any]]) -> str:
    """JSON Lines exactly as the mirror stores them (UTF-8, ensure_ascii=False, one object per line)."""
    return "".join(json.dumps(dict(r), ensure_ascii=False) + "\n" for r in rows)


def write_jsonl(rows: Iterable[Mapping[str, Any]], path: Path) -> Tuple[int, str]:
    """Write ``rows`` atomically; returns (rows, sha256)."""
    text = jsonl_text(rows)
    atomic_write_text(Path(path), text)
    return text.count("\n"), _sha(text.encode("utf-8"))


def targets(benchmark: str) -> List[Tuple[str, str]]:
    """(HF split, mirror-relative file) of a harness benchmark, from its task template."""
    out = []
    for _split, files in mirror_files(benchmark).items():
        for f in files:
            out.append((Path(f).stem, f))
    return out


def fetch_hub(benchmark: str, root: Path, force: bool = False) -> List[Dict[str, Any]]:
    import datasets

    src = hub_sources()[benchmark]
    todo = [(s, f) for s, f in targets(benchmark) if force or not (root / f).is_file()]
    if not todo:
        return []
    dd = datasets.load_dataset(src.path, src.name, revision=src.revision)
    out = []
    for split, rel in todo:
        if split not in dd:
            raise KeyError(f"{src.path} ({src.name}) has no split {split!r} (has {list(dd)})")
        n, sha = write_jsonl(dd[split].to_list(), root / rel)
        out.append(
            {
                "file": rel,
                "rows": n,
                "sha256": sha,
                "source": f"hf:{src.path}"
                + (f"/{src.name}" if src.name else "")
                + f" split {split}"
                + (f" @ {src.revision}" if src.revision else " (default branch)"),
            }
        )
    return out


def fetch_url(key: str, root: Path, force: bool = False, timeout: float = 60.0) -> List[Dict[str, Any]]:
    src = URLS[key]
    if (root / src.target).is_file() and not force:
        return []
    with urllib.request.urlopen(src.url, timeout=timeout) as r:
        data = r.read()
    got = _sha(data)
    if got != src.sha256:
        raise ValueError(f"{src.url}: sha256 {got}, expected {src.sha256}")
    if src.jsonl:
        n, sha = write_jsonl(json.loads(data.decode("utf-8")), root / src.target)
    else:
        atomic_write_text(root / src.target, data.decode("utf-8"))
        n, sha = len(json.loads(data.decode("utf-8"))), got
    return [{"file": src.target, "rows": n, "sha256": sha, "source": src.url}]


def fetch(root: Path, only: Optional[Sequence[str]] = None, force: bool = False) -> Dict[str, str]:
    """Fetch everything (or ``only``) into ``root``; returns benchmark -> error for the failures."""
    from tqdm.auto import tqdm

    root = Path(root).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    hub = hub_sources()
    keys = [k for k in list(hub) + list(URLS) if not only or k in only]
    unknown = sorted(set(only or []) - set(hub) - set(URLS))
    failures: Dict[str, str] = {k: "unknown benchmark" for k in unknown}
    manifest_path = root / "MANIFEST.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {"files": {}}
    for k in tqdm(keys, desc="fetch-data"):
        try:
            got = fetch_hub(k, root, force) if k in hub else fetch_url(k, root, force)
        except Exception as e:  # reported, the others go on
            failures[k] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            log.error("%s: %s", k, failures[k])
            continue
        for entry in got:
            entry["fetched"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            manifest["files"][entry["file"]] = entry
        atomic_write_json(manifest_path, manifest)
    return failures


def main(argv: Optional[List[str]] = None) -> int:
    ap = cli.parser("python -m pipeline.eval.fetch", __doc__)
    ap.add_argument("--force", action="store_true", help="download again even where the mirror has the files")
    ap.add_argument(
        "--only",
        type=lambda v: [x for x in v.split(",") if x],
        default=None,
        help="comma-separated benchmarks to fetch (default: all)",
    )
    args, rest = cli.parse(ap, argv)
    force, only = args.force, args.only
    cli.setup_logging()
    try:
        cfg, _ = cli.compose(rest)
    except cli.CONFIG_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not cfg.eval.data_dir:
        print("error: config key 'eval.data_dir' is null: set the mirror folder to write", file=sys.stderr)
        return 2
    root = Path(str(cfg.eval.data_dir))
    failures = fetch(root, only, force)
    print(f"mirror: {root}")
    for k, why in failures.items():
        print(f"  FAILED {k}: {why}", file=sys.stderr)
    if failures:
        print(
            "Some benchmarks could not be fetched (offline? HF_HUB_OFFLINE set?); the evaluation records "
            "them as skipped. Re-run `make fetch-data` where the hub and GitHub are reachable.",
            file=sys.stderr,
        )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

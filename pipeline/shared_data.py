"""``python -m pipeline.shared_data [--root DIR] [--force] [overrides]`` (``make fetch-demo-data``):
the demo's inputs from their pinned public sources.

Without ``--root``, nothing is fetched when ``paths.shared_dir`` (../shared) or data/shared already
holds every file; else they are fetched into ``<paths.data_dir>/shared``.

``make demo`` reads its data from ``paths.shared_dir`` (default ``../shared``, beside the checkout). A
clone has no such folder, so this module declares every file the demo reads there (:data:`FILES`: its
path in the shared layout, its sha256, its pinned source and the named conversion that turns the
source into it) and fetches them into a folder of the same layout, by default
``<paths.data_dir>/shared`` (:func:`default_root`)::

    data/instructions/*.jsonl          4 instruction sets (GitHub, pinned commits; sha256 checked)
    data/alpaca_eval/alpaca_eval_v1.jsonl, data/pandalm/testset-inference-v1.json
                                       the judges' sets (pipeline.eval.fetch.URLS; sha256 checked)
    tokenizers/llama/                  tokenizer.model (karpathy/llama2.c) + the HF files generated
                                       from it by transformers (sha256 checked)
    data/benchmarks/**                 the benchmark mirror (pipeline.eval.fetch, from the hub;
                                       present is enough: the hub copy is not pinned to bytes)

Every download is checked against the source's sha256 and every written file against its expected
sha256 before it is moved into place (atomic: a failed check writes nothing). Files already present
and correct are kept unless ``--force``. Exit status 1 lists the files that could not be fetched.
Each conversion was checked to reproduce ../shared byte for byte from the pinned source
(tests/test_shared_data.py checks the wiring offline, from sources rebuilt where the inverse is exact).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence

from tqdm.auto import tqdm

from pipeline import cli
from pipeline.config import load_config
from pipeline.data.records import sha256_file
from pipeline.eval import fetch as eval_fetch
from pipeline.runs import atomic_write_bytes

RAW = "https://raw.githubusercontent.com"
BASE_URL_ENV = "PLW_SHARED_DATA_URL"  # another base URL laid out like raw.githubusercontent.com
FETCH_COMMAND = "make fetch-demo-data"
BENCHMARKS = "data/benchmarks"
TOKENIZER = "tokenizers/llama"


class FetchError(RuntimeError):
    """A file could not be fetched or did not have the expected bytes (one line, naming the file)."""


@dataclass(frozen=True)
class Source:
    """A file at a pinned commit of a public GitHub repository, with the sha256 of its bytes."""

    repo: str  # owner/name
    commit: str
    path: str
    sha256: str

    def url(self, base_url: str = RAW) -> str:
        return f"{base_url.rstrip('/')}/{self.repo}/{self.commit}/{self.path}"


@dataclass(frozen=True)
class DemoFile:
    """One file the demo reads from the shared layout."""

    path: str  # relative to a shared-layout root
    sha256: str  # of the file in ../shared
    source: Optional[Source]  # None: generated (tokenizer) or fetched by pipeline.eval.fetch (hub)
    conversion: str  # a key of CONVERSIONS, "hf_tokenizer" or "hub"
    pinned: bool = True  # False: only its presence is checked (the hub benchmark files)


# ----------------------------------------------------------------------------------------------
# conversions (source bytes -> the shared file's bytes), each verified byte for byte against ../shared
# ----------------------------------------------------------------------------------------------
ALPACA_FIELDS = ("instruction", "input", "output")
DOLLY_INSTRUCTION = "### Instruction:\n"
DOLLY_RESPONSE = "\n\n### Response:\n"


def _jsonl(rows: Iterable[Dict[str, object]]) -> bytes:
    return eval_fetch.jsonl_text(rows).encode("utf-8")


def _alpaca(rows: Iterable[Dict[str, str]], source: str) -> List[Dict[str, str]]:
    return [{**{k: r[k] for k in ALPACA_FIELDS}, "source": source} for r in rows]


def torchtune_alpaca_tiny(data: bytes) -> bytes:
    """JSON array of Alpaca rows -> JSON Lines; the HF ``text`` column is dropped, ``source`` added."""
    src = "tatsu-lab/alpaca (Alpaca-52K) via pytorch/torchtune:tests/assets/alpaca_tiny.json"
    return _jsonl(_alpaca(json.loads(data), src))


def llamafactory_alpaca_en_demo(data: bytes) -> bytes:
    """JSON array of Alpaca rows -> JSON Lines, rows as they are, ``source`` added."""
    src = "hiyouga/LLaMA-Factory:data/alpaca_en_demo.json (Alpaca-GPT4 subset)"
    return _jsonl(_alpaca(json.loads(data), src))


def llmfoundry_dolly_hhrlhf(data: bytes) -> bytes:
    """``{prompt, response}`` lines -> Alpaca rows: the text between ``### Instruction:`` and
    ``### Response:`` of the Alpaca-template prompt is the instruction, ``input`` is empty."""
    src = "mosaicml/dolly_hhrlhf (train) via mosaicml/llm-foundry:scripts/data_prep/dolly_hhrlhf_train_small.jsonl"
    rows = []
    for n, line in enumerate(data.decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        r = json.loads(line)
        prompt = r["prompt"]
        if DOLLY_INSTRUCTION not in prompt or not prompt.endswith(DOLLY_RESPONSE):
            raise FetchError(f"dolly_hhrlhf line {n}: prompt is not the Alpaca template")
        start = prompt.index(DOLLY_INSTRUCTION) + len(DOLLY_INSTRUCTION)
        instruction = prompt[start : len(prompt) - len(DOLLY_RESPONSE)]
        rows.append({"instruction": instruction, "input": "", "output": r["response"], "source": src})
    return _jsonl(rows)


def stanford_alpaca_seed_tasks(data: bytes) -> bytes:
    """Seed tasks -> one Alpaca row per instance (``id``, ``name``, ``is_classification`` dropped)."""
    src = "tatsu-lab/stanford_alpaca:seed_tasks.jsonl"
    rows = []
    for line in data.decode("utf-8").splitlines():
        if line.strip():
            task = json.loads(line)
            for inst in task["instances"]:
                rows.append({"instruction": task["instruction"], "input": inst["input"], "output": inst["output"]})
    return _jsonl(_alpaca(rows, src))


def json_array_to_jsonl(data: bytes) -> bytes:
    """JSON array -> JSON Lines, order and fields kept (pipeline.eval.fetch's rule for AlpacaEval)."""
    return _jsonl(json.loads(data))


def verbatim(data: bytes) -> bytes:
    return data


CONVERSIONS: Dict[str, Callable[[bytes], bytes]] = {
    "torchtune_alpaca_tiny": torchtune_alpaca_tiny,
    "llamafactory_alpaca_en_demo": llamafactory_alpaca_en_demo,
    "llmfoundry_dolly_hhrlhf": llmfoundry_dolly_hhrlhf,
    "stanford_alpaca_seed_tasks": stanford_alpaca_seed_tasks,
    "json_array_to_jsonl": json_array_to_jsonl,
    "verbatim": verbatim,
}


# ----------------------------------------------------------------------------------------------
# the declared files
# ----------------------------------------------------------------------------------------------
def _url_file(key: str, sha256: str) -> DemoFile:
    """An AlpacaEval/PandaLM file of pipeline.eval.fetch.URLS, at data/<its mirror target> (beside
    data/benchmarks, as in ../shared; the demo's eval config reads it there)."""
    u = eval_fetch.URLS[key]
    owner, name, commit, path = u.url.removeprefix(RAW + "/").split("/", 3)
    src = Source(f"{owner}/{name}", commit, path, u.sha256)
    return DemoFile(f"data/{u.target}", sha256, src, "json_array_to_jsonl" if u.jsonl else "verbatim")


_BENCHMARK_SHA256 = {
    "arc_challenge/test.jsonl": "03227c30fd557ad1416c2cb955eeb6dc79eeb21e0679456a1ccd42eaccc0ff87",
    "arc_challenge/train.jsonl": "681628d0f2ff88f0d12e5b547088e7453b85b8b852f53025fb0e96c503e59fa7",
    "arc_challenge/validation.jsonl": "e91e22bf541b70fb1940476e45dae46a986a72dff25e822c8b3205b4367c41ab",
    "piqa/validation.jsonl": "61533005e22f175534909b1ec8eacb6da03c233933558d1bafb15787453b1f55",
    "winogrande/validation.jsonl": "69f3d7f3a900d775339b04c7de672609c40fca573e50f594f2ae66d8782505be",
    "winogrande/train.jsonl": "cfbfa381ddc2d6039f8f8dfd3b525151a5fdd9d251c131f8df7c2fba929733a6",
    "truthfulqa/generation/validation.jsonl": "b02c029f68fadf4c9aca0a76faf8d5a7aa655f7ef52c0f74e4873f21cf671428",
    "truthfulqa/multiple_choice/validation.jsonl": "f526d2f69e74ada8b49f13d5cf5d7b86b746b92b0d5b1b0db97167fa8d70d032",
    "wmt14/fr-en/validation.jsonl": "a497d7e244706a29930dea3c3e5df4af9c5ed9becb6cf033c1ed706ede56333c",
    "wmt14/fr-en/test.jsonl": "be07d66036718b4e744f9be05d215a8356f6afdb943f23d77fee849b147e15f9",
    "wmt16/de-en/validation.jsonl": "434eea4d1068b8e910eadefa9582421aa4aa35aa18a1f6a5d9266ee6dd4f1582",
    "wmt16/de-en/test.jsonl": "cc79ceef25c33a6468020592e187904b9ef93d721e57d019bb3229b4f076dab0",
    "wmt16/ro-en/validation.jsonl": "232e346f45320df1a07972a39969cd11a8ac256cdbdbc3a3b6a6285332994452",
    "wmt16/ro-en/test.jsonl": "ac5bdde5184af59808eab20b28255f25ad32a85c91d3da11ff54c3d46c044b2a",
}

FILES: List[DemoFile] = [
    DemoFile(
        "data/instructions/alpaca52k_torchtune_tiny.jsonl",
        "7fb3db07c93a31154807a1266b62847f55ec52c9be7c2ac642b1ceeac7adff5d",
        Source(
            "pytorch/torchtune",
            "bd2a0fc7c31430972728494fa01aaeeb0ebf1ba1",
            "tests/assets/alpaca_tiny.json",
            "b1e3ff228aa9c61b524f85f859640fd07c0b94895047222dba6deec978afdfc0",
        ),
        "torchtune_alpaca_tiny",
    ),
    DemoFile(
        "data/instructions/alpaca_gpt4_llamafactory_en_demo.jsonl",
        "b35f9ae4c9fe89372e9290b02a061d20f38eae639d1964ed17345441bcb70293",
        Source(
            "hiyouga/LLaMA-Factory",
            "ff6d4d12eeb035d6ce06805a5733dd7b29f2ac30",
            "data/alpaca_en_demo.json",
            "bcc37c64db1a739a0789a1b81f251146fcf4459f903474bc9e3c21bbb5628318",
        ),
        "llamafactory_alpaca_en_demo",
    ),
    DemoFile(
        "data/instructions/dolly_hhrlhf_llmfoundry_small.jsonl",
        "eb3e86e1758c20d3fdfefc8d923687b96a90390c1081d1cc6460cee9c2d1c37a",
        Source(
            "mosaicml/llm-foundry",
            "8c8dd48f72168c5d51e2f7b151595892a8fba43d",
            "scripts/data_prep/dolly_hhrlhf_train_small.jsonl",
            "8d2def6bcae096798cbff5c69fb5817599f80d0dab8548bd76b61c3faeb159d8",
        ),
        "llmfoundry_dolly_hhrlhf",
    ),
    DemoFile(
        "data/instructions/stanford_alpaca_seed_tasks.jsonl",
        "1098f5bcefbc8e3cf01521be4e483b6a1af5a6cdae72eda2f83ceeb7d3772cab",
        Source(
            "tatsu-lab/stanford_alpaca",
            "761dc5bfbdeeffa89b8bff5d038781a4055f796a",
            "seed_tasks.jsonl",
            "7779004fa198fdf27cf70a159363879d8a26c53329e11b436af17b3941875f48",
        ),
        "stanford_alpaca_seed_tasks",
    ),
    _url_file("alpaca_eval", "715907093e302237d2a1b29e347211202d16c04a77dbb6d90d507c03f2d733f3"),
    _url_file("pandalm", "170fef9eb10de404cdb3e2d9c6e3fab5cf656d47bd199cd6b368509e5bfc2967"),
    DemoFile(
        f"{TOKENIZER}/tokenizer.model",
        "9e556afd44213b6bd1be2b850ebbbd98f5481437a8021afaf58ee7fb1818d347",
        Source(
            "karpathy/llama2.c",
            "350e04fe35433e6d2941dce5a1f53308f87058eb",
            "tokenizer.model",
            "9e556afd44213b6bd1be2b850ebbbd98f5481437a8021afaf58ee7fb1818d347",
        ),
        "verbatim",
    ),
    # Generated from tokenizer.model by transformers 4.57.6 (the pinned version): the slow and then
    # the fast LlamaTokenizer saved into one folder (default legacy behaviour).
    DemoFile(
        f"{TOKENIZER}/tokenizer_config.json",
        "3e1c2b69bfc5ff1a4ec64e9d6abf711094c23d4cf21b66e72ac79a7f77062824",
        None,
        "hf_tokenizer",
    ),
    DemoFile(
        f"{TOKENIZER}/special_tokens_map.json",
        "6fa06efa2785e450051989a6f8fb4416b10149ded485ddd3f127a40734f5cfd0",
        None,
        "hf_tokenizer",
    ),
    DemoFile(
        f"{TOKENIZER}/tokenizer.json",
        "b6fa577798fdc9a20c4502fc9f9931cce13f1c6c8c7a4ac617924affc12cb3c3",
        None,
        "hf_tokenizer",
    ),
    *(DemoFile(f"{BENCHMARKS}/{rel}", sha, None, "hub", pinned=False) for rel, sha in _BENCHMARK_SHA256.items()),
]


# ----------------------------------------------------------------------------------------------
# checking
# ----------------------------------------------------------------------------------------------
def _ok(root: Path, f: DemoFile) -> bool:
    p = root / f.path
    return p.is_file() and (not f.pinned or sha256_file(p) == f.sha256)


def missing(root: Path) -> List[str]:
    """The declared files absent under ``root`` or, for pinned files, with other bytes (reads only)."""
    root = Path(root)
    return [f.path for f in FILES if not _ok(root, f)]


def summarize(paths: Sequence[str]) -> List[str]:
    """Missing files grouped for a short message: one line per folder, its file names after it."""
    groups: Dict[str, List[str]] = {}
    for p in paths:
        folder, _, name = p.rpartition("/")
        if folder.startswith(BENCHMARKS + "/"):  # benchmarks: one line, the benchmark folders
            folder, name = BENCHMARKS, folder.removeprefix(BENCHMARKS + "/").split("/")[0]
        groups.setdefault(folder, [])
        if name not in groups[folder]:
            groups[folder].append(name)
    return [f"{folder}/: {', '.join(names)}" for folder, names in groups.items()]


def default_root(overrides: Sequence[str] = ()) -> Path:
    """``<paths.data_dir>/shared``: where the demo's inputs are fetched when ../shared is absent."""
    return Path(str(load_config(list(overrides)).paths.data_dir)).expanduser().resolve() / "shared"


def choose(configured: Path, fallback: Path) -> Optional[Path]:
    """The shared folder to use: ``configured`` (../shared) when complete, else ``fallback``
    (data/shared) when complete, else None."""
    for root in (Path(configured), Path(fallback)):
        if not missing(root):
            return root
    return None


def shared_dir_for_demo(overrides: Sequence[str] = ()) -> Optional[Path]:
    """The shared folder the demo should read: the configured ``paths.shared_dir`` (../shared) when
    complete, else :func:`default_root` when complete, else None (fetch first)."""
    cfg = load_config(list(overrides))
    return choose(Path(str(cfg.paths.shared_dir)).expanduser().resolve(), default_root(overrides))


# ----------------------------------------------------------------------------------------------
# fetching
# ----------------------------------------------------------------------------------------------
def download(src: Source, base_url: str = RAW, timeout: float = 60.0) -> bytes:
    """The source's bytes, checked against its pinned sha256 (:class:`FetchError` otherwise)."""
    url = src.url(base_url)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            data = r.read()
    except (urllib.error.URLError, OSError) as e:
        raise FetchError(f"cannot download {url}: {getattr(e, 'reason', e)}") from None
    got = hashlib.sha256(data).hexdigest()
    if got != src.sha256:
        raise FetchError(f"{url}: sha256 {got}, expected {src.sha256} (the pinned source); nothing written")
    return data


def fetch_file(root: Path, f: DemoFile, base_url: str = RAW, timeout: float = 60.0) -> None:
    """Download, convert, check and write one sourced file."""
    assert f.source is not None
    data = CONVERSIONS[f.conversion](download(f.source, base_url, timeout))
    got = hashlib.sha256(data).hexdigest()
    if got != f.sha256:
        raise FetchError(f"{f.path}: converted file has sha256 {got}, expected {f.sha256}; nothing written")
    atomic_write_bytes(Path(root) / f.path, data)


def generate_tokenizer(root: Path, files: Sequence[DemoFile]) -> None:
    """The HF tokenizer files from ``<root>/tokenizers/llama/tokenizer.model``, generated in a temporary
    folder, checked against their sha256, then moved into place (all or nothing)."""
    import transformers  # lazy: heavy, only when the tokenizer files are generated

    folder = Path(root) / TOKENIZER
    model = folder / "tokenizer.model"
    if not model.is_file():
        raise FetchError(f"{model} is missing: cannot generate the HF tokenizer files")
    tmp = Path(tempfile.mkdtemp(prefix=".hf-tokenizer.", dir=folder))
    try:
        src, out = tmp / "in", tmp / "out"
        src.mkdir()
        shutil.copyfile(model, src / "tokenizer.model")
        transformers.LlamaTokenizer.from_pretrained(str(src)).save_pretrained(str(out))
        transformers.LlamaTokenizerFast.from_pretrained(str(src), from_slow=True).save_pretrained(str(out))
        for f in files:
            got = sha256_file(out / Path(f.path).name) if (out / Path(f.path).name).is_file() else "(not written)"
            if got != f.sha256:
                raise FetchError(
                    f"{f.path}: generated with transformers {transformers.__version__} has sha256 {got}, "
                    f"expected {f.sha256} (transformers 4.57.6); nothing written"
                )
        for f in files:
            os.replace(out / Path(f.path).name, Path(root) / f.path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def benchmark_keys(paths: Iterable[str]) -> List[str]:
    """The hub benchmarks of pipeline.eval.fetch whose mirror targets include any of ``paths``."""
    rels = {p.removeprefix(BENCHMARKS + "/") for p in paths}
    return [k for k in eval_fetch.hub_sources() if rels & {rel for _split, rel in eval_fetch.targets(k)}]


def fetch_benchmarks(root: Path, paths: Sequence[str], force: bool = False) -> Dict[str, str]:
    """Delegate the missing benchmark files to pipeline.eval.fetch (the hub) with ``root/data/benchmarks``
    as its mirror; path -> error for each file still missing afterwards."""
    keys = benchmark_keys(paths)
    failures = eval_fetch.fetch(Path(root) / BENCHMARKS, only=keys, force=force) if keys else {}
    out = {}
    for p in paths:
        if not (Path(root) / p).is_file():
            why = [f"{k}: {failures[k]}" for k in benchmark_keys([p]) if k in failures]
            out[p] = "; ".join(why) or "not written by pipeline.eval.fetch"
    return out


def fetch(
    root: Path, base_url: str = RAW, force: bool = False, timeout: float = 60.0, progress: bool = True
) -> Dict[str, str]:
    """Fetch every declared file missing (or, with ``force``, every file) into ``root``; returns
    path -> error for the failures (the others are still fetched)."""
    root = Path(root).expanduser()
    todo = [f for f in FILES if force or not _ok(root, f)]
    failures: Dict[str, str] = {}
    sourced = [f for f in todo if f.source is not None]
    generated = [f for f in todo if f.conversion == "hf_tokenizer"]
    hub = [f.path for f in todo if f.conversion == "hub"]
    steps = len(sourced) + bool(generated) + bool(hub)
    with tqdm(total=steps, desc="demo data", unit="step", disable=not progress or not steps) as bar:
        for f in sourced:
            bar.set_postfix_str(f.path)
            try:
                fetch_file(root, f, base_url, timeout)
            except (FetchError, ValueError, KeyError) as e:
                failures[f.path] = str(e)
            bar.update()
        if generated:
            bar.set_postfix_str(TOKENIZER)
            try:
                generate_tokenizer(root, generated)
            except (FetchError, OSError, ValueError, ImportError) as e:
                failures.update({f.path: str(e) for f in generated})
            bar.update()
        if hub:
            bar.set_postfix_str(BENCHMARKS)
            failures.update(fetch_benchmarks(root, hub, force))
            bar.update()
    return failures


def main(argv: Optional[List[str]] = None) -> int:
    ap = cli.parser("python -m pipeline.shared_data", __doc__)
    ap.add_argument("--root", help="shared-layout folder to fill (default: <paths.data_dir>/shared)")
    ap.add_argument("--force", action="store_true", help="fetch again even where the files are correct")
    ap.add_argument("--base-url", default=os.environ.get(BASE_URL_ENV, RAW), help=f"default ${BASE_URL_ENV} or {RAW}")
    args, overrides = cli.parse(ap, argv)
    cli.setup_logging()
    try:
        ready = None if args.root or args.force else shared_dir_for_demo(overrides)
        root = Path(args.root).expanduser().resolve() if args.root else default_root(overrides)
    except cli.CONFIG_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if ready is not None:  # ../shared (or data/shared) already has everything
        print(f"demo data complete: {ready}")
        return 0
    failures = fetch(root, args.base_url, args.force)
    if failures:
        print(f"{len(failures)} file(s) could not be fetched into {root}:", file=sys.stderr)
        for path, why in failures.items():
            print(f"  {path}: {why}", file=sys.stderr)
        print("GitHub (raw.githubusercontent.com) and the Hugging Face hub must be reachable.", file=sys.stderr)
        return 1
    print(f"demo data complete: {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

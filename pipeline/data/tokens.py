"""Token counts of field texts with a Hugging Face tokenizer (no template, no BOS/EOS).

``length_fn(tok)`` returns the batch length function used by prompt inversion and the statistics:
each text is tokenized on its own with ``add_special_tokens=False``; ``""`` counts 0 tokens.
Repeated texts are tokenized once; long batches show a tqdm progress bar.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from pipeline.tokenizer import load_tokenizer, tokenizer_fingerprint

CHUNK = 2048
PROGRESS_MIN = 5000  # show a progress bar from this many unique texts on


def count_tokens(tok, texts: Sequence[str], desc: Optional[str] = None) -> List[int]:
    from tqdm.auto import tqdm

    unique = list(dict.fromkeys(t for t in texts if t != ""))
    counts: Dict[str, int] = {"": 0}
    bar = tqdm(
        total=len(unique), desc=desc or "tokenizing", unit="text", disable=len(unique) < PROGRESS_MIN, leave=False
    )
    for start in range(0, len(unique), CHUNK):
        chunk = unique[start : start + CHUNK]
        ids = tok(chunk, add_special_tokens=False)["input_ids"]
        for t, x in zip(chunk, ids):
            counts[t] = len(x)
        bar.update(len(chunk))
    bar.close()
    return [counts[t] for t in texts]


def length_fn(tok, desc: Optional[str] = None):
    return lambda texts: count_tokens(tok, texts, desc)


def resolve_tokenizer_spec(cfg) -> str:
    """dataset.transform.tokenizer, else paths.llama_tokenizer (a local folder as an absolute path)."""
    spec = cfg.dataset.transform.tokenizer or cfg.paths.llama_tokenizer
    return str(Path(spec).expanduser().resolve()) if Path(spec).expanduser().is_dir() else spec


@functools.lru_cache(maxsize=16)
def get_tokenizer(spec: str):
    """(tokenizer, fingerprint) for a spec (hub id, folder, package_gguf:...)."""
    tok = load_tokenizer(spec)
    return tok, tokenizer_fingerprint(tok)

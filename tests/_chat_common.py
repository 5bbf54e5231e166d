"""Shared pieces of the chat-format tests: an Alpaca-like chat template (one that writes Stanford
Alpaca's own prompt around each user message, so single-turn conversations render to the Alpaca
path's exact ids), and the conversion of Alpaca-schema rows into conversations."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

from pipeline.preprocess import PROMPT_DICT


def alpaca_like_template() -> str:
    """A Jinja chat template writing ``prompt_no_input`` around each user message and ``content + eos``
    for each assistant message, after the BOS token."""
    head, _, tail = PROMPT_DICT["prompt_no_input"].partition("{instruction}")
    return (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}"
        + head.replace("\n", "\\n").join(["{{ '", "' }}"])
        + "{{ m['content'] }}"
        + tail.replace("\n", "\\n").join(["{{ '", "' }}"])
        + "{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
    )


def as_chat(row: Mapping[str, Any]) -> Dict[str, Any]:
    """An Alpaca-schema row as a single-turn conversation (the input after the instruction)."""
    user = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": row["output"]}]}


def alpaca_rows(instructions_dir: Path, n: Optional[int] = None) -> List[Dict[str, Any]]:
    """The shared Alpaca-schema sample (``alpaca52k_torchtune_tiny.jsonl``), its first ``n`` rows."""
    lines = (Path(instructions_dir) / "alpaca52k_torchtune_tiny.jsonl").read_text().splitlines()
    rows = [json.loads(x) for x in lines]
    return rows[:n] if n else rows

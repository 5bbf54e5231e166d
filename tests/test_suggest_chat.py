"""`make suggest` on chat-format data (``analysis.suggest.format=messages``): the R_g is the data
stage's (pipeline.data.inversion.measure: every message content alone, the counted assistant contents
the completion). Single-turn conversations made from shared Alpaca rows without input give the Alpaca
file's R_g exactly; two-turn conversations give different R_g for ``all`` and ``last`` assistant
turns, each equal to counts made here with direct tokenizer calls; the Makefile passes FORMAT= and
TURNS= through."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.analysis.suggest import dataset_rg
from _chat_common import as_chat as _as_chat
from _chat_common import alpaca_rows as _alpaca_rows

REPO = Path(__file__).resolve().parent.parent


def _write(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _two_turn(rows):
    """Conversations of a system message and two exchanges, from consecutive pairs of rows."""
    return [
        {
            "messages": [
                {"role": "system", "content": "Answer well."},
                *_as_chat(a)["messages"],
                *_as_chat(b)["messages"],
            ]
        }
        for a, b in zip(rows[0::2], rows[1::2])
    ]


def _direct_counts(convs, tok, turns: str):
    """(prompt, completion) token totals with one tokenizer call per message content."""
    prompt = completion = 0
    for c in convs:
        n = [len(tok(m["content"], add_special_tokens=False)["input_ids"]) for m in c["messages"]]
        answers = [k for k, m in zip(n, c["messages"]) if m["role"] == "assistant"]
        counted = sum(answers) if turns == "all" else answers[-1]
        prompt += sum(n) - counted
        completion += counted
    return prompt, completion


def test_single_turn_chat_file_has_the_alpaca_files_rg(tmp_path, instructions_dir, llama_tokenizer_dir):
    alpaca = [r for r in _alpaca_rows(instructions_dir) if not r["input"]]
    assert len(alpaca) > 50
    a = dataset_rg(_write(tmp_path / "a.jsonl", alpaca), str(llama_tokenizer_dir), "alpaca")
    c = dataset_rg(_write(tmp_path / "c.jsonl", [_as_chat(r) for r in alpaca]), str(llama_tokenizer_dir), "messages")
    assert c["r_g"] == a["r_g"] and c["n"] == a["n"] == len(alpaca)
    assert (c["prompt_tokens"], c["completion_tokens"]) == (a["prompt_tokens"], a["completion_tokens"])
    assert c["mean_ratio"] == a["mean_ratio"] and c["geomean_ratio"] == a["geomean_ratio"]


def test_multi_turn_rg_for_all_and_last_turns(tmp_path, instructions_dir, llama_tokenizer_dir):
    from transformers import AutoTokenizer

    convs = _two_turn(_alpaca_rows(instructions_dir, 40))
    src = _write(tmp_path / "chat.jsonl", convs)
    tok = AutoTokenizer.from_pretrained(str(llama_tokenizer_dir))
    got = {t: dataset_rg(src, str(llama_tokenizer_dir), "messages", t) for t in ("all", "last")}
    for turns, g in got.items():
        p, c = _direct_counts(convs, tok, turns)
        assert (g["prompt_tokens"], g["completion_tokens"], g["n"]) == (p, c, len(convs)), turns
        assert g["r_g"] == c / p, turns
    # the first answer moves from the completion to the prompt: same total, lower R_g
    assert got["last"]["r_g"] < got["all"]["r_g"]
    assert sum(got["last"][k] for k in ("prompt_tokens", "completion_tokens")) == sum(
        got["all"][k] for k in ("prompt_tokens", "completion_tokens")
    )


def test_completion_turns_only_for_chat_data(tmp_path):
    src = _write(tmp_path / "a.jsonl", [{"instruction": "q", "input": "", "output": "a"}])
    with pytest.raises(ValueError, match="completion_turns=last is only for chat data"):
        dataset_rg(src, "unused", "alpaca", "last")
    with pytest.raises(ValueError, match="must be one of all, last"):
        dataset_rg(src, "unused", "messages", "first")


def test_make_suggest_passes_format_and_turns(tmp_path, instructions_dir, llama_tokenizer_dir):
    """`make suggest FORMAT=messages TURNS=last` prints the last-turn counts of the file."""
    from transformers import AutoTokenizer

    convs = _two_turn(_alpaca_rows(instructions_dir, 20))
    src = _write(tmp_path / "chat.jsonl", convs)
    p, c = _direct_counts(convs, AutoTokenizer.from_pretrained(str(llama_tokenizer_dir)), "last")
    cmd = [
        "make",
        "-s",
        "suggest",
        f"DATA={src}",
        f"TOKENIZER={llama_tokenizer_dir}",
        "FORMAT=messages",
        "TURNS=last",
        f"OVERRIDES=paths.reports_dir={tmp_path / 'no_study'}",
        f"PY={sys.executable}",
    ]
    out = subprocess.run(cmd, cwd=REPO, env=dict(os.environ), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert f"{len(convs)} instances, {p} prompt tokens, {c} completion tokens" in out.stdout, out.stdout
    assert "message contents alone, the last assistant turn the completion" in out.stdout

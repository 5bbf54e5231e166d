"""python -m pipeline.inspect_data on chat-format data (``dataset.source.format=messages``): multi-turn
conversations through SmolLM2's tokenizer and chat template (model=tiny). The token rows equal
``pipeline.chat.render`` and ``pipeline.chat.weights`` token for token, for ``dataset.completion_turns``
all and last; the terminal view shows each counted assistant turn as a completion part in order."""

from __future__ import annotations

import json

import pytest
import torch

from pipeline import chat
from pipeline.inspect_data import main

CONVERSATIONS = [
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "And again?"},
        {"role": "assistant", "content": "Hello again."},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue, like the sea."},
    ],
    [
        {"role": "user", "content": "Add 2 and 3."},
        {"role": "assistant", "content": "5"},
        {"role": "user", "content": "Now double it."},
        {"role": "assistant", "content": "10"},
    ],
]
PLW = 0.25


@pytest.fixture(scope="module")
def smol_tokenizer():
    from pipeline.config import load_config
    from pipeline.models import load_tokenizer_for

    return load_tokenizer_for(load_config(["model=tiny"]).model)


def _inspect(tmp_path, turns: str, color: str = "never"):
    src = tmp_path / "chat.jsonl"
    src.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CONVERSATIONS))
    out = tmp_path / f"rows_{turns}_{color}.jsonl"
    rc = main(
        [
            "dataset=local_jsonl",
            "dataset.source.format=messages",
            f"dataset.source.path={src}",
            f"dataset.completion_turns={turns}",
            "model=tiny",
            f"plw={PLW}",
            "n=2",
            f"out={out}",
            f"paths.data_dir={tmp_path / 'data'}",
            f"color={color}",
        ]
    )
    return rc, out


def _counted(conv, turns: str):
    answers = [m["content"] for m in conv if m["role"] == "assistant"]
    return answers if turns == "all" else answers[-1:]


@pytest.mark.parametrize("turns", ["all", "last"])
def test_rows_follow_the_chat_roles_and_weights(tmp_path, smol_tokenizer, capsys, turns):
    rc, out = _inspect(tmp_path, turns)
    printed = capsys.readouterr().out
    assert rc == 0, printed
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    meta = json.loads(out.with_name(out.name + ".meta.json").read_text())
    assert meta["completion_turns"] == turns
    for k, conv in enumerate(CONVERSATIONS):
        got = [r for r in rows if r["example"] == k]
        ex = chat.render(smol_tokenizer, conv, turns)
        want_w = chat.weights(ex, plw=PLW)
        assert [r["position"] for r in got] == list(range(len(ex.input_ids)))
        assert [r["token_id"] for r in got] == ex.input_ids
        assert [r["role"] for r in got] == ["completion" if c else "prompt" for c in ex.completion_mask]
        assert torch.equal(torch.tensor([r["weight"] for r in got], dtype=torch.float32), want_w)
        assert [r["label"] for r in got] == [t if w > 0 else -100 for t, w in zip(ex.input_ids, want_w.tolist())]
        # the prompt is not a prefix: completion and prompt tokens alternate, one run per counted turn
        roles = [r["role"] for r in got]
        starts = sum(1 for i in range(1, len(roles)) if roles[i] == "completion" != roles[i - 1])
        assert starts == len(_counted(conv, turns))
        s = meta["instances"][k]
        assert s["completion_tokens"] == sum(ex.completion_mask)
        assert s["prompt_tokens"] == len(ex.input_ids) - sum(ex.completion_mask)
        assert s["completion_targets"] == sum(ex.completion_mask[1:])
    # terminal: each counted answer (with its end-of-turn token) is a completion part, in order
    lines = printed.splitlines()
    parts = [lines[i + 1] for i, x in enumerate(lines) if x == "  COMPLETION (targets weighted 1):"]
    assert parts == [f"{a}<|im_end|>" for conv in CONVERSATIONS for a in _counted(conv, turns)]
    n_turns = len(parts)
    assert printed.count("prompt \u25b2 | \u25bc completion") == n_turns
    assert printed.count("completion \u25b2 | \u25bc prompt") == n_turns  # the newline after <|im_end|>
    assert f"completion_turns={turns} (chat data)" in printed
    if turns == "last":  # earlier answers are prompt, weighted PLW
        assert "Hello!<|im_end|>" not in parts and "Hello!" in printed


def test_coloured_view_paints_each_turn(tmp_path, capsys):
    rc, _ = _inspect(tmp_path, "all", color="always")
    printed = capsys.readouterr().out
    assert rc == 0, printed
    for a in ("Hello!", "Hello again.", "Blue, like the sea.", "5", "10"):
        assert f"\033[32m{a}<|im_end|>\033[0m" in printed
    assert "\033[36m\n<|im_start|>user\nAnd again?" in printed  # the next user turn: prompt colour

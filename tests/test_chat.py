"""Chat-format rendering with token roles (pipeline/chat.py): two real chat templates (SmolLM2's, from
its GGUF; a LLaMA-3-style template written into a local tokenizer folder), a system message, multi-turn
data, boundaries checked against each message prefix rendered separately, weights, an Alpaca-like
chat template reproducing the Alpaca path exactly on real records, and bad conversations."""

from __future__ import annotations

import json

import pytest
import torch

from _chat_common import alpaca_like_template
from pipeline import chat
from pipeline.preprocess import build_example, tokenize_instance

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "And again?"},
    {"role": "assistant", "content": "Hello again."},
]
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


@pytest.fixture(scope="module")
def llama3_tok(llama_tokenizer_dir, tmp_path_factory):
    """The shared LLaMA tokenizer with LLaMA-3's header/turn tokens and chat template, saved and reloaded."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(llama_tokenizer_dir))
    tok.add_special_tokens({"additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]})
    tok.chat_template = LLAMA3_TEMPLATE
    folder = tmp_path_factory.mktemp("llama3_style")
    tok.save_pretrained(str(folder))
    return AutoTokenizer.from_pretrained(str(folder))


def completion_runs(tok, ex):
    """The decoded runs of consecutive completion tokens."""
    runs, cur = [], []
    for t, c in zip(ex.input_ids, ex.completion_mask):
        if c:
            cur.append(t)
        elif cur:
            runs.append(tok.decode(cur))
            cur = []
    if cur:
        runs.append(tok.decode(cur))
    return runs


@pytest.mark.parametrize("which, end", [("tiny_tok", "<|im_end|>"), ("llama3_tok", "<|eot_id|>")])
def test_roles_of_every_token_in_two_real_templates(request, which, end):
    tok = request.getfixturevalue(which)
    ex = chat.render(tok, CONVERSATION)
    assert completion_runs(tok, ex) == [f"Hello!{end}", f"Hello again.{end}"]
    assert completion_runs(tok, chat.render(tok, CONVERSATION, "last")) == [f"Hello again.{end}"]
    # the boundaries, from each message prefix rendered and tokenized on its own: every counted turn
    # starts right after the rendering of what precedes it plus the assistant turn's opening, and the
    # prompt tokens are exactly those outside the turns
    starts = []
    for i in (2, 4):
        before = tok.apply_chat_template(CONVERSATION[:i], tokenize=False, add_generation_prompt=True)
        starts.append(len(tok(before, add_special_tokens=False)["input_ids"]))
    first = [k for k in range(1, len(ex.completion_mask)) if ex.completion_mask[k] and not ex.completion_mask[k - 1]]
    assert first == starts
    assert ex.input_ids == tok(ex.text, add_special_tokens=False)["input_ids"]


def test_weights_follow_the_roles(tiny_tok):
    ex = chat.render(tiny_tok, CONVERSATION)
    w = chat.weights(ex, plw=0.1, completion_weight=1.0)
    comp = torch.tensor(ex.completion_mask)
    assert w[0] == 0  # no target at position 0
    assert torch.all(w[1:][comp[1:]] == 1.0) and torch.all(w[1:][~comp[1:]] == 0.1)
    assert float(w.sum()) == pytest.approx(0.1 * int((~comp[1:]).sum()) + int(comp.sum()))


def test_an_alpaca_like_chat_template_reproduces_the_alpaca_path(llama_tokenizer_dir, instructions_dir):
    """Single-turn conversations converted from real Alpaca records (no input), rendered by a chat
    template that writes Alpaca's own prompt: the same token ids and the same weights as the Alpaca
    path (pipeline.preprocess, checked against Stanford Alpaca's own preprocessing)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(llama_tokenizer_dir))
    tok.chat_template = alpaca_like_template()
    rows = [json.loads(x) for x in (instructions_dir / "alpaca52k_torchtune_tiny.jsonl").read_text().splitlines()]
    rows = [r for r in rows if not r["input"]]
    assert len(rows) > 50
    for r in rows:
        conv = [{"role": "user", "content": r["instruction"]}, {"role": "assistant", "content": r["output"]}]
        ex = chat.render(tok, conv)
        inst = tokenize_instance(r, tok, model_max_length=100_000)
        want = build_example(inst.input_ids, inst.n_prompt, plw=0.1)
        assert ex.input_ids == inst.input_ids
        assert torch.equal(chat.weights(ex, plw=0.1), want["weights"]), r["instruction"]


@pytest.mark.parametrize(
    "messages, says",
    [
        ([{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}], "message 1: field 'role': 'bot'"),
        ([{"role": "user", "content": " "}, {"role": "assistant", "content": "a"}], "message 0: field 'content'"),
        ([{"role": "user", "content": "q"}], "no assistant turn"),
        (
            [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}],
            "message 2: field 'role': the conversation ends on a user turn",
        ),
        ([{"role": "user", "content": "q"}, {"role": "user", "content": "r"}], "message 1: field 'role': 'user' where"),
        (
            [
                {"role": "user", "content": "q"},
                {"role": "system", "content": "s"},
                {"role": "assistant", "content": "a"},
            ],
            "message 1: field 'role': a system message must come first",
        ),
        ([], "field 'messages'"),
    ],
)
def test_bad_conversations_are_named(tiny_tok, messages, says):
    assert any(says in p for p in chat.check_messages(messages)), chat.check_messages(messages)
    with pytest.raises(chat.ChatError, match="message|messages"):
        chat.render(tiny_tok, messages)


def test_a_tokenizer_without_a_template_is_an_error(llama_tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(llama_tokenizer_dir))
    with pytest.raises(chat.ChatError, match="no chat template"):
        chat.render(tok, CONVERSATION[1:3])

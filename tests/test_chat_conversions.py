"""Chat-format conversions of the shared instruction data (../shared has no chat-format file): the
Alpaca-GPT4 demo rows (alpaca_gpt4_llamafactory_en_demo.jsonl, the 587 of 999 without input) and the
Dolly/HH-RLHF rows (dolly_hhrlhf_llmfoundry_small.jsonl, all 1000 without input; the file is in the
Alpaca schema, instruction/input/output, as conf/dataset/shared_dolly_hhrlhf.yaml reads it) become
conversations (user = instruction, assistant = output), are written as a ``messages`` file and read
back by the pipeline's loader. With an Alpaca-like chat template on the shared LLaMA tokenizer, every
conversation has the Alpaca path's token ids and weights (pipeline.preprocess.tokenize_instance +
build_example), record by record, and the dataset R_g of pipeline.data.inversion.measure is the
Alpaca records' exactly. All 1587 rows: about 4 s on one core, under 10 s with the tokenizer load."""

from __future__ import annotations

import json

import pytest
import torch

from _chat_common import alpaca_like_template, as_chat
from pipeline import chat
from pipeline.data import inversion
from pipeline.data.records import load_records
from pipeline.data.tokens import length_fn
from pipeline.preprocess import build_example, tokenize_instance

FILES = {
    "alpaca_gpt4": "alpaca_gpt4_llamafactory_en_demo.jsonl",
    "dolly_hhrlhf": "dolly_hhrlhf_llmfoundry_small.jsonl",
}
PLW = 0.1


@pytest.fixture(scope="module")
def alpaca_like_tok(llama_tokenizer_dir):
    """The shared LLaMA tokenizer with a chat template writing Alpaca's no-input prompt
    (tests/test_chat.py::test_an_alpaca_like_chat_template_reproduces_the_alpaca_path)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(llama_tokenizer_dir))
    tok.chat_template = alpaca_like_template()
    return tok


def _both(instructions_dir, tmp_path, name: str):
    """(Alpaca records without input, the same rows as chat records read back by the loader)."""
    alpaca = [r for r in load_records(instructions_dir / FILES[name], fmt="alpaca").records if r["input"] == ""]
    src = tmp_path / f"{name}_chat.jsonl"
    src.write_text("".join(json.dumps(as_chat(r), ensure_ascii=False) + "\n" for r in alpaca))
    return alpaca, load_records(src, fmt="messages").records


@pytest.mark.parametrize("name, n_rows", [("alpaca_gpt4", 587), ("dolly_hhrlhf", 1000)])
def test_converted_conversations_reproduce_the_alpaca_path(
    name, n_rows, instructions_dir, tmp_path, alpaca_like_tok, one_thread
):
    tok = alpaca_like_tok
    alpaca, chats = _both(instructions_dir, tmp_path, name)
    assert len(alpaca) == len(chats) == n_rows
    for i, (a, c) in enumerate(zip(alpaca, chats)):
        assert (c["instruction"], c["output"]) == (a["instruction"], a["output"]), i  # display fields
        ex = chat.render(tok, c["messages"])
        inst = tokenize_instance(a, tok, model_max_length=100_000)
        want = build_example(inst.input_ids, inst.n_prompt, plw=PLW)
        assert ex.input_ids == inst.input_ids, (name, i)
        assert torch.equal(chat.weights(ex, plw=PLW), want["weights"]), (name, i)
    length = length_fn(tok)
    a_len, c_len = inversion.measure(alpaca, length), inversion.measure(chats, length)
    assert [(x.prompt, x.completion) for x in c_len] == [(x.prompt, x.completion) for x in a_len]
    assert inversion.dataset_rg(c_len) == inversion.dataset_rg(a_len)
    assert 0 < inversion.dataset_rg(a_len) < float("inf")

"""Chat data (``dataset.source.format=messages``) beyond rendering: which assistant turns are the
completion (``dataset.completion_turns``: weights, R_g, the processed definition and the run
identity), truncation by whole turns (``truncate_prompt_left`` drops the oldest exchanges before
the final answer is cut; a single-turn conversation is cut exactly as the Alpaca path cuts it), and
prompt inversion of single-turn conversations (the same records inverted as the Alpaca path;
multi-turn conversations never)."""

from __future__ import annotations

import json

import pytest
import torch

from _chat_common import alpaca_like_template, as_chat
from pipeline import chat
from pipeline.config import ConfigError, load_config
from pipeline.preprocess import (
    build_example,
    chat_instance,
    preprocess_records,
    tokenize_instance,
    tokenize_records,
)

pytestmark = pytest.mark.usefixtures("one_thread")

THREE_TURNS = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is the capital of France? Please answer in a full sentence."},
    {"role": "assistant", "content": "The capital of France is Paris, a city on the Seine."},
    {"role": "user", "content": "And the capital of Italy, in one sentence as well?"},
    {"role": "assistant", "content": "The capital of Italy is Rome, on the Tiber."},
    {"role": "user", "content": "Spain?"},
    {"role": "assistant", "content": "Madrid."},
]


@pytest.fixture(scope="module")
def alpaca_chat_tok(llama_tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(llama_tokenizer_dir))
    tok.chat_template = alpaca_like_template()
    return tok


def _rows(instructions_dir, no_input=True):
    rows = [json.loads(x) for x in (instructions_dir / "alpaca52k_torchtune_tiny.jsonl").read_text().splitlines()]
    return [r for r in rows if not r["input"]] if no_input else rows


# ------------------------------------------------------------------------------------------------
# completion_turns
# ------------------------------------------------------------------------------------------------
def test_last_turn_only_puts_earlier_answers_in_the_prompt(tiny_tok):
    tok = tiny_tok
    every = chat.render(tok, THREE_TURNS, "all")
    last = chat.render(tok, THREE_TURNS, "last")
    assert every.input_ids == last.input_ids
    # the last answer's tokens are completion in both; the earlier answers only under "all"
    n_last = sum(last.completion_mask)
    assert 0 < n_last < sum(every.completion_mask)
    assert all(a or not b for a, b in zip(every.completion_mask, last.completion_mask))  # last within all
    assert tok.decode([t for t, c in zip(last.input_ids, last.completion_mask) if c]).startswith("Madrid.")
    (ex,), _ = preprocess_records([{"messages": THREE_TURNS}], tok, plw=0.1, completion_turns="last")
    assert torch.equal(ex["weights"], chat.weights(last, plw=0.1))
    assert int((ex["weights"] == 1.0).sum()) == n_last


def test_completion_turns_is_part_of_a_chat_runs_identity_only(tmp_path):
    from pipeline.runs import run_id, run_identity

    chat_ov = ["dataset=local_jsonl", "dataset.source.format=messages", f"dataset.source.path={tmp_path}/c.jsonl"]
    a = load_config(chat_ov)
    b = load_config(chat_ov + ["dataset.completion_turns=last"])
    assert run_id(a) != run_id(b)
    assert run_identity(b)["dataset"]["completion_turns"] == "last"
    alpaca = load_config(["dataset=local_jsonl", f"dataset.source.path={tmp_path}/a.jsonl"])
    assert "completion_turns" not in run_identity(alpaca)["dataset"]  # Alpaca runs keep their ids
    with pytest.raises(ConfigError, match="dataset.completion_turns"):
        load_config(["dataset=local_jsonl", f"dataset.source.path={tmp_path}/a.jsonl", "dataset.completion_turns=last"])


def test_the_data_stage_measures_rg_over_the_counted_turns(tmp_path, llama_tokenizer_dir):
    """R_g of a multi-turn file: assistant contents / every other content, each tokenized alone; with
    ``last`` the earlier answers move to the prompt side. Two processed folders (the definition
    includes the setting)."""
    from transformers import AutoTokenizer

    from pipeline.data.build import build

    src = tmp_path / "c.jsonl"
    src.write_text(json.dumps({"messages": THREE_TURNS}) + "\n")
    tok = AutoTokenizer.from_pretrained(str(llama_tokenizer_dir))
    n = [len(tok(m["content"], add_special_tokens=False).input_ids) for m in THREE_TURNS]
    answers = [k for k, m in zip(n, THREE_TURNS) if m["role"] == "assistant"]
    ov = [
        "dataset=local_jsonl",
        "dataset.source.format=messages",
        f"dataset.source.path={src}",
        f"paths.data_dir={tmp_path}",
        f"paths.llama_tokenizer={llama_tokenizer_dir}",
    ]
    every = build(load_config(ov))
    last = build(load_config(ov + ["dataset.completion_turns=last"]))
    assert every.meta["rg"] == pytest.approx(sum(answers) / (sum(n) - sum(answers)), rel=1e-12)
    assert last.meta["rg"] == pytest.approx(answers[-1] / (sum(n) - answers[-1]), rel=1e-12)
    assert every.meta["definition"]["completion_turns"] == "all" and every.meta["hash"] != last.meta["hash"]


# ------------------------------------------------------------------------------------------------
# truncation by turns
# ------------------------------------------------------------------------------------------------
def test_truncate_prompt_left_drops_the_oldest_exchanges_first(tiny_tok):
    tok = tiny_tok
    kept_conv = [THREE_TURNS[0], *THREE_TURNS[-2:]]  # the system message and the last exchange
    want = chat.render(tok, kept_conv)
    full = chat.render(tok, THREE_TURNS)
    budget = len(want.input_ids) + 3  # the last exchange fits, the one before it does not
    assert len(chat.render(tok, [THREE_TURNS[0], *THREE_TURNS[-4:]]).input_ids) > budget
    inst = chat_instance({"messages": THREE_TURNS}, tok, budget, "truncate_prompt_left")
    assert inst.input_ids == want.input_ids and inst.completion_mask == want.completion_mask
    assert inst.turns_dropped == 2 and inst.truncated and not inst.lost_completion
    assert inst.prompt_tokens_dropped_left == len(full.input_ids) - len(want.input_ids)
    # keep: cut on the right, so the final answer is gone while the older ones stay
    kept = chat_instance({"messages": THREE_TURNS}, tok, budget, "keep")
    assert kept.input_ids == full.input_ids[:budget] and kept.turns_dropped == 0
    _, rep = tokenize_records([{"messages": THREE_TURNS}], tok, budget, "truncate_prompt_left")
    assert rep.n_turns_dropped == 1 and "lost their oldest turns" in rep.summary()
    # a conversation that fits is not touched
    assert chat_instance({"messages": THREE_TURNS}, tok, 10_000, "truncate_prompt_left").input_ids == full.input_ids


def test_a_single_turn_conversation_is_cut_as_the_alpaca_path_cuts_it(alpaca_chat_tok, instructions_dir):
    """Real rows at a budget that cuts the answers of many: every policy gives the Alpaca path's ids
    and weights (``truncate_prompt_left`` at token level, BOS kept; ``drop`` the same records)."""
    tok = alpaca_chat_tok
    rows = _rows(instructions_dir)
    budget = 48
    n_lost = 0
    for policy in ("keep", "drop", "truncate_prompt_left"):
        for r in rows:
            a = tokenize_instance(r, tok, budget, policy)
            c = chat_instance(as_chat(r), tok, budget, policy)
            assert (a is None) == (c is None), (policy, r["instruction"])
            if a is None:
                n_lost += 1
                continue
            assert c.input_ids == a.input_ids, (policy, r["instruction"])
            assert c.lost_completion == a.lost_completion
            assert c.prompt_tokens_dropped_left == a.prompt_tokens_dropped_left
            want = build_example(a.input_ids, a.n_prompt, plw=0.1)["weights"]
            got = build_example(c.input_ids, c.n_prompt, plw=0.1, completion_mask=c.completion_mask)["weights"]
            assert torch.equal(got, want)
    assert n_lost > 0  # the budget really cut some answers


# ------------------------------------------------------------------------------------------------
# prompt inversion
# ------------------------------------------------------------------------------------------------
def test_single_turn_conversations_are_inverted_like_alpaca_records(tmp_path, instructions_dir, llama_tokenizer_dir):
    """Short inversion (every instance with R_g > 1) of conversations made from real rows inverts the
    same records as the Alpaca path; an inverted conversation asks for the prompt; a two-turn
    conversation with R_g > 1 is left as it is."""
    from pipeline.data.build import build
    from pipeline.data.inversion import INSTRUCTION_NO_INPUT

    rows = _rows(instructions_dir)
    two_turns = {"messages": [*as_chat(rows[0])["messages"], *as_chat(rows[1])["messages"]]}
    src_a, src_c = tmp_path / "a.jsonl", tmp_path / "c.jsonl"
    src_a.write_text("".join(json.dumps(r) + "\n" for r in rows))
    src_c.write_text("".join(json.dumps(as_chat(r)) + "\n" for r in rows) + json.dumps(two_turns) + "\n")
    common = [
        f"paths.data_dir={tmp_path}",
        f"paths.llama_tokenizer={llama_tokenizer_dir}",
        "dataset.transform.kind=invert",
        f"dataset.transform.tokenizer={llama_tokenizer_dir}",
    ]
    a = build(load_config(["dataset=local_jsonl", f"dataset.source.path={src_a}", *common]))
    c = build(
        load_config(["dataset=local_jsonl", "dataset.source.format=messages", f"dataset.source.path={src_c}", *common])
    )
    inverted_a = [r["source_index"] for r in a.records if r["inverted"]]
    inverted_c = [r["source_index"] for r in c.records if r["inverted"]]
    assert inverted_a and inverted_c == inverted_a
    assert not c.records[-1]["inverted"] and c.records[-1]["messages"] == two_turns["messages"]
    i = inverted_c[0]
    assert c.records[i]["messages"] == [
        {"role": "user", "content": f"{INSTRUCTION_NO_INPUT}\n\n{rows[i]['output']}"},
        {"role": "assistant", "content": rows[i]["instruction"]},
    ]
    assert c.meta["rg"] < 1.0 and c.meta["transform"]["n_inverted"] == len(inverted_a)

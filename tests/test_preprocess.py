"""pipeline.preprocess: Alpaca rendering/tokenisation, PLW weights, collation, truncation, inspection."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from pipeline import preprocess as pp
from pipeline.loss import IGNORE_INDEX

torch.set_num_threads(1)

MAX_LENGTHS = (64, 512)


# ------------------------------------------------------------------------------------------
# fixtures
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def records(instructions_dir: Path):
    out = []
    for fn in sorted(instructions_dir.glob("*.jsonl")):
        with open(fn) as f:
            out.extend(json.loads(line) for line in f if line.strip())
    assert len(out) > 1000
    return out


@pytest.fixture(scope="module")
def fast_tok(llama_tokenizer_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(llama_tokenizer_dir))


# ------------------------------------------------------------------------------------------
# Stanford Alpaca's own preprocessing (train.py @ 761dc5b), re-written here independently.
# Alpaca loads the *slow* LlamaTokenizer (use_fast=False) with model_max_length and right padding,
# and adds a "[PAD]" special token because LLaMA has none.
# ------------------------------------------------------------------------------------------
ALPACA_PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)


def alpaca_tokenizer(tok_dir, model_max_length):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(
        str(tok_dir), model_max_length=model_max_length, padding_side="right", use_fast=False
    )
    if tok.pad_token is None:  # smart_tokenizer_and_embedding_resize(dict(pad_token="[PAD]"))
        tok.add_special_tokens({"pad_token": "[PAD]"})
    return tok


def alpaca_tokenize_fn(strings, tokenizer):
    tokenized_list = [
        tokenizer(text, return_tensors="pt", padding="longest", max_length=tokenizer.model_max_length, truncation=True)
        for text in strings
    ]
    input_ids = [t.input_ids[0] for t in tokenized_list]
    input_ids_lens = [t.input_ids.ne(tokenizer.pad_token_id).sum().item() for t in tokenized_list]
    return dict(input_ids=input_ids, labels=input_ids, input_ids_lens=input_ids_lens, labels_lens=input_ids_lens)


def alpaca_preprocess(list_data_dict, tokenizer):
    sources = [
        ALPACA_PROMPT_INPUT.format_map(ex) if ex.get("input", "") != "" else ALPACA_PROMPT_NO_INPUT.format_map(ex)
        for ex in list_data_dict
    ]
    targets = [f"{ex['output']}{tokenizer.eos_token}" for ex in list_data_dict]
    examples = [s + t for s, t in zip(sources, targets)]
    examples_tokenized, sources_tokenized = [alpaca_tokenize_fn(strings, tokenizer) for strings in (examples, sources)]
    input_ids = examples_tokenized["input_ids"]
    labels = copy.deepcopy(input_ids)
    for label, source_len in zip(labels, sources_tokenized["input_ids_lens"]):
        label[:source_len] = IGNORE_INDEX
    return dict(input_ids=input_ids, labels=labels)


def alpaca_collate(instances, tokenizer):
    input_ids = torch.nn.utils.rnn.pad_sequence(
        [i for i, _ in instances], batch_first=True, padding_value=tokenizer.pad_token_id
    )
    labels = torch.nn.utils.rnn.pad_sequence(
        [lab for _, lab in instances], batch_first=True, padding_value=IGNORE_INDEX
    )
    return dict(input_ids=input_ids, labels=labels, attention_mask=input_ids.ne(tokenizer.pad_token_id))


# ------------------------------------------------------------------------------------------
# tests that need no tokenizer
# ------------------------------------------------------------------------------------------
def test_render_matches_alpaca_templates():
    rec = {"instruction": "Add.", "input": "2 and 3", "output": "5"}
    src, tgt = pp.render(rec, "</s>")
    assert src == ALPACA_PROMPT_INPUT.format_map(rec)
    assert src.endswith("### Input:\n2 and 3\n\n### Response:")
    assert tgt == "5</s>"
    rec0 = {"instruction": "Say hi.", "input": "", "output": "hi"}
    assert pp.render_source(rec0) == ALPACA_PROMPT_NO_INPUT.format_map(rec0)
    # only an exactly empty input selects prompt_no_input
    assert "### Input:\n \n" in pp.render_source({"instruction": "x", "input": " ", "output": "y"})


def test_build_example_alignment():
    ids = [1, 10, 11, 12, 20, 21, 2]  # BOS, 3 prompt tokens, 2 completion tokens, EOS
    ex = pp.build_example(ids, n_prompt=4, plw=0.1, completion_weight=1.0)
    assert ex["input_ids"].tolist() == ids
    # weights[j] is the weight of predicting ids[j]; j = 0 is no target
    assert torch.allclose(ex["weights"], torch.tensor([0, 0.1, 0.1, 0.1, 1, 1, 1]))
    assert ex["prompt_mask"].tolist() == [False, True, True, True, False, False, False]
    assert ex["labels"].tolist() == [IGNORE_INDEX, 10, 11, 12, 20, 21, 2]
    # PLW = 0: Alpaca's masking (first n_prompt labels ignored, BOS included)
    ex0 = pp.build_example(ids, 4, plw=0.0)
    assert ex0["labels"].tolist() == [IGNORE_INDEX] * 4 + [20, 21, 2]
    assert ex0["weights"].tolist() == [0, 0, 0, 0, 1, 1, 1]
    # ... unless zero-weight labels are kept for logging
    ex0k = pp.build_example(ids, 4, plw=0.0, mask_zero_weight_labels=False)
    assert ex0k["labels"].tolist() == [IGNORE_INDEX, 10, 11, 12, 20, 21, 2]
    assert ex0k["weights"].tolist() == ex0["weights"].tolist()
    # completion weight (WIT-style) and an instance with no completion
    ex2 = pp.build_example(ids, 4, plw=0.5, completion_weight=2.0)
    assert ex2["weights"].tolist() == [0, 0.5, 0.5, 0.5, 2, 2, 2]
    exn = pp.build_example(ids, 7, plw=0.0)
    assert exn["weights"].sum() == 0 and (exn["labels"] == IGNORE_INDEX).all()


def test_collator_right_pads():
    a = pp.build_example([1, 5, 6, 7], 2, plw=0.25)
    b = pp.build_example([1, 5, 6, 7, 8, 9], 3, plw=0.25)
    batch = pp.Collator(pad_token_id=1)([a, b])  # pad id equal to a real id must not matter
    assert batch["input_ids"].shape == (2, 6)
    assert batch["input_ids"][0].tolist() == [1, 5, 6, 7, 1, 1]
    assert batch["labels"][0].tolist() == [IGNORE_INDEX, 5, 6, 7, IGNORE_INDEX, IGNORE_INDEX]
    assert batch["weights"][0].tolist() == [0, 0.25, 1, 1, 0, 0]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 0, 0], [1] * 6]
    assert batch["prompt_mask"][0].tolist() == [False, True, False, False, False, False]
    assert batch["weights"].dtype == torch.float32
    assert pp.Collator(0, pad_to_multiple_of=8)([a, b])["input_ids"].shape == (2, 8)


# ------------------------------------------------------------------------------------------
# real data + LLaMA tokenizer
# ------------------------------------------------------------------------------------------
@pytest.mark.shared
@pytest.mark.parametrize("max_len", MAX_LENGTHS)
def test_plw0_equals_alpaca_preprocessing(records, fast_tok, llama_tokenizer_dir, max_len):
    """At PLW = 0 our input_ids and ignored labels are token for token Alpaca's (incl. truncation)."""
    if max_len == 512:  # every long instance (the ones truncation touches) and a fifth of the rest
        records = [
            r for i, r in enumerate(records) if i % 5 == 0 or len(r["instruction"] + r["input"] + r["output"]) > 1500
        ]
    atok = alpaca_tokenizer(llama_tokenizer_dir, max_len)
    ref = alpaca_preprocess(records, atok)
    ours, report = pp.preprocess_records(records, fast_tok, plw=0.0, model_max_length=max_len, truncation="keep")
    assert len(ours) == len(records) == report.n_instances
    n_trunc = n_lost = 0
    for i, (ex, rid, rlab) in enumerate(zip(ours, ref["input_ids"], ref["labels"])):
        assert ex["input_ids"].tolist() == rid.tolist(), f"record {i}: input_ids differ"
        assert ex["labels"].tolist() == rlab.tolist(), f"record {i}: labels differ"
        # weights are zero exactly where Alpaca ignores the label
        assert ((ex["weights"] == 0) == (rlab == IGNORE_INDEX)).all(), f"record {i}"
        n_trunc += int(len(rid) == max_len)
        n_lost += int((rlab == IGNORE_INDEX).all())
    assert n_trunc > 0, "the data must exercise truncation"
    assert report.n_lost_completion == n_lost and report.n_kept_without_completion == n_lost
    if max_len == 64:
        assert n_lost > 0, "some prompts must fill the 64-token budget"
    # collated batches are Alpaca's too (its pad token is the added [PAD])
    for s in range(0, 64, 16):
        mine = pp.Collator(pad_token_id=atok.pad_token_id)(ours[s : s + 16])
        theirs = alpaca_collate(list(zip(ref["input_ids"][s : s + 16], ref["labels"][s : s + 16])), atok)
        assert torch.equal(mine["input_ids"], theirs["input_ids"])
        assert torch.equal(mine["labels"], theirs["labels"])
        assert torch.equal(mine["attention_mask"].bool(), theirs["attention_mask"])


@pytest.mark.shared
def test_plw_weights_on_real_data(records, fast_tok):
    exs, _ = pp.preprocess_records(records[:50], fast_tok, plw=0.1, completion_weight=1.0, model_max_length=512)
    for rec, ex in zip(records[:50], exs):
        n_src = len(fast_tok(pp.render_source(rec)).input_ids)
        w, lab = ex["weights"], ex["labels"]
        assert w[0] == 0 and lab[0] == IGNORE_INDEX
        assert torch.allclose(w[1:n_src], torch.full((n_src - 1,), 0.1))
        assert (w[n_src:] == 1).all()
        assert (lab[1:] == ex["input_ids"][1:]).all()  # nothing masked at PLW > 0
        assert ex["input_ids"][0] == fast_tok.bos_token_id and ex["input_ids"][-1] == fast_tok.eos_token_id


@pytest.mark.shared
def test_truncation_policies(records, fast_tok):
    max_len = 48
    records = records[::4]
    keep, rk = pp.tokenize_records(records, fast_tok, max_len, "keep")
    drop, rd = pp.tokenize_records(records, fast_tok, max_len, "drop")
    left, rl = pp.tokenize_records(records, fast_tok, max_len, "truncate_prompt_left")
    lost = [i for i, t in enumerate(keep) if t.n_completion == 0]
    assert lost and rk.n_lost_completion == len(lost) == rk.n_kept_without_completion
    assert rd.n_lost_completion == rd.n_dropped == len(lost) and len(drop) == len(records) - len(lost)
    assert rl.n_lost_completion == rl.n_prompt_left_truncated == len(lost) and len(left) == len(records)
    for r in (rk, rd, rl):
        assert r.n_truncated >= len(lost) and "lost every completion token" in r.summary()
    for i in range(len(records)):
        if keep[i].n_completion > 0:  # untouched by the policy
            assert left[i].input_ids == keep[i].input_ids and left[i].n_prompt == keep[i].n_prompt
            continue
        t = left[i]
        src, tgt = pp.render(records[i], fast_tok.eos_token)
        full = fast_tok(src + tgt).input_ids
        n_src = len(fast_tok(src).input_ids)
        completion = full[n_src:]
        assert len(t.input_ids) <= max_len and t.n_completion > 0
        assert t.input_ids[0] == fast_tok.bos_token_id
        assert t.input_ids[t.n_prompt :] == completion[: max_len - t.n_prompt]
        if len(completion) <= max_len - 1:  # the whole completion survives, prompt fills the rest
            assert t.n_completion == len(completion) and len(t.input_ids) == max_len
            kept_prompt = t.input_ids[1 : t.n_prompt]
            assert kept_prompt == full[n_src - len(kept_prompt) : n_src]  # the prompt's tail
        else:  # prompt reduced to BOS
            assert t.n_prompt == 1
    with pytest.raises(ValueError):
        pp.tokenize_instance(records[0], fast_tok, 64, "nope")


@pytest.mark.shared
def test_inspect_examples(records, fast_tok):
    exs, _ = pp.preprocess_records(records[:3], fast_tok, plw=0.01, model_max_length=512)
    rows = pp.inspect_examples(exs, fast_tok)
    assert len(rows) == sum(len(e["input_ids"]) for e in exs)
    r0 = [r for r in rows if r["example"] == 0]
    assert r0[0]["token"] == "<s>" and r0[0]["role"] == "prompt" and r0[0]["weight"] == 0 and not r0[0]["is_target"]
    assert r0[-1]["token"] == "</s>" and r0[-1]["role"] == "completion" and r0[-1]["weight"] == 1
    assert all(r["weight"] == pytest.approx(0.01) for r in r0 if r["role"] == "prompt" and r["position"] > 0)
    n_src = len(fast_tok(pp.render_source(records[0])).input_ids)
    assert sum(r["role"] == "prompt" for r in r0) == n_src
    # collated batch: pad rows appear with weight 0
    batch = pp.Collator(pad_token_id=0)(exs)
    brows = pp.inspect_examples(batch, fast_tok)
    assert len(brows) == batch["input_ids"].numel()
    assert all(r["weight"] == 0 and r["label"] == IGNORE_INDEX for r in brows if r["role"] == "pad")
    assert any(r["role"] == "pad" for r in brows)
    assert [(r["token"], r["role"], r["weight"]) for r in brows if r["role"] != "pad"] == [
        (r["token"], r["role"], r["weight"]) for r in rows
    ]
    lines = pp.rows_to_jsonl(rows).splitlines()
    assert json.loads(lines[0])["token_id"] == fast_tok.bos_token_id
    table = pp.format_rows(rows[:10])
    assert "role" in table and "<s>" in table

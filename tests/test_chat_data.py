"""Chat-format datasets (``dataset.source.format=messages``) through the data stage and the trainer:
shared Alpaca rows converted to conversations build with the Alpaca path's R_g, bad conversations
name file, record and message, a multi-turn file trains with the weights of pipeline/chat.py, and
what is not supported yet for chat data says so."""

from __future__ import annotations

import json

import pytest
import torch

from _chat_common import alpaca_rows, as_chat
from _train_common import SMALL, overrides, rows, tokenizer_dir
from pipeline.config import load_config

pytestmark = pytest.mark.usefixtures("one_thread")


_alpaca_rows = alpaca_rows  # the shared Alpaca-schema sample (tests/_chat_common.py)
_as_chat = as_chat  # an Alpaca row as a single-turn conversation (tests/_chat_common.py)


def _cfg(path, data_dir, *extra):
    return load_config(
        [
            "dataset=local_jsonl",
            "dataset.source.format=messages",
            f"dataset.source.path={path}",
            f"paths.data_dir={data_dir}",
        ]
        + list(extra)
    )


def test_single_turn_chat_data_has_the_alpaca_paths_rg(tmp_path, instructions_dir, llama_tokenizer_dir):
    """R_g of conversations converted from Alpaca rows without input: every content tokenized alone,
    the template excluded, assistant contents the completion -- the Alpaca path's counts exactly."""
    from pipeline.data.build import build

    alpaca = [r for r in _alpaca_rows(instructions_dir) if not r["input"]]
    src_a, src_c = tmp_path / "a.jsonl", tmp_path / "c.jsonl"
    src_a.write_text("".join(json.dumps(r) + "\n" for r in alpaca))
    src_c.write_text("".join(json.dumps(_as_chat(r)) + "\n" for r in alpaca))
    tok = f"paths.llama_tokenizer={llama_tokenizer_dir}"
    a = build(load_config(["dataset=local_jsonl", f"dataset.source.path={src_a}", f"paths.data_dir={tmp_path}", tok]))
    c = build(_cfg(src_c, tmp_path, tok))
    assert c.meta["rg"] == pytest.approx(a.meta["rg"], rel=1e-12)
    assert c.meta["rg_measure"]["prompt_tokens"] == a.meta["rg_measure"]["prompt_tokens"]
    assert len(c.records) == len(alpaca) and all(r["messages"] for r in c.records)
    assert c.records[0]["instruction"] == alpaca[0]["instruction"]  # display fields


def test_bad_conversations_name_file_record_and_message(tmp_path, capsys):
    from pipeline.data.build import main

    bad = tmp_path / "bad.jsonl"
    good = _as_chat({"instruction": "q", "input": "", "output": "a"})
    lines = [
        good,
        {"messages": [{"role": "user", "content": "q"}, {"role": "robot", "content": "a"}]},
        {"messages": [{"role": "user", "content": "q"}]},
        {"conversation": []},
    ]
    bad.write_text("".join(json.dumps(x) + "\n" for x in lines))
    rc = main(
        [
            "dataset=local_jsonl",
            "dataset.source.format=messages",
            f"dataset.source.path={bad}",
            f"paths.data_dir={tmp_path}",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 1 and str(bad) in err
    assert "record 1" in err and "message 1: field 'role': 'robot'" in err
    assert "record 2" in err and "no assistant turn" in err
    assert "record 3" in err and "messages" in err


@pytest.fixture(scope="module")
def base(request, tmp_path_factory, module_tmp, shared_dir):
    cache = getattr(request.config, "cache", None)
    cache = cache.mkdir("plw_train") if cache is not None else tmp_path_factory.mktemp("plw_train")
    return {"data_dir": module_tmp("chat_data"), "tokenizer": tokenizer_dir(cache)}


def test_a_multi_turn_chat_dataset_trains_with_the_chat_weights(base, tmp_path, instructions_dir):
    """The tiny model (SmolLM2's tokenizer and chat template) on two-turn conversations built from real
    rows: the run trains, and the trainer's examples carry exactly pipeline/chat.py's weights."""
    from transformers import AutoTokenizer

    from pipeline import chat
    from pipeline.preprocess import preprocess_records
    from pipeline.train import run

    rs = _alpaca_rows(instructions_dir, 40)
    convs = [
        {
            "messages": [
                {"role": "system", "content": "Answer well."},
                *_as_chat(a)["messages"],
                *_as_chat(b)["messages"],
            ]
        }
        for a, b in zip(rs[0::2], rs[1::2])
    ]
    src = tmp_path / "chat.jsonl"
    src.write_text("".join(json.dumps(c) + "\n" for c in convs))
    ov = overrides(base, tmp_path / "runs", "dataset=local_jsonl", "dataset.source.format=messages", recipe=SMALL)
    ov = [o for o in ov if not o.startswith("dataset.max_records")] + [f"dataset.source.path={src}"]
    rd = run(load_config(ov))
    assert rd.status()["state"] == "done" and len(rows(rd)) == 4
    tok = AutoTokenizer.from_pretrained(str(base["tokenizer"]))
    examples, report = preprocess_records(convs, tok, plw=0.1, model_max_length=128)
    assert len(examples) == len(convs)
    for c, ex in zip(convs, examples):
        want = chat.weights(chat.render(tok, c["messages"]), plw=0.1)[:128]
        assert torch.equal(ex["weights"], want)
        assert set(ex["weights"][1:].tolist()) == {torch.tensor(0.1).item(), 1.0}  # prompt and completion

"""A run trained on chat data is evaluated in the format it was trained in (pipeline/eval/prompting.py):
AlpacaEval and PandaLM ask it (and PandaLM's comparator) through the model's chat template, the
memorization metric renders its training conversations as they were trained, and Alpaca-format
runs keep their prompts and cache keys byte for byte."""

from __future__ import annotations

import hashlib
import json

import pytest

from _chat_common import as_chat
from _train_common import SMALL, overrides, tokenizer_dir
from pipeline.config import load_config
from pipeline.eval import alpacaeval, mechanisms, pandalm, prompting
from pipeline.preprocess import render_source

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def base(request, tmp_path_factory, module_tmp, shared_dir):
    cache = getattr(request.config, "cache", None)
    cache = cache.mkdir("plw_train") if cache is not None else tmp_path_factory.mktemp("plw_train")
    return {"data_dir": module_tmp("chat_eval_data"), "tokenizer": tokenizer_dir(cache)}


def test_the_prompt_style_follows_the_training_data(tmp_path, tiny_tok):
    tok = tiny_tok
    chat_cfg = load_config(["dataset=local_jsonl", "dataset.source.format=messages", f"dataset.source.path={tmp_path}"])
    assert prompting.style_of(chat_cfg) == prompting.CHAT
    assert prompting.style_of(load_config([])) == prompting.ALPACA and prompting.style_of(None) == prompting.ALPACA
    items = [{"instruction": "Name a colour.", "input": ""}, {"instruction": "Translate.", "input": "Bonjour"}]
    want = [
        tok.apply_chat_template([{"role": "user", "content": u}], tokenize=False, add_generation_prompt=True)
        for u in ("Name a colour.", "Translate.\n\nBonjour")
    ]
    assert pandalm.candidate_prompts(items, prompting.CHAT, tok) == want
    assert alpacaeval.prompts_for(items[:1], prompting.CHAT, tok) == want[:1]
    # Alpaca-format runs: the prompts and the recorded settings (cache keys) as before
    assert pandalm.candidate_prompts(items) == [render_source(it) for it in items]
    assert alpacaeval.prompts_for(items) == [render_source({"instruction": it["instruction"]}) for it in items]
    assert alpacaeval.generation_settings(32, 4)["template"] == "alpaca (pipeline.preprocess.render_source, no input)"
    assert alpacaeval.generation_settings(32, 4, prompting.CHAT) != alpacaeval.generation_settings(32, 4)
    assert not prompting.add_special_tokens(prompting.CHAT) and prompting.add_special_tokens(prompting.ALPACA)


def test_memorization_prompts_of_chat_records_are_the_trained_context(tiny_tok):
    tok = tiny_tok
    conv = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Again?"},
        {"role": "assistant", "content": "Hello again."},
    ]
    [(prompt, ref)] = mechanisms.select_prompts([{"messages": conv}, {"messages": conv}], 10, 0, tok)
    assert ref == "Hello again."
    assert prompt == tok.apply_chat_template(conv[:-1], tokenize=False, add_generation_prompt=True)
    # the rendered training conversation is the prompt followed by the answer
    assert tok.apply_chat_template(conv, tokenize=False).startswith(prompt + "Hello again.")


def test_a_chat_run_trains_and_is_evaluated_through_its_chat_template(
    base, tmp_path, instructions_dir, llama_tokenizer_dir
):
    from pipeline.eval.results import read_results
    from pipeline.eval.stage import evaluate_run
    from pipeline.train import run

    rows = [json.loads(x) for x in (instructions_dir / "alpaca52k_torchtune_tiny.jsonl").read_text().splitlines()]
    src = tmp_path / "chat.jsonl"
    src.write_text("".join(json.dumps(as_chat(r)) + "\n" for r in rows[:40]))
    ov = overrides(base, tmp_path / "runs", "dataset=local_jsonl", "dataset.source.format=messages", recipe=SMALL)
    ov = [o for o in ov if not o.startswith("dataset.max_records")] + [
        f"dataset.source.path={src}",
        f"paths.llama_tokenizer={llama_tokenizer_dir}",  # R_g, as the analysis needs it
        "eval=cpu_small",
        "eval.limit=2",
        "eval.max_new_tokens=8",
        "eval.memorization_prompts=3",
        "eval.benchmarks=[alpaca_eval,pandalm]",
        "eval.mechanisms=[mech_memorization_bleu,mech_alpacaeval_length]",
    ]
    cfg = load_config(ov)
    rd = run(cfg)
    assert rd.status()["state"] == "done"
    results = read_results(evaluate_run(rd.path, cfg))
    assert {r["benchmark"] for r in results if r["status"] == "ok"} == {
        "alpaca_eval",
        "pandalm",
        "mech_memorization_bleu",
        "mech_alpacaeval_length",
    }
    ev = rd.path / "eval"
    memo = json.loads((ev / "memorization" / "generations.json").read_text())
    assert memo and all(m["prompt"].startswith("<|im_start|>") for m in memo)  # SmolLM2's ChatML template
    cand = json.loads((ev / "pandalm" / "candidates.json").read_text())
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(rd.final))
    items = pandalm.load_testset(pandalm.testset_path(cfg.eval.pandalm_testset, cfg.eval.data_dir))[:2]
    want = hashlib.sha256(json.dumps(pandalm.candidate_prompts(items, prompting.CHAT, tok)).encode()).hexdigest()
    assert cand["settings"]["prompts"] == want
    # ...and it enters the analysis like any run: collected with its scores and the chat data's R_g
    from pipeline.analysis.collect import collect_runs

    df, _log = collect_runs(rd.path.parent)
    mine = df[df["run_id"] == rd.path.name]
    assert set(mine["benchmark"]) >= {"alpaca_eval", "pandalm"}
    rg = json.loads((rd.path / "train_summary.json").read_text())["data"]["dataset_rg"]
    assert rg and (mine["r_g"] == rg).all()

"""AlpacaEval 1 through alpaca_eval 0.6.6's real pipeline with the TEST DOUBLE judge.

The win rate alpaca_eval reports is checked against an independent computation from the output
lengths (the double's rule), the cache is checked to avoid re-judging, and bad inputs are checked
to name the file, record and field.
"""

from __future__ import annotations

import json
import statistics

import pytest
import yaml

from pipeline.eval import alpacaeval as A
from pipeline.eval import judges


@pytest.fixture(scope="module")
def reference(shared_dir):
    return A.load_reference(shared_dir / "data" / "alpaca_eval" / "alpaca_eval_v1.jsonl")


def test_reference_set(reference):
    assert len(reference) == 805 and {r["generator"] for r in reference} == {"text_davinci_003"}
    prompts = A.prompts_for(reference[:1])
    assert prompts[0] == (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\n" + reference[0]["instruction"] + "\n\n### Response:"
    )


def test_mixtral_evaluator_config_is_guanaco_in_inst_format():
    name, conf = A.annotator_config("mixtral_8x7b_instruct")
    assert name == "mixtral_8x7b_instruct"
    assert conf["completions_kwargs"]["model_name"] == "mistralai/Mixtral-8x7B-Instruct-v0.1"
    assert conf["fn_completions"] == "huggingface_local_completions" and conf["batch_size"] == 1
    prompt = open(conf["prompt_template"]).read()
    assert prompt.startswith("[INST] Select the output (a) or (b)") and prompt.endswith("[/INST]")
    assert "### Human" not in prompt and "### Assistant" not in prompt
    for field in ("{instruction}", "{output_1}", "{output_2}"):
        assert prompt.count(field) == 1
    # same one-shot example and parser as alpaca_eval's guanaco_33b
    import alpaca_eval

    from pathlib import Path

    g = Path(alpaca_eval.__file__).parent / "evaluators_configs" / "guanaco_33b"
    guanaco = (g / "basic_prompt.txt").read_text()
    body = guanaco.split("### Human: ", 1)[1].rsplit("### Assistant:", 1)[0].rstrip()
    assert prompt == "[INST] " + body + " [/INST]"
    gconf = yaml.safe_load((g / "configs.yaml").read_text())["guanaco_33b"]
    assert conf["completion_parser_kwargs"] == gconf["completion_parser_kwargs"]
    _, vllm = A.annotator_config("mixtral_8x7b_instruct_vllm")
    assert vllm["prompt_template"] == conf["prompt_template"]
    _, other = A.annotator_config("mixtral_8x7b_instruct", judge_model="/models/judge")
    assert other["completions_kwargs"]["model_name"] == "/models/judge"
    with pytest.raises(A.AlpacaEvalError, match="eval.judge"):
        A.annotator_config("no_such_judge")


def _expected(model_out, ref_out):
    pts = []
    for m, r in zip(model_out, ref_out):
        w = judges.longer(r, m)  # 1: the reference wins, 2: the model wins, 0: identical
        pts.append({0: 0.5, 1: 0.0, 2: 1.0}[w])
    return 100 * statistics.mean(pts), 100 * statistics.stdev(pts) / len(pts) ** 0.5


def test_win_rate_through_alpaca_eval_with_the_test_double(reference, tmp_path):
    ref = reference[:6]
    texts = ["x", ref[1]["output"] + " and more", ref[2]["output"], "y" * (len(ref[3]["output"]) + 5), "", "z" * 3]
    outputs = [
        {"instruction": r["instruction"], "output": t, "generator": "m", "n_tokens": 1, "finished": True}
        for r, t in zip(ref, texts)
    ]
    board, ann = A.annotate(
        outputs, reference, judge=judges.TEST_DOUBLE, judge_model=None, out_dir=tmp_path, name="run-x"
    )
    win, se = _expected(texts, [r["output"] for r in ref])
    assert board["win_rate"] == pytest.approx(win) and board["standard_error"] == pytest.approx(se)
    assert (board["n_wins"], board["n_draws"], board["n_total"]) == (2, 1, 6)
    rows = A.rows_from(board, ann, outputs, ["win_rate", "avg_length", "bogus"], judges.TEST_DOUBLE)
    assert [(r.metric, r.status) for r in rows] == [("win_rate", "ok"), ("avg_length", "ok"), ("bogus", "skipped")]
    assert rows[0].value == pytest.approx(win) and rows[0].n == 6
    assert rows[1].value == pytest.approx(statistics.mean(len(t) for t in texts))
    assert "TEST DOUBLE" in rows[0].message and "wins 2, losses 3, draws 1" in rows[0].message
    written = yaml.safe_load((tmp_path / "annotator" / judges.TEST_DOUBLE / "configs.yaml").read_text())
    assert "fn_completions" not in written[judges.TEST_DOUBLE]  # handed over as a callable
    cache = json.loads((tmp_path / "annotations_cache.json").read_text())
    assert sorted(c["preference"] for c in cache) == [1.0, 1.0, 1.0, 1.5, 2.0, 2.0]


def test_annotations_are_cached(reference, tmp_path, monkeypatch):
    ref = reference[:3]
    outputs = [{"instruction": r["instruction"], "output": "o" * (i + 1), "generator": "m"} for i, r in enumerate(ref)]
    A.annotate(outputs, reference, judge=judges.TEST_DOUBLE, judge_model=None, out_dir=tmp_path, name="r")
    calls = []
    real = judges.longer_wins_completions

    def counting(prompts, **kw):
        calls.append(len(prompts))
        return real(prompts, **kw)

    monkeypatch.setattr(judges, "longer_wins_completions", counting)
    board, _ = A.annotate(outputs, reference, judge=judges.TEST_DOUBLE, judge_model=None, out_dir=tmp_path, name="r")
    assert sum(calls) == 0 and board["n_total"] == 3


def test_unparsable_judgments_are_counted(reference, tmp_path, monkeypatch):
    ref = reference[:4]
    outputs = [
        {"instruction": r["instruction"], "output": "out " * (i + 1), "generator": "m"} for i, r in enumerate(ref)
    ]

    real = judges.longer_wins_completions

    def garbled(prompts, **kw):  # a judge answering out of format for the first two prompts
        res = real(prompts)
        res["completions"] = ["I cannot decide."] * 2 + res["completions"][2:]
        return res

    monkeypatch.setattr(judges, "longer_wins_completions", garbled)
    board, ann = A.annotate(outputs, reference, judge=judges.TEST_DOUBLE, judge_model=None, out_dir=tmp_path, name="r")
    rows = A.rows_from(board, ann, outputs, ["win_rate"], judges.TEST_DOUBLE)
    assert board["n_total"] == 2 and rows[0].n == 2 and rows[0].status == "ok"
    assert "2 judgment(s) could not be parsed" in rows[0].message


def test_bad_reference_names_file_record_field(tmp_path):
    p = tmp_path / "ref.jsonl"
    p.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c"}\n')
    with pytest.raises(A.AlpacaEvalError, match=r"ref.jsonl: record 1: field 'output'"):
        A.load_reference(p)
    p.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": "c"}\n')
    with pytest.raises(A.AlpacaEvalError, match=r"record 1: field 'instruction' duplicates"):
        A.load_reference(p)
    with pytest.raises(A.DataUnavailable, match="eval.alpaca_eval_reference"):
        A.reference_path(str(tmp_path / "missing.json"), None)


def test_local_judge_needs_peft_message():
    import importlib.util

    if importlib.util.find_spec("peft") is not None:
        pytest.skip("peft is installed")
    with pytest.raises(A.AlpacaEvalError, match="pip install peft"):
        A._check_decoder("huggingface_local_completions")

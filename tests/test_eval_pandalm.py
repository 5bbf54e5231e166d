"""PandaLM: PandaLM's exact prompt and parser, both orders, tallies, the test-double judge, bad input."""

from __future__ import annotations

import json

import pytest

from pipeline.eval import judges, pandalm as P


def test_prompt_is_pandalms_build_pandalm_prompt():
    # expected strings written out from PandaLM's pandalm/utils/pandalm_inference.py
    got = P.build_prompt("Sum the numbers.", "2, 3", " 5 </s>", "<s>six")
    assert got == (
        "Below are two responses for a given task. The task is defined by the Instruction with an Input "
        "that provides further context. Evaluate the responses and generate a reference answer for the "
        "task.\n\n### Instruction:\nSum the numbers.\n\n### Input:\n2, 3\n\n### Response 1:\n5\n\n"
        "### Response 2:\nsix\n\n### Evaluation:\n"
    )
    got = P.build_prompt("Say hi.", "", "hi", "[PAD]hello")
    assert got == (
        "Below are two responses for a given task. The task is defined by the Instruction. Evaluate the "
        "responses and generate a reference answer for the task.\n\n### Instruction:\nSay hi.\n\n"
        "### Response 1:\nhi\n\n### Response 2:\nhello\n\n### Evaluation:\n"
    )
    mix = P.wrap_prompt(got, "mixtral")
    assert mix.startswith("[INST] Below are two responses") and mix.endswith(" [/INST]")
    assert "### Evaluation:" not in mix and "first line with exactly one of: 1" in mix


@pytest.mark.parametrize(
    "text,expect",
    [
        ("1\n\n### Reason: ...", 1),
        ("2", 2),
        ("  Tie\n### Reason", 0),
        ("tie", 0),
        ("</s>2\nfoo", 2),
        ("Response 1 is better", None),
        ("", None),
        ("12\n", None),
        (None, None),
    ],
)
def test_parse_judgment(text, expect):
    assert P.parse_judgment(text) == expect


def test_tally_by_hand():
    # (verdict with the model as Response 1, verdict with the model as Response 2)
    pairs = [
        (1, 2),  # model wins both orders          -> points 1, win
        (2, 1),  # comparator wins both            -> 0, loss
        (1, 1),  # position bias: Response 1 always -> 0.5, tie (orders disagree)
        (0, 2),  # tie + win                       -> 0.75, win
        (None, 1),  # unparsable + loss               -> 0 (one judgment), loss
        (None, None),
    ]  # nothing parsable                -> excluded
    t = P.tally(pairs)
    pts = [1, 0, 0.5, 0.75, 0]
    m = sum(pts) / 5
    sd = (sum((x - m) ** 2 for x in pts) / 4) ** 0.5
    assert (t.wins, t.ties, t.losses, t.n, t.unparsable, t.judgments) == (2, 1, 2, 5, 3, 12)
    assert t.score == pytest.approx(100 * m) and t.stderr == pytest.approx(100 * sd / 5**0.5)
    assert t.position_consistency == pytest.approx(2 / 4)  # items with two judgments: 4, agreeing: 2
    tt = P.tally(pairs, unparsable="tie")  # PandaLM's own parser: unparsable = tie
    assert tt.n == 6 and tt.unparsable == 3
    assert tt.score == pytest.approx(100 * (1 + 0 + 0.5 + 0.75 + 0.25 + 0.5) / 6)


def test_tally_nothing_parsable_gives_error_rows():
    t = P.tally([(None, None)] * 3)
    assert t.n == 0 and t.score is None
    rows = P.rows_from(t, ["score", "wins"], "pandalm_7b", "pretrained (x)")
    assert all(r.status == "error" and "no judgment could be parsed" in r.message for r in rows)
    assert "6 of 6 judgments could not be parsed" in rows[0].message


def test_test_double_answers_the_real_prompt():
    prompt = P.build_prompt("Explain.", "", "short", "a much longer answer")
    assert judges.pandalm_outputs(prompt) == ("short", "a much longer answer")
    out = judges.pandalm_longer_wins([prompt, P.build_prompt("x", "in", "same", "same")])
    assert [P.parse_judgment(o) for o in out] == [2, 0]
    with pytest.raises(judges.JudgePromptError, match="### Response 1"):
        judges.pandalm_longer_wins(["not a PandaLM prompt"])


def test_judge_pairs_both_orders_and_cache(tmp_path):
    items = [{"instruction": f"q{i}", "input": ""} for i in range(3)]
    model = ["a long answer here", "x", "equal"]
    comp = ["short", "a longer one", "equal"]
    calls = []

    def judge(prompts):
        calls.append(len(prompts))
        return judges.pandalm_longer_wins(prompts)

    cache = tmp_path / "j.jsonl"
    pairs, records = P.judge_pairs(judge, items, model, comp, style="pandalm", cache=cache, chunk=4)
    assert pairs == [(1, 2), (2, 1), (0, 0)]  # model longer: wins as Response 1 and as Response 2
    assert sum(calls) == 6 and records[0]["answer_model_first"].startswith("1")
    t = P.tally(pairs)
    assert (t.wins, t.ties, t.losses, t.score) == (1, 1, 1, pytest.approx(50.0))
    calls.clear()
    assert P.judge_pairs(judge, items, model, comp, style="pandalm", cache=cache)[0] == pairs
    assert calls == []  # every answer came from the cache (resume)


def test_load_testset_and_errors(shared_dir, tmp_path):
    items = P.load_testset(shared_dir / "data" / "pandalm" / "testset-inference-v1.json")
    assert len(items) == 170 and items[161]["instruction"] == " "  # a genuine blank instruction is kept
    bad = tmp_path / "t.json"
    bad.write_text(json.dumps([{"instruction": "ok", "input": ""}, {"input": "x"}]))
    with pytest.raises(P.PandaLMError, match=r"t.json: record 1: field 'instruction'"):
        P.load_testset(bad)
    with pytest.raises(P.DataUnavailable, match="make fetch-data"):
        P.testset_path(None, str(tmp_path))


def test_comparator_outputs_file(tmp_path):
    f = tmp_path / "o.jsonl"
    f.write_text('{"output": "a"}\n"b"\n')
    assert P.load_outputs_file(f, 2) == ["a", "b"]
    with pytest.raises(P.PandaLMError, match="2 outputs for 3 test items"):
        P.load_outputs_file(f, 3)
    g = tmp_path / "o.json"
    g.write_text(json.dumps([{"text": 1}]))
    with pytest.raises(P.PandaLMError, match="record 0"):
        P.load_outputs_file(g, 1)


def test_judge_configs():
    for name in ("pandalm_7b", "mixtral_8x7b_instruct", "test_double_longer_wins"):
        c = P.judge_config(name)
        assert c["kind"] in ("hf", "test_double")
    c = P.judge_config("pandalm_7b")
    assert c["model"] == "WeOpenML/PandaLM-7B-v1" and c["decoding"]["num_beams"] == 4
    assert c["decoding"]["repetition_penalty"] == 1.2
    assert P.judge_config("pandalm_7b", "/models/panda")["model"] == "/models/panda"
    with pytest.raises(P.PandaLMError, match="eval.pandalm_judge"):
        P.judge_config("nope")


def test_hf_judge_runs_a_real_model(request, tmp_path_factory):
    """The HF judge path (loading, prompt wrapping, batched generation, parsing) with SmolLM2 standing in
    for Mixtral (a real model; its verdicts are whatever it answers, parsed or counted as unparsable)."""
    import torch

    from pipeline import models
    from pipeline.config import load_config

    cache = request.config.cache.mkdir("plw_models") if request.config.cache else tmp_path_factory.mktemp("m")
    cfg = load_config(["model=smollm2_135m", f"paths.data_dir={cache}"])
    folder = models.pretrained_dir(cfg.model, cfg.paths)
    conf = {
        **P.judge_config("mixtral_8x7b_instruct", str(folder)),
        "dtype": "float32",
        "batch_size": 2,
        "decoding": {"do_sample": False, "max_new_tokens": 6},
    }
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        judge = P.make_judge(conf, device="cpu")
        items = [{"instruction": "Name a colour.", "input": ""}]
        pairs, records = P.judge_pairs(
            judge,
            items,
            ["Blue."],
            ["A colour is blue or red."],
            style="mixtral",
            cache=tmp_path_factory.mktemp("j") / "j.jsonl",
        )
    finally:
        torch.set_num_threads(n)
    assert len(pairs) == 1 and all(v in (None, 0, 1, 2) for v in pairs[0])
    assert isinstance(records[0]["answer_model_first"], str)
    assert [
        P.parse_judgment(records[0]["answer_model_first"]),
        P.parse_judgment(records[0]["answer_model_second"]),
    ] == list(pairs[0])


def test_a_judge_that_is_never_parsable_gives_error_rows_also_as_ties(tmp_path):
    """eval.pandalm_unparsable=tie turns every unparsable answer into a tie: a judge that never answers
    1/2/Tie would score 50.0 with position consistency 1.0; it is an error row instead."""
    items = [{"instruction": f"q{i}", "input": ""} for i in range(4)]
    model, comp = ["a long answer here"] * 4, ["short"] * 4

    def judge(prompts):  # a test double that answers in prose, never on the first line
        judges.pandalm_longer_wins(prompts)  # the prompts are real PandaLM prompts
        return ["Both responses have merits.\n1"] * len(prompts)

    pairs, _ = P.judge_pairs(judge, items, model, comp, style="pandalm", cache=tmp_path / "j.jsonl")
    assert pairs == [(None, None)] * 4
    t = P.tally(pairs, unparsable="tie")
    assert (t.score, t.position_consistency, t.n, t.unparsable, t.judgments) == (50.0, 1.0, 4, 8, 8)
    rows = P.rows_from(t, ["score", "position_consistency", "wins"], "pandalm_7b", "pretrained (x)")
    assert [r.status for r in rows] == ["error"] * 3
    assert all(r.value is None and "no judgment could be parsed" in r.message for r in rows)
    assert "8 of 8 judgments could not be parsed" in rows[0].message


def test_mostly_unparsable_judgments_warn_above_the_configured_share():
    pairs = [(1, 2), (None, None), (None, None), (None, 2)]  # 5 of 8 unparsable
    t = P.tally(pairs, unparsable="tie")
    rows = P.rows_from(t, ["score"], "pandalm_7b", "pretrained (x)", max_unparsable=0.5)
    assert rows[0].status == "ok" and rows[0].value == pytest.approx(t.score)
    assert rows[0].message.startswith("WARNING: 62.5% of the judge's answers could not be parsed")
    assert "eval.pandalm_max_unparsable=0.5" in rows[0].message
    for share in (0.625, 0.9, None):  # at or below the threshold (or none set): no warning
        msg = P.rows_from(t, ["score"], "pandalm_7b", "pretrained (x)", max_unparsable=share)[0].message
        assert "WARNING" not in msg


def test_max_unparsable_is_a_checked_config_key():
    from pipeline.config import ConfigError, load_config

    assert load_config([]).eval.pandalm_max_unparsable == 0.5
    assert load_config(["eval.pandalm_max_unparsable=0.2"]).eval.pandalm_max_unparsable == 0.2
    with pytest.raises(ConfigError, match="eval.pandalm_max_unparsable"):
        load_config(["eval.pandalm_max_unparsable=1.5"])

"""Judges in their own format (prompt style ``chat_template``, pipeline/eval/chat_judge.py).

The real SmolLM2-135M-Instruct (its dequantised checkpoint cached in pytest's cache folder, as in
tests/test_eval_generation.py) stands in for an instruct judge: its tokenizer carries a ChatML chat
template. Its verdicts are whatever it answers; the tests check what it was given.
"""

from __future__ import annotations

import pytest

from pipeline.config import load_config
from pipeline.eval import alpacaeval as A
from pipeline.eval import chat_judge as C
from pipeline.eval import generation as G
from pipeline.eval import pandalm as P

pytestmark = pytest.mark.usefixtures("one_thread")

ITEMS = [{"instruction": "Name a colour.", "input": ""}, {"instruction": "Add the numbers.", "input": "2 and 3"}]


@pytest.fixture(scope="module")
def smollm2_dir(model_cache):
    from pipeline import models

    cfg = load_config(["model=smollm2_135m", f"paths.data_dir={model_cache}"])
    return str(models.pretrained_dir(cfg.model, cfg.paths))


@pytest.fixture(scope="module")
def smollm2_tok(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture()
def spy_generate(monkeypatch):
    """Records every call of pipeline.eval.generation.generate (prompts and keywords), then runs it."""
    calls = []
    real = G.generate

    def spy(model, tok, prompts, **kw):
        calls.append({"prompts": list(prompts), **kw})
        return real(model, tok, prompts, **kw)

    monkeypatch.setattr(G, "generate", spy)
    return calls


def _word_tokenizer(folder):
    """A real fast tokenizer without a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]")
    tok.save_pretrained(str(folder))
    return tok


def test_pandalm_chat_prompt_is_the_mixtral_task_text_in_the_judges_template(smollm2_tok):
    raw = P.build_prompt("Name a colour.", "", "Blue.", "Red or blue.")
    body = raw[: -len("### Evaluation:\n")]
    got = P.wrap_prompt(raw, "chat_template", smollm2_tok)
    # SmolLM2's ChatML template, written out: its default system turn, the user turn, the opening
    # of the assistant turn
    assert got.startswith("<|im_start|>system\n")
    assert f"<|im_end|>\n<|im_start|>user\n{body}{P.MIXTRAL_FORMAT}<|im_end|>\n<|im_start|>assistant\n" in got
    assert got.endswith("<|im_start|>assistant\n") and got.count("<|im_start|>user") == 1
    # the same task text as the Mixtral judge's, only the wrapper differs
    mixtral = P.wrap_prompt(raw, "mixtral")
    assert mixtral == f"[INST] {body}{P.MIXTRAL_FORMAT} [/INST]"
    with pytest.raises(P.PandaLMError, match="needs the judge's tokenizer"):
        P.wrap_prompt(raw, "chat_template")


def test_a_tokenizer_without_a_chat_template_is_a_one_line_error(tmp_path):
    tok = _word_tokenizer(tmp_path / "tok")
    with pytest.raises(C.ChatTemplateError, match="has no chat template|has none") as e:
        P.wrap_prompt(P.build_prompt("q", "", "a", "b"), "chat_template", tok)
    assert "\n" not in str(e.value) and "PandaLM judge" in str(e.value)


def test_judge_configs_check_prompt_style_and_model(tmp_path, monkeypatch):
    conf = P.judge_config("chat_template", "/models/any-instruct")
    assert conf["prompt"] == "chat_template" and conf["model"] == "/models/any-instruct"
    with pytest.raises(P.PandaLMError, match="eval.pandalm_judge_model"):
        P.judge_config("chat_template")
    # a judge's answers are cached per judge: another model or prompt style never reuses them
    keys = {
        P.judge_key(P.judge_config("chat_template", "/m/a")),
        P.judge_key(P.judge_config("chat_template", "/m/b")),
        P.judge_key(P.judge_config("mixtral_8x7b_instruct", "/m/a")),
    }
    assert len(keys) == 3
    bad = tmp_path / "judges"
    bad.mkdir()
    (bad / "odd.yaml").write_text("kind: hf\nmodel: x\nprompt: vicuna\n")
    monkeypatch.setattr(P, "JUDGES_DIR", bad)
    with pytest.raises(P.PandaLMError, match="prompt 'vicuna' is not one of pandalm | mixtral | chat_template"):
        P.judge_config("odd")
    with pytest.raises(A.AlpacaEvalError, match="eval.judge_model"):
        A.annotator_config("chat_template")
    name, ae = A.annotator_config("chat_template", "/models/any-instruct")
    assert name == "chat_template" and ae["completions_kwargs"]["model_name"] == "/models/any-instruct"
    assert A.resolve_callable(ae["fn_completions"]) is C.alpaca_eval_completions


def test_pandalm_hf_judge_reads_its_chat_template_without_extra_special_tokens(
    smollm2_dir, smollm2_tok, spy_generate, tmp_path
):
    conf = {
        **P.judge_config("chat_template", smollm2_dir),
        "dtype": "float32",
        "batch_size": 2,
        "decoding": {"do_sample": False, "max_new_tokens": 4},
    }
    judge = P.make_judge(conf, device="cpu")
    pairs, records = P.judge_pairs(
        judge,
        ITEMS,
        ["Blue.", "5"],
        ["A colour is blue or red.", "The sum is five."],
        style="chat_template",
        cache=tmp_path / "j.jsonl",
        tokenizer=judge.tok,
    )
    assert len(pairs) == 2 and all(v in (None, 0, 1, 2) for p in pairs for v in p)
    (call,) = spy_generate
    assert call["add_special_tokens"] is False and len(call["prompts"]) == 4
    first = P.build_prompt("Name a colour.", "", "Blue.", "A colour is blue or red.")
    assert call["prompts"][0] == P.wrap_prompt(first, "chat_template", smollm2_tok)
    assert [
        P.parse_judgment(records[0]["answer_model_first"]),
        P.parse_judgment(records[0]["answer_model_second"]),
    ] == [*pairs[0]]


def test_alpaca_eval_completions_render_the_chatml_prompt_in_the_judges_template(
    smollm2_dir, smollm2_tok, spy_generate
):
    from alpaca_eval.utils import prompt_to_chatml

    _, conf = A.annotator_config("chat_template", smollm2_dir)
    template = open(conf["prompt_template"], encoding="utf-8").read()
    prompts = [
        template.format(instruction="Name a colour.", output_1="Blue.", output_2="A colour is blue or red."),
        template.format(instruction="Add 2 and 3.", output_1="5", output_2="The sum is five."),
    ]
    out = C.alpaca_eval_completions(
        prompts, model_name=smollm2_dir, max_new_tokens=4, batch_size=2, dtype="float32", device="cpu"
    )
    assert len(out["completions"]) == 2 and all(isinstance(c, str) for c in out["completions"])
    assert out["price_per_example"] == [0.0, 0.0]
    (call,) = spy_generate
    assert call["add_special_tokens"] is False
    want = [
        smollm2_tok.apply_chat_template(prompt_to_chatml(p), tokenize=False, add_generation_prompt=True)
        for p in prompts
    ]
    assert call["prompts"] == want
    # one user turn holding the Mixtral evaluator's task text, unchanged
    mixtral = open(A.EVALUATORS_DIR / "mixtral_8x7b_instruct" / "basic_prompt.txt", encoding="utf-8").read()
    task = mixtral[len("[INST] ") : mixtral.rstrip("\n").rfind(" [/INST]")]
    assert prompt_to_chatml(template) == [{"role": "user", "content": task}]
    with pytest.raises(C.ChatTemplateError, match="eval.judge_model"):
        C.alpaca_eval_completions(prompts)


def test_a_judge_that_cannot_be_loaded_is_one_line_naming_it(tmp_path):
    """Both judges load through generation.load_judge; a missing model is the caller's one-line error."""
    missing = str(tmp_path / "no_such_judge")
    with pytest.raises(C.ChatTemplateError, match=r"^AlpacaEval judge: cannot load .*no_such_judge") as e:
        C.load(missing, None, "float32", "cpu", "AlpacaEval judge")
    assert "\n" not in str(e.value)
    conf = {**P.judge_config("pandalm_7b", missing), "dtype": "float32"}
    with pytest.raises(P.PandaLMError, match=r"PandaLM judge 'pandalm_7b': cannot load .*eval.pandalm_judge_model"):
        P.make_judge(conf, device="cpu")

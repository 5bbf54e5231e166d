"""PandaLM: pairwise judging of the model against a comparator on PandaLM's 170-item test set.

The paper used PandaLM (commit eb758c4) on ``data/testset-inference-v1.json`` without saying what
each model was compared with; here the comparator is a config value (``eval.pandalm_comparator``):

- ``pretrained`` (default): the run's own pre-trained model (the PTLM it was fine-tuned from), so
  the score measures what fine-tuning changed. Its outputs are generated once per PTLM and cached in
  ``<runs_dir>/_baselines/<model>/eval/pandalm/candidates.json``;
- a model folder (any saved Hugging Face model);
- a JSON/JSONL file of outputs (a list of strings, or records with ``output``), 170 in test-set order.

Steps:

1. candidates: each item (instruction, input) rendered in the Alpaca template the models were
   trained with (:func:`pipeline.preprocess.render_source`; a run trained on chat data, and its
   comparator: the model's chat template, :mod:`pipeline.eval.prompting`), greedy, ``eval.max_new_tokens``,
   batched; cached.
2. judging: :func:`build_prompt` is PandaLM's ``build_pandalm_prompt`` (special tokens removed from
   the responses, ``### Evaluation:`` at the end); every item is judged in BOTH orders (model as
   Response 1, then as Response 2) to cancel position bias. The judge (``eval.pandalm_judge``,
   ``pipeline/eval/pandalm_judges/<name>.yaml``): PandaLM-7B (``WeOpenML/PandaLM-7B-v1``, PandaLM's
   decoding: 4 beams, repetition penalty 1.2, up to 512 new tokens), Mixtral-8x7B-Instruct (the
   same task text in Mixtral's [INST] format, asked to answer 1, 2 or Tie on the first line), any
   instruct model through its own chat template (``chat_template``: the Mixtral task text as one user
   message, :mod:`pipeline.eval.chat_judge`), or the test double. Judgments are cached per judge
   (``judgments-<name>-<hash of model, prompt style, decoding>.jsonl``) so an interrupted run
   resumes and another judge never reuses them.
3. parsing (:func:`parse_judgment`): the first line of the answer is ``1``, ``2`` or ``Tie`` (PandaLM's
   ``parse_pandalm_response``); anything else is *unparsable*: excluded and counted
   (``eval.pandalm_unparsable=exclude``, default) or a tie (``=tie``, what PandaLM's own parser does).
4. tallies (:func:`tally`): per judgment the model gets 1 (win), 0.5 (tie) or 0 (loss); an item's
   points are the mean over its parsable judgments; ``score`` = 100 x mean item points (50 = on par
   with the comparator; stderr over items). Item verdicts: win if its two judgments sum to a win
   (win+win, win+tie), loss likewise, tie otherwise (tie+tie, or the orders disagree).
   ``position_consistency`` = share of items whose two judgments agree. A judge none of whose
   answers could be parsed gives ``error`` rows (with ``=tie`` it would otherwise score 50.0 with
   position consistency 1.0); a share above ``eval.pandalm_max_unparsable`` (default 0.5) gives
   ``ok`` rows whose message starts with ``WARNING`` (:func:`rows_from`).

:class:`PandaLMRunner` (kind ``pandalm``, pipeline/eval/runner.py) drives the steps: candidates of
the evaluated model while it is loaded, then (after it is released) the comparator's candidates and
the judge.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import yaml

from pipeline.eval import benchmarks as B
from pipeline.eval import chat_judge
from pipeline.eval import generation
from pipeline.eval.judges import TEST_DOUBLE, TEST_DOUBLE_NOTE
from pipeline.eval.results import ResultRow
from pipeline.eval.runner import BASELINES_DIR, EvalPlan, EvalSession, Runner, model_identity, register, short_hash
from pipeline.models import ensure_pad_token
from pipeline.eval import prompting
from pipeline.runs import append_jsonl, atomic_write_json, file_lock, read_jsonl

log = logging.getLogger(__name__)

JUDGES_DIR = Path(__file__).resolve().parent / "pandalm_judges"
MIRROR_FILE = "pandalm/testset-inference-v1.json"
SPECIAL = re.compile(
    r"<unk>|<pad>|<s>|</s>|\[PAD\]|<\|endoftext\|>|\[UNK\]|\[CLS\]|\[MASK\]|<\|startofpiece\|>"
    r"|<\|endofpiece\|>|\[gMASK\]|\[sMASK\]"
)  # PandaLM's pattern, verbatim


class PandaLMError(RuntimeError):
    """Bad or missing PandaLM input (the message names the file, record and field)."""


class DataUnavailable(PandaLMError):
    """The test set cannot be found offline (recorded as status=skipped)."""


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


# --------------------------------------------------------------------------------------------
# test set
# --------------------------------------------------------------------------------------------
def testset_path(explicit: Optional[str], data_dir: Optional[str]) -> Path:
    if explicit:
        p = Path(explicit).expanduser()
        if not p.is_file():
            raise DataUnavailable(f"eval.pandalm_testset: {p} does not exist")
        return p
    if data_dir and (Path(data_dir).expanduser() / MIRROR_FILE).is_file():
        return Path(data_dir).expanduser() / MIRROR_FILE
    where = Path(data_dir).expanduser() / MIRROR_FILE if data_dir else "eval.data_dir (not set)"
    raise DataUnavailable(
        f"PandaLM test set not available offline (looked at {where}); set "
        f"eval.pandalm_testset=<testset-inference-v1.json> or run `make fetch-data`"
    )


def load_testset(path: Path) -> List[Dict[str, str]]:
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise PandaLMError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, list) or not data:
        raise PandaLMError(f"{path}: expected a non-empty JSON array")
    out = []
    for i, r in enumerate(data):
        if not isinstance(r, dict):
            raise PandaLMError(f"{path}: record {i} is not an object")
        if not isinstance(r.get("instruction"), str):  # may be blank: item 161 of v1 is ' '
            raise PandaLMError(f"{path}: record {i}: field 'instruction' is missing or not a string")
        inp = r.get("input", "")
        if inp is None:
            inp = ""
        if not isinstance(inp, str):
            raise PandaLMError(f"{path}: record {i}: field 'input' is not a string")
        out.append({"instruction": r["instruction"], "input": inp, "motivation_app": str(r.get("motivation_app", ""))})
    return out


def candidate_prompts(items: Sequence[Dict[str, str]], style: str = prompting.ALPACA, tokenizer=None) -> List[str]:
    """The items in the run's prompt style (:mod:`pipeline.eval.prompting`)."""
    return [prompting.render(style, tokenizer, it["instruction"], it["input"]) for it in items]


# --------------------------------------------------------------------------------------------
# prompts and parsing (pure)
# --------------------------------------------------------------------------------------------
def clean(resp: str) -> str:
    return SPECIAL.sub("", resp.strip()).strip()


def build_prompt(instruction: str, input: str, resp1: str, resp2: str) -> str:
    """PandaLM's ``build_pandalm_prompt`` (pandalm/utils/pandalm_inference.py), verbatim."""
    resp1, resp2 = clean(resp1), clean(resp2)
    rsp = f"### Response 1:\n{resp1}\n\n### Response 2:\n{resp2}"
    if input:
        return (
            "Below are two responses for a given task. The task is defined by the Instruction with an Input "
            "that provides further context. Evaluate the responses and generate a reference answer for the "
            f"task.\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n{rsp}\n\n### Evaluation:\n"
        )
    return (
        "Below are two responses for a given task. The task is defined by the Instruction. Evaluate the "
        "responses and generate a reference answer for the task.\n\n"
        f"### Instruction:\n{instruction}\n\n{rsp}\n\n### Evaluation:\n"
    )


MIXTRAL_FORMAT = (
    "Answer on the first line with exactly one of: 1 (Response 1 is better), 2 (Response 2 is "
    "better) or Tie. Then give the reason after \"### Reason:\" and a reference answer after "
    "\"### Reference:\"."
)


PROMPT_STYLES = ("pandalm", "mixtral", chat_judge.PROMPT_STYLE)


def wrap_prompt(prompt: str, style: str, tokenizer=None) -> str:
    """``pandalm``: as is (PandaLM-7B was trained on it); ``mixtral``: in [INST] ... [/INST] with the
    answer format spelt out (the tokenizer adds <s>); ``chat_template``: the same task text as for
    Mixtral, one user message rendered by the judge ``tokenizer``'s chat template
    (:mod:`pipeline.eval.chat_judge`)."""
    if style == "pandalm":
        return prompt
    body = prompt[: -len("### Evaluation:\n")] if prompt.endswith("### Evaluation:\n") else prompt
    if style == "mixtral":
        return f"[INST] {body}{MIXTRAL_FORMAT} [/INST]"
    if style == chat_judge.PROMPT_STYLE:
        if tokenizer is None:
            raise PandaLMError("prompt style chat_template needs the judge's tokenizer (a judge of kind hf)")
        return chat_judge.render(tokenizer, [{"role": "user", "content": body + MIXTRAL_FORMAT}], "PandaLM judge")
    raise PandaLMError(f"unknown prompt style {style!r} ({' | '.join(PROMPT_STYLES)})")


def parse_judgment(text: str) -> Optional[int]:
    """1 or 2 (that response is better), 0 (tie) or None (unparsable): the first line of the answer."""
    if text is None:
        return None
    first = SPECIAL.sub("", str(text)).strip().split("\n")[0].strip()
    if first in ("1", "2"):
        return int(first)
    if first.lower() == "tie":
        return 0
    return None


@dataclass
class Tally:
    score: Optional[float]  # 100 x mean item points
    stderr: Optional[float]
    n: int  # items with at least one parsable judgment
    wins: int
    ties: int
    losses: int
    position_consistency: Optional[float]
    unparsable: int  # judgments
    judgments: int


def points(verdict: Optional[int], model_is_first: bool) -> Optional[float]:
    if verdict is None:
        return None
    if verdict == 0:
        return 0.5
    return 1.0 if (verdict == 1) == model_is_first else 0.0


def tally(pairs: Sequence[Tuple[Optional[int], Optional[int]]], unparsable: str = "exclude") -> Tally:
    """Tallies from per-item (verdict with the model as Response 1, verdict with it as Response 2)."""
    item_points, wins, ties, losses, agree, both, bad = [], 0, 0, 0, 0, 0, 0
    for v1, v2 in pairs:
        bad += (v1 is None) + (v2 is None)
        if unparsable == "tie":
            v1 = 0 if v1 is None else v1
            v2 = 0 if v2 is None else v2
        p = [x for x in (points(v1, True), points(v2, False)) if x is not None]
        if not p:
            continue
        item_points.append(sum(p) / len(p))
        s = sum(x - 0.5 for x in p)
        wins += s > 0
        losses += s < 0
        ties += s == 0
        if len(p) == 2:
            both += 1
            agree += p[0] == p[1]
    n = len(item_points)
    score = 100.0 * sum(item_points) / n if n else None
    stderr = None
    if n > 1:
        m = sum(item_points) / n
        sd = math.sqrt(sum((x - m) ** 2 for x in item_points) / (n - 1))
        stderr = 100.0 * sd / math.sqrt(n)
    return Tally(score, stderr, n, wins, ties, losses, (agree / both) if both else None, bad, 2 * len(pairs))


# --------------------------------------------------------------------------------------------
# judges
# --------------------------------------------------------------------------------------------
def judge_config(name: str, model_override: Optional[str] = None) -> Dict[str, Any]:
    path = JUDGES_DIR / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in JUDGES_DIR.glob("*.yaml"))
        raise PandaLMError(f"config key 'eval.pandalm_judge': no judge config {path} (known: {known})")
    with open(path, encoding="utf-8") as f:
        conf = yaml.safe_load(f)
    conf["name"] = name
    if conf.get("prompt", "pandalm") not in PROMPT_STYLES:
        raise PandaLMError(f"{path}: prompt {conf.get('prompt')!r} is not one of {' | '.join(PROMPT_STYLES)}")
    if model_override:
        conf["model"] = str(model_override)
        conf["revision"] = None
    if conf.get("kind") == "hf" and not conf.get("model"):
        raise PandaLMError(
            f"PandaLM judge '{name}' ({path}) names no model: set eval.pandalm_judge_model=<hub id or local folder>"
        )
    return conf


class HFJudge:
    """A causal LM judge (PandaLM-7B, Mixtral) generating with pipeline.eval.generation."""

    def __init__(self, conf: Dict[str, Any], device: str = "auto"):
        self.conf = conf
        model_id, rev = conf["model"], conf.get("revision")
        try:
            model, tok = generation.load_judge(
                model_id, rev, conf.get("dtype", "bfloat16"), device, slow_fallback=conf.get("tokenizer") == "pandalm"
            )
        except OSError as e:
            raise PandaLMError(
                f"PandaLM judge '{conf['name']}': cannot load {model_id} (revision {rev}): "
                f"{str(e).splitlines()[0]}. Download it where the hub is reachable or set "
                f"eval.pandalm_judge_model=<local folder>"
            ) from e
        if conf.get("tokenizer") == "pandalm":  # PandaLM's own set-up (pandalm_inference.py)
            model, tok = ensure_pad_token(model, tok)
            tok.add_special_tokens({"eos_token": "</s>", "bos_token": "</s>", "unk_token": "</s>"})
            model.config.pad_token_id = tok.pad_token_id = 0
            model.config.bos_token_id, model.config.eos_token_id = 1, 2
        self.model, self.tok = model, tok

    def __call__(self, prompts: Sequence[str]) -> List[str]:
        dec = dict(self.conf.get("decoding") or {})
        max_new = int(dec.pop("max_new_tokens", 512))
        gens = generation.generate(
            self.model,
            self.tok,
            prompts,
            max_new_tokens=max_new,
            batch_size=int(self.conf.get("batch_size", 1)),
            gen_kwargs=dec,
            desc="PandaLM judging",
            add_special_tokens=self.conf.get("prompt") != chat_judge.PROMPT_STYLE,  # the template wrote them
        )
        return [g.text for g in gens]


def judge_key(conf: Dict[str, Any]) -> str:
    """Short hash of what makes a judge's answers (its cache is per judge: answers of one model are
    never reused for another given the same prompts)."""
    return short_hash(
        {k: conf.get(k) for k in ("kind", "model", "function", "revision", "prompt", "dtype", "decoding")}
    )


def make_judge(conf: Dict[str, Any], device: str = "auto") -> Callable[[Sequence[str]], List[str]]:
    if conf.get("kind") == "test_double":
        module, _, attr = str(conf["function"]).partition(":")
        import importlib

        return getattr(importlib.import_module(module), attr)
    if conf.get("kind") == "hf":
        return HFJudge(conf, device)
    raise PandaLMError(f"PandaLM judge '{conf.get('name')}': unknown kind {conf.get('kind')!r} (hf | test_double)")


def evaluator_info(
    judge_name: str,
    judge_model: Optional[str],
    testset: Path,
    comparator: str,
    *,
    max_new_tokens: int,
    limit: Optional[int],
    unparsable: str,
    style: str = prompting.ALPACA,
    backend: str = "hf",
) -> Dict[str, Any]:
    conf = judge_config(judge_name, judge_model)
    template = "alpaca (pipeline.preprocess.render_source)"
    if style != prompting.ALPACA:
        template = f"{style} (the evaluated model's, pipeline.eval.prompting)"
    return {
        "framework": "pandalm (reimplemented prompt/parser of WeOpenML/PandaLM eb758c4)",
        "judge": conf.get("model") or conf.get("function"),
        "judge_config": judge_name,
        "judge_revision": conf.get("revision"),
        "judge_decoding": conf.get("decoding"),
        "prompt_style": conf.get("prompt", "pandalm"),
        "orders": "both",
        "unparsable": unparsable,
        "comparator": comparator,
        "testset": {"file": testset.name, "sha256": _sha(testset.read_bytes())[:16]},
        "limit": limit,
        "generation": {
            "template": template,
            **({"backend": backend} if backend != "hf" else {}),
            "decoding": "greedy",
            "max_new_tokens": int(max_new_tokens),
        },
    }


# --------------------------------------------------------------------------------------------
# candidates (cached) and judging (cached)
# --------------------------------------------------------------------------------------------
def generate_candidates(
    model,
    tokenizer,
    items: Sequence[Dict[str, str]],
    *,
    out_file: Path,
    who: str,
    max_new_tokens: int,
    batch_size: int,
    style: str = prompting.ALPACA,
) -> List[str]:
    prompts = candidate_prompts(items, style, tokenizer)
    settings = {
        "who": who,
        "max_new_tokens": int(max_new_tokens),
        "decoding": "greedy",
        "prompts": _sha(json.dumps(prompts).encode()),
        **({"backend": "vllm"} if generation.is_vllm(model) else {}),  # never mixed with HF outputs
    }
    if out_file.is_file():
        try:
            cached = json.loads(out_file.read_text(encoding="utf-8"))
            if cached.get("settings") == settings:
                return cached["outputs"]
        except (ValueError, KeyError):
            pass
    gens = generation.generate(
        model,
        tokenizer,
        prompts,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        desc=f"PandaLM candidates ({who})",
        add_special_tokens=prompting.add_special_tokens(style),
    )
    outputs = [g.text for g in gens]
    atomic_write_json(out_file, {"settings": settings, "outputs": outputs})
    return outputs


def load_outputs_file(path: Path, n: int) -> List[str]:
    """Comparator outputs from a JSON array / JSONL of strings or of records with ``output``."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    try:
        data = [json.loads(x) for x in text.splitlines() if x.strip()] if path.suffix == ".jsonl" else json.loads(text)
    except json.JSONDecodeError as e:
        raise PandaLMError(f"{path}: not valid JSON ({e})") from e
    if isinstance(data, dict) and "outputs" in data:
        data = data["outputs"]
    if not isinstance(data, list):
        raise PandaLMError(f"{path}: expected a list of outputs")
    out = []
    for i, r in enumerate(data):
        if isinstance(r, str):
            out.append(r)
        elif isinstance(r, dict) and isinstance(r.get("output"), str):
            out.append(r["output"])
        else:
            raise PandaLMError(f"{path}: record {i}: expected a string or an object with a string field 'output'")
    if len(out) < n:
        raise PandaLMError(f"{path}: {len(out)} outputs for {n} test items")
    return out[:n]


def judge_pairs(
    judge: Callable[[Sequence[str]], List[str]],
    items: Sequence[Dict[str, str]],
    model_out: Sequence[str],
    comp_out: Sequence[str],
    *,
    style: str,
    cache: Path,
    chunk: int = 16,
    tokenizer=None,
) -> Tuple[List[Tuple[Optional[int], Optional[int]]], List[Dict[str, Any]]]:
    """Judge every item in both orders; answers cached in ``cache`` (JSONL keyed by prompt hash).
    ``tokenizer``: the judge's, for ``style="chat_template"``."""
    from tqdm.auto import tqdm

    prompts = []
    for it, m, c in zip(items, model_out, comp_out):
        prompts.append(wrap_prompt(build_prompt(it["instruction"], it["input"], m, c), style, tokenizer))  # model 1st
        prompts.append(wrap_prompt(build_prompt(it["instruction"], it["input"], c, m), style, tokenizer))  # model 2nd
    keys = [_sha(p.encode())[:24] for p in prompts]
    done = {r["key"]: r["answer"] for r in read_jsonl(cache) if "key" in r}
    todo = [i for i, k in enumerate(keys) if k not in done]
    bar = tqdm(total=len(todo), desc="PandaLM judging", leave=False)
    for s in range(0, len(todo), chunk):
        idx = todo[s : s + chunk]
        answers = judge([prompts[i] for i in idx])
        if len(answers) != len(idx):
            raise PandaLMError(f"the judge returned {len(answers)} answers for {len(idx)} prompts")
        for i, a in zip(idx, answers):
            done[keys[i]] = a
            append_jsonl(cache, {"key": keys[i], "answer": a})
        bar.update(len(idx))
    bar.close()
    answers = [done[k] for k in keys]
    verdicts = [parse_judgment(a) for a in answers]
    pairs = [(verdicts[2 * i], verdicts[2 * i + 1]) for i in range(len(items))]
    records = [
        {
            "instruction": it["instruction"],
            "input": it["input"],
            "model": m,
            "comparator": c,
            "answer_model_first": answers[2 * i],
            "answer_model_second": answers[2 * i + 1],
            "verdict_model_first": pairs[i][0],
            "verdict_model_second": pairs[i][1],
        }
        for i, (it, m, c) in enumerate(zip(items, model_out, comp_out))
    ]
    return pairs, records


def rows_from(
    t: Tally,
    metrics: Sequence[str],
    judge_name: str,
    comparator: str,
    name: str = "pandalm",
    max_unparsable: Optional[float] = None,
) -> List[ResultRow]:
    """Rows of the tallies. No clean score from a judge that could not be read: every judgment
    unparsable is an ``error`` row (also with ``eval.pandalm_unparsable=tie``, where the ties would
    give 50.0 and a position consistency of 1.0), and a share of unparsable judgments above
    ``max_unparsable`` (``eval.pandalm_max_unparsable``) keeps the numbers but starts the message with
    ``WARNING`` (results.csv has no warning status: ok/skipped/error, pipeline/eval/results.py)."""
    notes = [f"vs {comparator}: {t.wins} wins, {t.ties} ties, {t.losses} losses over {t.n} items (both orders)"]
    if t.unparsable:
        notes.append(f"{t.unparsable} of {t.judgments} judgments could not be parsed (first line not 1/2/Tie)")
    share = t.unparsable / t.judgments if t.judgments else 0.0
    if 0 < t.unparsable < t.judgments and max_unparsable is not None and share > max_unparsable:
        warning = (
            f"WARNING: {100 * share:.1f}% of the judge's answers could not be parsed, above "
            f"eval.pandalm_max_unparsable={max_unparsable:g}: the score rests on few judgments"
        )
        log.warning("%s: %s", name, warning)
        notes.insert(0, warning)
    if judge_name == TEST_DOUBLE:
        notes.append(TEST_DOUBLE_NOTE)
    msg = "; ".join(notes)
    values = {
        "score": (t.score, t.stderr),
        "wins": (t.wins, None),
        "ties": (t.ties, None),
        "losses": (t.losses, None),
        "position_consistency": (t.position_consistency, None),
    }
    rows = []
    for m in metrics:
        if m not in values:
            rows.append(
                ResultRow(name, m, None, None, None, "skipped", f"unknown metric {m!r} (available: {sorted(values)})")
            )
        elif t.n == 0 or (t.judgments and t.unparsable == t.judgments):
            rows.append(ResultRow(name, m, None, None, 0, "error", f"no judgment could be parsed; {msg}"))
        else:
            v, se = values[m]
            rows.append(ResultRow(name, m, v, se, t.n, "ok", msg))
    return rows


# --------------------------------------------------------------------------------------------
# the runner
# --------------------------------------------------------------------------------------------
def comparator_id(ev: EvalSession) -> str:
    c = str(ev.e.pandalm_comparator)
    return f"pretrained ({ev.model_name()})" if c == "pretrained" else c


def comparator_outputs(ev: EvalSession, items: Sequence[Dict[str, str]]) -> List[str]:
    """The comparator's outputs for ``items``: the run's pre-trained model (generated once per
    pre-trained model, cached under ``<runs_dir>/_baselines/<model>/``), a model folder, or a file."""
    e = ev.e
    c = str(e.pandalm_comparator)
    style = prompting.style_of(ev.t.run_cfg)  # the comparator is asked as the evaluated model is
    tail = "" if style == prompting.ALPACA else f"-{style}"
    if c == "pretrained":
        if not ev.t.is_run:
            raise PandaLMError("the comparator (pretrained) is the evaluated model itself")
        name = str(getattr(ev.t.model_cfg, "name", "model"))
        ident = short_hash(model_identity(ev.t.model_cfg))
        cache = (
            Path(ev.cfg.paths.runs_dir) / BASELINES_DIR / name / "eval" / "pandalm" / f"candidates-{ident}{tail}.json"
        )
        who = f"pretrained {name} {ident}"
        folder, mcfg = ev.pretrained_source()
    else:
        p = Path(c).expanduser()
        if p.is_file():
            return load_outputs_file(p, len(items))
        if not p.is_dir():
            raise PandaLMError(
                f"config key 'eval.pandalm_comparator': {c!r} is neither 'pretrained', a model folder nor "
                f"a JSON/JSONL file of outputs"
            )
        cache = ev.eval_dir / "pandalm" / f"comparator-{short_hash(str(p.resolve()))}{tail}.json"
        who, folder, mcfg = str(p.resolve()), p, None
    # one process generates a shared cache, the others wait for it (parallel workers)
    lock = cache.parent / f".{cache.name}.lock"
    with file_lock(lock, wait=True, on_wait=lambda: log.info("waiting for %s (another process holds it)", lock)):
        if cache.is_file() and style == prompting.ALPACA:  # cheap check before loading a model
            try:
                got = json.loads(cache.read_text(encoding="utf-8"))
                if (
                    got.get("settings", {}).get("who") == who
                    and len(got.get("outputs", [])) >= len(items)
                    and got["settings"].get("max_new_tokens") == int(e.max_new_tokens)
                    and got["settings"].get("backend", "hf") == str(e.backend)
                ):
                    if got["settings"].get("prompts") == _sha(json.dumps(candidate_prompts(items)).encode()):
                        return got["outputs"]
            except (ValueError, KeyError):
                pass
        lm = ev.load_model(folder, mcfg)
        try:
            return generate_candidates(
                lm.model,
                lm.tokenizer,
                items,
                out_file=cache,
                who=who,
                max_new_tokens=e.max_new_tokens,
                batch_size=e.batch_size,
                style=style,
            )
        finally:
            del lm
            generation.release()


@register
class PandaLMRunner(Runner):
    kind = "pandalm"
    order = {"model": 30, "judge": 10}

    def plan(self, ev: EvalSession, bench: B.Benchmark) -> EvalPlan:
        e = ev.e
        try:
            ts = testset_path(e.pandalm_testset, e.data_dir)
        except DataUnavailable as ex:
            return EvalPlan(bench.name, {"framework": "pandalm"}, str(ex))
        comp = comparator_id(ev)
        evaluator = evaluator_info(
            e.pandalm_judge,
            e.pandalm_judge_model,
            ts,
            comp,
            max_new_tokens=e.max_new_tokens,
            limit=e.limit,
            unparsable=e.pandalm_unparsable,
            style=prompting.style_of(ev.t.run_cfg),
            backend=str(e.backend),
        )
        if comp.startswith("pretrained") and not ev.t.is_run:
            return EvalPlan(
                bench.name, evaluator, "the comparator (the pre-trained model) is the evaluated model itself"
            )
        return EvalPlan(bench.name, evaluator)

    def model_phase(self, ev: EvalSession, plans: Dict[str, EvalPlan], names: List[str], lm) -> None:
        """The evaluated model's candidates (once for every benchmark of this kind)."""
        e = ev.e
        try:
            items = load_testset(testset_path(e.pandalm_testset, e.data_dir))
            ev.shared["pandalm_items"] = items[: e.limit] if e.limit else items
            ev.shared["pandalm_model_out"] = generate_candidates(
                lm.model,
                lm.tokenizer,
                ev.shared["pandalm_items"],
                out_file=ev.eval_dir / "pandalm" / "candidates.json",
                who=ev.t.run_id,
                max_new_tokens=e.max_new_tokens,
                batch_size=e.batch_size,
                style=prompting.style_of(ev.t.run_cfg),
            )
        except Exception as ex:
            log.error("PandaLM candidates failed:\n%s", traceback.format_exc())
            ev.fail_all(plans, names, f"PandaLM candidate generation failed: {type(ex).__name__}: {ex}")

    def judge_phase(self, ev: EvalSession, plans: Dict[str, EvalPlan], names: List[str]) -> None:
        e = ev.e
        for n in names:

            def fn(n=n) -> List[ResultRow]:
                items, model_out = ev.shared.get("pandalm_items"), ev.shared.get("pandalm_model_out")
                if items is None or model_out is None:
                    raise RuntimeError("no PandaLM candidates for the evaluated model")
                comp = comparator_outputs(ev, items)
                conf = judge_config(e.pandalm_judge, e.pandalm_judge_model)
                judge = make_judge(conf, e.device)
                try:
                    pairs, records = judge_pairs(
                        judge,
                        items,
                        model_out,
                        comp,
                        style=conf.get("prompt", "pandalm"),
                        cache=ev.eval_dir / "pandalm" / f"judgments-{e.pandalm_judge}-{judge_key(conf)}.jsonl",
                        tokenizer=getattr(judge, "tok", None),
                    )
                finally:
                    del judge
                    generation.release()
                atomic_write_json(ev.eval_dir / "pandalm" / "judgments.json", records)
                t = tally(pairs, e.pandalm_unparsable)
                return rows_from(
                    t,
                    ev.metrics(n),
                    e.pandalm_judge,
                    comparator_id(ev),
                    name=n,
                    max_unparsable=e.pandalm_max_unparsable,
                )

            ev.attempt(plans[n], fn)

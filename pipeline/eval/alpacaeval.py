"""AlpacaEval 1: generate outputs for the 805 instructions, judge them with alpaca_eval 0.6.6.

Steps (driven by :class:`AlpacaEvalRunner`):

1. :func:`load_reference` -- the AlpacaEval 1 set with the text-davinci-003 reference outputs
   (``eval.alpaca_eval_reference``; else ``<eval.data_dir>/alpaca_eval/alpaca_eval_v1.jsonl`` from
   `make fetch-data`; else the hub file ``alpaca_eval.json`` of the dataset ``tatsu-lab/alpaca_eval``).
2. :func:`generate_outputs` -- the model's outputs: each instruction rendered in the Alpaca template
   (:func:`pipeline.preprocess.render_source`, no input; a run trained on chat data: its model's
   chat template, :mod:`pipeline.eval.prompting`), greedy, ``eval.max_new_tokens``, batched
   with left padding; cached in ``<eval_dir>/alpaca_eval/model_outputs.json`` (reused when the
   generation settings and instructions are the same).
3. :func:`annotate` -- ``alpaca_eval.main.evaluate`` with the evaluator config ``eval.judge``
   (``pipeline/eval/evaluators/<judge>/configs.yaml``; default Mixtral-8x7B-Instruct, derived from
   alpaca_eval's guanaco_33b config), the reference outputs, metric ``get_winrate`` (draws count
   half) and an annotation cache (alpaca_eval's ``caching_path``, ``<eval_dir>/alpaca_eval/
   annotations_cache.json``: a resumed run does not re-judge). The resolved evaluator config is
   written to ``<eval_dir>/alpaca_eval/annotator/<judge>/configs.yaml``.

:class:`AlpacaEvalRunner` (kind ``alpaca_eval``, pipeline/eval/runner.py) drives these steps for the
benchmarks whose YAML says ``kind: alpaca_eval``: ``compute: win_rate`` (``alpaca_eval``: generate,
then judge once the evaluated model is released) and ``compute: length`` (``mech_alpacaeval_length``:
the generations' length, runs and baselines alike).

Rows: ``win_rate`` (0-100, stderr = alpaca_eval's standard error, n = judged pairs),
``avg_length`` (alpaca_eval's: mean characters of the outputs), optionally ``discrete_win_rate``.
Judgments that cannot be parsed are excluded by alpaca_eval's metric and counted in the message.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import statistics
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import yaml

from pipeline.eval import benchmarks as B
from pipeline.eval import generation
from pipeline.eval.judges import TEST_DOUBLE, TEST_DOUBLE_NOTE
from pipeline.eval.results import ResultRow
from pipeline.eval.runner import EvalPlan, EvalSession, Runner, register
from pipeline.eval import prompting
from pipeline.runs import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

EVALUATORS_DIR = Path(__file__).resolve().parent / "evaluators"
MIRROR_FILE = "alpaca_eval/alpaca_eval_v1.jsonl"
HUB_REPO = "tatsu-lab/alpaca_eval"
HUB_FILE = "alpaca_eval.json"
REFERENCE_GENERATOR = "text_davinci_003"


class AlpacaEvalError(RuntimeError):
    """Bad or missing AlpacaEval input (the message names the file, record and field)."""


class DataUnavailable(AlpacaEvalError):
    """The benchmark's data cannot be found offline (recorded as status=skipped)."""


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def alpaca_eval_version() -> str:
    try:
        from importlib.metadata import version

        return version("alpaca_eval")
    except Exception:  # pragma: no cover
        return "?"


# --------------------------------------------------------------------------------------------
# reference data
# --------------------------------------------------------------------------------------------
def reference_path(explicit: Optional[str], data_dir: Optional[str]) -> Path:
    """Where the reference set is read from (see the module docstring); raises DataUnavailable."""
    if explicit:
        p = Path(explicit).expanduser()
        if not p.is_file():
            raise DataUnavailable(f"eval.alpaca_eval_reference: {p} does not exist")
        return p
    if data_dir:
        p = Path(data_dir).expanduser() / MIRROR_FILE
        if p.is_file():
            return p
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(repo_id=HUB_REPO, filename=HUB_FILE, repo_type="dataset"))
    except Exception as e:
        where = f"{Path(data_dir).expanduser() / MIRROR_FILE} (not found), " if data_dir else ""
        raise DataUnavailable(
            f"AlpacaEval reference outputs not available offline: looked at {where}the hub dataset "
            f"{HUB_REPO}/{HUB_FILE} ({type(e).__name__}). Set eval.alpaca_eval_reference=<file> or run "
            f"`make fetch-data` where the hub is reachable"
        ) from None


def load_reference(path: Path) -> List[Dict[str, str]]:
    """Records ``{instruction, output, generator, dataset}`` from a JSON array or JSONL file."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".jsonl":
            recs = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            recs = json.loads(text)
    except json.JSONDecodeError as e:
        raise AlpacaEvalError(f"{path}: not valid JSON{'L' if path.suffix == '.jsonl' else ''} ({e})") from e
    if not isinstance(recs, list) or not recs:
        raise AlpacaEvalError(f"{path}: expected a non-empty list of records")
    out = []
    for i, r in enumerate(recs):
        if not isinstance(r, dict):
            raise AlpacaEvalError(f"{path}: record {i} is not an object")
        for k in ("instruction", "output"):
            if not isinstance(r.get(k), str):
                raise AlpacaEvalError(f"{path}: record {i}: field '{k}' is missing or not a string")
        out.append(
            {
                "instruction": r["instruction"],
                "output": r["output"],
                "generator": str(r.get("generator", REFERENCE_GENERATOR)),
                "dataset": str(r.get("dataset", "")),
            }
        )
    seen = set()
    for i, r in enumerate(out):
        if r["instruction"] in seen:
            raise AlpacaEvalError(
                f"{path}: record {i}: field 'instruction' duplicates an earlier record "
                f"(alpaca_eval merges outputs on the instruction)"
            )
        seen.add(r["instruction"])
    return out


def prompts_for(reference: Sequence[Dict[str, str]], style: str = prompting.ALPACA, tokenizer=None) -> List[str]:
    """The instructions in the run's prompt style (:mod:`pipeline.eval.prompting`; Alpaca: no input)."""
    return [prompting.render(style, tokenizer, r["instruction"]) for r in reference]


# --------------------------------------------------------------------------------------------
# generation
# --------------------------------------------------------------------------------------------
def generation_settings(
    max_new_tokens: int, limit: Optional[int], style: str = prompting.ALPACA, backend: str = "hf"
) -> Dict[str, Any]:
    template = "alpaca (pipeline.preprocess.render_source, no input)"
    if style != prompting.ALPACA:
        template = f"{style} (the evaluated model's, pipeline.eval.prompting)"
    out = {
        "template": template,
        "decoding": "greedy",
        "max_new_tokens": int(max_new_tokens),
        "limit": limit,
    }
    if backend != "hf":  # vllm outputs are never mixed with (or cached as) HF ones
        out["backend"] = backend
    return out


def generate_outputs(
    model,
    tokenizer,
    reference: Sequence[Dict[str, str]],
    *,
    out_file: Path,
    generator: str,
    max_new_tokens: int,
    batch_size: int,
    limit: Optional[int],
    style: str = prompting.ALPACA,
) -> List[Dict[str, Any]]:
    """The model's outputs for the (first ``limit``) instructions, asked in ``style``
    (:mod:`pipeline.eval.prompting`); cached in ``out_file``."""
    ref = list(reference[:limit] if limit else reference)
    settings = generation_settings(max_new_tokens, limit, style, "vllm" if generation.is_vllm(model) else "hf")
    key = _sha(json.dumps([settings, [r["instruction"] for r in ref]], sort_keys=True).encode())
    if out_file.is_file():
        try:
            cached = json.loads(out_file.read_text(encoding="utf-8"))
            if cached.get("key") == key:
                return cached["outputs"]
        except (ValueError, KeyError):
            pass
    gens = generation.generate(
        model,
        tokenizer,
        prompts_for(ref, style, tokenizer),
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        desc="AlpacaEval generation",
        add_special_tokens=prompting.add_special_tokens(style),
    )
    outputs = [
        {
            "instruction": r["instruction"],
            "output": g.text,
            "generator": generator,
            "dataset": r["dataset"],
            "n_tokens": g.n_tokens,
            "finished": g.finished,
        }
        for r, g in zip(ref, gens)
    ]
    atomic_write_json(out_file, {"key": key, "settings": settings, "outputs": outputs})
    return outputs


# --------------------------------------------------------------------------------------------
# the evaluator (annotator) config
# --------------------------------------------------------------------------------------------
def resolve_callable(spec: str) -> Callable:
    module, _, attr = spec.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise AlpacaEvalError(f"fn_completions {spec!r}: cannot import ({e})") from e


def annotator_config(judge: str, judge_model: Optional[str] = None) -> Tuple[str, Dict[str, Any]]:
    """``(name, config)`` of ``pipeline/eval/evaluators/<judge>/configs.yaml`` with the prompt template
    made absolute and, with ``judge_model``, the model replaced."""
    path = EVALUATORS_DIR / judge / "configs.yaml"
    if not path.is_file():
        known = sorted(p.name for p in EVALUATORS_DIR.iterdir() if (p / "configs.yaml").is_file())
        raise AlpacaEvalError(f"config key 'eval.judge': no evaluator config {path} (known: {known})")
    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f)
    if not isinstance(data, dict) or len(data) != 1:
        raise AlpacaEvalError(f"{path}: expected exactly one annotator entry")
    name, conf = next(iter(data.items()))
    conf = dict(conf)
    tpl = Path(conf["prompt_template"])
    tpl = tpl if tpl.is_absolute() else EVALUATORS_DIR / tpl
    if not tpl.is_file():
        raise AlpacaEvalError(f"{path}: prompt_template {tpl} does not exist")
    conf["prompt_template"] = str(tpl)
    if judge_model:
        conf.setdefault("completions_kwargs", {})["model_name"] = str(judge_model)
    if not (conf.get("completions_kwargs") or {}).get("model_name"):
        raise AlpacaEvalError(
            f"evaluator '{judge}' ({path}) names no judge model: set eval.judge_model=<hub id or local folder>"
        )
    return name, conf


def evaluator_info(
    judge: str,
    judge_model: Optional[str],
    reference_file: Path,
    *,
    max_new_tokens: int,
    limit: Optional[int],
    style: str = prompting.ALPACA,
    backend: str = "hf",
) -> Dict[str, Any]:
    """The exact evaluator config recorded in results.csv (and compared on resume)."""
    name, conf = annotator_config(judge, judge_model)
    prompt = Path(conf["prompt_template"]).read_bytes()
    kw = conf.get("completions_kwargs", {})
    return {
        "framework": "alpaca_eval",
        "version": alpaca_eval_version(),
        "annotator": name,
        "judge": kw.get("model_name"),
        "fn_completions": conf.get("fn_completions"),
        "judge_decoding": {k: v for k, v in kw.items() if k != "model_name"},
        "prompt_sha256": _sha(prompt)[:16],
        "parser": conf.get("completion_parser_kwargs"),
        "metric": "get_winrate (draws count half)",
        "reference": {"file": reference_file.name, "sha256": _sha(reference_file.read_bytes())[:16]},
        "generation": generation_settings(max_new_tokens, limit, style, backend),
    }


def _check_decoder(fn: str) -> None:
    import importlib.util

    need = {"huggingface_local_completions": ["peft"], "vllm_local_completions": ["vllm"]}.get(fn, [])
    missing = [m for m in need if importlib.util.find_spec(m) is None]
    if missing:
        raise AlpacaEvalError(
            f"the judge's decoder {fn} needs the package(s) {missing}: pip install {' '.join(missing)} "
            f"(or choose another evaluator: eval.judge=mixtral_8x7b_instruct_vllm / mixtral_8x7b_instruct)"
        )


def _annotator_class():
    """alpaca_eval's PairwiseAnnotator, with cached preferences read back as floats.

    Workaround: with pandas >= 3, annotations re-read from the cache come back as int64 (1/2) and
    alpaca_eval's own ``replace({0: 1.5})`` on that column raises TypeError, so a fully cached
    (resumed) evaluation would crash. Casting the cached column to float restores alpaca_eval's
    behaviour with pandas 2.
    """
    from alpaca_eval.annotators import PairwiseAnnotator

    class CachedFloatPairwiseAnnotator(PairwiseAnnotator):
        def load_(self, path=None):
            super().load_(path)
            df = self.df_annotations
            if df is not None and self.annotation_key in df.columns:
                df[self.annotation_key] = df[self.annotation_key].astype(float)

    return CachedFloatPairwiseAnnotator


def annotate(
    outputs: Sequence[Dict[str, Any]],
    reference: Sequence[Dict[str, str]],
    *,
    judge: str,
    judge_model: Optional[str],
    out_dir: Path,
    name: str,
    chunksize: Optional[int] = None,
) -> Tuple[Dict[str, Any], List[Dict[str, Any]]]:
    """Judge ``outputs`` against ``reference`` with alpaca_eval; returns (leaderboard row, annotations)."""
    import pandas as pd

    os.environ.setdefault("IS_ALPACA_EVAL_2", "False")
    from alpaca_eval import main as ae_main

    ann_name, conf = annotator_config(judge, judge_model)
    kwargs: Dict[str, Any] = {}
    fn = conf.get("fn_completions", "openai_completions")
    if isinstance(fn, str) and ":" in fn:
        kwargs["fn_completions"] = resolve_callable(fn)
        conf.pop("fn_completions")
    else:
        _check_decoder(str(fn))
    ann_dir = out_dir / "annotator" / ann_name
    atomic_write_text(ann_dir / "configs.yaml", yaml.safe_dump({ann_name: conf}, sort_keys=False))
    by_instr = {r["instruction"]: r for r in reference}
    ref = [by_instr[o["instruction"]] for o in outputs]
    model_df = pd.DataFrame(
        [{"instruction": o["instruction"], "output": o["output"], "generator": name} for o in outputs]
    )
    ref_df = pd.DataFrame(
        [{"instruction": r["instruction"], "output": r["output"], "generator": r["generator"]} for r in ref]
    )
    leaderboard, annotations = ae_main.evaluate(
        model_outputs=model_df,
        reference_outputs=ref_df,
        annotators_config=str(ann_dir / "configs.yaml"),
        name=name,
        output_path=str(out_dir),
        precomputed_leaderboard=None,
        is_return_instead_of_print=True,
        fn_metric="get_winrate",
        sort_by="win_rate",
        is_cache_leaderboard=False,
        caching_path=str(out_dir / "annotations_cache.json"),
        annotation_kwargs={"chunksize": chunksize},
        Annotator=_annotator_class(),
        **kwargs,
    )
    row = leaderboard.loc[name].to_dict()
    ann = annotations if isinstance(annotations, list) else pd.DataFrame(annotations).to_dict("records")
    return row, ann


def rows_from(
    board: Dict[str, Any],
    annotations: Sequence[Dict[str, Any]],
    outputs: Sequence[Dict[str, Any]],
    metrics: Sequence[str],
    judge: str,
) -> List[ResultRow]:
    """Tidy rows from alpaca_eval's leaderboard row (see the module docstring)."""
    import math

    n_total = int(board.get("n_total", 0))
    unparsed = sum(
        1
        for a in annotations
        if a.get("preference") is None or (isinstance(a.get("preference"), float) and math.isnan(a["preference"]))
    )
    notes = [
        f"wins {int(board.get('n_wins', 0))}, losses {int(board.get('n_wins_base', 0))}, "
        f"draws {int(board.get('n_draws', 0))} of {len(outputs)} instructions"
    ]
    if unparsed:
        notes.append(f"{unparsed} judgment(s) could not be parsed (no 'Output (a)'/'Output (b)') and are excluded")
    if judge == TEST_DOUBLE:
        notes.append(TEST_DOUBLE_NOTE)
    msg = "; ".join(notes)
    chars = [len(o["output"]) for o in outputs]
    values = {
        "win_rate": (board.get("win_rate"), board.get("standard_error"), n_total),
        "discrete_win_rate": (board.get("discrete_win_rate"), None, n_total),
        "avg_length": (sum(chars) / len(chars) if chars else None, None, len(chars)),
    }
    rows = []
    for m in metrics:
        if m in values:
            v, se, n = values[m]
            if n_total == 0 and m != "avg_length":
                rows.append(
                    ResultRow(
                        "alpaca_eval",
                        m,
                        None,
                        None,
                        0,
                        "error",
                        f"no judgment could be parsed ({len(outputs)} pairs); {msg}",
                    )
                )
            else:
                rows.append(ResultRow("alpaca_eval", m, v, se, n, "ok", msg))
        else:
            rows.append(
                ResultRow(
                    "alpaca_eval", m, None, None, None, "skipped", f"unknown metric {m!r} (available: {sorted(values)})"
                )
            )
    return rows


# --------------------------------------------------------------------------------------------
# the runner
# --------------------------------------------------------------------------------------------
COMPUTATIONS = ("win_rate", "length")


@register
class AlpacaEvalRunner(Runner):
    kind = "alpaca_eval"
    order = {"model": 20, "judge": 20}

    def plan(self, ev: EvalSession, bench: B.Benchmark) -> EvalPlan:
        e = ev.e
        if bench.compute not in COMPUTATIONS:
            raise ValueError(
                f"{bench.path}: field 'benchmark.compute' must be one of {list(COMPUTATIONS)} for "
                f"kind alpaca_eval, got {bench.compute!r}"
            )
        style = prompting.style_of(ev.t.run_cfg)
        gen = generation_settings(e.max_new_tokens, e.limit, style, str(e.backend))
        try:
            ref = reference_path(e.alpaca_eval_reference, e.data_dir)
        except DataUnavailable as ex:
            return EvalPlan(bench.name, {"framework": "alpaca_eval", "generation": gen}, str(ex))
        if bench.compute == "length":
            return EvalPlan(
                bench.name,
                {
                    "kind": "mechanism",
                    "source": "AlpacaEval generations",
                    "generation": gen,
                    "reference_file": ref.name,
                },
            )
        return EvalPlan(
            bench.name,
            evaluator_info(
                e.judge,
                e.judge_model,
                ref,
                max_new_tokens=e.max_new_tokens,
                limit=e.limit,
                style=style,
                backend=str(e.backend),
            ),
        )

    def prepare(self, ev: EvalSession) -> None:
        """Import alpaca_eval before the objects alive are frozen (when a win rate is asked for)."""
        reg = B.registry()
        if any(reg[n].kind == self.kind and reg[n].compute == "win_rate" for n in ev.names if n in reg):
            os.environ.setdefault("IS_ALPACA_EVAL_2", "False")
            try:
                import alpaca_eval.main  # noqa: F401
            except Exception:  # reported by the benchmark itself
                pass

    def model_phase(self, ev: EvalSession, plans: Dict[str, EvalPlan], names: List[str], lm) -> None:
        """Generate the outputs once (every benchmark of this kind needs them), then their length."""
        e = ev.e
        try:
            path = reference_path(e.alpaca_eval_reference, e.data_dir)
            ev.shared["alpaca_reference"] = load_reference(path)
            ev.shared["alpaca_outputs"] = generate_outputs(
                lm.model,
                lm.tokenizer,
                ev.shared["alpaca_reference"],
                out_file=ev.eval_dir / "alpaca_eval" / "model_outputs.json",
                generator=ev.t.run_id,
                max_new_tokens=e.max_new_tokens,
                batch_size=e.batch_size,
                limit=e.limit,
                style=prompting.style_of(ev.t.run_cfg),
            )
        except Exception as ex:
            log.error("AlpacaEval generation failed:\n%s", traceback.format_exc())
            ev.fail_all(plans, names, f"AlpacaEval generation failed: {type(ex).__name__}: {ex}")
            return
        for n in names:
            if B.get(n).compute == "length":
                ev.attempt(plans[n], lambda n=n: rows_length(ev, n))

    def judge_phase(self, ev: EvalSession, plans: Dict[str, EvalPlan], names: List[str]) -> None:
        e = ev.e
        for n in names:
            if B.get(n).compute != "win_rate":
                continue

            def fn(n=n) -> List[ResultRow]:
                outputs = ev.shared.get("alpaca_outputs")
                if outputs is None:  # generations of an earlier attempt
                    cached = ev.eval_dir / "alpaca_eval" / "model_outputs.json"
                    raise RuntimeError(f"no AlpacaEval generations ({cached})")
                board, ann = annotate(
                    outputs,
                    ev.shared["alpaca_reference"],
                    judge=e.judge,
                    judge_model=e.judge_model,
                    out_dir=ev.eval_dir / "alpaca_eval",
                    name=ev.t.run_id,
                    chunksize=e.judge_chunksize,
                )
                return rows_from(board, ann, outputs, ev.metrics(n), e.judge)

            ev.attempt(plans[n], fn)


def rows_length(ev: EvalSession, name: str) -> List[ResultRow]:
    """Mean characters and tokens of the AlpacaEval generations (``mech_alpacaeval_length``)."""
    outs = ev.shared.get("alpaca_outputs") or []
    vals = {"mean_chars": [len(o["output"]) for o in outs], "mean_tokens": [o["n_tokens"] for o in outs]}
    unfinished = sum(1 for o in outs if not o.get("finished", True))
    msg = (
        f"{unfinished} of {len(outs)} generations stopped at max_new_tokens={ev.e.max_new_tokens}" if unfinished else ""
    )
    rows = []
    for m in ev.metrics(name):
        v = vals.get(m)
        if v is None:
            rows.append(ResultRow(name, m, None, None, None, "skipped", f"unknown metric {m!r}"))
            continue
        se = statistics.stdev(v) / len(v) ** 0.5 if len(v) > 1 else None
        rows.append(ResultRow(name, m, sum(v) / len(v), se, len(v), "ok", msg))
    return rows

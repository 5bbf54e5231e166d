"""lm-eval tasks from the offline mirror build the SAME prompts as lm-eval's built-in tasks.

For each harness benchmark in ../shared's mirror, the built-in task config is loaded through
lm_eval's TaskManager indexing every built-in task and pointed at the same local file (every split
of the built-in -> that file, so its few-shot pool is the same list of documents); our materialised
mirror task (the template in pipeline/eval/tasks/, splits the mirror lacks nulled) is loaded from
its YAML by the TaskManager the evaluation uses (harness.task_manager: no built-in index). Both
build their requests with the same few-shot seed and the contexts/continuations (and doc_to_text,
targets, choices) must be identical, few-shot ones included. No model is needed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from pipeline.eval import benchmarks as B
from pipeline.eval import harness

MIRRORED = {  # benchmark -> (built-in task, shots, evaluated split, {split: file in the shared mirror})
    "arc_challenge": (
        "arc_challenge",
        25,
        "test",
        {
            "train": "arc_challenge/train.jsonl",
            "validation": "arc_challenge/validation.jsonl",
            "test": "arc_challenge/test.jsonl",
        },
    ),
    "winogrande": (
        "winogrande",
        5,
        "validation",
        {"train": "winogrande/train.jsonl", "validation": "winogrande/validation.jsonl"},
    ),
    "piqa": ("piqa", 0, "validation", {"validation": "piqa/validation.jsonl"}),
    "truthfulqa_mc2": (
        "truthfulqa_mc2",
        0,
        "validation",
        {"validation": "truthfulqa/multiple_choice/validation.jsonl"},
    ),
    "truthfulqa_gen": ("truthfulqa_gen", 0, "validation", {"validation": "truthfulqa/generation/validation.jsonl"}),
}
LIMIT = 4
SEED = 1234


@pytest.fixture(scope="module")
def mirror(shared_dir) -> Path:
    p = shared_dir / "data" / "benchmarks"
    if not p.is_dir():
        pytest.skip(f"needs the benchmark mirror {p}")
    return p


def _requests(task, shots: int):
    task.set_config(key="num_fewshot", value=shots)
    task.set_fewshot_seed(seed=SEED)
    task.build_all_requests(limit=LIMIT, rank=0, world_size=1)
    return [
        (i.doc_id, i.idx, tuple(i.arguments) if isinstance(i.arguments, tuple) else i.arguments) for i in task.instances
    ]


def _builtin(name: str, files: dict, eval_file: Path):
    """lm-eval's built-in task config (via TaskManager's index), its data pointed at the mirror:
    each split it names reads the mirror's file of that split, and a split the mirror lacks reads
    the evaluated file (zero-shot tasks then evaluate the same documents)."""
    from lm_eval.tasks._yaml_loader import load_yaml

    tm = harness.builtin_task_manager()
    cfg = load_yaml(tm.task_index[name].yaml_path, resolve_func=True)
    splits = {cfg[k] for k in ("training_split", "validation_split", "test_split", "fewshot_split") if cfg.get(k)}
    cfg.update(
        dataset_path="json",
        dataset_name=None,
        dataset_kwargs={"data_files": {s: str(files.get(s, eval_file)) for s in splits}},
    )
    cfg.pop("tag", None)
    return tm.load([cfg])["tasks"][name]


def _jsonl(path: Path):
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


@pytest.mark.parametrize("benchmark", sorted(MIRRORED))
def test_mirror_task_builds_the_builtin_prompts(benchmark, mirror, tmp_path):
    name, shots, eval_split, rels = MIRRORED[benchmark]
    files = {s: mirror / r for s, r in rels.items()}
    assert B.shots_for(benchmark) == shots  # docs/study.md section 5
    spec = harness.materialize(
        benchmark,
        str(mirror),
        tmp_path,
        shots=shots,
        metrics=list(B.get(benchmark).metrics),
        limit=LIMIT,
        fewshot_seed=SEED,
    )
    assert spec.skip is None, spec.skip
    text = spec.yaml_path.read_text()
    y = yaml.safe_load(text)
    assert y["dataset_path"] == "json" and y["num_fewshot"] == shots
    assert y["dataset_kwargs"]["data_files"] == {s: str(f) for s, f in files.items()}  # every split the mirror has
    assert spec.evaluator["data"]["eval_split"] == eval_split
    ours = harness.task_manager().load([str(spec.yaml_path)])["tasks"][spec.task]
    ref = _builtin(name, files, files[eval_split])
    # the documents and their rendering
    ours_docs, ref_docs = list(ours.eval_docs)[:LIMIT], list(ref.eval_docs)[:LIMIT]
    assert (
        ours_docs == ref_docs == _jsonl(files[eval_split])[:LIMIT]
        or benchmark.startswith("truthfulqa")
        and ours_docs == ref_docs
    )  # (TruthfulQA's process_docs rewrites the documents)
    for d in ours_docs:
        assert ours.doc_to_text(d) == ref.doc_to_text(d)
        assert ours.doc_to_target(d) == ref.doc_to_target(d)
        if ours.config.output_type == "multiple_choice":
            assert ours.doc_to_choice(d) == ref.doc_to_choice(d)
    # the requests (context, continuation), few-shot examples included
    a, b = _requests(ours, shots), _requests(ref, shots)
    assert a == b and len(a) >= LIMIT
    if shots:
        # the shots come from the mirror's training split (recorded in the evaluator config), not the
        # evaluated one, and no context holds its own document
        assert spec.evaluator["data"]["fewshot_split"] == "train"
        assert not any("few-shot examples are drawn from the evaluated split" in n for n in spec.notes)
        ctx = a[0][2][0]
        assert ctx.count("Answer:" if benchmark == "arc_challenge" else "\n\n") >= shots  # the shots are there
        train, evaluated = _jsonl(files["train"]), _jsonl(files[eval_split])
        key = "question" if benchmark == "arc_challenge" else "sentence"
        if benchmark == "arc_challenge":
            shown = [d[key] for d in train if f"Question: {d[key]}\nAnswer:" in ctx]
        else:  # WinoGrande's context: the shots' sentences with the option filled in, blank-first part
            shown = [d[key] for d in train if d[key].split("_")[0].strip() and d[key].split("_")[0] in ctx]
        assert len(shown) >= shots
        for inst in ours.instances:
            doc = evaluated[inst.doc_id]
            c = inst.arguments[0]
            if benchmark == "arc_challenge":
                assert c.count(f"Question: {doc[key]}\nAnswer:") == 1  # only as the item itself
                assert c.endswith(f"Question: {doc[key]}\nAnswer:")


def test_few_shot_examples_from_the_evaluated_split_when_the_mirror_has_no_train_split(mirror, tmp_path):
    """A mirror with ARC's test split only (symlinked): lm-eval's rule falls back to the evaluated
    split, which the evaluator config and the rows' note say."""
    m = tmp_path / "mirror"
    (m / "arc_challenge").mkdir(parents=True)
    (m / "arc_challenge" / "test.jsonl").symlink_to(mirror / "arc_challenge" / "test.jsonl")
    spec = harness.materialize(
        "arc_challenge", str(m), tmp_path / "tasks", shots=25, metrics=["acc_norm"], limit=LIMIT, fewshot_seed=SEED
    )
    assert spec.skip is None
    y = yaml.safe_load(spec.yaml_path.read_text())
    assert y["dataset_kwargs"]["data_files"] == {"test": str(m / "arc_challenge" / "test.jsonl")}
    assert y["training_split"] is None and y["validation_split"] is None
    assert spec.evaluator["data"]["fewshot_split"] == spec.evaluator["data"]["eval_split"] == "test"
    assert any("few-shot examples are drawn from the evaluated split" in n for n in spec.notes)
    assert y["fewshot_split"] == y["test_split"] == "test"  # so that lm-eval drops the current doc
    assert spec.evaluator["data"]["fewshot_excludes_current"] is True
    ours = harness.task_manager().load([str(spec.yaml_path)])["tasks"][spec.task]
    a = _requests(ours, 25)
    assert len(a) >= LIMIT and a[0][2][0].count("Answer:") >= 25
    _assert_no_context_holds_its_own_document(ours, 25)


def _shown(task, doc) -> str:
    """How ``doc`` reads as a few-shot example (question + gold answer), as lm-eval renders it."""
    if task.multiple_input:  # WinoGrande: the sentence up to the blank with the right option + the rest
        return task.doc_to_choice(doc)[task.doc_to_text(doc)] + task.config.target_delimiter + task.doc_to_target(doc)
    return task.doc_to_text(doc) + task.config.target_delimiter + task.doc_to_choice(doc)[task.doc_to_target(doc)]


def _assert_no_context_holds_its_own_document(task, shots: int) -> int:
    """Checks every context of ``task``'s requests; returns the number of documents they cover."""
    docs = list(task.eval_docs)
    shown = [_shown(task, d) for d in docs]
    for inst in task.instances:
        ctx = inst.arguments[0]
        assert shown[inst.doc_id] not in ctx, f"document {inst.doc_id} is among its own shots"
        assert sum(s in ctx for i, s in enumerate(shown) if i != inst.doc_id) >= shots  # the shots are there
    return len({inst.doc_id for inst in task.instances})


@pytest.mark.parametrize(
    "benchmark,shots,split,pool", [("arc_challenge", 25, "test", 26), ("winogrande", 5, "validation", 7)]
)
def test_shots_from_the_evaluated_split_never_include_the_current_document(
    benchmark, shots, split, pool, mirror, tmp_path
):
    """A mirror without the training split, whose evaluated split holds only a few more documents than
    shots: drawn without lm-eval's exclusion, nearly every context would contain its own question and
    gold answer (27 of 1,172 ARC contexts did with the full test split); none does. (WinoGrande, whose
    built-in task has no test split, was already excluded by lm-eval: None == None; kept as a guard.)"""
    src = mirror / benchmark / f"{split}.jsonl"
    m = tmp_path / "mirror"
    (m / benchmark).mkdir(parents=True)
    lines = src.read_text(encoding="utf-8").splitlines(keepends=True)[:pool]
    (m / benchmark / f"{split}.jsonl").write_text("".join(lines), encoding="utf-8")
    spec = harness.materialize(
        benchmark, str(m), tmp_path / "tasks", shots=shots, metrics=["acc"], limit=None, fewshot_seed=SEED
    )
    assert spec.skip is None and spec.evaluator["data"]["fewshot_split"] == split
    assert any("(minus the current item)" in n for n in spec.notes)
    task = harness.task_manager().load([str(spec.yaml_path)])["tasks"][spec.task]
    task.set_config(key="num_fewshot", value=shots)
    task.set_fewshot_seed(seed=SEED)
    task.build_all_requests(limit=None, rank=0, world_size=1)
    assert _assert_no_context_holds_its_own_document(task, shots) == pool  # every document evaluated


def test_truthfulqa_gen_keeps_its_six_qa_preamble(mirror, tmp_path):
    spec = harness.materialize(
        "truthfulqa_gen", str(mirror), tmp_path, shots=0, metrics=["bleu_max"], limit=1, fewshot_seed=SEED
    )
    task = harness.task_manager().load([str(spec.yaml_path)])["tasks"][spec.task]
    doc = list(task.eval_docs)[0]
    text = task.doc_to_text(doc)
    assert text.startswith("Q: What is human life expectancy in the United States?")
    assert text.count("\n\nQ: ") == 6 and text.endswith("Q: " + doc["question"])
    assert "I have no comment." in doc["correct_answers"]  # lm-eval's process_docs ran


def _wmt_mirror(root: Path, val: int, test: int) -> None:
    for split, n in (("validation", val), ("test", test)):
        rows = [{"translation": {"fr": f"Bonjour {split} {i}.", "en": f"Hello {split} {i}."}} for i in range(n)]
        p = root / "wmt14" / "fr-en" / f"{split}.jsonl"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def test_wmt_task_uses_the_instruction_and_both_splits(tmp_path):
    _wmt_mirror(tmp_path / "mirror", val=3, test=2)
    spec = harness.materialize(
        "wmt14_fr_en",
        str(tmp_path / "mirror"),
        tmp_path / "tasks",
        shots=0,
        metrics=["bleu", "chrf"],
        limit=None,
        fewshot_seed=SEED,
    )
    assert spec.skip is None and not spec.notes
    y = yaml.safe_load(spec.yaml_path.read_text())
    assert [m["metric"] for m in y["metric_list"]] == ["bleu", "chrf"]  # TER not computed when not reported
    task = harness.task_manager().load([str(spec.yaml_path)])["tasks"][spec.task]
    docs = list(task.eval_docs)
    assert len(docs) == 5  # validation + test combined
    assert task.doc_to_text(docs[0]) == (
        "Translate the following from French to English\n\nFrench phrase: Bonjour validation 0.\nEnglish phrase:"
    )
    assert task.doc_to_target(docs[4]) == " Hello test 1."
    task.set_fewshot_seed(seed=SEED)
    task.build_all_requests(limit=None, rank=0, world_size=1)
    ctx, gen = task.instances[0].arguments
    assert ctx.endswith("English phrase:") and gen["until"] == ["\n"] and gen["do_sample"] is False


def test_wmt_partial_and_missing_mirror(tmp_path):
    _wmt_mirror(tmp_path / "m", val=2, test=0)
    (tmp_path / "m" / "wmt14" / "fr-en" / "test.jsonl").unlink()
    spec = harness.materialize(
        "wmt14_en_fr", str(tmp_path / "m"), tmp_path / "t", shots=0, metrics=["bleu"], limit=None, fewshot_seed=SEED
    )
    assert spec.skip is None and "incomplete" in spec.notes[0] and "test.jsonl" in spec.notes[0]
    spec = harness.materialize(
        "wmt16_de_en", str(tmp_path / "m"), tmp_path / "t", shots=0, metrics=["bleu"], limit=None, fewshot_seed=SEED
    )
    assert spec.skip and "not in the offline mirror" in spec.skip and "wmt16/de-en/validation.jsonl" in spec.skip
    assert "make fetch-data" in spec.skip
    spec = harness.materialize(
        "wmt16_de_en", None, tmp_path / "t", shots=0, metrics=["bleu"], limit=None, fewshot_seed=SEED
    )
    assert spec.skip and "eval.data_dir" in spec.skip


def test_hub_mode_keeps_the_builtin_dataset(tmp_path):
    spec = harness.materialize("piqa", None, tmp_path, shots=0, metrics=["acc"], limit=None, fewshot_seed=SEED)
    y = yaml.safe_load(spec.yaml_path.read_text())
    assert "dataset_path" not in y and y["include"].endswith("lm_eval/tasks/piqa/piqa.yaml")
    assert spec.evaluator["data"] == {"source": "hub", "dataset_path": "baber/piqa", "dataset_name": None}
    spec = harness.materialize(
        "arc_challenge", None, tmp_path, shots=25, metrics=["acc_norm"], limit=None, fewshot_seed=SEED
    )
    assert spec.evaluator["data"]["fewshot_split"] == "train"  # lm-eval's rule on the built-in splits


def test_parse_results_maps_lm_eval_keys():
    res = {
        "results": {
            "plw_piqa": {
                "alias": "plw_piqa",
                "acc,none": 0.75,
                "acc_stderr,none": 0.25,
                "acc_norm,none": 0.5,
                "acc_norm_stderr,none": "N/A",
            }
        },
        "n-samples": {"plw_piqa": {"original": 1838, "effective": 4}},
    }
    rows = harness.parse_results(res, "plw_piqa", "piqa", ["acc", "acc_norm", "bleurt_max"], ["note"])
    assert [(r.metric, r.value, r.stderr, r.n, r.status) for r in rows] == [
        ("acc", 0.75, 0.25, 4, "ok"),
        ("acc_norm", 0.5, None, 4, "ok"),
        ("bleurt_max", None, None, 4, "skipped"),
    ]
    assert rows[0].message == "note"
    assert "BLEURT needs the BLEURT-20 model" in rows[2].message


def test_the_evaluation_task_manager_indexes_no_builtin_task():
    assert harness.task_manager().all_tasks == []  # our tasks load from their file (test above)
    assert "arc_challenge" in harness.builtin_task_manager().task_index


def test_rouge_shortcut_equals_rouge_scores_loop():
    """One score: the shortcut's bootstrap percentiles and the random state equal rouge_score's loop;
    more than one: rouge_score's own loop runs (same draws)."""
    import numpy as np
    from rouge_score import scoring

    harness.install_rouge_shortcut()
    harness.install_rouge_shortcut()  # idempotent
    fast = scoring.BootstrapAggregator._bootstrap_resample
    loop = fast.plw_original
    assert not hasattr(loop, "plw_original")
    agg = scoring.BootstrapAggregator()
    rng = np.random.default_rng(3)
    for n in (1, 1, 2, 5):
        m = rng.random((n, 3))
        np.random.seed(7)
        want, s_want = loop(agg, m), np.random.get_state()
        np.random.seed(7)
        got, s_got = fast(agg, m), np.random.get_state()
        assert got.dtype == want.dtype and np.array_equal(got, want), n
        assert np.array_equal(s_got[1], s_want[1]) and s_got[2] == s_want[2]
    # lm-eval's TruthfulQA-Gen metric on real strings, with and without the shortcut
    from lm_eval.tasks.truthfulqa import utils as tqa

    refs = [
        "The watermelon seeds pass through your digestive system.",
        "Nothing happens.",
        "You eat watermelon seeds. They are harmless.",
    ]
    pred = "Nothing happens if you eat watermelon seeds; they pass through you."
    with_shortcut = [tqa.rouge([r], [pred]) for r in refs]
    scoring.BootstrapAggregator._bootstrap_resample = loop
    try:
        without = [tqa.rouge([r], [pred]) for r in refs]
    finally:
        scoring.BootstrapAggregator._bootstrap_resample = fast
    assert with_shortcut == without and with_shortcut[1]["rouge1"] > 0


def test_cached_reads_follow_the_file(tmp_path):
    p = tmp_path / "data.jsonl"
    p.write_text('{"a": 1}\n')
    import hashlib

    assert harness.file_sha256(p) == hashlib.sha256(p.read_bytes()).hexdigest()
    p.write_text('{"a": 2, "b": 3}\n')  # another content (size): computed again
    assert harness.file_sha256(p) == hashlib.sha256(p.read_bytes()).hexdigest()
    t = harness.template("piqa")
    t["task"] = "changed"  # the caller's copy only
    assert harness.template("piqa")["task"] == "plw_piqa"


WMT = {  # benchmark -> (lm-eval 0.4.13 built-in task in lm_eval/tasks/translation/, pair folder, source, target)
    "wmt14_en_fr": ("wmt14-en-fr", "wmt14/fr-en", "English", "French"),
    "wmt14_fr_en": ("wmt14-fr-en", "wmt14/fr-en", "French", "English"),
    "wmt16_en_de": ("wmt16-en-de", "wmt16/de-en", "English", "German"),
    "wmt16_de_en": ("wmt16-de-en", "wmt16/de-en", "German", "English"),
    "wmt16_en_ro": ("wmt16-en-ro", "wmt16/ro-en", "English", "Romanian"),
    "wmt16_ro_en": ("wmt16-ro-en", "wmt16/ro-en", "Romanian", "English"),
}


@pytest.mark.parametrize("benchmark", sorted(WMT))
def test_wmt_prompts_are_the_builtin_translation_tasks_with_the_papers_instruction(benchmark, mirror, tmp_path):
    """Our WMT tasks against lm-eval's built-in translation tasks on the same pairs: the built-in task's
    evaluated (test) split is pointed at the mirror's validation + test files combined, as the paper
    scored them. The documents, targets and generation settings are identical, and each context is
    the built-in one with exactly the paper's zero-shot instruction in front
    (``Translate the following from <src> to <tgt>`` + a blank line: docs/study.md section 5) and
    nothing else different."""
    name, pair, src, tgt = WMT[benchmark]
    val, test = mirror / pair / "validation.jsonl", mirror / pair / "test.jsonl"
    if not (val.is_file() and test.is_file()):
        pytest.skip(f"needs the WMT mirror {mirror / pair}")
    spec = harness.materialize(
        benchmark, str(mirror), tmp_path, shots=0, metrics=["bleu", "chrf", "ter"], limit=None, fewshot_seed=SEED
    )
    assert spec.skip is None and not spec.notes
    ours = harness.task_manager().load([str(spec.yaml_path)])["tasks"][spec.task]

    from lm_eval.tasks._yaml_loader import load_yaml

    tm = harness.builtin_task_manager()
    cfg = load_yaml(tm.task_index[name].yaml_path, resolve_func=True)
    assert cfg["test_split"] == "test" and cfg["output_type"] == "generate_until"
    cfg.update(
        dataset_path="json",
        dataset_name=None,
        dataset_kwargs={"data_files": {"train": str(val), "validation": str(val), "test": [str(val), str(test)]}},
    )
    cfg.pop("tag", None)
    ref = tm.load([cfg])["tasks"][name]

    # the same documents: validation then test, every pair
    n_val = len(_jsonl(val))
    ours_docs, ref_docs = list(ours.eval_docs), list(ref.eval_docs)
    assert ours_docs == ref_docs == _jsonl(val) + _jsonl(test)
    # the same rendering, modulo exactly the instruction
    prefix = f"Translate the following from {src} to {tgt}\n\n"
    picks = sorted({0, 1, n_val - 1, n_val, n_val + 1, len(ours_docs) - 1})  # both sides of the join
    for i in picks:
        d = ours_docs[i]
        assert ours.doc_to_text(d) == prefix + ref.doc_to_text(d)
        assert ours.doc_to_target(d) == ref.doc_to_target(d)
    # the requests: context (built-in + the instruction) and generation settings, zero-shot
    for t in (ours, ref):
        t.set_config(key="num_fewshot", value=0)
        t.set_fewshot_seed(seed=SEED)
        t.build_all_requests(samples=picks, rank=0, world_size=1)
    assert len(ours.instances) == len(ref.instances) == len(picks)
    for a, b in zip(ours.instances, ref.instances):
        (ctx_a, gen_a), (ctx_b, gen_b) = a.arguments, b.arguments
        assert a.doc == b.doc and ctx_a == prefix + ctx_b and gen_a == gen_b
        assert ctx_b.endswith(f"{tgt} phrase:") and gen_a["until"] == ["\n"]
    # the same metrics (sacreBLEU corpus BLEU, chrF, TER) and task settings otherwise
    assert {m["metric"] for m in ours.config.metric_list} == {m["metric"] for m in ref.config.metric_list}
    for key in ("output_type", "generation_kwargs", "repeats", "target_delimiter", "fewshot_delimiter"):
        assert getattr(ours.config, key) == getattr(ref.config, key), key


def test_bootstrap_in_process_gives_lm_evals_pool_values(monkeypatch):
    """Below 2,000 iterations the in-process bootstrap draws the pool's one chunk with the same seed:
    equal standard errors (BLEU's corpus statistic and a mean), DISABLE_MULTIPROC restored after."""
    from lm_eval.api import metrics as M

    monkeypatch.delenv("DISABLE_MULTIPROC", raising=False)
    refs = ["the cat sat on the mat", "a dog ran in the park", "it is raining today", "we like green tea"]
    hyps = ["the cat is on the mat", "a dog runs in a park", "it rains today", "we like tea"]
    pairs = list(zip(refs, hyps)) * 5
    scores = [0.1, 0.7, 0.3, 0.9, 0.4, 0.2, 0.8] * 3
    pooled = [M.bootstrap_stderr(M.bleu, pairs, 1000), M.bootstrap_stderr(M.mean, scores, 1000)]
    with harness.bootstrap_in_process(1000):
        assert os.environ.get("DISABLE_MULTIPROC") == "1"
        here = [M.bootstrap_stderr(M.bleu, pairs, 1000), M.bootstrap_stderr(M.mean, scores, 1000)]
    assert "DISABLE_MULTIPROC" not in os.environ
    assert here == pooled and pooled[0] > 0 and pooled[1] > 0
    with harness.bootstrap_in_process(2000):  # more than one chunk: lm-eval's pool stays
        assert "DISABLE_MULTIPROC" not in os.environ
    monkeypatch.setenv("DISABLE_MULTIPROC", "1")
    with harness.bootstrap_in_process(1000):  # the user's own setting is left alone
        pass
    assert os.environ.get("DISABLE_MULTIPROC") == "1"

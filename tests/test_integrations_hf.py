"""PLW inside transformers' Trainer (pipeline/integrations/hf.py): one optimizer step through
``transformers.Trainer`` with the integration gives the project's gradient (float64, the project's
chunked loss through WeightedLossModel on the same examples), with gradient accumulation 1 and 4;
the collator builds the project's own examples; bad features get a clear error."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from pipeline.integrations.hf import PLWCollator, PLWInputError, count_weights, plw_compute_loss
from pipeline.loss import WeightedLossModel
from pipeline.preprocess import preprocess_records

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.shared]

PLW = 0.1


@pytest.fixture(scope="module")
def tok(llama_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(llama_tokenizer_dir))


@pytest.fixture(scope="module")
def records(instructions_dir):
    rows = [json.loads(x) for x in (instructions_dir / "alpaca52k_torchtune_tiny.jsonl").read_text().splitlines()]
    short = [r for r in rows if len(r["instruction"]) + len(r.get("input", "")) + len(r["output"]) < 300]
    return [{"instruction": r["instruction"], "input": r.get("input", ""), "output": r["output"]} for r in short[:8]]


def tiny_llama(vocab: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg).to(torch.float64)


def project_gradient(model, collator, records):
    """The project's trainer's step gradient: WeightedLossModel (chunked loss from hidden states and the
    head), every example in one batch, normaliser = the step's weight sum."""
    m = copy.deepcopy(model)
    batch = collator(records)
    labels, weights = batch["labels"]["labels"], batch["labels"]["weights"].to(torch.float64)
    out = WeightedLossModel(m)(
        input_ids=batch["input_ids"],
        labels=labels,
        weights=weights,
        normaliser=weights[:, 1:].sum(),
        attention_mask=batch["attention_mask"],
    )
    out["loss"].backward()
    return {n: p.grad.detach().clone() for n, p in m.named_parameters()}


def sgd_step(out_dir, n_records: int, ga: int) -> dict:
    """Trainer arguments for one SGD step over all ``n_records`` (lr 1, no clipping, no decay), so that
    the gradient is ``before - after``; the same for transformers' Trainer and TRL's SFTConfig."""
    return dict(
        output_dir=str(out_dir),
        per_device_train_batch_size=n_records // ga,
        gradient_accumulation_steps=ga,
        max_steps=1,
        learning_rate=1.0,
        optim="sgd",
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        weight_decay=0.0,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )


def trainer_gradient(model, collator, records, tmp_path, ga: int, with_hook: bool = True, head_widths=None):
    """One SGD step (lr 1, no clipping, no decay) through transformers.Trainer: gradient = before - after.
    ``head_widths`` collects the sequence length of every LM-head output (the logits built)."""
    from transformers import Trainer, TrainingArguments

    m = copy.deepcopy(model)
    if head_widths is not None:
        m.lm_head.register_forward_hook(lambda mod, inp, out: head_widths.append(out.shape[1]))
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    args = TrainingArguments(**sgd_step(tmp_path / f"ga{ga}", len(records), ga), remove_unused_columns=False)
    loss_fn = plw_compute_loss(m) if collator.chunked else plw_compute_loss()
    trainer = Trainer(
        model=m, args=args, train_dataset=list(records), data_collator=collator, compute_loss_func=loss_fn
    )
    if with_hook:
        count_weights(trainer)
    trainer.train()
    return {n: before[n] - p.detach() for n, p in m.named_parameters()}


def test_the_collator_builds_the_projects_examples(tok, records):
    collator = PLWCollator(tok, plw=PLW, model_max_length=128)
    want, _ = preprocess_records(records, tok, plw=PLW, model_max_length=128)
    for rec, w in zip(records, want):
        got = collator.example(rec)
        for k in ("input_ids", "labels", "weights", "prompt_mask"):
            assert torch.equal(got[k], w[k]), k
    # TRL's prompt/completion pairs: the prompt is the source, completion + EOS the target
    pc = collator.example({"prompt": "Say hi.", "completion": " Hi!"})
    n_prompt = len(tok("Say hi.")["input_ids"])
    assert pc["input_ids"][-1] == tok.eos_token_id
    assert torch.all(pc["weights"][1:n_prompt] == PLW) and torch.all(pc["weights"][n_prompt:] == 1.0)
    batch = collator(records[:3])
    assert set(batch) == {"input_ids", "attention_mask", "labels"} and set(batch["labels"]) == {"labels", "weights"}
    chunked = PLWCollator(tok, plw=PLW, model_max_length=128, chunked=True)(records[:3])
    assert chunked["output_hidden_states"] is True and chunked["logits_to_keep"] == 1
    with pytest.raises(PLWInputError, match="remove_unused_columns=False") as e:
        collator([{"input_ids": [1, 2]}])
    assert "feature 0" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("chunked", [False, True], ids=["logits", "chunked"])
@pytest.mark.parametrize("ga", [1, 4])
def test_a_trainer_step_has_the_projects_gradient(tok, records, tmp_path, ga, chunked):
    model = tiny_llama(len(tok))
    collator = PLWCollator(tok, plw=PLW, model_max_length=128, chunked=chunked)
    ref = project_gradient(model, collator, records)
    widths: list = []
    got = trainer_gradient(model, collator, records, tmp_path, ga, head_widths=widths)
    assert set(got) == set(ref)
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-9, atol=1e-13, msg=n)
    assert max(g.abs().max().item() for g in ref.values()) > 1e-4  # a gradient that could differ
    # chunked: the head only ever saw the last position (no tokens x vocab logits); else every position
    assert widths and (set(widths) == {1} if chunked else min(widths) > 1)


def test_a_chunked_collator_without_the_model_is_a_clear_error(tok, records):
    collator = PLWCollator(tok, plw=PLW, model_max_length=128, chunked=True)
    model = tiny_llama(len(tok))
    batch = collator(records[:2])
    labels = batch.pop("labels")
    out = model(**batch)
    assert out.logits.shape[1] == 1
    with pytest.raises(PLWInputError, match=r"plw_compute_loss\(model\)"):
        plw_compute_loss()(out, labels, num_items_in_batch=torch.tensor(3.0))


def test_without_the_counting_hook_trainer_normalises_by_a_token_count(tok, records, tmp_path):
    """Without count_weights, Trainer cannot count PLWCollator's labels (num_items_in_batch is None): each
    of the 4 micro-batches divides by its own weight sum and their losses add up, not the study's
    normaliser, so the step differs (with a warning); count_weights is what makes it right."""
    model = tiny_llama(len(tok))
    collator = PLWCollator(tok, plw=PLW, model_max_length=128)
    ref = project_gradient(model, collator, records)
    with pytest.warns(UserWarning, match="count_weights"):
        got = trainer_gradient(model, collator, records, tmp_path, 4, with_hook=False)
    n = "lm_head.weight"
    assert not torch.allclose(got[n], ref[n], rtol=1e-3, atol=0)


def test_the_readme_examples_run_as_written(tok, tmp_path, monkeypatch):
    """README's "Use PLW in your own training" blocks (Trainer, then TRL with the first block's model,
    tokenizer and records), executed with MODEL pointing at a tiny local model (the only change: the
    hub cannot be reached here)."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    blocks = dict(re.findall(r"<!-- readme-example: (\w+) .*?-->\n```python\n(.*?)```", readme, re.S))
    assert set(blocks) == {"trainer", "trl"}
    folder = tmp_path / "tiny"
    tiny_llama(len(tok)).to(torch.float32).save_pretrained(folder)
    tok.save_pretrained(folder)
    model_line = 'MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"'
    assert model_line in blocks["trainer"]
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    exec(compile(blocks["trainer"].replace(model_line, f"MODEL = {str(folder)!r}"), "README.md", "exec"), ns)
    trainer = ns["trainer"]
    assert trainer.state.global_step == 2 and len(ns["records"]) == 16
    assert trainer._get_num_items_in_batch.__func__.__name__ == "_weight_sum_items"
    exec(compile(blocks["trl"], "README.md", "exec"), ns)
    assert ns["trainer"].state.global_step == 2 and type(ns["trainer"]).__name__ == "PLWSFTTrainer"


@pytest.mark.parametrize("ga", [1, 4])
def test_a_trl_sft_trainer_step_has_the_projects_gradient(tok, records, tmp_path, ga):
    """The same through TRL's SFTTrainer (trl 1.16.0, pinned in the `integrations` extra)."""
    from datasets import Dataset
    from trl import SFTConfig

    from pipeline.integrations.hf import sft_trainer_class

    model = tiny_llama(len(tok))
    collator = PLWCollator(tok, plw=PLW, model_max_length=128)
    ref = project_gradient(model, collator, records)
    m = copy.deepcopy(model)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    widths: list = []
    m.lm_head.register_forward_hook(lambda mod, inp, out: widths.append(out.shape[1]))
    args = SFTConfig(**sgd_step(tmp_path / f"sft{ga}", len(records), ga))
    trainer = sft_trainer_class()(
        model=m,
        args=args,
        train_dataset=Dataset.from_list(list(records)),
        processing_class=tok,
        data_collator=collator,
    )
    trainer.train()
    after = dict(m.named_parameters())
    assert widths and set(widths) == {1}  # the chunked loss: no tokens x vocab logits
    for n in ref:
        torch.testing.assert_close(before[n] - after[n].detach(), ref[n], rtol=1e-9, atol=1e-13, msg=n)


def test_the_sft_trainer_needs_the_plw_collator(tok, tmp_path):
    from datasets import Dataset
    from trl import SFTConfig

    from pipeline.integrations.hf import sft_trainer_class

    args = SFTConfig(output_dir=str(tmp_path / "x"), use_cpu=True, report_to=[])
    with pytest.raises(PLWInputError, match="data_collator=PLWCollator"):
        sft_trainer_class()(model=tiny_llama(len(tok)), args=args, train_dataset=Dataset.from_list([{"a": 1}]))

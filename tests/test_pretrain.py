"""The offline pre-training step (pipeline/pretrain/), its trained tokenizer (pipeline.tokenizer) and its
cached checkpoints (pipeline.models)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from pipeline.config import ConfigError, load_config, validate
from pipeline.models import PRETRAIN_LOG, load_pretrained, load_tokenizer_for, pretrained_dir
from pipeline.pretrain import lr_at, pack_blocks
from pipeline.tokenizer import CorpusError, corpus_texts, train_bpe

WORDS = (
    "the cat sat on the mat while a dog ran in the park and birds sang songs about rain "
    "water flows down hills into rivers that reach the sea where fish swim all day long"
).split()


def _corpus(tmp_path: Path, n: int = 120, name: str = "corpus.jsonl") -> Path:
    g = torch.Generator().manual_seed(0)
    lines = []
    for i in range(n):
        idx = torch.randint(0, len(WORDS), (12,), generator=g).tolist()
        lines.append(
            json.dumps(
                {
                    "instruction": f"Say something about item {i}.",
                    "input": "",
                    "output": " ".join(WORDS[j] for j in idx) + ".",
                }
            )
        )
    p = tmp_path / name
    p.write_text("\n".join(lines) + "\n")
    return p


def _model_cfg(corpus: Path, steps: int = 30, **pre):
    spec = {
        "corpus": [str(corpus)],
        "vocab_size": 300,
        "steps": steps,
        "batch_size": 8,
        "seq_len": 32,
        "learning_rate": 3e-3,
        "warmup_steps": 3,
        "seed": 0,
        **pre,
    }
    return OmegaConf.create(
        {
            "name": "pico",
            "source": "scratch",
            "tokenizer": None,
            "init_seed": 0,
            "architecture": {
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "num_key_value_heads": 2,
                "max_position_embeddings": 128,
            },
            "pretrain": spec,
            "dtype": "float32",
        }
    )


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PLW_CACHE_DIR", str(tmp_path / "cache"))


def test_corpus_texts_joins_fields_and_names_bad_records(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text(
        '{"instruction": "Q1", "input": "", "output": "A1"}\n\n{"instruction": "Q2", "input": "x", "output": "A2"}\n'
    )
    assert corpus_texts([str(p)], ["instruction", "input", "output"]) == ["Q1\nA1", "Q2\nx\nA2"]
    bad = tmp_path / "b.jsonl"
    bad.write_text('{"instruction": "Q1", "output": "A1"}\n{"instruction": 3, "output": "A"}\n')
    with pytest.raises(CorpusError, match=r"b\.jsonl: line 2: field 'instruction' must be a string"):
        corpus_texts([str(bad)], ["instruction", "output"])
    broken = tmp_path / "c.jsonl"
    broken.write_text('{"instruction": "Q1"}\n{oops\n')
    with pytest.raises(CorpusError, match=r"c\.jsonl: line 2: not valid JSON"):
        corpus_texts([str(broken)], ["instruction"])
    with pytest.raises(CorpusError, match="does not exist"):
        corpus_texts([str(tmp_path / "missing.jsonl")], ["instruction"])


def test_train_bpe_is_deterministic_llama_like_and_lossless(tmp_path):
    texts = corpus_texts([str(_corpus(tmp_path))], ["instruction", "input", "output"])
    a, b = train_bpe(texts, 300), train_bpe(texts, 300)
    assert a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str()
    assert len(a) == 300
    assert (a.unk_token_id, a.bos_token_id, a.eos_token_id, a.pad_token) == (0, 1, 2, None)
    assert sorted(a("x")) == ["attention_mask", "input_ids"]  # what a LLaMA model's generate() accepts
    sample = "Water flows, the cat sat; ünïcode ✓ and 123."
    ids = a(sample)["input_ids"]
    assert ids[0] == a.bos_token_id and a.eos_token_id not in ids  # BOS prepended, no EOS (as LLaMA)
    assert a.decode(ids, skip_special_tokens=True) == sample  # byte-level: nothing lost
    # the merges compress the corpus it was trained on well below one token per byte
    n_tokens = sum(len(x) for x in a(texts, add_special_tokens=False)["input_ids"])
    assert n_tokens < 0.6 * sum(len(t.encode()) for t in texts)


def test_pack_blocks_and_schedule():
    blocks = pack_blocks([[5, 6, 7], [8], [9, 10]], eos_id=2, seq_len=3)
    assert blocks == [[5, 6, 7], [2, 8, 2], [9, 10, 2]]  # stream 5 6 7 2 | 8 2 | 9 10 2
    assert pack_blocks([[5, 6, 7], [8], [9, 10]], eos_id=2, seq_len=4) == [[5, 6, 7, 2], [8, 2, 9, 10]]  # tail dropped
    assert lr_at(0, 100, 1.0, 10) == pytest.approx(0.1)
    assert lr_at(9, 100, 1.0, 10) == pytest.approx(1.0)
    assert lr_at(10, 100, 1.0, 10) == pytest.approx(1.0)
    assert lr_at(100, 100, 1.0, 10) == pytest.approx(0.1)


def test_pretrained_checkpoint_learns_is_cached_and_reproducible(tmp_path):
    corpus = _corpus(tmp_path)
    cfg = _model_cfg(corpus)
    paths_a = OmegaConf.create({"data_dir": str(tmp_path / "a")})
    paths_b = OmegaConf.create({"data_dir": str(tmp_path / "b")})
    folder = pretrained_dir(cfg, paths_a)
    assert folder.name.startswith("pretrained-")
    log = json.loads((folder / PRETRAIN_LOG).read_text())
    assert log["steps"] == 30 and len(log["losses"]) == 30
    assert log["held_out_loss_after"] < log["held_out_loss_before"] - 0.5  # it learned the corpus
    # a second call reuses the folder (same DONE, nothing rebuilt)
    done = (folder / "DONE").read_text()
    mtime = (folder / "model.safetensors").stat().st_mtime_ns
    assert pretrained_dir(cfg, paths_a) == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == mtime
    # an independent build elsewhere gives bit-identical weights
    other = pretrained_dir(cfg, paths_b)
    assert other.name == folder.name and (other / "DONE").read_text() == done
    # the training entry point loads it with the trained tokenizer (+ Alpaca's [PAD])
    model, tok = load_pretrained(cfg, paths_a)
    assert tok.pad_token == "[PAD]" and len(tok) == 301
    assert model.get_input_embeddings().weight.shape[0] == 301
    from transformers import AutoTokenizer

    from pipeline.tokenizer import tokenizer_fingerprint

    saved = AutoTokenizer.from_pretrained(str(folder))
    assert tokenizer_fingerprint(saved) == tokenizer_fingerprint(load_tokenizer_for(cfg))


def test_definition_follows_corpus_content_and_recipe(tmp_path):
    corpus = _corpus(tmp_path)
    paths = OmegaConf.create({"data_dir": str(tmp_path / "d")})
    base = pretrained_dir(_model_cfg(corpus, steps=5), paths)
    assert pretrained_dir(_model_cfg(corpus, steps=6), paths) != base  # recipe change -> new folder
    # same content at another path -> same checkpoint name; changed content -> another one
    copy = tmp_path / "elsewhere.jsonl"
    copy.write_bytes(corpus.read_bytes())
    assert pretrained_dir(_model_cfg(copy, steps=5), paths).name == base.name
    changed = _corpus(tmp_path, n=121, name="changed.jsonl")
    assert pretrained_dir(_model_cfg(changed, steps=5), paths).name != base.name


def test_config_checks_and_demo_models_compose():
    with pytest.raises(ConfigError, match="model.tokenizer"):
        validate(load_config(["model=tinylm_a", "model.tokenizer=HuggingFaceTB/SmolLM2-135M"]))
    with pytest.raises(ConfigError, match="model.pretrain.vocab_size"):
        validate(load_config(["model=tinylm_a", "model.pretrain.vocab_size=100"]))
    hub = load_config(["model=llama2_7b"])
    from pipeline.config import PretrainConfig

    hub.model.pretrain = PretrainConfig(steps=3, corpus=["x.jsonl"])
    with pytest.raises(ConfigError, match="'model.pretrain': only for model.source=scratch"):
        validate(hub)
    a, b = validate(load_config(["model=tinylm_a"])).model, validate(load_config(["model=tinylm_b"])).model
    assert a.pretrain.corpus == b.pretrain.corpus and a.pretrain.vocab_size == b.pretrain.vocab_size
    assert a.architecture != b.architecture


def test_cli_builds_the_experiments_typed_model_configs_in_worker_processes():
    """`python -m pipeline.pretrain experiment=...` hands each worker process a typed ModelConfig and
    its entry point by reference (spawn: neither may live in ``__main__``)."""
    import pickle

    from pipeline.config import ModelConfig
    from pipeline.pretrain.cli import _build, _model_configs

    models, paths = _model_configs(["experiment=demo_ci"])
    assert [m.name for m in models] == ["tinylm_b"] and isinstance(models[0], ModelConfig)
    assert [m.name for m in _model_configs(["model=tinylm_a"])[0]] == ["tinylm_a"]
    assert _build.__module__ == "pipeline.pretrain.cli" and pickle.loads(pickle.dumps(_build)) is _build
    assert pickle.loads(pickle.dumps((models[0], paths))) == (models[0], paths)


def test_pretrain_log_writes_null_for_a_non_finite_loss_and_the_folder_name_ignores_it(tmp_path, monkeypatch):
    import pipeline.models as models

    corpus = _corpus(tmp_path)
    cfg = _model_cfg(corpus, steps=3)
    clean = pretrained_dir(cfg, OmegaConf.create({"data_dir": str(tmp_path / "a")}))
    real = models.pretrain

    def diverged(*args, **kwargs):
        rec = real(*args, **kwargs)
        rec["held_out_loss_after"] = float("nan")
        rec["losses"][-1] = float("inf")
        return rec

    monkeypatch.setattr(models, "pretrain", diverged)
    folder = pretrained_dir(cfg, OmegaConf.create({"data_dir": str(tmp_path / "b")}))
    assert folder.name == clean.name  # the name hashes the definition, not the log
    text = (folder / PRETRAIN_LOG).read_text()
    log = json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in {PRETRAIN_LOG}"))
    assert log["held_out_loss_after"] is None and log["losses"][-1] is None

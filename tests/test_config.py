"""Every config file composes and validates; typos and out-of-range values fail naming the key."""

from __future__ import annotations

import re

import pytest
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, MissingMandatoryValue, ValidationError

from pipeline.config import CONF_DIR, PLW_LEVELS, ConfigError, compose_config, load_config, validate

GROUPS = ["model", "dataset", "train", "eval", "experiment", "launcher", "paths"]
# Configs that need a value from the user to be complete.
NEEDS = {("dataset", "local_jsonl"): ["dataset.source.path=/tmp/my.jsonl"]}


def _options():
    for group in GROUPS:
        for f in sorted((CONF_DIR / group).glob("*.yaml")):
            yield group, f.stem


@pytest.mark.parametrize("group,name", list(_options()), ids=lambda x: str(x))
def test_every_config_file_composes(group, name):
    cfg = load_config([f"{group}={name}", *NEEDS.get((group, name), [])])
    OmegaConf.resolve(cfg)  # every interpolation resolves
    node = cfg[group]
    if group != "paths":
        # the file's own name is its `name` (runs are identified by it)
        assert node.name == name, f"{group}/{name}.yaml sets name={node.name!r}"


def test_every_group_has_configs():
    for group in GROUPS:
        assert list((CONF_DIR / group).glob("*.yaml")), f"conf/{group}/ is empty"


def test_default_config_is_the_paper_setting():
    cfg = load_config()
    assert cfg.plw == 0.0 and cfg.completion_weight == 1.0 and cfg.seed == 42
    t = cfg.train
    # docs/study.md section 3: the Alpaca recipe
    assert (t.epochs, t.learning_rate, t.global_batch_size, t.per_device_batch_size) == (3, 2e-5, 128, 4)
    assert validate(cfg).train.accumulation_steps(world_size=4) == 8
    assert (t.weight_decay, t.warmup_ratio, t.lr_scheduler, t.model_max_length) == (0.0, 0.03, "cosine", 512)
    assert t.loss_normaliser == "weight_sum" and t.distributed == "fsdp"


def test_main_experiment_is_the_paper_grid():
    cfg = load_config(["experiment=main"])
    e = cfg.experiment
    assert list(e.plw) == PLW_LEVELS
    assert sorted(e.models) == ["llama1_7b", "llama2_7b"]
    assert sorted(e.datasets) == ["alpaca_data", "alpaca_data_cleaned", "alpaca_data_short"]
    assert len(e.plw) * len(e.models) * len(e.datasets) * len(e.seeds) == 60


def test_overrides_apply():
    cfg = load_config(["plw=0.1", "model=llama2_7b", "train.learning_rate=1e-5"])
    assert cfg.plw == 0.1 and cfg.model.hub_id == "meta-llama/Llama-2-7b-hf"
    assert cfg.train.learning_rate == 1e-5


@pytest.mark.parametrize(
    "override,key",
    [
        ("plw=-0.1", "plw"),
        ("plw=nan", "plw"),
        ("completion_weight=0", "completion_weight"),
        ("train.learning_rate=-1", "train.learning_rate"),
        ("train.loss_normaliser=mean", "train.loss_normaliser"),
        ("train.truncation=cut", "train.truncation"),
        ("dataset.empty_output=ignore", "dataset.empty_output"),
        ("dataset.transform.target_rg=-2", "dataset.transform.target_rg"),
        ("model.source=ftp", "model.source"),
        ("launcher.max_parallel=0", "launcher.max_parallel"),
        ("dataset.source.sha256=abc", "dataset.source.sha256"),
        ("model.gguf_sha256=" + "A" * 64, "model.gguf_sha256"),
        ("train.save_dtype=int8", "train.save_dtype"),
    ],
)
def test_out_of_range_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        load_config([override])


def test_negative_plw_in_an_experiment_grid_names_the_index():
    with pytest.raises(ConfigError, match=r"experiment.plw\[1\]"):
        load_config(["experiment=main", "experiment.plw=[0.0,-1.0]"])


def test_unknown_key_fails_naming_it():
    with pytest.raises((ConfigKeyError, HydraException), match="learning_rte"):
        load_config(["train.learning_rte=1e-5"])


@pytest.mark.parametrize(
    "override,key",
    [
        ("+train.learning_rte=1", "train.learning_rte"),  # the form Hydra's own error message suggests
        ("+learning_rte=1", "learning_rte"),
        ("+model.foo.bar=1", "model.foo"),
        ("+dataset.source.paht=x.jsonl", "dataset.source.paht"),
    ],
)
def test_an_unknown_key_is_refused_however_it_is_spelled(override, key):
    with pytest.raises(ConfigError, match=f"config key '{re.escape(key)}': unknown key") as ei:
        compose_config([override])
    assert "\n" not in str(ei.value)
    with pytest.raises(ConfigError, match=re.escape(key)):
        load_config([override])


def test_the_unknown_key_message_suggests_the_near_field():
    with pytest.raises(ConfigError, match="did you mean 'train.learning_rate'"):
        load_config(["+train.learning_rte=1"])


def test_validate_refuses_a_key_added_to_a_composed_config():
    cfg = compose_config([])
    OmegaConf.update(cfg, "train.learning_rte", 1.0, force_add=True)  # as Hydra's +key=value does
    with pytest.raises(ConfigError, match="'train.learning_rte'"):
        validate(cfg)


def test_keys_of_dict_typed_fields_may_be_added():
    cfg = load_config(["+eval.shots.arc_challenge=3", "+eval.metrics.arc_challenge=[acc]"])
    assert cfg.eval.shots.arc_challenge == 3 and list(cfg.eval.metrics.arc_challenge) == ["acc"]
    cfg = load_config(["experiment=regularizers", "+experiment.variants.wd_005={weight_decay:0.05}"])
    assert cfg.experiment.variants.wd_005.weight_decay == 0.05
    with pytest.raises(ConfigError, match=r"'eval.shots.arc_challenge'.*\+eval.shots.arc_challenge="):
        load_config(["eval.shots.arc_challenge=3"])  # not set yet: says to add it with +


def test_composition_errors_are_one_line_naming_the_key():
    for override, key in [("plw=abc", "plw"), ("train.epochs=[1,2]", "train.epochs"), ("model=nosuch", "model")]:
        with pytest.raises(ConfigError, match=f"config key '{key}'") as ei:
            load_config([override])
        assert "\n" not in str(ei.value)


def test_wrong_type_fails_naming_the_key():
    with pytest.raises((ValidationError, HydraException), match="epochs"):
        load_config(["train.epochs=three"])


def test_unknown_dataset_fails_at_composition():
    with pytest.raises(HydraException, match="dataset"):
        load_config(["dataset=no_such_dataset"])


def test_missing_mandatory_value_names_the_key():
    with pytest.raises((MissingMandatoryValue, ConfigError), match="dataset.source.path"):
        load_config(["dataset=local_jsonl"])


def test_experiment_naming_an_unknown_model_fails():
    with pytest.raises(ConfigError, match="experiment.models"):
        load_config(["experiment=main", "experiment.models=[llama9_70b]"])


def test_global_batch_must_split_evenly():
    with pytest.raises(ConfigError, match="train.global_batch_size"):
        load_config(["train.global_batch_size=10", "train.per_device_batch_size=4"])
    train = validate(load_config()).train
    with pytest.raises(ConfigError, match="train.global_batch_size"):
        train.accumulation_steps(world_size=3)


def test_experiment_means_the_same_to_train_as_to_the_sweep(tmp_path):
    """`python -m pipeline.train experiment=demo ...` applies the experiment's overrides (train=demo)
    before the command line's, as the sweep does for each run: the same run folder."""
    from pipeline.runs import run_id
    from pipeline.sweep.plan import make_plan

    assert load_config(["experiment=demo"]).train.name == "demo"
    assert load_config(["experiment=demo", "train=cpu_small"]).train.name == "cpu_small"  # the command line wins
    assert load_config(["experiment=demo", "train.max_steps=3"]).train.name == "demo"
    point = ["model=tinylm_a", "dataset=shared_alpaca52k_short", "plw=0.1"]
    rid = run_id(load_config(["experiment=demo", f"paths.runs_dir={tmp_path}", *point]))
    plan = make_plan(["experiment=demo", f"paths.runs_dir={tmp_path}"])
    assert rid in {r.run_id for r in plan.runs}


@pytest.mark.parametrize("experiment", ["main", "demo", "alt_datasets", "optimal_plw"])
def test_plw_levels_are_written_once(experiment):
    assert list(load_config([f"experiment={experiment}"]).experiment.plw) == PLW_LEVELS
    for f in (CONF_DIR / "experiment").glob("*.yaml"):
        assert "2.463e-1" not in f.read_text(), f"{f.name} repeats the PLW levels: use the schema's default"


def test_allowed_values_come_from_their_owner_modules():
    import torch

    from pipeline.config import DTYPES
    from pipeline.loss import NORMALISERS
    from pipeline.models import torch_dtype
    from pipeline.preprocess import TRUNCATION_POLICIES

    for n in NORMALISERS:
        assert validate(load_config([f"train.loss_normaliser={n}"])).train.loss_normaliser == n
    for t in TRUNCATION_POLICIES:
        assert validate(load_config([f"train.truncation={t}"])).train.truncation == t
    for d in DTYPES:
        assert torch_dtype(validate(load_config([f"model.dtype={d}"])).model) == getattr(torch, d)
        load_config([f"model.dtype={d}", f"train.save_dtype={d}", f"eval.dtype={d}"])
    with pytest.raises(ConfigError, match="'eval.dtype'"):
        load_config(["eval.dtype=int8"])


def test_the_config_layer_does_not_import_the_eval_stage():
    import subprocess
    import sys

    code = (
        "import sys, pipeline.config as c; c.load_config(); "
        "print(sorted(m for m in sys.modules if m.startswith('pipeline.eval')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_show_config_prints_the_composed_config_and_names_a_bad_key(capsys):
    from pipeline.show_config import main

    assert main(["experiment=demo"]) == 0
    assert OmegaConf.create(capsys.readouterr().out).train.name == "demo"
    assert main(["train.learning_rte=1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "learning_rte" in err and "Traceback" not in err

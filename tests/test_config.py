"""Every config file composes and validates; typos and out-of-range values fail naming the key."""
from __future__ import annotations

import pytest
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, MissingMandatoryValue, ValidationError

from pipeline.config import CONF_DIR, PLW_LEVELS, ConfigError, load_config, validate

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

"""Unit tests of the sweep's pure parts: grid, estimates, states/decisions, table, SLURM id parsing,
and the planning of real experiment configs (composition, run ids) without launching anything."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from pipeline.config import PLW_LEVELS, ConfigError, load_config
from pipeline.runs import RunDir, run_id
from pipeline.sweep import estimate as est
from pipeline.sweep.grid import BASELINE, enumerate_grid, format_value, split_overrides, variant_key, variants_of
from pipeline.sweep.plan import make_plan, merge_overrides
from pipeline.sweep.slurm import expand_job_ids, parse_state_lines, sbatch_parameters
from pipeline.sweep.store import Liveness, Row, classify, decide, format_table, liveness

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------------------------
# grid
# ------------------------------------------------------------------------------------------------
def test_main_grid_is_60_runs_in_factor_order():
    exp = {
        "plw": PLW_LEVELS,
        "models": ["llama1_7b", "llama2_7b"],
        "datasets": ["alpaca_data", "alpaca_data_cleaned", "alpaca_data_short"],
        "seeds": [42],
    }
    pts = enumerate_grid(exp)
    assert len(pts) == 60
    assert len({(p.model, p.dataset, p.plw, p.seed) for p in pts}) == 60
    assert all(p.variant == BASELINE and p.variant_overrides == () for p in pts)
    assert [p.plw for p in pts[:10]] == PLW_LEVELS
    assert (pts[0].model, pts[0].dataset) == ("llama1_7b", "alpaca_data")
    assert (pts[-1].model, pts[-1].dataset, pts[-1].plw) == ("llama2_7b", "alpaca_data_short", 1.0)


def test_variants_become_train_overrides_and_keep_the_baseline():
    exp = {
        "plw": [0.0, 1.0],
        "models": ["m"],
        "datasets": ["d"],
        "seeds": [1, 2],
        "variants": {"wd": {"weight_decay": 0.1}, "broken": {"dataset.source.path": "/x y.jsonl"}},
    }
    pts = enumerate_grid(exp)
    assert len(pts) == 2 * 2 * 3
    assert [v for v, _ in variants_of(exp)] == ["none", "wd", "broken"]
    wd = [p for p in pts if p.variant == "wd"][0]
    assert wd.overrides() == ["model=m", "dataset=d", "plw=0.0", "seed=1", "train.weight_decay=0.1"]
    broken = [p for p in pts if p.variant == "broken"][0]
    assert broken.overrides()[-1] == "dataset.source.path='/x y.jsonl'"
    no_base = dict(exp, include_baseline=False)
    assert {p.variant for p in enumerate_grid(no_base)} == {"wd", "broken"}


def test_variant_keys():
    assert variant_key("label_smoothing") == "train.label_smoothing"
    assert variant_key("dataset.max_records") == "dataset.max_records"
    with pytest.raises(ValueError, match="dotted key"):
        variant_key("launcher.partition")


@pytest.mark.parametrize("axis", ["plw", "models", "seeds"])
def test_duplicate_or_empty_axis_is_an_error(axis):
    exp = {"plw": [0.0, 0.1], "models": ["m"], "datasets": ["d"], "seeds": [1]}
    dup = dict(exp, **{axis: exp[axis] + exp[axis][:1]})
    with pytest.raises(ValueError, match=f"experiment.{axis}"):
        enumerate_grid(dup)
    with pytest.raises(ValueError, match=f"experiment.{axis}"):
        enumerate_grid(dict(exp, **{axis: []}))


@pytest.mark.parametrize(
    "value,text",
    [
        (0.0, "0.0"),
        (2.236e-3, "0.002236"),
        (5e-4, "0.0005"),
        (True, "true"),
        (None, "null"),
        (3, "3"),
        ("abc", "abc"),
        ("1e3", "'1e3'"),
        ("null", "'null'"),
        ([1, 0.5], "[1,0.5]"),
    ],
)
def test_format_value_reads_back_unchanged(value, text):
    assert format_value(value) == text


def test_format_value_round_trips_through_hydra():
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    for v in [0.0, 2.463e-2, 1e-12, 7, True, None, "it's a path/with space", "1e3", [0.1, "x"]]:
        ov = parser.parse_override(f"k={format_value(v)}")
        assert ov.value() == v, (v, format_value(v))


def test_split_and_merge_overrides():
    grid, per_run = split_overrides(
        ["experiment=main", "experiment.models=[llama2_7b]", "launcher=slurm", "train.save_steps=10"]
    )
    assert grid == ["experiment=main", "experiment.models=[llama2_7b]"]
    assert per_run == ["launcher=slurm", "train.save_steps=10"]
    assert merge_overrides(["train=cpu_small", "plw=0.5"], ["train=alpaca"], ["plw=0.1"]) == ["train=alpaca", "plw=0.1"]


# ------------------------------------------------------------------------------------------------
# estimates
# ------------------------------------------------------------------------------------------------
def test_gpu_hours_formula_against_a_hand_computation():
    # AlpacaData (Table 1): 52,002 instances, 84.16 tokens each + template; LLaMA 7B; 3 epochs.
    stats = est.TokenStats(n_records=52_002, mean_tokens=100.0, source="x")
    e = est.estimate(
        stats, params_billion=6.74, epochs=3, max_steps=-1, global_batch_size=128, peak_tflops=312.0, mfu=0.5, gpus=4
    )
    tokens = 52_002 * 3 * 100.0
    flops = 6 * 6.74e9 * tokens
    assert e.tokens == pytest.approx(tokens) and e.flops == pytest.approx(flops)
    assert e.gpu_hours == pytest.approx(flops / (312e12 * 0.5) / 3600)
    assert e.wall_hours == pytest.approx(e.gpu_hours / 4)
    # max_steps overrides epochs; the cap at model_max_length applies to the mean
    e2 = est.estimate(stats, 1.0, 3, 10, 8, 100.0, 1.0, max_length=64)
    assert e2.examples == 80 and e2.tokens == 80 * 64 and e2.wall_hours is None
    with pytest.raises(ValueError):
        est.gpu_hours(1.0, 0.0, 0.5)


def test_table1_stats_recover_the_instance_counts():
    s = est.table1_stats("alpaca_data")
    assert s.n_records == 52_002  # 4,376,482 / 84.16
    assert est.table1_stats("dolly").n_records == pytest.approx(15_011, abs=15)
    assert est.table1_stats("my_own_data") is None


def test_example_tokens_and_capped_mean():
    assert est.example_tokens(10, 0, 5) == 15 + est.TEMPLATE_TOKENS_NO_INPUT
    assert est.example_tokens(10, 3, 5) == 18 + est.TEMPLATE_TOKENS_WITH_INPUT
    assert est.capped_mean([10, 100, 1000], 512) == pytest.approx((10 + 100 + 512) / 3)
    assert est.chars_to_tokens(9) == 3


def test_template_token_constants_match_the_llama_tokenizer(llama_tokenizer_dir):
    from transformers import AutoTokenizer

    from pipeline.preprocess import PROMPT_DICT

    tok = AutoTokenizer.from_pretrained(str(llama_tokenizer_dir))
    n_in = len(tok(PROMPT_DICT["prompt_input"].format(instruction="", input=""))["input_ids"]) + 1  # + EOS
    n_no = len(tok(PROMPT_DICT["prompt_no_input"].format(instruction=""))["input_ids"]) + 1
    assert (n_in, n_no) == (est.TEMPLATE_TOKENS_WITH_INPUT, est.TEMPLATE_TOKENS_NO_INPUT)


# ------------------------------------------------------------------------------------------------
# states and decisions
# ------------------------------------------------------------------------------------------------
RUN = {"state": "running", "host": "h", "pid": 1}


@pytest.mark.parametrize(
    "status,live,expected",
    [
        ({"state": "done"}, Liveness(), "done"),
        ({"state": "failed", "error": "x"}, Liveness(lock_held=True), "failed"),
        ({"state": "pending"}, Liveness(), "pending"),
        ({"state": "pending", "interrupted": {"step": 2}}, Liveness(), "interrupted"),
        ({"state": "pending", "slurm_job_id": "5_1"}, Liveness(slurm_alive=True), "queued"),
        ({"state": "pending", "slurm_job_id": "5_1"}, Liveness(slurm_alive=False), "pending"),
        ({"state": "pending", "interrupted": {"step": 2}, "slurm_job_id": "5"}, Liveness(slurm_alive=True), "queued"),
        (RUN, Liveness(lock_held=True, pid_alive=False), "running"),
        (RUN, Liveness(lock_held=False, pid_alive=True), "running"),  # a trainer run by hand
        (RUN, Liveness(lock_held=False, pid_alive=False, heartbeat_age=1.0), "stale"),
        (RUN, Liveness(slurm_alive=False, heartbeat_age=1.0), "stale"),
        (RUN, Liveness(slurm_alive=True, heartbeat_age=1e9), "running"),
        (RUN, Liveness(heartbeat_age=601.0), "stale"),  # another host, no SLURM: the heartbeat decides
        (RUN, Liveness(heartbeat_age=10.0), "running"),
        (RUN, Liveness(), "running"),  # nothing to go on: never start a second copy blindly
    ],
)
def test_classify(status, live, expected):
    assert classify(status, live, stale_after_s=600.0) == expected


def test_classify_rejects_an_unknown_state():
    with pytest.raises(ValueError, match="sleeping"):
        classify({"state": "sleeping"}, Liveness(), 60)


@pytest.mark.parametrize(
    "effective,failures,action",
    [
        ("done", 0, "skip"),
        ("running", 0, "wait"),
        ("queued", 0, "wait"),
        ("pending", 0, "launch"),
        ("interrupted", 5, "resume"),
        ("failed", 1, "retry"),
        ("failed", 2, "retry"),
        ("failed", 3, "give_up"),
        ("stale", 1, "resume"),
        ("stale", 2, "give_up"),
    ],
)
def test_decide_counts_failed_attempts_against_max_retries(effective, failures, action):
    assert decide(effective, failures, max_retries=2) == action


def test_liveness_of_a_dead_local_process_and_of_a_held_lock(tmp_path):
    import socket

    rd = RunDir(tmp_path / "r")
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    status = {"state": "running", "host": socket.gethostname(), "pid": proc.pid}
    live = liveness(rd, status)
    assert live.lock_held is False and live.pid_alive is False
    assert classify(status, live, 600) == "stale"
    fd = rd.try_lock()
    try:
        assert rd.try_lock() is None  # flock is per open file: a second taker fails
        # another process sees it held
        out = subprocess.run(
            [
                sys.executable,
                "-c",
                "import sys; from pipeline.runs import RunDir; "
                f"sys.exit(0 if RunDir(__import__('pathlib').Path({str(rd.path)!r})).lock_held() else 1)",
            ],
            cwd=REPO,
        )
        assert out.returncode == 0
        assert classify(status, liveness(rd, status), 600) == "running"
    finally:
        RunDir.unlock(fd)
    assert rd.lock_held() is False


def test_format_table_shows_progress_error_and_counts():
    rows = [
        Row("a", "tiny", "d", 0.1, "none", 42, "done", 1, 0, 8, 8, 1.2345),
        Row(
            "b",
            "tiny",
            "d",
            1.0,
            "wd",
            42,
            "failed",
            2,
            2,
            None,
            None,
            None,
            error="SourceError: /nonexistent.jsonl: no such file\nTraceback ...",
        ),
        Row("c", "tiny", "d", 0.0, "none", 42, "running", 1, 0, 3, 8, 2.0, job="7_2"),
    ]
    text = format_table(rows, show_cost=True)
    lines = text.splitlines()
    assert "8/8" in lines[2] and "1.2345" in lines[2]
    assert "2 (2 failed)" in lines[3] and "SourceError: /nonexistent.jsonl" in lines[3]
    assert "3/8" in lines[4] and "7_2" in lines[4]
    assert lines[-1] == "3 runs: 1 done, 1 running, 1 failed"


# ------------------------------------------------------------------------------------------------
# SLURM helpers (pure)
# ------------------------------------------------------------------------------------------------
def test_array_ids_expand():
    assert expand_job_ids("12_[0-2,5%4]") == ["12_0", "12_1", "12_2", "12_5"]
    assert expand_job_ids("12_3") == ["12_3"] and expand_job_ids("13") == ["13"]
    text = "12_[3-4%2]|PENDING\n12_0|RUNNING\n12_0.batch|RUNNING\n13|CANCELLED by 0\n"
    assert parse_state_lines(text) == {"12_3": "PENDING", "12_4": "PENDING", "12_0": "RUNNING", "13": "CANCELLED by 0"}


def test_sbatch_parameters_from_model_resources_and_launcher():
    cfg = load_config(
        [
            "launcher=slurm",
            "launcher.partition=gpu",
            "launcher.account=proj",
            "launcher.qos=high",
            "+launcher.additional_parameters.constraint=a100",
            "model=llama2_7b",
        ]
    )
    r = cfg.model.resources
    p = sbatch_parameters((1, r.gpus_per_node, r.cpus_per_task, r.mem_gb, r.timeout_min), cfg.launcher, "plw-main")
    assert p["gpus_per_node"] == 4 and p["cpus_per_task"] == 32 and p["mem"] == "320GB" and p["time"] == 1440
    assert (p["partition"], p["account"], p["qos"]) == ("gpu", "proj", "high")
    assert p["additional_parameters"] == {"constraint": "a100"} and p["array_parallelism"] == 64
    cpu = sbatch_parameters((1, 0, 2, 4, 30), cfg.launcher, "x")
    assert "gpus_per_node" not in cpu
    with pytest.raises(ConfigError, match="model.resources.nodes"):
        sbatch_parameters((2, 4, 32, 320, 60), cfg.launcher, "x")


# ------------------------------------------------------------------------------------------------
# config and planning of the real experiment configs (no launch)
# ------------------------------------------------------------------------------------------------
def test_launcher_and_experiment_schema_checks():
    with pytest.raises(ConfigError, match="launcher.stale_after_s"):
        load_config(["launcher.heartbeat_s=100", "launcher.stale_after_s=50"])
    with pytest.raises(ConfigError, match="launcher.mfu"):
        load_config(["launcher.mfu=1.5"])
    with pytest.raises(ConfigError, match="experiment.variants.none"):
        load_config(["experiment=regularizers", "+experiment.variants.none={weight_decay: 0.1}"])


def test_demo_experiment_is_the_embedded_default():
    cfg = load_config(["experiment=demo"])
    e = cfg.experiment
    assert list(e.models) == ["tinylm_a", "tinylm_b"]
    assert {"shared_alpaca52k", "shared_alpaca52k_short"} <= set(e.datasets)
    assert len(e.plw) >= 3 and list(e.overrides) == ["train=demo"]


def test_plan_of_the_main_grid_matches_single_run_ids_and_ignores_runtime_settings(tmp_path):
    """The fast path (compose once per model/dataset, set plw/seed) gives the run ids that plain
    Hydra overrides give (python -m pipeline.train ...); runtime overrides change none of them."""
    runs = f"paths.runs_dir={tmp_path}"
    plan = make_plan(["experiment=main", runs])
    assert len(plan.runs) == 60 and len({r.run_id for r in plan.runs}) == 60
    assert all(r.action == "launch" and r.effective == "pending" for r in plan.runs)
    for pr in (plan.runs[0], plan.runs[17], plan.runs[-1]):
        single = load_config([*pr.point.overrides(), runs])
        assert run_id(single, pr.point.variant) == pr.run_id
    sub = ["experiment=main", "experiment.datasets=[alpaca_data_short]", "experiment.models=[llama2_7b]", runs]
    subset = [r.run_id for r in plan.runs if r.point.dataset == "alpaca_data_short" and r.point.model == "llama2_7b"]
    moved = make_plan(
        [
            *sub,
            "launcher=slurm",
            "launcher.partition=big",
            "train.per_device_batch_size=2",
            "model.resources.gpus_per_node=8",
            "train.save_steps=7",
        ]
    )
    assert [r.run_id for r in moved.runs] == subset
    changed = make_plan([*sub, "train.learning_rate=1e-5"])
    assert not {r.run_id for r in changed.runs} & set(subset)


def test_grid_axes_are_overridable_from_the_command_line(tmp_path):
    plan = make_plan(
        ["experiment=main", "experiment.models=[llama2_7b]", "experiment.plw=[0.0,0.1]", f"paths.runs_dir={tmp_path}"]
    )
    assert [(r.point.model, r.point.dataset, r.point.plw) for r in plan.runs] == [
        ("llama2_7b", d, w) for d in ("alpaca_data", "alpaca_data_cleaned", "alpaca_data_short") for w in (0.0, 0.1)
    ]


def test_regularizer_variants_in_the_plan(tmp_path):
    plan = make_plan(["experiment=regularizers", "experiment.models=[llama1_7b]", f"paths.runs_dir={tmp_path}"])
    assert len(plan.runs) == 2 * 9  # PLW x (baseline + 8 variants)
    wd = [r for r in plan.runs if r.point.variant == "weight_decay_0.1"][0]
    assert wd.cfg.train.weight_decay == 0.1 and "weight_decay_0.1" in wd.run_id
    # the same run as `python -m pipeline.train <the point's overrides> variant=weight_decay_0.1`
    assert run_id(load_config([*wd.point.overrides(), f"paths.runs_dir={tmp_path}"]), wd.point.variant) == wd.run_id
    base = [
        r
        for r in plan.runs
        if r.point.variant == "none" and r.point.plw == wd.point.plw and r.point.model == wd.point.model
    ][0]
    assert base.cfg.train.weight_decay == 0.0 and base.run_id != wd.run_id
    # the baseline is the very run of the main grid
    main = make_plan(
        [
            "experiment=main",
            "experiment.models=[llama1_7b]",
            "experiment.datasets=[alpaca_data_short]",
            f"paths.runs_dir={tmp_path}",
        ]
    )
    assert base.run_id in {r.run_id for r in main.runs}


def test_dry_run_prints_the_grid_with_estimates_and_launches_nothing(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PLW_RUNS_DIR=str(tmp_path))
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.sweep",
            "--dry-run",
            "experiment=main",
            "experiment.datasets=[alpaca_data]",
            "launcher.mfu=0.5",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("llama")]
    assert len(lines) == 20 and all(" pending " in ln for ln in lines)
    # GPU-hours of one AlpacaData run from Table 1 (no download here), recomputed independently
    s = est.table1_stats("alpaca_data")
    want = 6 * 6.74e9 * s.n_records * 3 * s.mean_tokens / (312e12 * 0.5) / 3600
    assert f"{want:.3g}" in lines[0].split()
    assert "nothing launched" in out.stdout
    # nothing was written (a dry run works on a read-only store)
    assert list(tmp_path.iterdir()) == []
    # and `make status` shows the grid before any sweep
    st = subprocess.run(
        [sys.executable, "-m", "pipeline.sweep", "status", "experiment=main", "experiment.datasets=[alpaca_data]"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert st.returncode == 0, st.stderr
    assert "20 runs: 20 pending" in st.stdout


def test_stale_running_run_is_detected_marked_failed_and_relaunched(tmp_path):
    """status running, its process gone (SIGKILL, node failure): the next sweep sees it stale."""
    from pipeline.sweep.plan import mark_stale, prepare_launch, refresh

    ov = [
        "experiment=demo",
        "experiment.plw=[0.1]",
        "experiment.datasets=[shared_alpaca52k]",
        f"paths.runs_dir={tmp_path}",
    ]
    plan = make_plan(ov)
    pr = plan.runs[0]
    prepare_launch(pr, plan.root.launcher)
    victim = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from pipeline.runs import RunDir; import pathlib, time; "
            f"rd = RunDir(pathlib.Path({str(pr.rd.path)!r})); fd = rd.try_lock(); "
            "rd.set_status('running'); rd.write_heartbeat(); time.sleep(60)",
        ],
        cwd=REPO,
    )
    for _ in range(100):
        if pr.rd.status().get("state") == "running":
            break
        time.sleep(0.1)
    assert make_plan(ov).runs[0].effective == "running"  # alive: left alone
    victim.kill()
    victim.wait()
    again = make_plan(ov).runs[0]
    assert again.effective == "stale" and again.action == "resume"
    mark_stale(again)
    refresh(again, 2, 600.0)
    st = again.rd.status()
    assert st["state"] == "failed" and st["failures"] == 1 and st["error"].startswith("stale:")
    assert again.action == "retry"


# ------------------------------------------------------------------------------------------------
# the worker process: busy runs and workers killed before they could record anything
# ------------------------------------------------------------------------------------------------
@pytest.fixture
def prepared_run(tmp_path):
    from pipeline.sweep.plan import prepare_launch

    plan = make_plan(
        [
            "experiment=demo",
            "experiment.plw=[0.1]",
            "experiment.datasets=[shared_alpaca52k]",
            f"paths.runs_dir={tmp_path}",
        ]
    )
    pr = plan.runs[0]
    prepare_launch(pr, plan.root.launcher)
    return pr


def test_a_run_held_by_another_process_is_not_started_twice(prepared_run):
    from pipeline.sweep.supervise import Supervisor

    rd = prepared_run.rd
    before = rd.status_file.read_bytes()
    fd = rd.try_lock()
    try:
        sup = Supervisor(rd).start()
        assert sup.wait(120) == 79
        assert sup.finalize() == "busy"
    finally:
        RunDir.unlock(fd)
    assert rd.status_file.read_bytes() == before
    assert "another process holds" in sup.log_path.read_text()


def test_a_killed_worker_is_recorded_as_a_failed_attempt(prepared_run):
    import signal

    from pipeline.sweep.supervise import Supervisor

    rd = prepared_run.rd
    sup = Supervisor(rd).start()
    time.sleep(0.5)
    sup.send(signal.SIGKILL)  # e.g. the kernel's OOM killer: nothing recorded by the run itself
    assert sup.wait(60) == -signal.SIGKILL
    assert sup.finalize() == "failed"
    st = rd.status()
    assert st["state"] == "failed" and st["failures"] == 1
    assert "killed by SIGKILL" in st["error"] and str(sup.log_path) in st["error"]
    assert not rd.lock_held()  # the lock died with the process


def test_a_stop_sent_while_the_worker_imports_is_kept_not_fatal(prepared_run):
    """The supervisor starts a worker with SIGTERM/SIGUSR1 blocked until it catches them, so a stop
    sent while it still imports torch makes it exit 75 without starting the run (not killed, not a
    failed attempt)."""
    import signal

    from pipeline.sweep.supervise import Supervisor

    rd = prepared_run.rd
    before = rd.status_file.read_bytes()
    sup = Supervisor(rd).start()
    sup.send(signal.SIGTERM)  # at once: the worker is still starting Python
    assert sup.wait(120) == 75, sup.log_path.read_text()
    assert sup.finalize() == "interrupted"
    assert rd.status_file.read_bytes() == before and not rd.metrics.exists()
    assert "not starting" in sup.log_path.read_text()


def test_one_reader_of_a_run_config(prepared_run):
    """RunDir.load_config: the latest launch's config (launch.yaml) else config.yaml, validated; an
    invalid file is a one-line error naming it and the key."""
    from pipeline.runs import create_run

    rd = prepared_run.rd
    cfg = rd.load_config()
    assert float(cfg.plw) == 0.1 and cfg.model.name == prepared_run.cfg.model.name
    assert create_run(cfg).path == rd.path  # the same run
    rd.launch_config.write_text(rd.launch_config.read_text().replace("plw: 0.1", "plw: -1.0"))
    with pytest.raises(ConfigError) as e:
        rd.load_config()
    assert str(rd.launch_config) in str(e.value) and "plw" in str(e.value) and "\n" not in str(e.value)
    assert float(rd.load_config(latest=False).plw) == 0.1  # config.yaml: the config it was created with
    rd.launch_config.unlink()
    assert float(rd.load_config().plw) == 0.1
    rd.config.unlink()
    with pytest.raises(FileNotFoundError, match="config.yaml"):
        rd.load_config()


# ------------------------------------------------------------------------------------------------
# bad input in the store: a corrupt status.json, a read-only store
# ------------------------------------------------------------------------------------------------
def test_a_corrupt_status_is_its_own_state_and_never_launched():
    from pipeline.runs import CORRUPT

    assert classify({"state": CORRUPT, "error": "x"}, Liveness(lock_held=False), 600) == CORRUPT
    assert decide(CORRUPT, 0, 2) == "report"


def _two_runs(tmp_path):
    from pipeline.sweep.plan import prepare_launch

    ov = [
        "experiment=demo",
        "experiment.plw=[0.1,0.2]",
        "experiment.models=[tinylm_a]",
        "experiment.datasets=[shared_alpaca52k]",
        f"paths.runs_dir={tmp_path}",
    ]
    plan = make_plan(ov)
    assert len(plan.runs) == 2
    for pr in plan.runs:
        prepare_launch(pr, plan.root.launcher)
    return ov, plan.runs


def test_one_corrupt_status_is_reported_and_the_other_runs_go_on(tmp_path, capsys):
    from pipeline.sweep.__main__ import main
    from pipeline.sweep.store import store_rows

    ov, (bad, good) = _two_runs(tmp_path)
    bad.rd.status_file.write_text('{"state": "runn')  # edited by hand, a disk fault
    plan = {pr.run_id: pr for pr in make_plan(ov).runs}
    assert (plan[bad.run_id].effective, plan[bad.run_id].action) == ("corrupt", "report")
    assert (plan[good.run_id].effective, plan[good.run_id].action) == ("pending", "launch")
    rows = {r.run_id: r for r in store_rows(tmp_path)}
    assert rows[bad.run_id].state == "corrupt" and str(bad.rd.status_file) in rows[bad.run_id].error
    assert rows[good.run_id].state == "pending"
    # make status, and a dry run of make sweep: the table, the corrupt run named with its file
    for argv in (["status", f"paths.runs_dir={tmp_path}"], ["status", *ov], ["--dry-run", *ov]):
        assert main(argv) == 0, argv
        out = capsys.readouterr()
        table = [ln for ln in out.out.splitlines() if bad.run_id in ln]
        assert table and " corrupt " in table[0], out.out
        assert "1 corrupt" in out.out and "1 pending" in out.out
    assert str(bad.rd.status_file) in out.err  # the dry run says which file


def _snapshot(root):
    return {
        str(p.relative_to(root)): (p.stat().st_mtime_ns, p.read_bytes() if p.is_file() else None)
        for p in sorted(root.rglob("*"))
    }


def test_a_dry_run_writes_nothing_into_the_store(tmp_path, capsys):
    """A dry run on a read-only store must work: it writes nothing (tests run as root, where a
    read-only mode stops nothing, so the test checks that no file is created or changed)."""
    from pipeline.sweep.__main__ import main

    ov, _ = _two_runs(tmp_path)
    before = _snapshot(tmp_path)
    assert main(["--dry-run", *ov]) == 0
    assert "nothing launched" in capsys.readouterr().out
    assert _snapshot(tmp_path) == before
    assert main(["status", *ov]) == 0  # the grid without a sweep manifest
    assert "2 runs: 2 pending" in capsys.readouterr().out
    assert _snapshot(tmp_path) == before


def test_the_evaluation_estimate_counts_what_the_model_generates():
    """Generations and new tokens per run from the benchmarks' declared full sizes (AlpacaEval 805, PandaLM
    170, TruthfulQA-Gen 817, the six WMT directions' validation + test, 10,000 memorization prompts),
    with eval.limit, max_gen_toks and the training set's size applied; hours at eval_tokens_per_s."""
    from pipeline.sweep.plan import eval_cost, eval_generations

    full = load_config(["model=llama2_7b", "dataset=alpaca_data"])
    got = {b: (n, t) for b, n, t in eval_generations(full, None)}
    wmt = {"wmt14_en_fr": 6003, "wmt14_fr_en": 6003, "wmt16_en_de": 5168, "wmt16_de_en": 5168}
    wmt.update(wmt16_en_ro=3998, wmt16_ro_en=3998)
    assert got == {
        "alpaca_eval": (805, 512),
        "pandalm": (170, 512),
        "truthfulqa_gen": (817, 256),
        **{k: (v, 256) for k, v in wmt.items()},
        "mech_memorization_bleu": (10_000, 512),
    }
    cost = eval_cost(full, None, 250.0)
    assert cost.generations == 42_130 and cost.new_tokens == 13_594_880
    assert cost.gpu_hours == pytest.approx(13_594_880 / 250.0 / 3600.0)
    # a small training set caps the memorization prompts; the demo's limits and short generations
    small = est.TokenStats(n_records=300, mean_tokens=100.0, source="raw")
    assert dict((b, n) for b, n, _ in eval_generations(full, small))["mech_memorization_bleu"] == 300
    demo = eval_generations(load_config(["eval=demo", "dataset=shared_alpaca52k"]), None)
    assert len(demo) == 10 and all(n == 16 and t == 32 for _, n, t in demo)
    with pytest.raises(ValueError, match="eval_tokens_per_s"):
        est.eval_estimate([(1, 1)], 0.0)


def test_the_evaluation_estimate_uses_the_backends_throughput(tmp_path):
    """DRY_RUN: eval.backend=vllm estimates at launcher.eval_tokens_per_s_vllm, hf at eval_tokens_per_s."""
    from pipeline.sweep.plan import make_plan

    base = ["experiment=demo", f"paths.runs_dir={tmp_path}", "experiment.plw=[0.1]"]
    hf = make_plan(base, estimates=True).runs[0].eval_estimate
    vl = make_plan([*base, "eval.backend=vllm"], estimates=True).runs[0].eval_estimate
    assert vl.new_tokens == hf.new_tokens
    lc = load_config([]).launcher
    assert vl.gpu_hours == pytest.approx(hf.gpu_hours * lc.eval_tokens_per_s / lc.eval_tokens_per_s_vllm)

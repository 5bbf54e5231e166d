"""Fine-tune one run: ``python -m pipeline.train [hydra overrides]`` or :func:`run` from Python.

Examples::

    make train OVERRIDES="plw=0.1 model=tiny dataset=shared_alpaca52k train=cpu_small"
    HF_HUB_OFFLINE=1 python -m pipeline.train plw=0.1 model=llama2_7b dataset=alpaca_data_short
    python -m pipeline.train model=tiny dataset=shared_alpaca52k train=cpu_small train.nproc=2 train.distributed=fsdp

The run goes to ``paths.runs_dir/<run id>/`` (:mod:`pipeline.runs`); running the same command again
resumes it from its latest checkpoint, or returns at once when it is done. The command prints the run
folder; exit codes: 0 done, 1 failed (the error is also in ``<run>/status.json``), 2 bad config,
75 stopped by SIGTERM/SIGUSR1 after a checkpoint (run it again to resume), 79 another process is
executing the run (its lock is held; nothing was done). ``variant=<name>`` (not a
config key) names a training variant of an experiment whose ``train.*`` overrides are given too, e.g.
``variant=minkowski_0.01 train.minkowski_coef=0.01`` (the sweep does this for you).

What a run writes, and the recipe: ``pipeline/trainer/loop.py`` (metrics fields, resume, signals),
``pipeline/regularizers.py`` (weight decay, Minkowski penalty, dropout, label smoothing),
``conf/distributed/README.md`` (several GPUs).

Contract (other stages build on it)
-----------------------------------
:func:`run` ``(cfg, variant="none") -> RunDir``:

1. creates/finds the run folder (:func:`pipeline.runs.create_run`); status ``done`` -> returns it
   (a folder whose ``train_summary.json`` says training finished is marked done without training);
2. takes the run's lock and sets status ``running`` (:func:`pipeline.lifecycle.execute`, the one
   writer of ``status.json``; another process holding the lock -> :class:`~pipeline.lifecycle.RunBusy`)
   and trains -- in this process when one process is configured (``train.nproc``), otherwise by
   launching ``train.nproc`` training processes (``torchrun``/``accelerate launch ... -m
   pipeline.trainer.rank <run>``, see :func:`launch_command`) and waiting for them; training resumes
   from the latest complete checkpoint in ``<run>/checkpoints``;
3. appends one line per optimizer step to ``<run>/metrics.jsonl`` (fields: :mod:`pipeline.trainer.loop`);
4. saves the model to ``<run>/final/`` (``save_pretrained``: safetensors, config, tokenizer; loads with
   ``AutoModelForCausalLM.from_pretrained``) and ``<run>/train_summary.json`` (final loss, steps,
   tokens, weight distances to the pre-trained model, truncation report, validation losses, batch
   layout, resumes, ``skipped_steps``: optimizer steps whose examples all weigh zero, skipped);
   a dataset whose training examples carry no loss weight at all (e.g. PLW 0 with every completion
   cut by truncation) fails before training (:class:`~pipeline.trainer.data.ZeroWeightError`);
5. sets status ``done``. On an exception: status ``failed`` with the error (message and the end of
   the traceback), and the exception is re-raised. On SIGTERM/SIGUSR1 (or a callback's stop
   request): a checkpoint at the next step boundary, status ``pending`` with ``interrupted``
   (signal, step, checkpoint), and :class:`Preempted` (``SystemExit`` code 75) is raised; the CLI
   exits with 75, so a launcher knows to requeue.

``variant`` names a training variant of an experiment (a regularizer); its ``train.*`` overrides
are already in ``cfg``. It is part of the run's identity.

:func:`train` is the linear entry point every training process runs (in-process, or in each rank):
load model, load data, build the trainer, train, save; it returns the summary or raises, and never
touches the status.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
from omegaconf import DictConfig, OmegaConf

from pipeline import cli
from pipeline import lifecycle
from pipeline.config import CONF_DIR, Config, ConfigError, validate
from pipeline.data.build import load_dataset
from pipeline.lifecycle import EXIT_BUSY, PREEMPTED_EXIT_CODE, Preempted, RunBusy
from pipeline.models import load_pretrained, pretrained_dir
from pipeline.runs import RunDir, atomic_write_text, create_run
from pipeline.trainer.data import prepare_examples
from pipeline.trainer import checkpoint as ckpt
from pipeline.trainer import lora
from pipeline.trainer.dist import Backend
from pipeline.trainer.loop import SUMMARY_FILE, Trainer, TrainerCallback

log = logging.getLogger("pipeline.train")

__all__ = [
    "run",
    "train",
    "main",
    "Preempted",
    "RunBusy",
    "TrainerCallback",
    "PREEMPTED_EXIT_CODE",
    "SUMMARY_FILE",
    "launch_command",
    "resolve_nproc",
]

REPO = Path(__file__).resolve().parent.parent  # the folder holding the package (checkout or site-packages)
DISTRIBUTED_DIR = CONF_DIR / "distributed"
PREEMPTED_MARKER = "preempted.json"  # logs/: written by rank 0 of a stopped multi-process attempt
ACCELERATE_CONFIGS = {"fsdp": "fsdp.yaml", "deepspeed": "deepspeed_zero3.yaml", "ddp": "ddp.yaml", "none": "ddp.yaml"}


# ------------------------------------------------------------------------------------------------
# the linear entry point (every training process)
# ------------------------------------------------------------------------------------------------
def train(
    cfg: DictConfig,
    run_dir: RunDir,
    variant: str = "none",
    callbacks: Sequence[TrainerCallback] = (),
    typed: Optional[Config] = None,
) -> Dict[str, Any]:
    """Load model, load data, build the trainer, train (resuming), save; returns the summary (rank 0).

    ``typed``: ``cfg`` validated (:func:`pipeline.config.validate`) by the caller; validated here if
    not given. The typed sections go inward; ``cfg`` is what the run folder records."""
    typed = validate(cfg) if typed is None else typed
    if cfg.train.num_threads:
        torch.set_num_threads(int(cfg.train.num_threads))
    backend = Backend.from_env(cfg.train)
    try:
        # 1. model: fp32 master weights (bf16 is a compute precision, train.bf16); rank 0 builds any
        #    cached checkpoint (scratch / GGUF) and the processed dataset first.
        if backend.distributed:
            if backend.is_main:
                pretrained_dir(typed.model, typed.paths)
                load_dataset(typed)
            backend.barrier()
        pc = typed.train.peft
        if pc.enabled:
            lora.check(pc, backend.mode, backend.distributed)
        lm, tokenizer = load_pretrained(
            typed.model, typed.paths, dtype=torch.float32, load_kwargs=lora.load_kwargs(pc) if pc.enabled else None
        )
        peft_model = None
        if pc.enabled:  # LoRA: adapters injected into lm, the rest frozen (trainer/lora.py)
            peft_model = lora.apply(lm, pc, int(cfg.seed), bool(typed.train.gradient_checkpointing))
        # 2. data
        records, meta = load_dataset(typed)
        t = cfg.train
        data = prepare_examples(
            records,
            tokenizer,
            plw=float(cfg.plw),
            completion_weight=float(cfg.completion_weight),
            model_max_length=int(t.model_max_length),
            truncation=str(t.truncation),
            eval_fraction=float(t.eval_fraction),
            seed=int(cfg.seed),
            dataset=str(cfg.dataset.name),
            completion_turns=typed.dataset.completion_turns,
        )
        if backend.is_main:
            log.info("data %s (%s): %s", cfg.dataset.name, meta.get("dir"), data.truncation.summary())
        # 3. trainer, 4. train (resumes from the latest checkpoint)
        trainer = Trainer(cfg, run_dir, backend, lm, tokenizer, data, callbacks, typed=typed, peft_model=peft_model)
        trainer.train()
        # 5. save: final model, summary
        return trainer.finalize(
            {
                **data.summary(),
                "dataset_dir": str(meta.get("dir")),
                "dataset_hash": meta.get("hash"),
                "dataset_rg": meta.get("rg"),
                # the file this run read (a folder built from an identical file names that one)
                "dataset_source": (meta.get("raw") or {}).get("path"),
            },
            variant,
        )
    finally:
        backend.close()


# ------------------------------------------------------------------------------------------------
# run(): the lifecycle around train(), in-process or multi-process
# ------------------------------------------------------------------------------------------------
def resolve_nproc(train_cfg: Any) -> int:
    """``train.nproc``, or (0 = auto) every visible GPU when ``train.distributed`` != none, else 1."""
    n = int(train_cfg.nproc)
    if n > 0:
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if gpus and n > gpus:
            raise ConfigError(
                f"config key 'train.nproc': {n} processes but only {gpus} GPUs are visible (one process per GPU)"
            )
        return n
    if str(train_cfg.distributed) != "none" and torch.cuda.is_available():
        return max(1, torch.cuda.device_count())
    return 1


def _summary(rd: RunDir) -> Optional[Dict[str, Any]]:
    try:
        return json.loads((rd.path / SUMMARY_FILE).read_text(encoding="utf-8"))
    except (FileNotFoundError, ValueError):
        return None


def _finished(rd: RunDir) -> Optional[Dict[str, Any]]:
    """The summary of a run whose training completed (final model written), else None."""
    s = _summary(rd)
    if s and s.get("steps") == s.get("total_steps") and (rd.final / "config.json").is_file():
        return s
    return None


def _drop_checkpoints(rd: RunDir, keep: bool) -> None:
    """A done run's step checkpoints (weights + optimizer state, read only to resume) are removed unless
    ``train.keep_checkpoints``; checkpoints moved aside as damaged stay. Never fails the run."""
    if keep or not rd.checkpoints.is_dir():
        return
    found = ckpt.complete_checkpoints(rd.checkpoints)
    size = sum(f.stat().st_size for p in found for f in p.rglob("*") if f.is_file())
    try:
        gone = ckpt.prune(rd.checkpoints, 0) + ckpt.remove_debris(rd.checkpoints)
    except OSError as e:
        log.warning("run %s is done, but its checkpoints could not be removed: %s", rd.path.name, e)
        return
    if gone:
        log.info(
            "run %s is done: removed its checkpoints %s (%.1f MB; train.keep_checkpoints=true keeps them)",
            rd.path.name,
            ", ".join(sorted(gone)),
            size / 1e6,
        )


def run(
    cfg: DictConfig, variant: str = "none", callbacks: Sequence[TrainerCallback] = (), typed: Optional[Config] = None
) -> RunDir:
    """Train the run defined by ``cfg`` (and ``variant``) to completion; see the module docstring.
    ``typed``: ``cfg`` already validated by the entry point (validated here if not given)."""
    typed = validate(cfg) if typed is None else typed
    if typed.train.peft.enabled:  # what this machine cannot do fails before a run folder exists
        lora.check(typed.train.peft, str(typed.train.distributed), resolve_nproc(typed.train) > 1)
    rd = create_run(cfg, variant)
    if rd.status().get("state") == "done":
        log.info("run %s is done: nothing to do", rd.path.name)
        return rd

    def work() -> Dict[str, Any]:
        nproc = resolve_nproc(typed.train)
        if nproc <= 1:
            return train(cfg, rd, variant, callbacks, typed=typed)
        if callbacks:
            raise ValueError("callbacks need training in this process (train.nproc=1)")
        return _run_ranks(cfg, rd, nproc)

    with lifecycle.hold(rd):
        done = _finished(rd)
        if done is not None:
            lifecycle.mark_done(rd, done)
            _drop_checkpoints(rd, typed.train.keep_checkpoints)
            return rd
        try:
            summary = lifecycle.execute(rd, work)
        except Preempted as e:
            log.warning("%s", e)
            raise
        _drop_checkpoints(rd, typed.train.keep_checkpoints)
    loss = summary.get("final_loss")
    log.info(
        "run %s done: %d steps, final loss %s -> %s",
        rd.path.name,
        summary.get("steps", 0),
        "n/a" if loss is None else f"{loss:.4f}",
        rd.final,
    )
    return rd


# ------------------------------------------------------------------------------------------------
# multi-process: launch the ranks and wait
# ------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch_command(cfg: DictConfig, run_dir: Path, nproc: int) -> List[str]:
    """The command that starts ``nproc`` training processes (ranks) on this node for ``run_dir``.

    ``train.launcher``: ``torchrun`` -> ``torchrun --standalone --nproc_per_node N -m pipeline.trainer.rank RUN``;
    ``accelerate`` -> ``accelerate launch --config_file conf/distributed/<fsdp|deepspeed_zero3|ddp>.yaml
    --num_processes N [--fsdp_transformer_layer_cls_to_wrap <model.fsdp_wrap_class>] -m pipeline.trainer.rank RUN``;
    ``auto`` -> accelerate on GPU machines, torchrun on CPU (accelerate cannot start several CPU processes).
    """
    t = cfg.train
    launcher = str(t.launcher)
    if launcher == "auto":
        launcher = "accelerate" if torch.cuda.is_available() else "torchrun"
    tail = ["-m", "pipeline.trainer.rank", str(run_dir)]
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *tail]
    mode = str(t.distributed)
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(DISTRIBUTED_DIR / ACCELERATE_CONFIGS[mode]),
        "--num_processes",
        str(nproc),
        "--num_machines",
        "1",
        "--main_process_port",
        str(_free_port()),
    ]
    if mode != "deepspeed":  # DeepSpeed takes precision from ds_zero3.json ("auto" = train.bf16)
        cmd += ["--mixed_precision", "bf16" if bool(t.bf16) else "no"]
    if mode == "fsdp" and cfg.model.fsdp_wrap_class:
        cmd += ["--fsdp_transformer_layer_cls_to_wrap", str(cfg.model.fsdp_wrap_class).rsplit(".", 1)[-1]]
    return cmd + tail


def _error_files(rd: RunDir) -> List[Path]:
    return sorted(rd.logs.glob("worker-rank*.err")) if rd.logs.is_dir() else []


def _signal_tree(pid: int, sig: int) -> None:
    """Send ``sig`` to the launcher ``pid`` and every process below it (torchrun starts the workers
    in sessions of their own, so a process-group signal would miss them)."""
    targets = [pid]
    try:
        import psutil

        targets += [c.pid for c in psutil.Process(pid).children(recursive=True)]
    except Exception:  # psutil missing or the process gone: the launcher's group at least
        try:
            os.killpg(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
    for t in targets:
        try:
            os.kill(t, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _run_ranks(cfg: DictConfig, rd: RunDir, nproc: int) -> Dict[str, Any]:
    """Write ``<run>/launch.yaml`` (the config every rank reads), launch the training processes,
    forward stop signals, map the outcome (the summary, :class:`Preempted` or an error). This
    process holds the run's lock, so the ranks leave the status to it."""
    rd.logs.mkdir(parents=True, exist_ok=True)
    atomic_write_text(rd.launch_config, OmegaConf.to_yaml(cfg, resolve=True))
    for p in _error_files(rd) + [rd.logs / PREEMPTED_MARKER]:
        p.unlink(missing_ok=True)
    cmd = launch_command(cfg, rd.path, nproc)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.setdefault("OMP_NUM_THREADS", str(int(cfg.train.num_threads or max(1, (os.cpu_count() or 1) // nproc))))
    log.info("launching %d training processes: %s", nproc, " ".join(cmd))

    def _ignore_usr1():  # the launcher's agent must not die of the SIGUSR1 meant for the workers
        os.setsid()
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)

    proc = subprocess.Popen(cmd, env=env, cwd=str(REPO), preexec_fn=_ignore_usr1)
    old = {}

    def _forward(signum, frame):
        log.warning("%s received: asking the training processes to checkpoint and stop", signal.Signals(signum).name)
        _signal_tree(proc.pid, signal.SIGUSR1)

    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            old[sig] = signal.signal(sig, _forward)
    try:
        rc = proc.wait()
    except BaseException:
        try:
            _signal_tree(proc.pid, signal.SIGTERM)
            proc.wait(timeout=60)
        except Exception:
            pass
        raise
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)
    marker = rd.logs / PREEMPTED_MARKER
    if marker.is_file():
        info = json.loads(marker.read_text(encoding="utf-8"))
        raise Preempted(int(info["step"]), str(info["reason"]), info.get("checkpoint"))
    summary = _finished(rd)
    if rc == 0 and summary is not None:
        return summary
    errors = [p.read_text(encoding="utf-8", errors="replace").strip() for p in _error_files(rd)]
    detail = (
        "\n".join(e for e in errors if e)[-4000:]
        if errors
        else "no rank wrote an error (killed? out of memory?); see the launcher output above"
    )
    raise RuntimeError(f"training processes exited with code {rc} ({' '.join(cmd)}):\n{detail}")


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------
def setup_logging() -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
        )
    logging.getLogger("pipeline").setLevel(logging.INFO)


def main(argv: Optional[List[str]] = None) -> int:
    _, argv = cli.parse(cli.parser("python -m pipeline.train", __doc__), argv)
    setup_logging()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    variant = "none"
    for a in list(argv):
        if a.startswith("+variant=") or a.startswith("variant="):
            variant = a.split("=", 1)[1]
            argv.remove(a)
    try:
        cfg, typed = cli.compose(argv)
    except cli.CONFIG_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        rd = run(cfg, variant, typed=typed)
    except Preempted as e:
        print(f"stopped: {e}", file=sys.stderr)
        return PREEMPTED_EXIT_CODE
    except RunBusy as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BUSY
    except ckpt.StorageFull as e:  # not a bug: one line (status.json keeps the traceback)
        print(f"error: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # status.json keeps the traceback too
        log.error("run failed", exc_info=True)
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(rd.path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The sweep: an experiment's factorial grid of training runs, on this machine or a SLURM cluster.

    make sweep EXPERIMENT=main DRY_RUN=1                   # the grid: run ids, states, GPU-hours
    make sweep EXPERIMENT=demo                             # run it here (launcher=local)
    make sweep EXPERIMENT=main OVERRIDES="launcher=slurm launcher.partition=gpu"
    make status EXPERIMENT=main                            # the grid's state, from the store alone

Modules: :mod:`~pipeline.sweep.grid` (pure: the grid of an experiment config),
:mod:`~pipeline.sweep.estimate` (pure: GPU-hours), :mod:`~pipeline.sweep.store` (effective states,
decisions, the status table, manifests), :mod:`~pipeline.sweep.plan` (composition, run ids, launch
files), :mod:`~pipeline.sweep.worker` (executes one run), :mod:`~pipeline.sweep.supervise` (starts
and watches a worker), :mod:`~pipeline.sweep.local` and :mod:`~pipeline.sweep.slurm` (launchers),
:mod:`~pipeline.sweep.__main__` (the command). Every run status change goes through
:mod:`pipeline.lifecycle`. See docs/sweep.md.
"""

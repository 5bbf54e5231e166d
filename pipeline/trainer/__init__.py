"""The trainer behind :mod:`pipeline.train` (entry point) and :mod:`pipeline.trainer.rank` (one
training process of a multi-process run).

Modules: :mod:`~pipeline.trainer.data` (examples, split, step order; pure),
:mod:`~pipeline.trainer.dist` (processes, FSDP/DDP/DeepSpeed, checkpoint state),
:mod:`~pipeline.trainer.checkpoint` (atomic checkpoint folders),
:mod:`~pipeline.trainer.loop` (the loop, metrics, resume, final model and summary),
:mod:`~pipeline.trainer.distance` (weight distance to the pre-trained model),
:mod:`~pipeline.trainer.reporting` (console and trackers),
:mod:`~pipeline.trainer.rank` (a rank's entry point). Regularizers: :mod:`pipeline.regularizers`;
the LM whose forward returns the PLW loss: :class:`pipeline.loss.WeightedLossModel`.
"""

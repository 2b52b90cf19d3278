"""Lightning training of the pure-torch SAEs (vlmsae.sae): the layer that owns Lightning.

- ``module.SAELitModule``: one SAE or a grid of them on each batch (``sae_grid``), each taking the METHOD §2
  step of :func:`vlmsae.sae.step.sae_step`; train/val metrics, NaN guards.
- ``fit.fit_sae``: one training run (one SAE or a grid), its loggers, checkpoints, resume and outputs.
- ``datamodule.ActsDataModule`` / ``ImageActsDataModule``: rows streamed from activation shards or
  computed from images on the fly; :class:`vlmsae.data.stream.ShardRowStream` (no Lightning) does the
  rank/worker split and shuffling.
- ``callbacks.SweepSummary``: the Hydra callback that summarises a multirun.

Submodules are imported explicitly (this package imports nothing), so Hydra can load the callback
without pulling in torch or Lightning.
"""

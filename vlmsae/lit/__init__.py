"""Lightning training of the pure-torch SAEs (vlmsae.sae): the layer that owns Lightning.

- ``module.SAELitModule``: one SAE, the METHOD §2 step (decoder-gradient projection, clip, Adam,
  renormalisation, warmup), train/val metrics, NaN guards.
- ``datamodule.ActsDataModule`` / ``ImageActsDataModule``: rows streamed from activation shards or
  computed from images on the fly; :class:`vlmsae.data.stream.ShardRowStream` (no Lightning) does the
  rank/worker split and shuffling.
- ``callbacks.SweepSummary``: the Hydra callback that summarises a multirun.

Submodules are imported explicitly (this package imports nothing), so Hydra can load the callback
without pulling in torch or Lightning.
"""

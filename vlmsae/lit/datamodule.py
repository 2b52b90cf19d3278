"""LightningDataModules that feed activation rows to the SAE trainer.

``ActsDataModule`` streams an activation store through :class:`vlmsae.data.stream.ShardRowStream` (memory stays
flat whatever the store size; the training stream is infinite, ``trainer.max_steps`` ends it, so every rank runs
the same number of steps). ``ImageActsDataModule`` (``data=images``) computes the rows on the fly from images
through the extraction model; its resume replays the stream (an image's row count is only known once decoded).
What a resume restores, how validation is held out by image, and which small or odd stores fail or adapt with a
warning: docs/training.md (the bullets "Resume costs O(1)", "Validation is held out by image", "Small or odd
stores").
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset

from vlmsae.data.images import list_source
from vlmsae.data.shards import VAL_MAX_FRACTION, holdout_period, holdout_target
from vlmsae.data.store import check_store_width, open_store
from vlmsae.data.stream import ImageRowsStream, ShardRowStream, StreamConfig, build_chunk_index, kept_rows, window_rows
from vlmsae.models.image_rows import ImageChunkMaker
from vlmsae.models.spec import ModelSpec

log = logging.getLogger(__name__)


class _RowsDataModule(L.LightningDataModule):
    """What both datamodules share: the rank, the stream position a checkpoint holds, the init batches."""

    def __init__(self, stream: StreamConfig):
        super().__init__()
        self.stream = stream
        self.batches_seen = 0  # restored from a checkpoint: the train stream seeks past these
        self.rank, self.world_size = 0, 1

    def setup(self, stage: str | None = None) -> None:
        if self.trainer is not None:
            self.rank, self.world_size = int(self.trainer.global_rank), int(self.trainer.world_size)

    def state_dict(self) -> dict:
        step = int(self.trainer.global_step) if self.trainer is not None else self.batches_seen
        return {"batches_seen": step, "seed": self.stream.seed, "batch_size": self.stream.batch_size}

    def first_batches(self, n_batches: int) -> Iterator[torch.Tensor]:
        """The first batches of the training stream (rank 0's view), for b_dec and input-scale init."""
        for i, batch in enumerate(self._init_stream()):
            if i >= n_batches:
                return
            yield batch


class ActsDataModule(_RowsDataModule):
    """Streams rows ``[B, D]`` (stored dtype) from an activation store; see the module docstring."""

    def __init__(self, acts_dpath: str | Path, stream: StreamConfig, d_expected: int | None = None):
        super().__init__(stream)
        self.acts_dpath, self.manifest, self.shard_fpaths = open_store(acts_dpath)
        self.d = int(self.manifest.d)
        if d_expected is not None:
            check_store_width(self.manifest, d_expected, self.acts_dpath)
        if int(stream.batch_size) < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {stream.batch_size}")
        self.n_rows = int(self.manifest.n_rows)
        self._resume_state: dict | None = None
        self._workers: int | None = None
        self.n_val_rows = 0
        self._plan_split()
        # per-chunk row counts (and held-out rows) from headers: the resume seek and the size checks use them
        period = self.train_keep[1] if self.train_keep[0] != "all" else None
        t0 = time.perf_counter()
        self.chunk_rows = build_chunk_index(self.shard_fpaths, holdout_period=period, d=self.d, manifest=self.manifest)
        log.info(
            "indexed %d shards of %s in %.1f s (headers only)",
            len(self.shard_fpaths),
            self.acts_dpath,
            time.perf_counter() - t0,
        )
        self._warn_small_holdout()

    def _plan_split(self) -> None:
        n_shards = len(self.shard_fpaths)
        frac = float(self.stream.val_fraction)
        if not 0.0 <= frac < 1.0:
            raise ValueError(f"data.val_fraction must be in [0, 1), got {frac}")
        self.train_keep, self.val_keep = ("all",), ("all",)
        self.val_target = holdout_target(self.n_rows, frac, int(self.stream.batch_size))
        if frac == 0.0:
            # No held-out data: validation reads the training shards (in-sample, said in the log).
            self.train_fpaths, self.val_fpaths = self.shard_fpaths, self.shard_fpaths
            log.warning("data.val_fraction=0: validation metrics are measured on training rows")
            return
        m = self.manifest
        if m.shard_rows is not None and len(m.shard_rows) == n_shards:
            shard_rows = [int(n) for n in m.shard_rows]
        else:
            shard_rows = [self.n_rows / max(1, n_shards)] * n_shards
        n_val_shards, held = 0, 0
        while held < self.val_target and n_val_shards < n_shards:
            n_val_shards += 1
            held += shard_rows[n_shards - n_val_shards]
        if n_val_shards < n_shards and held < 2 * self.val_target:
            # whole shards: a shard holds whole images (extraction flushes between images)
            self.train_fpaths = self.shard_fpaths[: n_shards - n_val_shards]
            self.val_fpaths = self.shard_fpaths[n_shards - n_val_shards :]
        else:  # shards too coarse: hold out every period-th image, wherever its rows are
            n_images = int(m.n_images or self.n_rows)
            rows_per_image = max(1.0, self.n_rows / max(1, n_images))
            period = holdout_period(n_images, math.ceil(self.val_target / rows_per_image))
            self.train_fpaths, self.val_fpaths = self.shard_fpaths, self.shard_fpaths
            self.train_keep, self.val_keep = ("train", period), ("val", period)

    def _warn_small_holdout(self) -> None:
        """Say so when the store is too small to hold out one batch for validation (the held-out FVE is noisy)."""
        if self.val_fpaths == self.train_fpaths and self.val_keep[0] == "all":
            return
        n_val = self.n_val_rows = self._rows_in(self.val_fpaths, self.val_keep)
        if n_val < int(self.stream.batch_size):
            log.warning(
                "the activation store %s holds out only %d of its %d rows for validation (data.val_fraction=%g, "
                "capped at %d%% of the store): fewer than one batch (data.batch_size=%d), so the held-out FVE is "
                "noisy. Extract more images for a trustworthy validation figure",
                self.acts_dpath,
                n_val,
                self.n_rows,
                self.stream.val_fraction,
                round(100 * VAL_MAX_FRACTION),
                self.stream.batch_size,
            )

    def _rows_in(self, fpaths: list[str], keep: tuple) -> int:
        return sum(kept_rows(keep, n, held) for fpath in fpaths for _, n, held in self.chunk_rows[fpath])

    # ---------------------------------------------------------------- Lightning hooks
    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        self._workers = None
        if len(self.train_fpaths) < self.world_size:
            raise ValueError(
                f"{len(self.train_fpaths)} training shard(s) in {self.acts_dpath} for {self.world_size} ranks: "
                "every rank streams its own shards; extract with more, smaller shards (extract rows_per_shard) "
                "or use fewer devices"
            )
        B = int(self.stream.batch_size)
        per_rank = self._min_worker_rows(1)
        if per_rank < B:
            n_train = self._rows_in(self.train_fpaths, self.train_keep)
            raise ValueError(
                f"the activation store {self.acts_dpath} has {n_train} training rows ({self.n_val_rows} held out for "
                f"validation; {self.world_size} rank(s), at least {per_rank} rows per rank) but data.batch_size={B}: "
                f"one batch needs more rows than a rank gets. Lower data.batch_size (<= {max(1, per_rank)}), "
                "extract more images, or train on fewer devices"
            )

    def _stream(self, train: bool = True, seed_offset: int = 0, skip_batches: int = 0, rank: int | None = None):
        """The training stream (of ``rank``, default this one), or the validation pass over the held-out rows."""
        if train:
            fpaths, keep, world, rank = self.train_fpaths, self.train_keep, self.world_size, rank
        else:  # every rank reads its own validation shards when there are enough, else all of them
            fpaths, keep = self.val_fpaths, self.val_keep
            world = self.world_size if len(fpaths) >= self.world_size else 1
            rank = self.rank if world > 1 else 0
        return ShardRowStream(
            fpaths,
            self.stream.batch_size,
            self.stream.shuffle_buffer if train else 0,
            seed=self.stream.seed + seed_offset,
            rank=self.rank if rank is None else rank,
            world_size=world,
            n_epochs=None if train else 1,
            shuffle=train,
            drop_last=train,
            holdout=keep,
            skip_batches=skip_batches,
            chunk_rows=self.chunk_rows,
            d=self.d,
        )

    def _min_worker_rows(self, workers: int, n_epochs: int = 4) -> int:
        """The fewest training rows any worker of any rank gets in the first epochs (arithmetic, no reads)."""
        least = None
        for rank in range(self.world_size):
            stream = self._stream(rank=rank)
            for epoch in range(n_epochs):
                for worker in range(workers):
                    n = sum(k for _, _, k in stream.plan(epoch, worker, workers))
                    least = n if least is None else min(least, n)
        return int(least or 0)

    def train_stream(self, skip_batches: int = 0, seed_offset: int = 0) -> ShardRowStream:
        return self._stream(seed_offset=seed_offset, skip_batches=skip_batches)

    def val_stream(self) -> ShardRowStream:
        return self._stream(train=False)

    def _loader(self, dataset: IterableDataset, workers: int) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=None,
            num_workers=workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=False,
            prefetch_factor=4 if workers > 0 else None,
        )

    def train_workers(self) -> int:
        """data.num_workers, lowered (with a warning) until every worker of every rank gets a batch per epoch."""
        if self._workers is not None:
            return self._workers
        requested = int(self.stream.num_workers)
        workers = max(1, requested)
        while workers > 1 and self._min_worker_rows(workers) < self.stream.batch_size:
            workers -= 1
        if workers < requested:
            log.warning(
                "data.num_workers=%d lowered to %d: the store %s has too few training rows (or chunks) for every "
                "worker of %d rank(s) to fill a batch of %d each epoch",
                requested,
                workers,
                self.acts_dpath,
                self.world_size,
                self.stream.batch_size,
            )
        self._workers = 0 if workers == 1 and requested != 1 else workers
        return self._workers

    def train_dataloader(self) -> DataLoader:
        workers = self.train_workers()
        self._check_resume(workers)
        return self._loader(self.train_stream(skip_batches=self.batches_seen), workers)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_stream(), min(self.stream.num_workers, 1))

    def _init_stream(self) -> ShardRowStream:
        return self.train_stream(seed_offset=104729)

    # ------------------------------------------------------- resume: the stream's position
    def _store_id(self) -> dict:
        return {
            "n_rows": self.n_rows,
            "n_shards": len(self.shard_fpaths),
            "d": self.d,
            "image_list_digest": self.manifest.image_list_digest,
            "seed": self.manifest.seed,
        }

    def _layout(self, workers: int | None) -> dict:
        return {
            "num_workers": workers,
            "world_size": self.world_size,
            "window": window_rows(self.stream.shuffle_buffer, self.stream.batch_size),
            "holdout": list(self.train_keep),
            "n_train_shards": len(self.train_fpaths),
        }

    def state_dict(self) -> dict:
        return {**super().state_dict(), "store": self._store_id(), "layout": self._layout(self._workers), "version": 2}

    def load_state_dict(self, state: dict) -> None:
        self.batches_seen = int(state.get("batches_seen", 0))
        self._resume_state = dict(state)
        changed = []
        if state.get("batch_size", self.stream.batch_size) != self.stream.batch_size:
            changed.append(f"batch size {state.get('batch_size')} -> {self.stream.batch_size}")
        if state.get("seed", self.stream.seed) != self.stream.seed:
            changed.append(f"data seed {state.get('seed')} -> {self.stream.seed}")
        if "store" in state and state["store"] != self._store_id():
            changed.append(f"store {state['store']} -> {self._store_id()} ({self.acts_dpath})")
        if changed:
            log.warning(
                "resuming with a different data stream (%s): the stream restarts from its beginning instead "
                "of seeking to batch %d",
                "; ".join(changed),
                self.batches_seen,
            )
            self.batches_seen = 0

    def _check_resume(self, workers: int) -> None:
        saved = (self._resume_state or {}).get("layout")
        if not saved or not self.batches_seen:
            return
        now = self._layout(workers)
        diff = {k: (saved.get(k), v) for k, v in now.items() if k in saved and saved[k] != v}
        if diff:
            log.warning(
                "resuming with a different stream layout %s: seeking to batch %d, but the row order differs "
                "from the uninterrupted run",
                diff,
                self.batches_seen,
            )


def image_holdout_every(image_kwargs: dict, tokens: str, k_tokens: int, model: ModelSpec, stream: StreamConfig) -> int:
    """``data=images``: the period of held-out images (listing index ``% period == 0``), as for a store: enough
    images for one batch of validation rows when the listing allows (at most ``VAL_MAX_FRACTION`` of it),
    warning with the numbers when it does not. A ``wds`` source cannot be counted: ``round(1 / val_fraction)``."""
    frac = float(stream.val_fraction)
    if frac <= 0:
        return 10**9
    source = image_kwargs["source"]
    if source not in ("folder", "list", "synthetic"):
        return max(2, round(1.0 / frac))
    n_images = len(list_source(source, image_kwargs.get("root"), image_kwargs.get("synthetic")).items)
    if image_kwargs.get("max_images") is not None:
        n_images = min(n_images, int(image_kwargs["max_images"]))
    if tokens in ("cls", "mean"):
        rows_per_image = 1
    elif tokens == "random_k":
        rows_per_image = int(k_tokens)
    else:  # patches | all: an estimate from the patch grid
        rows_per_image = max(1, (int(model.image_size) // max(1, int(model.patch_size))) ** 2)
    n_rows = n_images * rows_per_image
    target = holdout_target(n_rows, frac, int(stream.batch_size))
    period = holdout_period(n_images, math.ceil(target / rows_per_image))
    n_val = math.ceil(n_images / period) * rows_per_image
    if n_val < int(stream.batch_size):
        log.warning(
            "the %d images of data.root=%s give about %d rows, %d of them held out for validation "
            "(data.val_fraction=%g, capped at %d%% of the images): fewer than one batch (data.batch_size=%d), so "
            "the held-out FVE is noisy. Use more images for a trustworthy validation figure",
            n_images,
            image_kwargs.get("root") or source,
            n_rows,
            n_val,
            frac,
            round(100 * VAL_MAX_FRACTION),
            stream.batch_size,
        )
    return period


class ImageActsDataModule(_RowsDataModule):
    """``data=images``: no cache on disk, activations are computed from images as training runs."""

    def __init__(
        self, make_train: ImageChunkMaker, make_val: ImageChunkMaker, d: int, stream: StreamConfig, manifest: dict
    ):
        super().__init__(stream)
        self.make_train, self.make_val, self.d, self.manifest = make_train, make_val, d, manifest

    def _loader(self, dataset, workers):
        # CUDA cannot be used in a forked worker: the encoder's workers are spawned instead.
        context = "spawn" if workers > 0 and torch.cuda.is_available() else None
        return DataLoader(dataset, batch_size=None, num_workers=workers, multiprocessing_context=context)

    def train_dataloader(self) -> DataLoader:
        ds = ImageRowsStream(
            self.make_train,
            self.stream.batch_size,
            self.stream.shuffle_buffer,
            self.stream.seed,
            self.rank,
            self.world_size,
            None,
            skip_batches=self.batches_seen,
            progress=self.trainer is not None and getattr(self.trainer, "progress_bar_callback", None) is not None,
        )
        return self._loader(ds, self.stream.num_workers)

    def val_dataloader(self) -> DataLoader:
        ds = ImageRowsStream(self.make_val, self.stream.batch_size, 0, self.stream.seed, self.rank, self.world_size, 1)
        return self._loader(ds, 0)

    def _init_stream(self) -> ImageRowsStream:
        return ImageRowsStream(
            self.make_train,
            self.stream.batch_size,
            self.stream.shuffle_buffer,
            self.stream.seed + 104729,
            0,
            1,
            None,
            progress=self.rank == 0,  # the first batch waits for a full shuffle window: show it filling
        )

    def load_state_dict(self, state: dict) -> None:
        self.batches_seen = int(state.get("batches_seen", 0))
        if state.get("batch_size", self.stream.batch_size) != self.stream.batch_size:
            log.warning("resuming with a different batch size: the data stream restarts instead of fast-forwarding")
            self.batches_seen = 0

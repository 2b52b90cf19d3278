"""LightningDataModules that feed activation rows to the SAE trainer.

``ActsDataModule`` streams an activation store (``acts-%06d.tar`` + ``manifest.json``, written by
``python -m vlmsae.extract``) through :class:`vlmsae.lit.stream.ShardRowStream`: memory stays
flat whatever the store size, ranks and workers read disjoint shards, and the training stream
is infinite (``trainer.max_steps`` ends training) so every rank runs the same number of steps.

``ImageActsDataModule`` (``data=images``) computes the rows on the fly from images through the
extraction model, for users without disk for a cache; it reuses the same shuffle buffer.

Held-out validation rows: whole shards when the store has enough of them
(``round(val_fraction * n_shards) >= 1`` and one training shard remains), else every
``round(1 / val_fraction)``-th chunk (chunk 0 included), else (a single-chunk store) every
``round(1 / val_fraction)``-th row, so even a tiny store keeps a validation split that training
never sees.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset

from vlmsae.data.shards import list_shards, read_manifest
from vlmsae.lit.stream import RowShuffleBuffer, ShardRowStream

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StreamConfig:
    """How rows are batched and shuffled (mirrors the ``data`` config node)."""

    batch_size: int = 4096  # rows per optimizer step (SPEC 2: 4096)
    shuffle_buffer: int = 16384  # rows held for shuffling; memory = shuffle_buffer * d * 2 bytes
    num_workers: int = 2  # DataLoader workers per rank (each reads its own shards)
    val_fraction: float = 0.01  # share of shards (or chunks) held out for validation
    val_batches: int = 20  # validation batches per check (per rank)
    seed: int = 0  # with the epoch, fixes the shard and row order


def list_shard_fpaths(acts_dpath: Path) -> list[str]:
    """The store's shard files in order, as strings (what a ShardRowStream takes)."""
    return [str(p) for p in list_shards(acts_dpath)]


def open_store(acts: str | Path | None) -> tuple[Path, dict, list[str]]:
    """Check an activation store exists and is readable; clear errors before any training."""
    if acts in (None, "", "???"):
        raise ValueError(
            "data.acts is not set: pass the activation folder written by `python -m vlmsae.extract`, "
            "e.g. data.acts=outputs/extract/<run> (or data=images to compute activations on the fly)"
        )
    acts_dpath = Path(str(acts)).expanduser()
    if not acts_dpath.is_dir():
        raise FileNotFoundError(
            f"activation directory {str(acts_dpath)!r} does not exist: run `python -m vlmsae.extract` first "
            "or fix data.acts (for a layer sweep: data.acts='/acts/layer${layer}')"
        )
    if not (acts_dpath / "manifest.json").is_file():
        raise FileNotFoundError(
            f"{str(acts_dpath)!r} has no manifest.json: it is not an activation store written by vlmsae.extract "
            "(an interrupted extraction writes the manifest last; re-run it)"
        )
    manifest = read_manifest(acts_dpath)
    shard_fpaths = list_shard_fpaths(acts_dpath)
    if not shard_fpaths:
        raise FileNotFoundError(f"{str(acts_dpath)!r} has a manifest but no acts-*.tar shards")
    return acts_dpath, manifest, shard_fpaths


def _world(trainer) -> tuple[int, int]:
    if trainer is None:
        return 0, 1
    return int(trainer.global_rank), int(trainer.world_size)


class ActsDataModule(L.LightningDataModule):
    """Streams rows ``[B, D]`` (stored dtype) from an activation store; see the module docstring."""

    def __init__(self, acts_dpath: str | Path, stream: StreamConfig):
        super().__init__()
        self.acts_dpath, self.manifest, self.shard_fpaths = open_store(acts_dpath)
        self.stream = stream
        self.d = int(self.manifest["d"])
        self.n_rows = int(self.manifest.get("n_rows", 0))
        self.batches_seen = 0  # restored from a checkpoint: the train stream fast-forwards past these
        self.rank, self.world_size = 0, 1
        self._plan_split()

    def _plan_split(self) -> None:
        n_shards = len(self.shard_fpaths)
        frac = float(self.stream.val_fraction)
        if not 0.0 <= frac < 1.0:
            raise ValueError(f"data.val_fraction must be in [0, 1), got {frac}")
        n_val_shards = round(frac * n_shards)
        self.train_rows, self.val_rows = ("all",), ("all",)
        self.train_keep, self.val_keep = ("all",), ("all",)
        if frac == 0.0:
            # No held-out data: validation reads the training shards (in-sample, said in the log).
            self.train_fpaths, self.val_fpaths = self.shard_fpaths, self.shard_fpaths
            self.train_keep, self.val_keep = ("all",), ("all",)
            log.warning("data.val_fraction=0: validation metrics are measured on training rows")
        elif n_val_shards >= 1 and n_shards - n_val_shards >= 1:
            self.train_fpaths = self.shard_fpaths[: n_shards - n_val_shards]
            self.val_fpaths = self.shard_fpaths[n_shards - n_val_shards :]
            self.train_keep, self.val_keep = ("all",), ("all",)
        else:
            period = max(2, round(1.0 / frac))
            self.train_fpaths, self.val_fpaths = self.shard_fpaths, self.shard_fpaths
            if int(self.manifest.get("n_chunks", 2)) >= 2:  # chunk 0 is held out, chunk 1 trains
                self.train_keep, self.val_keep = ("train", period), ("val", period)
            else:  # a single chunk: hold out every period-th row of it
                self.train_rows, self.val_rows = ("train", period), ("val", period)

    # ---------------------------------------------------------------- Lightning hooks
    def setup(self, stage: str | None = None) -> None:
        self.rank, self.world_size = _world(self.trainer)
        if len(self.train_fpaths) < self.world_size:
            raise ValueError(
                f"{len(self.train_fpaths)} training shard(s) in {self.acts_dpath} for {self.world_size} ranks: "
                "every rank streams its own shards; extract with more, smaller shards or use fewer devices"
            )

    def _effective_buffer(self, n_fpaths: int) -> int:
        """Cap the buffer at half the rows one worker sees, so a tiny store never holds a row twice."""
        workers = max(1, self.train_workers())
        rows_per_worker = self.n_rows * n_fpaths / max(1, len(self.shard_fpaths)) / (self.world_size * workers)
        for keep in (self.train_keep, self.train_rows):
            if keep[0] == "train":
                rows_per_worker *= 1 - 1 / keep[1]
        cap = int(rows_per_worker // 2)
        return max(0, min(int(self.stream.shuffle_buffer), cap)) if self.n_rows else int(self.stream.shuffle_buffer)

    def train_stream(self, skip_batches: int = 0, seed_offset: int = 0) -> ShardRowStream:
        return ShardRowStream(
            self.train_fpaths, self.stream.batch_size, self._effective_buffer(len(self.train_fpaths)),
            seed=self.stream.seed + seed_offset, rank=self.rank, world_size=self.world_size,
            n_epochs=None, shuffle=True, drop_last=True, chunk_keep=self.train_keep, row_keep=self.train_rows,
            skip_batches=skip_batches,
        )

    def val_stream(self) -> ShardRowStream:
        world = self.world_size if len(self.val_fpaths) >= self.world_size else 1
        rank = self.rank if world > 1 else 0
        return ShardRowStream(
            self.val_fpaths, self.stream.batch_size, 0, seed=self.stream.seed, rank=rank, world_size=world,
            n_epochs=1, shuffle=False, drop_last=False, chunk_keep=self.val_keep, row_keep=self.val_rows,
        )

    def _loader(self, dataset: IterableDataset, workers: int) -> DataLoader:
        return DataLoader(
            dataset, batch_size=None, num_workers=workers, pin_memory=torch.cuda.is_available(),
            persistent_workers=False, prefetch_factor=4 if workers > 0 else None,
        )

    def train_workers(self) -> int:
        """data.num_workers, capped so every worker of every rank has at least one training chunk."""
        n_chunks = int(self.manifest.get("n_chunks", 0)) or None
        if n_chunks is None:
            return self.stream.num_workers
        if self.train_rows[0] != "all":
            n_train = 1
        elif self.train_keep[0] == "train":
            n_train = n_chunks - (n_chunks + self.train_keep[1] - 1) // self.train_keep[1]
        else:
            n_train = n_chunks * len(self.train_fpaths) // len(self.shard_fpaths)
        workers = min(self.stream.num_workers, max(1, n_train // self.world_size))
        if workers < self.stream.num_workers:
            log.info("data.num_workers=%d capped to %d: the store has %d training chunk(s) for %d rank(s)",
                     self.stream.num_workers, workers, n_train, self.world_size)
        return 0 if workers == 1 and n_train < 2 else workers

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_stream(skip_batches=self.batches_seen), self.train_workers())

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_stream(), min(self.stream.num_workers, 1))

    def first_batches(self, n_batches: int) -> Iterator[torch.Tensor]:
        """The first batches of the training stream (rank 0's view), for b_dec and input-scale init."""
        for i, batch in enumerate(self.train_stream(seed_offset=104729)):
            if i >= n_batches:
                return
            yield batch

    # ------------------------------------------------------- resume: the stream's position
    def state_dict(self) -> dict:
        trainer = self.trainer
        step = int(trainer.global_step) if trainer is not None else self.batches_seen
        return {"batches_seen": step, "seed": self.stream.seed, "batch_size": self.stream.batch_size}

    def load_state_dict(self, state: dict) -> None:
        self.batches_seen = int(state.get("batches_seen", 0))
        if state.get("batch_size", self.stream.batch_size) != self.stream.batch_size:
            log.warning("resuming with a different batch size: the data stream restarts instead of fast-forwarding")
            self.batches_seen = 0


class _ImageRowsStream(IterableDataset):
    """Rows computed on the fly: images -> tap -> select_tokens -> shuffle buffer -> batches."""

    def __init__(self, make_chunks, batch_size: int, shuffle_buffer: int, seed: int, rank: int, world_size: int,
                 n_epochs: int | None, skip_batches: int = 0):
        super().__init__()
        self.make_chunks = make_chunks
        self.batch_size, self.shuffle_buffer, self.seed = batch_size, shuffle_buffer, seed
        self.rank, self.world_size, self.n_epochs, self.skip_batches = rank, world_size, n_epochs, skip_batches

    def __iter__(self) -> Iterator[torch.Tensor]:
        import numpy as np

        from torch.utils.data import get_worker_info

        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        worker = (worker + self.skip_batches) % n_workers  # round-robin order after a skip (see ShardRowStream)
        buffer = RowShuffleBuffer(self.shuffle_buffer, self.batch_size, np.random.default_rng([self.seed, self.rank, worker]))
        to_skip = len(range(worker, self.skip_batches, n_workers))
        epoch = 0
        while self.n_epochs is None or epoch < self.n_epochs:
            part, n_parts = self.rank * n_workers + worker, self.world_size * n_workers
            got = False
            for rows_RD in self.make_chunks(epoch, part, n_parts):
                got = True
                for batch in buffer.add(rows_RD):
                    if to_skip:
                        to_skip -= 1
                        continue
                    yield batch
            if not got:
                raise RuntimeError(f"no images for part {part} of {n_parts}: fewer images than ranks x workers")
            epoch += 1
        yield from buffer.flush(drop_last=False)


class ImageChunkMaker:
    """Picklable callable: the images of one (rank, worker) part -> activation row chunks.

    The encoder is loaded lazily in the process that iterates (a DataLoader worker or the main
    process), at the layer and token selection the training config asks for.
    """

    def __init__(self, model_spec, image_kwargs: dict, layer, tokens: str, k_tokens: int, images_per_forward: int,
                 seed: int, holdout_every: int, split: str):
        self.model_spec, self.image_kwargs = model_spec, image_kwargs
        self.layer, self.tokens, self.k_tokens = layer, tokens, k_tokens
        self.images_per_forward, self.seed = images_per_forward, seed
        self.holdout_every, self.split = holdout_every, split
        self._tap = None

    def _keep(self, index: int) -> bool:
        is_val = index % self.holdout_every == 0
        return is_val if self.split == "val" else not is_val

    def __call__(self, epoch: int, part: int, n_parts: int) -> Iterator[torch.Tensor]:
        from vlmsae.data.images import iter_images
        from vlmsae.models import load_tap, select_tokens

        if self._tap is None:
            spec = self.model_spec
            if spec.device == "auto" and torch.cuda.is_available():
                # DDP: each rank's encoder on its own GPU (a spawned worker does not inherit the device)
                import dataclasses
                import os

                spec = dataclasses.replace(spec, device=f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
            self._tap = load_tap(spec).eval()
        tap = self._tap
        device = next(tap.parameters()).device
        generator = torch.Generator().manual_seed(self.seed * 1000003 + epoch * 7919 + part)
        pixels: list[torch.Tensor] = []

        def flush() -> torch.Tensor:
            with torch.no_grad():
                acts = tap.forward_to(torch.stack(pixels).to(device), layer=self.layer)
                if acts.dim() == 2:  # layer="last": one embedding per image
                    rows = acts
                else:
                    rows = select_tokens(acts.cpu(), tokens=self.tokens, k=self.k_tokens, generator=generator,
                                         has_cls=tap.has_cls)[0]
            pixels.clear()
            return rows.detach().to("cpu", torch.float16)

        for record in iter_images(worker=(part, n_parts), **self.image_kwargs):
            if not self._keep(record.pos):
                continue
            pixels.append(tap.preprocess(record.image))
            if len(pixels) == self.images_per_forward:
                yield flush()
        if pixels:
            yield flush()


class ImageActsDataModule(L.LightningDataModule):
    """``data=images``: no cache on disk, activations are computed from images as training runs."""

    def __init__(self, make_train: ImageChunkMaker, make_val: ImageChunkMaker, d: int, stream: StreamConfig,
                 manifest: dict):
        super().__init__()
        self.make_train, self.make_val, self.d, self.stream = make_train, make_val, d, stream
        self.manifest = manifest
        self.batches_seen = 0
        self.rank, self.world_size = 0, 1

    def setup(self, stage: str | None = None) -> None:
        self.rank, self.world_size = _world(self.trainer)

    def _loader(self, dataset, workers):
        # CUDA cannot be used in a forked worker: the encoder's workers are spawned instead.
        context = "spawn" if workers > 0 and torch.cuda.is_available() else None
        return DataLoader(dataset, batch_size=None, num_workers=workers, multiprocessing_context=context)

    def train_dataloader(self) -> DataLoader:
        ds = _ImageRowsStream(self.make_train, self.stream.batch_size, self.stream.shuffle_buffer, self.stream.seed,
                              self.rank, self.world_size, None, skip_batches=self.batches_seen)
        return self._loader(ds, self.stream.num_workers)

    def val_dataloader(self) -> DataLoader:
        ds = _ImageRowsStream(self.make_val, self.stream.batch_size, 0, self.stream.seed, self.rank, self.world_size, 1)
        return self._loader(ds, 0)

    def first_batches(self, n_batches: int) -> Iterator[torch.Tensor]:
        ds = _ImageRowsStream(self.make_train, self.stream.batch_size, self.stream.shuffle_buffer,
                              self.stream.seed + 104729, 0, 1, None)
        for i, batch in enumerate(ds):
            if i >= n_batches:
                return
            yield batch

    state_dict = ActsDataModule.state_dict
    load_state_dict = ActsDataModule.load_state_dict

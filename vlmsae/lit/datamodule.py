"""LightningDataModules that feed activation rows to the SAE trainer.

``ActsDataModule`` streams an activation store (``acts-%06d.tar`` + ``manifest.json``, written by
``python -m vlmsae.extract``) through :class:`vlmsae.lit.stream.ShardRowStream`: memory stays
flat whatever the store size (one shuffle window of ``data.shuffle_buffer`` rows plus a chunk per
worker), ranks and workers read disjoint shards, and the training stream is infinite
(``trainer.max_steps`` ends training) so every rank runs the same number of steps.

Resume: the checkpoint holds the stream position (``state_dict``: batches trained, batch size,
seed, shuffle window, workers, world size and the store's identity). A resumed run seeks there in
O(1) reads (only the chunks of the current shuffle window are opened) and yields exactly the
batches the uninterrupted run would have. If the batch size or the store changed, the stream
restarts from its beginning with a warning; if the workers, ranks or window changed, it seeks to
the same number of batches but the row order differs from the uninterrupted run (warning).

Held-out validation, always by image (no image gives rows to both splits): whole shards when the
store has enough of them (``round(val_fraction * n_shards) >= 1`` and one training shard remains;
extraction flushes a shard only between images, so no image straddles two shards), else the
images with ``image_idx % round(1 / val_fraction) == 0`` (every row of those images, wherever
their chunks lie), so even a single-chunk store keeps a validation split that training never sees.

Small or odd stores (each case names the store, the numbers and the fix):

* fail: a store path that does not exist, has no manifest or no shards; a manifest with
  ``complete: false`` or without ``n_rows`` (an unfinished extraction); a truncated or corrupt
  shard (checked on open from the tar and safetensors headers, and again in the reader, naming the
  shard file); a store width ``d`` that differs from the SAE's (:func:`check_store_width`) or a
  chunk whose width differs from the manifest's; fewer training rows per rank than one batch;
  fewer training shards than ranks (every rank streams its own shards);
* adapt with a warning: fewer shards than DataLoader workers (workers split the rank's chunks
  instead of its shards) and fewer rows than one batch per worker (``data.num_workers`` is lowered
  until every worker gets a batch per epoch); a ``data.shuffle_buffer`` smaller than a batch (the
  window is one batch).

``ImageActsDataModule`` (``data=images``) computes the rows on the fly from images through the
extraction model, for users without disk for a cache. Every epoch visits the images in a fresh
seeded permutation of the listing (folder, list and synthetic sources; ``wds`` streams in file
order); images with listing index ``% round(1 / val_fraction) == 0`` are validation (the same
images a store made from that listing holds out). Its resume still replays the stream (the row
count of an image is only known once it is decoded).
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
from vlmsae.lit.stream import RowShuffleBuffer, ShardRowStream, build_chunk_index, window_rows

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StreamConfig:
    """How rows are batched and shuffled (mirrors the ``data`` config node)."""

    batch_size: int = 4096  # rows per optimizer step (SPEC 2: 4096)
    shuffle_buffer: int = 16384  # rows per shuffle window; memory = shuffle_buffer * d * 2 bytes per worker
    num_workers: int = 2  # DataLoader workers per rank (each reads its own shards)
    val_fraction: float = 0.01  # share of shards (or of images) held out for validation
    val_batches: int = 20  # validation batches per check (per rank)
    seed: int = 0  # with the epoch, fixes the shard and row order


def list_shard_fpaths(acts_dpath: Path) -> list[str]:
    """The store's shard files in order, as strings (what a ShardRowStream takes)."""
    return [str(p) for p in list_shards(acts_dpath)]


def open_store(acts: str | Path | None) -> tuple[Path, dict, list[str]]:
    """Check an activation store exists, is complete and is readable; clear errors before any training."""
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
    if manifest.get("complete") is False or "n_rows" not in manifest or "d" not in manifest:
        raise ValueError(
            f"the manifest of {str(acts_dpath)!r} says the store is incomplete (complete={manifest.get('complete')}, "
            f"n_rows={manifest.get('n_rows')}, d={manifest.get('d')}): finish it by re-running the same "
            "`python -m vlmsae.extract ... out=<dir>` command (it resumes), then train"
        )
    shard_fpaths = list_shard_fpaths(acts_dpath)
    if not shard_fpaths:
        raise FileNotFoundError(f"{str(acts_dpath)!r} has a manifest but no acts-*.tar shards")
    listed = manifest.get("n_shards")
    if listed is not None and int(listed) != len(shard_fpaths):
        raise ValueError(f"{str(acts_dpath)!r}: the manifest lists {listed} shards but {len(shard_fpaths)} are "
                         "present: restore the missing shards or re-run the extraction into a fresh folder")
    return acts_dpath, manifest, shard_fpaths


def check_store_width(store: str | Path | dict, d_expected: int, acts_dpath: str | Path | None = None) -> int:
    """The store's row width ``d``; a clear error when it is not ``d_expected`` (the SAE's ``d_in``).

    ``store``: a store folder or its manifest (then pass ``acts_dpath`` for the message).
    """
    if isinstance(store, dict):
        manifest, where = store, str(acts_dpath or "the activation store")
    else:
        where = str(store)
        manifest = read_manifest(store)
    d = int(manifest["d"])
    if d != int(d_expected):
        raise ValueError(
            f"width mismatch: the activation store {where} has d={d} (model {manifest.get('model')!r}, layer "
            f"{manifest.get('layer')}) but the SAE expects d_in={d_expected}: train on the store extracted with the "
            "SAE's model and layer, or change model=/layer= to the store's"
        )
    return d


def _world(trainer) -> tuple[int, int]:
    if trainer is None:
        return 0, 1
    return int(trainer.global_rank), int(trainer.world_size)


class ActsDataModule(L.LightningDataModule):
    """Streams rows ``[B, D]`` (stored dtype) from an activation store; see the module docstring."""

    def __init__(self, acts_dpath: str | Path, stream: StreamConfig, d_expected: int | None = None):
        super().__init__()
        self.acts_dpath, self.manifest, self.shard_fpaths = open_store(acts_dpath)
        self.stream = stream
        self.d = int(self.manifest["d"])
        if d_expected is not None:
            check_store_width(self.manifest, d_expected, self.acts_dpath)
        if int(stream.batch_size) < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {stream.batch_size}")
        self.n_rows = int(self.manifest["n_rows"])
        self.batches_seen = 0  # restored from a checkpoint: the train stream seeks past these
        self._resume_state: dict | None = None
        self._workers: int | None = None
        self.rank, self.world_size = 0, 1
        self._plan_split()
        # per-chunk row counts (and held-out rows) from headers: the resume seek and the size checks use them
        import time

        period = self.train_keep[1] if self.train_keep[0] != "all" else None
        t0 = time.perf_counter()
        self.chunk_rows = build_chunk_index(self.shard_fpaths, holdout_period=period, d=self.d)
        log.info("indexed %d shards of %s in %.1f s (headers only)", len(self.shard_fpaths), self.acts_dpath,
                 time.perf_counter() - t0)

    def _plan_split(self) -> None:
        n_shards = len(self.shard_fpaths)
        frac = float(self.stream.val_fraction)
        if not 0.0 <= frac < 1.0:
            raise ValueError(f"data.val_fraction must be in [0, 1), got {frac}")
        n_val_shards = round(frac * n_shards)
        self.train_keep, self.val_keep = ("all",), ("all",)
        if frac == 0.0:
            # No held-out data: validation reads the training shards (in-sample, said in the log).
            self.train_fpaths, self.val_fpaths = self.shard_fpaths, self.shard_fpaths
            log.warning("data.val_fraction=0: validation metrics are measured on training rows")
        elif n_val_shards >= 1 and n_shards - n_val_shards >= 1:
            # whole shards: a shard holds whole images (extraction flushes between images)
            self.train_fpaths = self.shard_fpaths[: n_shards - n_val_shards]
            self.val_fpaths = self.shard_fpaths[n_shards - n_val_shards :]
        else:  # too few shards: hold out every period-th image, wherever its rows are
            period = max(2, round(1.0 / frac))
            self.train_fpaths, self.val_fpaths = self.shard_fpaths, self.shard_fpaths
            self.train_keep, self.val_keep = ("train", period), ("val", period)

    def _rows_in(self, fpaths: list[str], keep: tuple) -> int:
        total = 0
        for fpath in fpaths:
            for _, n, held in self.chunk_rows[fpath]:
                total += n if keep[0] == "all" else held if keep[0] == "val" else n - held
        return total

    # ---------------------------------------------------------------- Lightning hooks
    def setup(self, stage: str | None = None) -> None:
        self.rank, self.world_size = _world(self.trainer)
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
            n_val = self._rows_in(self.val_fpaths, self.val_keep) if self.val_fpaths != self.train_fpaths or \
                self.val_keep[0] != "all" else 0
            raise ValueError(
                f"the activation store {self.acts_dpath} has {n_train} training rows ({n_val} held out for "
                f"validation; {self.world_size} rank(s), at least {per_rank} rows per rank) but data.batch_size={B}: "
                f"one batch needs more rows than a rank gets. Lower data.batch_size (<= {max(1, per_rank)}), "
                "extract more images, or train on fewer devices"
            )

    def _stream(self, seed_offset: int = 0, skip_batches: int = 0, rank: int | None = None) -> ShardRowStream:
        return ShardRowStream(
            self.train_fpaths, self.stream.batch_size, self.stream.shuffle_buffer,
            seed=self.stream.seed + seed_offset, rank=self.rank if rank is None else rank,
            world_size=self.world_size, n_epochs=None, shuffle=True, drop_last=True, holdout=self.train_keep,
            skip_batches=skip_batches, chunk_rows=self.chunk_rows, d=self.d,
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
        world = self.world_size if len(self.val_fpaths) >= self.world_size else 1
        rank = self.rank if world > 1 else 0
        return ShardRowStream(
            self.val_fpaths, self.stream.batch_size, 0, seed=self.stream.seed, rank=rank, world_size=world,
            n_epochs=1, shuffle=False, drop_last=False, holdout=self.val_keep, chunk_rows=self.chunk_rows, d=self.d,
        )

    def _loader(self, dataset: IterableDataset, workers: int) -> DataLoader:
        return DataLoader(
            dataset, batch_size=None, num_workers=workers, pin_memory=torch.cuda.is_available(),
            persistent_workers=False, prefetch_factor=4 if workers > 0 else None,
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
                "worker of %d rank(s) to fill a batch of %d each epoch", requested, workers, self.acts_dpath,
                self.world_size, self.stream.batch_size)
        self._workers = 0 if workers == 1 and requested != 1 else workers
        return self._workers

    def train_dataloader(self) -> DataLoader:
        workers = self.train_workers()
        self._check_resume(workers)
        return self._loader(self.train_stream(skip_batches=self.batches_seen), workers)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_stream(), min(self.stream.num_workers, 1))

    def first_batches(self, n_batches: int) -> Iterator[torch.Tensor]:
        """The first batches of the training stream (rank 0's view), for b_dec and input-scale init."""
        for i, batch in enumerate(self.train_stream(seed_offset=104729)):
            if i >= n_batches:
                return
            yield batch

    # ------------------------------------------------------- resume: the stream's position
    def _store_id(self) -> dict:
        m = self.manifest
        return {"n_rows": self.n_rows, "n_shards": len(self.shard_fpaths), "d": self.d,
                "image_list_digest": m.get("image_list_digest"), "seed": m.get("seed")}

    def _layout(self, workers: int | None) -> dict:
        return {"num_workers": workers, "world_size": self.world_size,
                "window": window_rows(self.stream.shuffle_buffer, self.stream.batch_size),
                "holdout": list(self.train_keep), "n_train_shards": len(self.train_fpaths)}

    def state_dict(self) -> dict:
        trainer = self.trainer
        step = int(trainer.global_step) if trainer is not None else self.batches_seen
        return {"batches_seen": step, "seed": self.stream.seed, "batch_size": self.stream.batch_size,
                "store": self._store_id(), "layout": self._layout(self._workers), "version": 2}

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
            log.warning("resuming with a different data stream (%s): the stream restarts from its beginning instead "
                        "of seeking to batch %d", "; ".join(changed), self.batches_seen)
            self.batches_seen = 0

    def _check_resume(self, workers: int) -> None:
        saved = (self._resume_state or {}).get("layout")
        if not saved or not self.batches_seen:
            return
        now = self._layout(workers)
        diff = {k: (saved.get(k), v) for k, v in now.items() if k in saved and saved[k] != v}
        if diff:
            log.warning("resuming with a different stream layout %s: seeking to batch %d, but the row order differs "
                        "from the uninterrupted run", diff, self.batches_seen)


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
        rng = np.random.default_rng([self.seed, self.rank, worker])
        buffer = RowShuffleBuffer(self.shuffle_buffer, self.batch_size, rng)
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


def epoch_order_seed(seed: int, epoch: int) -> int:
    """The ``order_seed`` of one training epoch of ``data=images``: a fresh permutation each epoch."""
    import numpy as np

    return int(np.random.SeedSequence([int(seed), 4099, int(epoch)]).generate_state(1, dtype=np.uint64)[0] >> 1)


def iter_epoch_images(image_kwargs: dict, order_seed: int | None, part: int, n_parts: int):
    """The images of part ``part`` of ``n_parts``, visited in ``default_rng(order_seed).permutation`` of the
    listing (file order when None); ``record.index`` is the listing position (the stable image id).

    A ``wds`` source keeps its file order: permuting its tars would also move ``index`` (a stream
    position there), and the held-out images must stay the same every epoch.
    """
    from vlmsae.data.images import iter_images

    if image_kwargs.get("source") == "wds":
        order_seed = None
    yield from iter_images(worker=(part, n_parts), order_seed=order_seed, **image_kwargs)


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

        order_seed = epoch_order_seed(self.seed, epoch) if self.split == "train" else None
        for record in iter_epoch_images(self.image_kwargs, order_seed, part, n_parts):
            if not self._keep(record.index):  # the listing index: a held-out image stays held out every epoch
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

    def state_dict(self) -> dict:
        trainer = self.trainer
        step = int(trainer.global_step) if trainer is not None else self.batches_seen
        return {"batches_seen": step, "seed": self.stream.seed, "batch_size": self.stream.batch_size}

    def load_state_dict(self, state: dict) -> None:
        self.batches_seen = int(state.get("batches_seen", 0))
        if state.get("batch_size", self.stream.batch_size) != self.stream.batch_size:
            log.warning("resuming with a different batch size: the data stream restarts instead of fast-forwarding")
            self.batches_seen = 0

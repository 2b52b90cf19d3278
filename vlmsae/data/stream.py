"""Streaming activation rows: shard/rank/worker split, a windowed shuffle, epochs that reshuffle, O(1) resume.

A store is far larger than memory, so rows are read chunk by chunk and only ``window + chunk`` rows are held.
The order is a pure function of ``(seed, epoch, rank, worker)`` and the store's per-chunk row counts:

* every rank permutes the shard list with the same ``(seed, epoch)`` generator and takes every ``world``-th
  shard; DataLoader workers split the rank's shards the same way (its chunks, when it has fewer shards);
* each worker cuts its rows into windows (``shuffle_buffer`` rounded down to whole batches), permutes each
  with ``default_rng([seed, epoch, rank, worker, window])`` and emits whole batches; the training stream is
  infinite, and an epoch's last ``< batch_size`` rows are dropped (``drop_last``);
* batch ``j`` of a worker maps to ``(epoch, window, offset)`` by arithmetic over the chunk row counts
  (:func:`vlmsae.data.shards.chunk_row_counts`), so ``skip_batches`` opens only the current window's chunks.

``holdout=("train"|"val", p)`` keeps the rows whose image is not / is held out (``image_idx % p == 0``).
Module-level functions and classes only (no lambdas): workers pickle the dataset. :class:`ImageRowsStream`
batches rows computed from images on the fly (``data=images``). More: docs/training.md.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from vlmsae.data.images import ImageRecord, iter_images
from vlmsae.data.remote import is_remote
from vlmsae.data.shards import chunk_row_counts, image_holdout, iter_chunks, manifest_chunk_rows
from vlmsae.formats import StoreManifest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StreamConfig:
    """How rows are batched and shuffled (mirrors the ``data`` config node)."""

    batch_size: int = 4096  # rows per optimizer step (METHOD §2: 4096)
    shuffle_buffer: int = 16384  # rows per shuffle window; memory = shuffle_buffer * d * 2 bytes per worker
    num_workers: int = 2  # DataLoader workers per rank (each reads its own shards)
    val_fraction: float = 0.01  # share of shards (or of images) held out for validation
    seed: int = 0  # with the epoch, fixes the shard and row order


# ---------------------------------------------------------------------------- shuffle buffer
class RowShuffleBuffer:
    """At most ``capacity`` rows held; each emitted batch is drawn uniformly from the buffer.

    When the buffer is full, ``batch_size`` random slots are emitted and refilled with the next
    incoming rows; rows that arrive while fewer than ``batch_size`` are pending wait in a small
    queue (< batch_size + one chunk). ``capacity=0`` is a pass-through that only re-batches
    (validation keeps file order).
    """

    def __init__(self, capacity: int, batch_size: int, rng: np.random.Generator):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.capacity = max(0, int(capacity))
        if 0 < self.capacity < batch_size:  # a batch is drawn from the buffer: it must hold one
            log.warning("shuffle buffer of %d rows is smaller than one batch: using %d", self.capacity, batch_size)
            self.capacity = int(batch_size)
        self.batch_size = int(batch_size)
        self.rng = rng
        self.buf_QD: torch.Tensor | None = None
        self.n_filled = 0
        self.pending: list[torch.Tensor] = []
        self.n_pending = 0

    def _take_pending(self) -> torch.Tensor:
        rows = self.pending[0] if len(self.pending) == 1 else torch.cat(self.pending)
        self.pending = []
        self.n_pending = 0
        return rows

    def add(self, rows_RD: torch.Tensor) -> Iterator[torch.Tensor]:
        """Push a chunk; yield every batch that becomes available."""
        if self.capacity > 0 and self.n_filled < self.capacity:
            if self.buf_QD is None:
                self.buf_QD = torch.empty((self.capacity, rows_RD.shape[1]), dtype=rows_RD.dtype)
            take = min(self.capacity - self.n_filled, rows_RD.shape[0])
            self.buf_QD[self.n_filled : self.n_filled + take] = rows_RD[:take]
            self.n_filled += take
            rows_RD = rows_RD[take:]
        if rows_RD.shape[0] == 0:
            return
        self.pending.append(rows_RD)
        self.n_pending += rows_RD.shape[0]
        B = self.batch_size
        if self.n_pending < B:
            return
        incoming_RD = self._take_pending()
        start = 0
        while incoming_RD.shape[0] - start >= B:
            if self.capacity == 0:
                yield incoming_RD[start : start + B].clone()
            else:
                slots_B = torch.from_numpy(self.rng.choice(self.capacity, size=B, replace=False))
                yield self.buf_QD.index_select(0, slots_B)  # a copy; ~3x faster than buf[idx] here
                self.buf_QD.index_copy_(0, slots_B, incoming_RD[start : start + B])
            start += B
        if start < incoming_RD.shape[0]:
            self.pending.append(incoming_RD[start:])
            self.n_pending = incoming_RD.shape[0] - start

    def flush(self, drop_last: bool) -> Iterator[torch.Tensor]:
        """Emit everything still held, shuffled (the end of a finite stream)."""
        parts = []
        if self.buf_QD is not None and self.n_filled:
            parts.append(self.buf_QD[: self.n_filled])
        parts.extend(self.pending)
        self.buf_QD, self.n_filled, self.pending, self.n_pending = None, 0, [], 0
        if not parts:
            return
        rest_ND = torch.cat(parts)
        if self.capacity > 0:
            rest_ND = rest_ND[torch.from_numpy(self.rng.permutation(rest_ND.shape[0]))]
        B = self.batch_size
        for start in range(0, rest_ND.shape[0], B):
            batch = rest_ND[start : start + B]
            if batch.shape[0] < B and drop_last:
                break
            yield batch.clone()


# ------------------------------------------------------------------------------------ stream
def kept_rows(holdout: tuple, n_rows: int, n_held: int) -> int:
    """The rows of a chunk that ``holdout`` keeps (``n_held``: those of held-out images)."""
    return n_rows if holdout[0] == "all" else n_held if holdout[0] == "val" else n_rows - n_held


def window_rows(shuffle_buffer: int, batch_size: int) -> int:
    """Rows of one shuffle window: ``shuffle_buffer`` rounded down to whole batches, at least one batch."""
    return max(1, int(shuffle_buffer) // int(batch_size)) * int(batch_size)


def build_chunk_index(
    shard_fpaths: list[str],
    holdout_period: int | None = None,
    d: int | None = None,
    manifest: StoreManifest | None = None,
) -> dict[str, list[tuple[int, int, int]]]:
    """``{shard: [(chunk_index, n_rows, n_held_out), ...]}`` for every shard (headers only for local ones).

    A remote store (URLs, ``pipe:...``; ``shard_fpaths`` = every shard of ``manifest``, in its order) takes the
    index from the manifest's ``shard_rows``, reading nothing. Without them (a store written before they
    were recorded) or with a held-out period (which needs each row's image), a shard that is not a local
    file cannot be seeked: it is read once to count.
    """
    if (
        any(is_remote(f) for f in shard_fpaths)
        and holdout_period is None
        and manifest is not None
        and manifest.shard_rows is not None
        and manifest.rows_per_chunk
        and len(manifest.shard_rows) == len(shard_fpaths)
    ):
        return dict(
            zip(shard_fpaths, manifest_chunk_rows(manifest.shard_rows, int(manifest.rows_per_chunk)), strict=True)
        )
    from tqdm.auto import tqdm

    # headers only, but a store of thousands of shards takes a while: a bar (hidden for small stores)
    bar = tqdm(shard_fpaths, desc="index store shards", unit="shard", leave=False, disable=len(shard_fpaths) < 64)
    index: dict[str, list[tuple[int, int, int]]] = {}
    for fpath in bar:
        if not is_remote(fpath) and Path(fpath).is_file():
            index[fpath] = chunk_row_counts(fpath, d=d, holdout_period=holdout_period)
            continue
        log.warning("shard %s is not a local file: reading it once to count its rows", fpath)
        index[fpath] = [
            (
                c["chunk"],
                int(c["acts"].shape[0]),
                int(image_holdout(c["image_idx"], holdout_period).sum()) if holdout_period else 0,
            )
            for c in iter_chunks([fpath], with_keys=False)
        ]
    return index


class _RowReader:
    """Pulls exactly ``n`` rows at a time from a generator of row blocks (keeps the rest of a block)."""

    def __init__(self, blocks: Iterator[torch.Tensor], where: str):
        self.blocks, self.where = blocks, where
        self.rest: list[torch.Tensor] = []
        self.n_rest = 0

    def take(self, n: int) -> torch.Tensor:
        while self.n_rest < n:
            block = next(self.blocks, None)
            if block is None:
                raise RuntimeError(
                    f"{self.where}: fewer rows than the chunk index says: a shard changed while "
                    "training; restart the run (the index is rebuilt on start)"
                )
            self.rest.append(block)
            self.n_rest += block.shape[0]
        rows = self.rest[0] if len(self.rest) == 1 else torch.cat(self.rest)
        self.rest = [rows[n:].clone()] if rows.shape[0] > n else []  # < one chunk; frees the window
        self.n_rest = rows.shape[0] - n
        return rows[:n]


class ShardRowStream(IterableDataset):
    """Batches ``[B, D]`` (fp16/bf16 as stored) streamed from activation shards (see the module docstring).

    ``n_epochs=None`` streams forever (training); otherwise that many passes (validation,
    benchmarks, tests). ``holdout``: ``("all",)``, ``("val", p)`` (only rows of held-out images,
    ``image_idx % p == 0``) or ``("train", p)`` (the others). ``skip_batches``: the number of
    batches already trained on (summed over workers, as the DataLoader delivered them); the stream
    seeks there. ``chunk_rows``: the store's chunk index (:func:`build_chunk_index`), built on first
    use when not given.
    """

    def __init__(
        self,
        shard_fpaths: list[str],
        batch_size: int,
        shuffle_buffer: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        n_epochs: int | None = None,
        shuffle: bool = True,
        drop_last: bool = True,
        holdout: tuple = ("all",),
        start_epoch: int = 0,
        skip_batches: int = 0,
        chunk_rows: dict[str, list[tuple[int, int, int]]] | None = None,
        d: int | None = None,
    ):
        super().__init__()
        if not shard_fpaths:
            raise ValueError("ShardRowStream needs at least one shard")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world of size {world_size}")
        if len(shard_fpaths) < world_size:
            raise ValueError(
                f"{len(shard_fpaths)} training shard(s) for {world_size} ranks: every rank needs its own shard. "
                "Write more shards (smaller extract shard size) or train on fewer devices."
            )
        if holdout[0] not in ("all", "train", "val"):
            raise ValueError(f"holdout must be ('all',), ('train', p) or ('val', p), got {holdout!r}")
        self.shard_fpaths = [str(p) for p in shard_fpaths]
        self.batch_size = int(batch_size)
        self.window = window_rows(shuffle_buffer, batch_size) if shuffle else self.batch_size
        self.seed = int(seed)
        self.rank, self.world_size = int(rank), int(world_size)
        self.n_epochs = n_epochs
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.holdout = tuple(holdout)
        self.start_epoch = int(start_epoch)
        self.skip_batches = int(skip_batches)
        self.chunk_rows = chunk_rows
        self.d = d

    # ------------------------------------------------------------------ the plan (no I/O)
    def index(self) -> dict[str, list[tuple[int, int, int]]]:
        if self.chunk_rows is None:
            period = self.holdout[1] if self.holdout[0] != "all" else None
            self.chunk_rows = build_chunk_index(self.shard_fpaths, holdout_period=period, d=self.d)
        return self.chunk_rows

    def shards_for(self, epoch: int, worker: int, n_workers: int) -> tuple[list[str], int | None]:
        """(shard paths, chunk stride or None): the shards of one worker of one rank for one epoch."""
        order = list(self.shard_fpaths)
        if self.shuffle:
            perm = np.random.default_rng([self.seed, epoch]).permutation(len(order))
            order = [order[i] for i in perm]
        mine = order[self.rank :: self.world_size]  # disjoint; sizes differ by at most one
        if len(mine) >= n_workers:
            return mine[worker::n_workers], None
        return mine, n_workers  # fewer shards than workers: split by chunk position instead

    def plan(self, epoch: int, worker: int, n_workers: int) -> list[tuple[str, int, int]]:
        """``(shard, chunk_index, kept rows)`` in reading order: what one worker reads in one epoch."""
        fpaths, stride = self.shards_for(epoch, worker, n_workers)
        index = self.index()
        entries = [(f, c, kept_rows(self.holdout, n, h)) for f in fpaths for c, n, h in index[f]]
        if stride is not None:
            entries = entries[worker::stride]
        return [e for e in entries if e[2] > 0]

    def n_batches(self, plan: list[tuple[str, int, int]]) -> int:
        n_rows = sum(n for _, _, n in plan)
        return n_rows // self.batch_size + int(n_rows % self.batch_size > 0 and not self.drop_last)

    def seek(self, local_batch: int, worker: int, n_workers: int) -> tuple[int, int] | None:
        """(epoch, batch within that epoch) of a worker's ``local_batch``-th batch; None past a finite end."""
        epoch, empty = self.start_epoch, 0
        while self.n_epochs is None or epoch < self.start_epoch + self.n_epochs:
            n = self.n_batches(self.plan(epoch, worker, n_workers))
            if local_batch < n:
                return epoch, local_batch
            local_batch -= n
            empty = empty + 1 if n == 0 else 0
            if empty >= 20:
                raise RuntimeError(self._starved(epoch, worker, n_workers))
            epoch += 1
        return None

    def _starved(self, epoch: int, worker: int, n_workers: int) -> str:
        n_rows = sum(n for _, _, n in self.plan(epoch, worker, n_workers))
        return (
            f"worker {worker} of {n_workers} on rank {self.rank} gets {n_rows} rows per epoch, fewer than one "
            f"batch of {self.batch_size}, epoch after epoch: use fewer data.num_workers, a smaller "
            "data.batch_size, or a larger store"
        )

    # ------------------------------------------------------------------------- reading
    def _filter(self, chunk: dict) -> torch.Tensor:
        rows_RD = chunk["acts"]
        if self.holdout[0] == "all":
            return rows_RD
        held_R = image_holdout(chunk["image_idx"], self.holdout[1])
        return rows_RD[held_R if self.holdout[0] == "val" else ~held_R]

    def rows_from(self, plan: list[tuple[str, int, int]], start_row: int) -> Iterator[torch.Tensor]:
        """Kept rows of ``plan`` from kept-row ``start_row`` on; chunks before it are not opened."""
        first, offset = len(plan), 0
        for i, (_, _, n) in enumerate(plan):
            if offset + n > start_row:
                first = i
                break
            offset += n
        skip = start_row - offset
        for fpath, group in itertools.groupby(plan[first:], key=lambda e: e[0]):
            expected = {c: n for _, c, n in group}
            # only the planned chunks are read; training needs only the rows (and image_idx for a holdout)
            for chunk in iter_chunks([fpath], expected.__contains__, with_keys=False):
                rows_RD = self._filter(chunk)
                if rows_RD.shape[0] != expected[chunk["chunk"]]:
                    raise RuntimeError(
                        f"{fpath}: chunk {chunk['chunk']} has {rows_RD.shape[0]} rows, the index "
                        f"says {expected[chunk['chunk']]}: the shard changed; restart the run"
                    )
                if skip:
                    rows_RD, skip = rows_RD[skip:], 0
                if rows_RD.shape[0]:
                    yield rows_RD

    def epoch_batches(self, epoch: int, worker: int, n_workers: int, first_batch: int = 0) -> Iterator[torch.Tensor]:
        """The batches of one worker in one epoch from ``first_batch`` on (opening only what they need)."""
        plan = self.plan(epoch, worker, n_workers)
        n_rows = sum(n for _, _, n in plan)
        B, W = self.batch_size, self.window
        window, offset = divmod(first_batch, W // B)
        reader = _RowReader(self.rows_from(plan, window * W), where=f"rank {self.rank} worker {worker} epoch {epoch}")
        while window * W < n_rows:
            size = min(W, n_rows - window * W)
            if size < B and self.drop_last:
                return
            rows_RD = reader.take(size)
            if self.shuffle:
                perm_R = torch.from_numpy(
                    np.random.default_rng([self.seed, epoch, self.rank, worker, window]).permutation(size)
                )
            else:
                perm_R = torch.arange(size)
            n_out = size // B + int(size % B > 0 and not self.drop_last)
            for b in range(offset, n_out):
                yield rows_RD.index_select(0, perm_R[b * B : (b + 1) * B])  # a copy: the window is freed
            window, offset = window + 1, 0

    def __iter__(self) -> Iterator[torch.Tensor]:
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # DataLoader interleaves workers round-robin from worker 0, so batch j of the original run
        # came from worker j % n. After skipping s batches, loader worker w must play the role of
        # original worker (w + s) % n for batch s + i to come out i-th; that role has already
        # delivered len(range(role, s, n)) batches, so it seeks past exactly those.
        worker = (worker + self.skip_batches) % n_workers
        found = self.seek(len(range(worker, self.skip_batches, n_workers)), worker, n_workers)
        if found is None:
            return
        epoch, first_batch = found
        empty = 0
        while self.n_epochs is None or epoch < self.start_epoch + self.n_epochs:
            n_out = 0
            for batch in self.epoch_batches(epoch, worker, n_workers, first_batch):
                n_out += 1
                yield batch
            empty = empty + 1 if n_out == 0 else 0
            if empty >= 20 and self.n_epochs is None:
                raise RuntimeError(self._starved(epoch, worker, n_workers))
            epoch, first_batch = epoch + 1, 0


# ------------------------------------------------------------------- rows from images
class ImageRowsStream(IterableDataset):
    """Rows computed on the fly: ``make_chunks(epoch, part, n_parts)`` (images -> tap -> select_tokens, e.g.
    :class:`vlmsae.models.image_rows.ImageChunkMaker`) -> shuffle buffer -> batches."""

    def __init__(
        self,
        make_chunks: Callable[[int, int, int], Iterator[torch.Tensor]],
        batch_size: int,
        shuffle_buffer: int,
        seed: int,
        rank: int,
        world_size: int,
        n_epochs: int | None,
        skip_batches: int = 0,
        progress: bool = False,
    ):
        super().__init__()
        self.make_chunks = make_chunks
        self.batch_size, self.shuffle_buffer, self.seed = batch_size, shuffle_buffer, seed
        self.rank, self.world_size, self.n_epochs, self.skip_batches = rank, world_size, n_epochs, skip_batches
        self.progress = progress  # a bar while the shuffle window fills (rank 0, first worker): no silent wait

    def _fill_bar(self, buffer: RowShuffleBuffer, to_skip: int, first_worker: bool):
        """A tqdm bar over the rows computed before the first batch (the window, plus replayed batches on resume)."""
        if not (self.progress and first_worker and self.rank == 0):
            return None
        from tqdm import tqdm

        what = f"replaying {to_skip} batches" if to_skip else "filling the shuffle window"
        total = buffer.capacity + self.batch_size * (to_skip + 1)
        log.info("%s (data.shuffle_buffer=%d rows) before the first batch", what, buffer.capacity)
        return tqdm(total=total, desc=f"{what} (rows)", unit="row", unit_scale=True, leave=False)

    def __iter__(self) -> Iterator[torch.Tensor]:
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        first_worker = worker == 0
        worker = (worker + self.skip_batches) % n_workers  # round-robin order after a skip (see ShardRowStream)
        rng = np.random.default_rng([self.seed, self.rank, worker])
        buffer = RowShuffleBuffer(self.shuffle_buffer, self.batch_size, rng)
        to_skip = len(range(worker, self.skip_batches, n_workers))
        bar = self._fill_bar(buffer, to_skip, first_worker)
        epoch = 0
        while self.n_epochs is None or epoch < self.n_epochs:
            part, n_parts = self.rank * n_workers + worker, self.world_size * n_workers
            got = False
            for rows_RD in self.make_chunks(epoch, part, n_parts):
                got = True
                if bar is not None:
                    bar.update(rows_RD.shape[0])
                for batch in buffer.add(rows_RD):
                    if to_skip:
                        to_skip -= 1
                        continue
                    if bar is not None:
                        bar.close()
                        bar = None
                    yield batch
            if not got:
                raise RuntimeError(f"no images for part {part} of {n_parts}: fewer images than ranks x workers")
            epoch += 1
        yield from buffer.flush(drop_last=False)


def epoch_order_seed(seed: int, epoch: int) -> int:
    """The ``order_seed`` of one training epoch of ``data=images``: a fresh permutation each epoch."""
    return int(np.random.SeedSequence([int(seed), 4099, int(epoch)]).generate_state(1, dtype=np.uint64)[0] >> 1)


def iter_epoch_images(image_kwargs: dict, order_seed: int | None, part: int, n_parts: int) -> Iterator[ImageRecord]:
    """The images of part ``part`` of ``n_parts``, visited in ``default_rng(order_seed).permutation`` of the
    listing (file order when None); ``record.index`` is the listing position (the stable image id).

    A ``wds`` source keeps its file order: permuting its tars would also move ``index`` (a stream
    position there), and the held-out images must stay the same every epoch.
    """
    if image_kwargs.get("source") == "wds":
        order_seed = None
    yield from iter_images(worker=(part, n_parts), order_seed=order_seed, **image_kwargs)

"""Activation store: WebDataset tar shards of safetensors chunks, a manifest, and resumable writing.

A store folder holds ``acts-%06d.tar`` (one sample per chunk, ``__key__`` = the chunk index over the store;
layout in docs/ARCHITECTURE.md; no pickles), ``manifest.json`` (:class:`vlmsae.formats.StoreManifest`, written
last) and ``progress.json`` (:class:`vlmsae.formats.StoreProgress`, the resume point); a store extracted by W
torchrun processes holds ``rank-RRRRR-of-WWWWW/`` folders instead, each one writer's folder, which
:func:`list_shards` lists rank by rank. Every file is written under a temporary name and renamed, and
``progress.json`` only after its shard is in place, so a killed run leaves at worst one shard newer than the
progress record; :class:`ShardWriter` deletes it on restart: no row is lost or written twice.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import tarfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from vlmsae.data.remote import open_stream
from vlmsae.data.sink import StoreSink
from vlmsae.formats import (
    MANIFEST_JSON,
    PROGRESS_JSON,
    StoreManifest,
    StoreProgress,
    read_progress,
    write_manifest,
    write_progress,
)
from vlmsae.utils.io import atomic_write
from vlmsae.utils.provenance import git_commit, versions

SHARD_PATTERN = "acts-%06d.tar"
STORE_DTYPES = {
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float32": torch.float32,
    "fp32": torch.float32,
}


RANK_DIR_PATTERN = "rank-%05d-of-%05d"  # one rank's part of a store written by torchrun (vlmsae.extract)
_SHARD_GLOB = "acts-[0-9][0-9][0-9][0-9][0-9][0-9].tar"


def rank_dpaths(dpath: str | Path) -> list[Path]:
    """The rank folders of a store written by several processes (``rank-RRRRR-of-WWWWW``), in rank order."""
    return sorted(p for p in Path(dpath).glob("rank-[0-9][0-9][0-9][0-9][0-9]-of-[0-9]*") if p.is_dir())


def list_shards(dpath: str | Path) -> list[Path]:
    """The complete shards of a store, in order (temporary files are never listed): its own, then those of
    its rank folders (a store extracted by several processes), rank by rank."""
    own = sorted(Path(dpath).glob(_SHARD_GLOB))
    return own + [fpath for rank_dpath in rank_dpaths(dpath) for fpath in sorted(rank_dpath.glob(_SHARD_GLOB))]


class RunningStats:
    """Per-dimension mean and variance and the mean squared norm, merged batch by batch in float64.

    Chan et al.'s parallel update keeps the variance accurate over hundreds of millions of rows.
    ``var`` is the population variance (ddof=0).
    """

    def __init__(self, d: int):
        self.n = 0
        self.mean = torch.zeros(d, dtype=torch.float64)
        self.m2 = torch.zeros(d, dtype=torch.float64)
        self.sq_norm_sum = 0.0

    def update(self, x_ND: torch.Tensor) -> None:
        x = x_ND.detach().to("cpu", torch.float64)
        batch = RunningStats(x.shape[1])
        batch.n, batch.mean = x.shape[0], x.mean(dim=0)
        batch.m2, batch.sq_norm_sum = ((x - batch.mean) ** 2).sum(dim=0), float((x**2).sum())
        self.merge(batch)

    def merge(self, other: RunningStats) -> None:
        """Add another part's statistics (Chan et al.'s pairwise combination)."""
        if other.n == 0:
            return
        n = self.n + other.n
        delta = other.mean - self.mean
        self.mean = self.mean + delta * (other.n / n)
        self.m2 = self.m2 + other.m2 + delta**2 * (self.n * other.n / n)
        self.n = n
        self.sq_norm_sum += other.sq_norm_sum

    @property
    def var(self) -> torch.Tensor:
        return self.m2 / max(self.n, 1)

    @property
    def mean_sq_norm(self) -> float:
        return self.sq_norm_sum / max(self.n, 1)

    def state_dict(self) -> dict[str, Any]:
        return {"n": self.n, "mean": self.mean.tolist(), "m2": self.m2.tolist(), "sq_norm_sum": self.sq_norm_sum}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> RunningStats:
        stats = cls(len(state["mean"]))
        stats.n = int(state["n"])
        stats.mean = torch.tensor(state["mean"], dtype=torch.float64)
        stats.m2 = torch.tensor(state["m2"], dtype=torch.float64)
        stats.sq_norm_sum = float(state["sq_norm_sum"])
        return stats


class ImageListDigest:
    """sha256 over the ordered image keys, resumable: keys are hashed in fixed blocks chained together.

    The digest depends only on the key sequence (not on shard sizes), so two stores made from the
    same image list carry the same digest. ``state_dict`` holds the chain and the pending keys.
    """

    BLOCK = 4096

    def __init__(self) -> None:
        self.chain = hashlib.sha256(b"vlmsae-image-list-v1").hexdigest()
        self.pending: list[str] = []

    def update(self, key: str) -> None:
        self.pending.append(key)
        if len(self.pending) >= self.BLOCK:
            self._fold()

    def _fold(self) -> None:
        self.chain, self.pending = self.hexdigest(), []

    def hexdigest(self) -> str:
        if not self.pending:
            return self.chain
        block = "\n".join(self.pending).encode("utf-8")
        return hashlib.sha256(self.chain.encode() + hashlib.sha256(block).digest()).hexdigest()

    def state_dict(self) -> dict[str, Any]:
        return {"chain": self.chain, "pending": list(self.pending)}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> ImageListDigest:
        digest = cls()
        digest.chain, digest.pending = state["chain"], list(state["pending"])
        return digest


def image_list_digest(keys: Iterable[str]) -> str:
    """The digest :class:`ImageListDigest` gives for ``keys`` (compare an image list with a store's)."""
    digest = ImageListDigest()
    for key in keys:
        digest.update(key)
    return digest.hexdigest()


def encode_chunk(
    acts_RD: torch.Tensor, token_idx_R: torch.Tensor, image_idx_R: torch.Tensor, label_R: torch.Tensor, keys: list[str]
) -> tuple[bytes, bytes]:
    """The two tar members of one chunk: safetensors bytes and the keys JSON."""
    from safetensors.torch import save

    tensors = {
        "acts": acts_RD.contiguous(),
        "token_idx": token_idx_R.to(torch.int32).contiguous(),
        "image_idx": image_idx_R.to(torch.int64).contiguous(),
        "label": label_R.to(torch.int64).contiguous(),
    }
    return save(tensors), json.dumps(keys).encode("utf-8")


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # reproducible bytes: the same rows give the same shard
    tar.addfile(info, io.BytesIO(data))


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class ShardWriter:
    """Buffers activation rows and writes them as whole shards, resuming a previous run in the same folder.

    ``meta`` describes the extraction (model, layer, tokens, source, ...); a folder written with
    different ``meta`` is refused rather than mixed. After a restart, ``self.state`` is the caller's
    state saved with the last complete shard (e.g. the next image position), or ``None`` if fresh.
    """

    def __init__(
        self,
        dpath: str | Path,
        d: int,
        dtype: str = "float16",
        rows_per_chunk: int = 4096,
        rows_per_shard: int = 65536,
        meta: dict[str, Any] | None = None,
        sink: StoreSink | None = None,
    ):
        if dtype not in STORE_DTYPES:
            raise ValueError(f"Unknown store dtype {dtype!r}: use one of {sorted(STORE_DTYPES)}.")
        if rows_per_chunk < 1 or rows_per_shard < 1:
            raise ValueError(f"rows_per_chunk={rows_per_chunk} and rows_per_shard={rows_per_shard} must be >= 1.")
        self.dpath = Path(dpath)
        self.dpath.mkdir(parents=True, exist_ok=True)
        self.d, self.dtype_name, self.dtype = d, dtype, STORE_DTYPES[dtype]
        self.rows_per_chunk, self.rows_per_shard = rows_per_chunk, rows_per_shard
        self.meta = json.loads(json.dumps(meta or {}, default=str))
        self.n_shards = self.n_rows = self.n_chunks = 0
        self.stats = RunningStats(d)
        self.state: dict[str, Any] | None = None
        self.shard_rows: list[int] = []  # rows of each shard (in progress.json: the manifest needs no shard read)
        self.sink = sink  # out=<url>: dpath stages, the sink publishes every finished file (vlmsae.data.sink)
        self._buf: list[tuple[torch.Tensor, ...]] = []
        self._buf_keys: list[str] = []
        self._buf_rows = 0
        if sink is not None:
            sink.pull(self.dpath)  # the remote progress.json is the resume point
        self._resume()
        if sink is not None:
            sink.prune(self.n_shards)

    def _resume(self) -> None:
        if (self.dpath / PROGRESS_JSON).exists():
            progress = read_progress(self.dpath)
            if progress.meta != self.meta:
                changed = sorted(
                    k for k in set(progress.meta) | set(self.meta) if progress.meta.get(k) != self.meta.get(k)
                )
                detail = "; ".join(
                    f"{k}: was {_short(progress.meta.get(k))}, now {_short(self.meta.get(k))}" for k in changed
                )
                raise ValueError(
                    f"{self.dpath} holds a different extraction (settings differ in {changed}: {detail}): resume "
                    "only with the same command and the same images, or choose a new out=<dir>."
                )
            self.n_shards, self.n_rows, self.n_chunks = progress.n_shards, progress.n_rows, progress.n_chunks
            self.stats = RunningStats.from_state(progress.stats)
            self.state = progress.state
            self.shard_rows = [int(n) for n in progress.extra.get("shard_rows", [])]
        elif list_shards(self.dpath):
            raise ValueError(f"{self.dpath} holds activation shards but no {PROGRESS_JSON}: choose a new out=<dir>.")
        # Shards newer than the progress record (killed between the rename and the progress write)
        # and stray temporary files are rewritten from the recorded state (this folder's own shards only).
        for fpath in sorted(self.dpath.glob(_SHARD_GLOB))[self.n_shards :]:
            fpath.unlink()
        for fpath in self.dpath.glob(".acts-*.tmp"):
            fpath.unlink()

    @property
    def buffered_rows(self) -> int:
        return self._buf_rows

    def add(
        self,
        acts_ND: torch.Tensor,
        token_idx_N: torch.Tensor,
        image_idx_N: torch.Tensor,
        label_N: torch.Tensor,
        keys: list[str],
    ) -> None:
        """Buffer rows (cast to the store dtype); statistics are taken on the stored values."""
        if acts_ND.ndim != 2 or acts_ND.shape[1] != self.d:
            raise ValueError(f"Expected rows [N, {self.d}], got {tuple(acts_ND.shape)}.")
        n = acts_ND.shape[0]
        if not (len(token_idx_N) == len(image_idx_N) == len(label_N) == len(keys) == n):
            raise ValueError("acts, token_idx, image_idx, label and keys must have one entry per row.")
        rows = acts_ND.detach().to("cpu", self.dtype)
        self.stats.update(rows)
        self._buf.append((rows, token_idx_N.cpu(), image_idx_N.cpu(), label_N.cpu()))
        self._buf_keys.extend(keys)
        self._buf_rows += n

    def flush(self, state: dict[str, Any] | None = None) -> Path | None:
        """Write every buffered row as the next shard, then record ``state`` as the resume point."""
        if self._buf_rows == 0:
            if state is not None:
                self.state = state
                self._write_progress()
            return None
        acts, token_idx, image_idx, label = (torch.cat(parts) for parts in zip(*self._buf))
        keys = self._buf_keys
        shard_fpath = self.dpath / (SHARD_PATTERN % self.n_shards)
        n_chunks = 0

        def write(tmp_fpath: Path) -> None:
            nonlocal n_chunks
            with tarfile.open(tmp_fpath, "w") as tar:
                for start in range(0, len(keys), self.rows_per_chunk):
                    end = start + self.rows_per_chunk
                    blob, keys_json = encode_chunk(
                        acts[start:end], token_idx[start:end], image_idx[start:end], label[start:end], keys[start:end]
                    )
                    key = f"{self.n_chunks + n_chunks:06d}"
                    _add_member(tar, f"{key}.acts.safetensors", blob)
                    _add_member(tar, f"{key}.keys.json", keys_json)
                    n_chunks += 1

        atomic_write(shard_fpath, write)  # .acts-*.tmp until renamed
        if self.sink is not None:
            self.sink.put_shard(shard_fpath)  # a temporary name, then moved: readers see whole shards only
        self.shard_rows.append(len(keys))
        self.n_shards += 1
        self.n_rows += len(keys)
        self.n_chunks += n_chunks
        self._buf, self._buf_keys, self._buf_rows = [], [], 0
        self.state = state
        self._write_progress()
        return shard_fpath

    def _write_progress(self) -> None:
        write_progress(
            self.dpath,
            StoreProgress(
                meta=self.meta,
                n_shards=self.n_shards,
                n_rows=self.n_rows,
                n_chunks=self.n_chunks,
                stats=self.stats.state_dict(),
                state=self.state,
                extra={"shard_rows": self.shard_rows},
            ),
        )
        if self.sink is not None:
            self.sink.put(self.dpath / PROGRESS_JSON)

    def write_manifest(self, **fields: Any) -> StoreManifest:
        """Write ``manifest.json`` (statistics + ``meta`` + ``fields``); call after the last ``flush``."""
        if self._buf_rows:
            raise RuntimeError("write_manifest() with rows still buffered: call flush() first.")
        if self.sink is not None:  # the shards are uploaded, not here: their rows were recorded in progress.json
            if len(self.shard_rows) != self.n_shards:
                raise ValueError(
                    f"{self.sink.url}/{PROGRESS_JSON} records the rows of {len(self.shard_rows)} of its "
                    f"{self.n_shards} shards (written by an older vlmsae): re-extract into a new out=<url>"
                )
            shards, shard_rows = [SHARD_PATTERN % i for i in range(self.n_shards)], list(self.shard_rows)
        else:
            shards = [p.name for p in list_shards(self.dpath)]
            shard_rows = [sum(n for _, n, _ in chunk_row_counts(p)) for p in list_shards(self.dpath)]
        counts = dict(d=self.d, dtype=self.dtype_name, n_rows=self.n_rows, n_shards=self.n_shards)
        # rows per shard: with rows_per_chunk, a remote store's chunk index without reading its shards
        counts.update(n_chunks=self.n_chunks, rows_per_chunk=self.rows_per_chunk, shards=shards, shard_rows=shard_rows)
        manifest = _write_store_manifest(self.dpath, self.meta, counts, fields, self.stats)
        if self.sink is not None:
            self.sink.put(self.dpath / MANIFEST_JSON)  # last: a store with a manifest is complete
        return manifest


def _write_store_manifest(
    dpath: Path, meta: dict[str, Any], counts: dict[str, Any], fields: dict[str, Any], stats: RunningStats
) -> StoreManifest:
    """Write ``manifest.json``: the extraction's ``meta``, the writer's ``counts``, the caller's ``fields``, the
    statistics and provenance (later keys win)."""
    manifest = StoreManifest.from_dict(
        {
            **meta,
            **counts,
            **fields,
            "mean": stats.mean.tolist(),
            "var": stats.var.tolist(),
            "mean_sq_norm": stats.mean_sq_norm,
            "versions": versions(),
            "git_commit": git_commit(),
        }
    )
    write_manifest(dpath, manifest)
    return manifest


def write_merged_manifest(dpath: str | Path, part_dpaths: list[Path], **fields: Any) -> StoreManifest:
    """The manifest of a store written in parts (one :class:`ShardWriter` per rank folder): counts summed,
    statistics merged, the parts' ``meta`` less its per-rank keys (``rank``, ``positions``)."""
    dpath = Path(dpath)
    parts = [read_progress(p) for p in part_dpaths]
    stats = RunningStats.from_state(parts[0].stats)
    for part in parts[1:]:
        stats.merge(RunningStats.from_state(part.stats))
    meta = {k: v for k, v in parts[0].meta.items() if k not in ("rank", "positions")}
    counts = {name: sum(getattr(p, name) for p in parts) for name in ("n_rows", "n_shards", "n_chunks")}
    counts.update(d=len(parts[0].stats["mean"]), dtype=meta["dtype"], rows_per_chunk=meta["rows_per_chunk"])
    counts["shards"] = [fpath.relative_to(dpath).as_posix() for fpath in list_shards(dpath)]
    return _write_store_manifest(dpath, meta, counts, fields, stats)


def iter_chunks(
    shard_fpaths: Iterable[str | Path], want: Callable[[int], bool] | None = None, with_keys: bool = True
) -> Iterator[dict[str, Any]]:
    """The chunks of the given shards in order: dicts with ``acts`` [R, D], ``token_idx``, ``image_idx``,
    ``label``, ``keys`` (list of str; left out when ``with_keys=False``) and ``chunk`` (its index).

    ``want(chunk_index)`` is asked once per chunk, in file order; the chunks it refuses are skipped
    (held-out rows, another worker's share). A local shard is read by member offset: Python's
    streaming tar reader (``tarfile`` mode ``r|``) copies through small buffers, and seeking to each
    member and decoding it whole measured ~4x faster (``vlmsae/bench/loader.py``); refused chunks
    are then never read. Anything else (a URL, ``pipe:...``) is streamed with ``webdataset.gopen``.
    """
    for fpath in shard_fpaths:
        if Path(fpath).is_file():
            yield from _iter_local_chunks(Path(fpath), want, with_keys)
        else:
            yield from _iter_streamed_chunks(str(fpath), want, with_keys)


def _decode_chunk(key: str, blob: bytes, keys_json: bytes | None, where: str = "") -> dict[str, Any]:
    from safetensors.torch import load

    try:
        chunk: dict[str, Any] = load(blob)
        if keys_json is not None:
            chunk["keys"] = json.loads(keys_json)
    except Exception as err:  # safetensors raises its own error types; name the shard so it can be re-extracted
        raise ValueError(
            f"{where}: chunk {key} is corrupt ({type(err).__name__}: {err}); the shard is damaged: "
            "delete the store and re-run `python -m vlmsae.extract` (or restore the file)"
        ) from err
    chunk["chunk"] = int(key)
    return chunk


def _shard_members(fpath: Path) -> dict[str, dict[str, tarfile.TarInfo]]:
    """key -> ext -> member, in file order; a truncated or unreadable tar is a clear error naming the file.

    Only tar headers are read (tarfile seeks over the payloads), so this is cheap even for a large shard.
    """
    members: dict[str, dict[str, tarfile.TarInfo]] = {}
    fix = "the shard is damaged (an interrupted copy?): re-copy it or re-run `python -m vlmsae.extract`"
    try:
        with tarfile.open(fpath, mode="r:") as tar:
            infos = tar.getmembers()
    except (tarfile.TarError, OSError, EOFError) as err:
        raise ValueError(f"{fpath}: not a readable tar shard ({type(err).__name__}: {err}); {fix}") from err
    size = fpath.stat().st_size
    for member in infos:
        if not member.isfile():
            continue
        if member.offset_data + member.size > size:
            raise ValueError(
                f"{fpath}: truncated shard: member {member.name} ends at byte "
                f"{member.offset_data + member.size} but the file has {size} bytes; {fix}"
            )
        key, _, ext = Path(member.name).name.partition(".")
        members.setdefault(key, {})[ext] = member
    if not members:
        raise ValueError(f"{fpath}: shard holds no chunks; {fix}")
    return members


def _iter_local_chunks(fpath: Path, want: Callable[[int], bool] | None, with_keys: bool) -> Iterator[dict[str, Any]]:
    """Seek to each chunk's members (the fast path: only the chunks ``want`` accepts are read)."""
    members = _shard_members(fpath)
    needed = ("acts.safetensors", "keys.json") if with_keys else ("acts.safetensors",)
    incomplete = sorted(key for key, parts in members.items() if not all(ext in parts for ext in needed))
    if incomplete:
        raise ValueError(f"{fpath}: incomplete chunk(s) {incomplete} (each needs acts.safetensors and keys.json).")

    def read(fh, member: tarfile.TarInfo) -> bytes:
        fh.seek(member.offset_data)
        return fh.read(member.size)

    with open(fpath, "rb") as fh:
        for key, parts in members.items():
            if want is None or want(int(key)):
                keys_json = read(fh, parts["keys.json"]) if with_keys else None
                yield _decode_chunk(key, read(fh, parts["acts.safetensors"]), keys_json, where=str(fpath))


VAL_MAX_FRACTION = 0.2  # the validation floor never takes more than this share of the rows


def holdout_target(n_rows: int, val_fraction: float, min_rows: int) -> int:
    """Rows validation should hold out: ``val_fraction`` of them, and at least ``min_rows`` (one batch) so the
    held-out FVE is measured on enough rows, but that floor never takes more than ``VAL_MAX_FRACTION`` of
    the rows (0 when ``val_fraction`` is 0: no split)."""
    if val_fraction <= 0 or n_rows <= 0:
        return 0
    floor = min(int(min_rows), int(VAL_MAX_FRACTION * n_rows))
    return max(1, math.ceil(val_fraction * n_rows), floor)


def holdout_period(n_images: int, target_images: int) -> int:
    """The period of :func:`image_holdout` that holds out at least ``target_images`` of ``n_images`` images
    (``image_idx % period == 0`` keeps ``ceil(n_images / period)`` of them); at least 2, so training keeps half."""
    return max(2, int(n_images) // max(1, int(target_images)))


def image_holdout(image_idx_R: torch.Tensor, period: int) -> torch.Tensor:
    """Rows whose image is held out for validation: ``image_idx % period == 0`` (a split by image, never
    by row: every row of an image falls on the same side). The same rule holds out the same images
    in ``data=images`` (listing index), so a store and the on-the-fly path validate on the same images."""
    return image_idx_R % int(period) == 0


def manifest_chunk_rows(shard_rows: list[int], rows_per_chunk: int) -> list[list[tuple[int, int, int]]]:
    """``(chunk_index, n_rows, 0)`` of every chunk of every shard, from the manifest's rows per shard.

    :class:`ShardWriter` cuts each shard into chunks of ``rows_per_chunk`` rows (the last one shorter) and
    numbers chunks across the store, so the rows per shard fix the whole index; the reader checks every
    chunk's size against it.
    """
    out, chunk = [], 0
    for n_rows in shard_rows:
        sizes = [min(rows_per_chunk, n_rows - start) for start in range(0, int(n_rows), rows_per_chunk)]
        out.append([(chunk + i, n, 0) for i, n in enumerate(sizes)])
        chunk += len(sizes)
    return out


def chunk_row_counts(
    fpath: str | Path, d: int | None = None, holdout_period: int | None = None
) -> list[tuple[int, int, int]]:
    """``(chunk_index, n_rows, n_held_out)`` of every chunk of a local shard, in file order, from headers.

    Reads the tar headers and each chunk's safetensors header (the tensor shapes); with
    ``holdout_period`` also the ``image_idx`` tensor (8 bytes a row, not the activations) to count
    the rows :func:`image_holdout` keeps for validation. ``d``: the width every chunk must have.
    This index is what lets a resumed training stream seek to its position instead of re-reading.
    """
    fpath = Path(fpath)
    members = _shard_members(fpath)
    out = []
    with open(fpath, "rb") as fh:
        for key, parts in members.items():
            member = parts.get("acts.safetensors")
            if member is None:
                raise ValueError(f"{fpath}: chunk {int(key)} has no acts.safetensors member (the shard is damaged).")
            try:
                fh.seek(member.offset_data)
                n_header = int.from_bytes(fh.read(8), "little")
                if not 0 < n_header <= member.size - 8:
                    raise ValueError(f"header length {n_header} outside the member's {member.size} bytes")
                header = json.loads(fh.read(n_header))
                shape = header["acts"]["shape"]
            except (ValueError, KeyError, TypeError) as err:
                raise ValueError(
                    f"{fpath}: chunk {int(key)} is corrupt (unreadable safetensors header: {err}); "
                    "re-copy the shard or re-run `python -m vlmsae.extract`"
                ) from err
            if d is not None and (len(shape) != 2 or int(shape[1]) != int(d)):
                raise ValueError(
                    f"{fpath}: chunk {int(key)} has rows of shape {shape} but the store's manifest says "
                    f"d={d}: the store mixes extractions; re-extract it into a fresh folder"
                )
            n_rows, n_held = int(shape[0]), 0
            if holdout_period is not None:
                start, end = header["image_idx"]["data_offsets"]
                fh.seek(member.offset_data + 8 + n_header + start)
                image_idx_R = torch.frombuffer(bytearray(fh.read(end - start)), dtype=torch.int64)
                n_held = int(image_holdout(image_idx_R, holdout_period).sum())
            out.append((int(key), n_rows, n_held))
    return out


def _iter_streamed_chunks(url: str, want: Callable[[int], bool] | None, with_keys: bool) -> Iterator[dict[str, Any]]:
    """One pass through a shard that cannot be seeked (a URL or a pipe): every member is read."""
    pending: dict[str, dict[str, bytes]] = {}
    with open_stream(url, "activation shard") as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, _, ext = Path(member.name).name.partition(".")
            sample = pending.setdefault(key, {})
            sample[ext] = tar.extractfile(member).read()
            if "acts.safetensors" in sample and "keys.json" in sample:
                del pending[key]
                if want is None or want(int(key)):
                    keys_json = sample["keys.json"] if with_keys else None
                    yield _decode_chunk(key, sample["acts.safetensors"], keys_json, where=url)
    if pending:
        raise ValueError(f"{url}: incomplete chunk(s) {sorted(pending)} (each needs acts.safetensors and keys.json).")


def read_rows(dpath: str | Path, max_rows: int | None = None) -> dict[str, Any]:
    """Load a (small) store into memory: ``acts`` [N, D], ``token_idx``, ``image_idx``, ``label``, ``keys``."""
    chunks, n = [], 0
    for chunk in iter_chunks(list_shards(dpath)):
        chunks.append(chunk)
        n += len(chunk["keys"])
        if max_rows is not None and n >= max_rows:
            break
    if not chunks:
        raise ValueError(f"No activation rows in {dpath}.")
    out: dict[str, Any] = {
        name: torch.cat([c[name] for c in chunks])[:max_rows] for name in ("acts", "token_idx", "image_idx", "label")
    }
    out["keys"] = [key for c in chunks for key in c["keys"]][:max_rows]
    return out

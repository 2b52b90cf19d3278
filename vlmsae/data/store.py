"""Opening an activation store for training, and writing one from rows in memory.

:func:`open_store` checks before any training step that a store exists, is complete (its manifest is written
last) and has the shards its manifest lists; :func:`check_store_width` that its rows fit the SAE;
:func:`write_acts_store` writes rows held in memory as a store (tests, benchmarks). Format:
:mod:`vlmsae.data.shards`; reader: :mod:`vlmsae.data.stream`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from vlmsae.data.remote import is_remote, join_url, missing_files, open_stream
from vlmsae.data.shards import ShardWriter, list_shards
from vlmsae.formats import MANIFEST_JSON, StoreManifest, manifest_from_json, read_manifest


def open_store(acts: str | Path | None) -> tuple[Path | str, StoreManifest, list[str]]:
    """Check an activation store exists, is complete and is readable; clear errors before any training.

    ``acts``: a folder, or a remote store (:func:`open_remote_store`; returned as the URL string).
    """
    if acts in (None, "", "???"):
        raise ValueError(
            "data.acts is not set: pass the activation folder written by `python -m vlmsae.extract`, "
            "e.g. data.acts=outputs/extract/<run> (or data=images to compute activations on the fly)"
        )
    if is_remote(acts):
        return open_remote_store(str(acts))
    acts_dpath = Path(str(acts)).expanduser()
    if not acts_dpath.is_dir():
        raise FileNotFoundError(
            f"activation directory {str(acts_dpath)!r} does not exist: run `python -m vlmsae.extract` first "
            "or fix data.acts (for a layer sweep: data.acts='/acts/layer${layer}')"
        )
    if not (acts_dpath / MANIFEST_JSON).is_file():
        raise FileNotFoundError(
            f"{str(acts_dpath)!r} has no manifest.json: it is not an activation store written by vlmsae.extract "
            "(an interrupted extraction writes the manifest last; re-run it)"
        )
    manifest = read_manifest(acts_dpath)
    _check_complete(manifest, str(acts_dpath))
    shard_fpaths = [str(p) for p in list_shards(acts_dpath)]  # what a ShardRowStream takes
    if not shard_fpaths:
        raise FileNotFoundError(f"{str(acts_dpath)!r} has a manifest but no acts-*.tar shards")
    listed = manifest.n_shards
    if listed is not None and int(listed) != len(shard_fpaths):
        raise ValueError(
            f"{str(acts_dpath)!r}: the manifest lists {listed} shards but {len(shard_fpaths)} are "
            "present: restore the missing shards or re-run the extraction into a fresh folder"
        )
    return acts_dpath, manifest, shard_fpaths


def _check_complete(manifest: StoreManifest, where: str) -> None:
    if manifest.complete is False or manifest.n_rows is None or manifest.d is None:
        raise ValueError(
            f"the manifest of {where!r} says the store is incomplete (complete={manifest.complete}, "
            f"n_rows={manifest.n_rows}, d={manifest.d}): finish it by re-running the same "
            "`python -m vlmsae.extract ... out=<dir>` command (it resumes), then train"
        )


def open_remote_store(url: str) -> tuple[str, StoreManifest, list[str]]:
    """A store behind a URL (``https://``, ``s3://``, any fsspec protocol) or a ``pipe:`` command with ``{name}``.

    The manifest is read from beside the shards and lists them (no globbing a remote folder); every listed
    shard must be there (a half-uploaded store fails here, naming the missing files), except behind a
    ``pipe:`` command, which cannot be listed (a missing shard then fails when it is read).
    """
    url = url if url.startswith("pipe:") else url.rstrip("/")
    manifest_url = join_url(url, MANIFEST_JSON)
    try:
        with open_stream(manifest_url, f"manifest of the activation store data.acts={url}") as stream:
            text = stream.read()
    except FileNotFoundError as err:
        raise FileNotFoundError(
            f"{err}: {url} is not a finished activation store (extraction writes {MANIFEST_JSON} last, so an "
            "unfinished upload has none): upload the whole store folder, manifest last, or fix data.acts"
        ) from err
    manifest = manifest_from_json(text, manifest_url)
    _check_complete(manifest, url)
    if not manifest.shards:
        raise ValueError(
            f"{manifest_url} lists no shards (a store written before vlmsae recorded them, or an empty one): "
            "remote stores are read from the manifest's shard list; re-run the extraction and upload its output"
        )
    if manifest.n_shards is not None and int(manifest.n_shards) != len(manifest.shards):
        raise ValueError(
            f"{manifest_url} says n_shards={manifest.n_shards} but lists {len(manifest.shards)} shard names: "
            "the manifest is damaged; re-upload it"
        )
    missing = missing_files(url, list(manifest.shards))
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise FileNotFoundError(
            f"the activation store {url} is half-written: its manifest lists {len(manifest.shards)} shards but "
            f"{len(missing)} are missing there ({shown}): finish the upload (shards first, manifest last) "
            "or point data.acts at a complete copy"
        )
    return url, manifest, [join_url(url, name) for name in manifest.shards]


def check_store_width(store: str | Path | StoreManifest, d_expected: int, acts_dpath: str | Path | None = None) -> int:
    """The store's row width ``d``; a clear error when it is not ``d_expected`` (the SAE's ``d_in``).

    ``store``: a store folder or its manifest (then pass ``acts_dpath`` for the message).
    """
    given = isinstance(store, StoreManifest)
    manifest = store if given else read_manifest(store)
    where = str(acts_dpath or "the activation store") if given else str(store)
    d = int(manifest.d)
    if d != int(d_expected):
        raise ValueError(
            f"width mismatch: the activation store {where} has d={d} (model {manifest.model!r}, layer "
            f"{manifest.layer}) but the SAE expects d_in={d_expected}: train on the store extracted with the "
            "SAE's model and layer, or change model=/layer= to the store's"
        )
    return d


def write_acts_store(
    dpath: str | Path,
    acts_ND: torch.Tensor,
    rows_per_chunk: int,
    chunks_per_shard: int,
    meta: dict | None = None,
    dtype: str = "float16",
    rows_per_image: int = 1,
) -> Path:
    """Write rows as an activation store with ``vlmsae.data.shards.ShardWriter`` (tests, benchmarks).

    ``meta`` goes into the manifest (model, layer, tokens, ...); defaults describe synthetic rows.
    Row ``i`` belongs to image ``i // rows_per_image`` (e.g. 2 for a ``random_k`` store); like
    extraction, a shard always holds whole images.
    """
    N, D = acts_ND.shape
    meta = {"model": "synthetic", "pretrained": None, "layer": 0, "tokens": "cls", **(meta or {})}
    rows_per_shard = rows_per_chunk * chunks_per_shard
    if rows_per_shard % rows_per_image:
        raise ValueError(
            f"rows_per_chunk * chunks_per_shard = {rows_per_shard} must be a multiple of "
            f"rows_per_image={rows_per_image}: a shard holds whole images"
        )
    writer = ShardWriter(
        dpath, d=D, dtype=dtype, rows_per_chunk=rows_per_chunk, rows_per_shard=rows_per_shard, meta=meta
    )
    for start in range(0, N, rows_per_shard):
        rows = acts_ND[start : start + rows_per_shard]
        n = rows.shape[0]
        row_R = torch.arange(start, start + n, dtype=torch.int64)
        writer.add(
            rows,
            (row_R % rows_per_image).to(torch.int32),
            row_R // rows_per_image,
            torch.full((n,), -1, dtype=torch.int64),
            [f"img{i}" for i in (row_R // rows_per_image).tolist()],
        )
        writer.flush()
    writer.write_manifest(n_images=-(-N // rows_per_image), image_list_digest=None, skipped=[])
    return Path(dpath)

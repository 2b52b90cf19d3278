"""Writing an activation store to an fsspec URL (``out=s3://bucket/store``, ``gs://``, ``file://``, ``memory://``, ...).

The shard writer works in a local staging folder; a :class:`StoreSink` uploads each file it finishes under a
temporary name (``.<name>.<random>.tmp``) and moves it onto its final name, so a reader never sees a
half-written shard; a shard leaves the staging folder once uploaded; ``progress.json`` follows each shard,
``manifest.json`` comes last. Resume: :meth:`StoreSink.pull` fetches the remote resume point and
:meth:`StoreSink.prune` deletes the remote shards newer than it and stray temporary uploads.
"""

from __future__ import annotations

import re
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import Any

from vlmsae.data.remote import _PROTOCOL_PACKAGES, filesystem, is_remote
from vlmsae.formats import MANIFEST_JSON, PROGRESS_JSON
from vlmsae.utils.io import atomic_write

_SHARD_NAME = re.compile(r"acts-(\d{6})\.tar")
_READ_ONLY = ("http", "https", "pipe")  # fsspec reads these but cannot write them


def check_writable_url(url: str) -> None:
    """Refuse ``url`` unless fsspec can write it here: an unknown protocol, a read-only one, or one whose
    package is not installed fails naming the URL and the fix (call before any image is processed)."""
    import fsspec

    protocol = url.split(":", 1)[0] if url.startswith("pipe:") else url.split("://", 1)[0]
    if protocol in _READ_ONLY:
        raise ValueError(
            f"out={url}: {protocol}: is read-only (vlmsae reads stores from it but cannot upload there): write "
            "to a local folder or a writable fsspec URL (s3://, gs://, az://, file://, ...)"
        )
    try:
        fsspec.get_filesystem_class(protocol)
    except ValueError as err:
        raise ValueError(
            f"out={url}: unknown protocol {protocol}:// ({err}): use a local folder or an fsspec URL such as "
            "s3://bucket/store (pip install s3fs), gs://bucket/store (pip install gcsfs) or file:///abs/path"
        ) from err
    except ImportError as err:
        package = _PROTOCOL_PACKAGES.get(protocol, f"the fsspec implementation of {protocol}://")
        raise ImportError(f"out={url} needs {package}: pip install {package} ({err})") from err


class StoreSink:
    """Publishes the files a shard writer finishes in ``staging_dpath`` to ``url`` (see the module docstring)."""

    def __init__(self, url: str, staging_dpath: str | Path, owns_staging: bool = False):
        self.url = url.rstrip("/")
        self.fs, self.root = filesystem(self.url)
        self.root = self.root.rstrip("/")
        self.staging_dpath = Path(staging_dpath)
        self.owns_staging = owns_staging  # a temporary folder of ours: removed by close()

    @classmethod
    def open(cls, url: str, staging_dir: str | Path | None = None) -> StoreSink:
        """Check ``url`` is writable, then stage in ``staging_dir`` (created) or a new temporary folder."""
        check_writable_url(url)
        if staging_dir is None:
            return cls(url, tempfile.mkdtemp(prefix="vlmsae-extract-"), owns_staging=True)
        Path(staging_dir).mkdir(parents=True, exist_ok=True)
        return cls(url, staging_dir)

    def _path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def names(self) -> list[str]:
        """The file names in the remote folder (none when it does not exist yet)."""
        try:
            listed = self.fs.ls(self.root, detail=False)
        except FileNotFoundError:
            return []
        return sorted(str(p).rstrip("/").rsplit("/", 1)[-1] for p in listed)

    def put(self, local_fpath: str | Path) -> str:
        """Upload ``local_fpath`` under a temporary name beside its final one, then move it there."""
        local_fpath = Path(local_fpath)
        final = self._path(local_fpath.name)
        tmp = self._path(f".{local_fpath.name}.{secrets.token_hex(6)}.tmp")
        try:
            self.fs.put_file(str(local_fpath), tmp)
            self.fs.mv(tmp, final)
        except OSError as err:
            raise ConnectionError(
                f"uploading {local_fpath.name} to {self.url} failed: {type(err).__name__}: {err}"
            ) from err
        return f"{self.url}/{local_fpath.name}"

    def put_shard(self, local_fpath: str | Path) -> str:
        """Upload a finished shard, then drop the staged copy (the staging folder never holds the store)."""
        url = self.put(local_fpath)
        Path(local_fpath).unlink()
        return url

    def pull(self, dpath: str | Path) -> None:
        """Make the staging folder ``dpath`` hold the remote resume point: the remote ``progress.json`` and
        ``manifest.json`` (the remote folder is the truth; staged leftovers of a killed run are dropped)."""
        dpath = Path(dpath)
        dpath.mkdir(parents=True, exist_ok=True)
        for fpath in [*dpath.glob("acts-*.tar"), *dpath.glob(".*.tmp"), dpath / PROGRESS_JSON, dpath / MANIFEST_JSON]:
            fpath.unlink(missing_ok=True)
        try:
            self.fs.makedirs(self.root, exist_ok=True)  # file:// needs the folder; object stores have none
        except OSError as err:
            raise ConnectionError(f"cannot create {self.url}: {type(err).__name__}: {err}") from err
        names = self.names()
        if any(_SHARD_NAME.fullmatch(n) for n in names) and PROGRESS_JSON not in names:
            raise ValueError(f"{self.url} holds activation shards but no {PROGRESS_JSON}: choose a new out=<url>.")
        for name in (PROGRESS_JSON, MANIFEST_JSON):
            if name in names:
                try:
                    atomic_write(dpath / name, lambda tmp, name=name: self.fs.get_file(self._path(name), str(tmp)))
                except OSError as err:
                    raise ConnectionError(f"reading {self.url}/{name} failed: {type(err).__name__}: {err}") from err

    def prune(self, n_shards: int) -> None:
        """Delete remote shards numbered ``n_shards`` or more (newer than the progress record) and temporary
        uploads a killed run left behind; they are rewritten from the recorded state."""
        for name in self.names():
            match = _SHARD_NAME.fullmatch(name)
            if (match and int(match.group(1)) >= n_shards) or (name.startswith(".") and name.endswith(".tmp")):
                self.fs.rm(self._path(name))

    def close(self) -> None:
        """Remove the staging folder if it is a temporary one of ours."""
        if self.owns_staging:
            shutil.rmtree(self.staging_dpath, ignore_errors=True)

    def __repr__(self) -> str:
        return f"StoreSink({self.url!r}, staging={str(self.staging_dpath)!r})"


def sink_of(out: Any, staging_dir: str | Path | None = None) -> StoreSink | None:
    """The sink of an ``out=`` value that is a URL (checked before any work), or None for a local folder."""
    return StoreSink.open(str(out), staging_dir) if out is not None and is_remote(out) else None

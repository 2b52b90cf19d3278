"""Atomic file writes: a reader never sees a half-written file, a crash never leaves one."""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def atomic_write(fpath: str | Path, write_fn: Callable[[Path], None]) -> Path:
    """Call ``write_fn(tmp_fpath)`` then rename the temporary file onto ``fpath``.

    The temporary file (``.<name>.*.tmp``) sits in the same directory, so the rename is atomic on
    POSIX. It gets the permissions a plain ``open()`` would give (0666 minus the umask), not
    mkstemp's owner-only 0600, so checkpoints and shards stay readable by the people they are for.
    """
    fpath = Path(fpath)
    fpath.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{fpath.name}.", suffix=".tmp", dir=fpath.parent)
    os.close(fd)
    tmp_fpath = Path(tmp_name)
    try:
        write_fn(tmp_fpath)
        umask = os.umask(0)  # the only portable way to read it is to set it and put it back
        os.umask(umask)
        os.chmod(tmp_fpath, 0o666 & ~umask)
        os.replace(tmp_fpath, fpath)
    finally:
        if tmp_fpath.exists():
            tmp_fpath.unlink()
    return fpath


def atomic_write_text(fpath: str | Path, text: str) -> Path:
    return atomic_write(fpath, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_json(fpath: str | Path, obj: Any, indent: int = 2) -> Path:
    return atomic_write_text(fpath, json.dumps(obj, indent=indent, sort_keys=False, default=str) + "\n")


def publish_dir(tmp_dpath: str | Path, dpath: str | Path) -> Path:
    """Rename a fully written temporary folder onto ``dpath``; returns ``dpath``.

    For idempotent builds (same inputs, same folder): if ``dpath`` already exists, or a concurrent
    builder renames its identical copy first, this copy is discarded. A crash before the rename
    never leaves a half-built ``dpath`` that a later existence check would take for complete.
    """
    import shutil

    tmp_dpath, dpath = Path(tmp_dpath), Path(dpath)
    if dpath.exists():
        shutil.rmtree(tmp_dpath, ignore_errors=True)
        return dpath
    try:
        os.replace(tmp_dpath, dpath)
    except OSError:  # lost the race against an identical build
        shutil.rmtree(tmp_dpath, ignore_errors=True)
    return dpath


def write_csv_rows(fpath: str | Path, rows: list[dict[str, Any]], columns: list[str] | None = None) -> Path:
    """Atomically write ``rows`` as a CSV file (columns: ``columns``, default every key of the rows in the order
    they first appear; missing cells empty)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns or list(dict.fromkeys(c for r in rows for c in r)), restval="")
    writer.writeheader()
    writer.writerows(rows)
    return atomic_write_text(fpath, buf.getvalue())

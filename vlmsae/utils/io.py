"""Atomic file writes: a reader never sees a half-written file, a crash never leaves one."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def atomic_write(fpath: str | Path, write_fn: Callable[[Path], None]) -> Path:
    """Call ``write_fn(tmp_fpath)`` then rename the temporary file onto ``fpath``.

    The temporary file sits in the same directory, so the rename is atomic on POSIX.
    """
    fpath = Path(fpath)
    fpath.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{fpath.name}.", suffix=".tmp", dir=fpath.parent)
    os.close(fd)
    tmp_fpath = Path(tmp_name)
    try:
        write_fn(tmp_fpath)
        os.replace(tmp_fpath, fpath)
    finally:
        if tmp_fpath.exists():
            tmp_fpath.unlink()
    return fpath


def atomic_write_bytes(fpath: str | Path, data: bytes) -> Path:
    return atomic_write(fpath, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(fpath: str | Path, text: str) -> Path:
    return atomic_write(fpath, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_json(fpath: str | Path, obj: Any, indent: int = 2) -> Path:
    return atomic_write_text(fpath, json.dumps(obj, indent=indent, sort_keys=False, default=str) + "\n")

"""What made an output: resolved config, package versions, git commit, command line.

Every output folder gets a ``run_info.json`` (:class:`vlmsae.formats.RunInfo`) written by :func:`write_run_info`.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import importlib.metadata
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

from vlmsae import __version__, formats

_PACKAGES = ("torch", "torchvision", "transformers", "open_clip_torch", "lightning", "hydra-core", "webdataset")


def git_commit() -> str:
    """Commit of the checkout vlmsae runs from, with ``-dirty`` if it has local changes; ``unknown`` outside git."""
    repo_dpath = Path(__file__).resolve().parents[2]

    def git(*args: str, check: bool = True) -> str:
        cmd = ["git", "-C", str(repo_dpath), *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=5, check=check).stdout.strip()

    try:
        sha = git("rev-parse", "HEAD")
        return sha + ("-dirty" if git("status", "--porcelain", "--untracked-files=no", check=False) else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def versions() -> dict[str, str]:
    out = {"vlmsae": __version__, "python": platform.python_version()}
    for name in _PACKAGES:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[name] = importlib.metadata.version(name)
    return out


def provenance() -> dict[str, Any]:
    """The small dict that says what produced an artefact (no config)."""
    return {
        "vlmsae_version": __version__,
        "git_commit": git_commit(),
        "versions": versions(),
        "command": " ".join(sys.argv),
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }


def write_run_info(out_dpath: str | Path, config: dict[str, Any] | None = None, **extra: Any) -> Path:
    """Write ``run_info.json`` (resolved config + provenance + extras) into ``out_dpath``.

    The format is :class:`vlmsae.formats.RunInfo`; read it back with :func:`vlmsae.formats.read_run_info`.
    """
    info = formats.RunInfo(config=config or {}, **provenance(), extra=extra)
    return formats.write_run_info(out_dpath, info)

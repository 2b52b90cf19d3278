"""Which Lightning checkpoint a training run continues from (``python -m vlmsae.train ... resume=true``).

Hydra gives a repeated command a new timestamped run dir, so ``resume=true`` looks for the checkpoint
of an earlier run whose saved config (``run_info.json``, read through :mod:`vlmsae.formats`) matches
this one: :func:`config_fingerprint` says which parts must match.

``resume=auto`` (the default) continues only this run dir's own checkpoint: a fresh timestamped run dir
has none, so it starts fresh, while a job that SLURM (through Hydra's submitit launcher) requeues after
a preemption or its time limit runs again in the same job dir and continues where it stopped.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from vlmsae import formats

log = logging.getLogger(__name__)


def config_fingerprint(config: dict) -> dict:
    """The parts of a resolved config that define a run (what resume=true matches on)."""
    config = dict(config)
    for key in ("resume", "hydra", "val_ms"):  # val_ms only monitors: it never changes the SAE
        config.pop(key, None)
    logger = dict(config.get("logger") or {})
    config["logger"] = {k: v for k, v in logger.items() if k == "kind"}
    trainer = dict(config.get("trainer") or {})
    trainer.pop("enable_progress_bar", None)
    config["trainer"] = trainer
    return config


def run_checkpoint(run_dpath: Path) -> Path | None:
    """A run dir's ``checkpoints/last.ckpt``, else its newest ``step*.ckpt``, else None.

    Lightning replaces the last.ckpt link by unlinking then linking: a kill in between leaves
    only the step files.
    """
    last = run_dpath / "checkpoints" / "last.ckpt"
    if last.is_file():
        return last
    steps = sorted((run_dpath / "checkpoints").glob("step*.ckpt"))  # zero-padded step numbers sort
    if steps:
        log.warning("%s has no checkpoints/last.ckpt (killed while relinking it?): using %s", run_dpath, steps[-1].name)
        return steps[-1]
    return None


def history_dpath(resume_ckpt: Path) -> Path:
    """The run dir a checkpoint belongs to (``<run dir>/checkpoints/<name>.ckpt``): its logs are the history."""
    return resume_ckpt.parent.parent


def find_resume_checkpoint(resume: Any, out_dpath: Path, config: dict) -> Path | None:
    """The Lightning checkpoint to continue from, or None for a fresh run.

    ``resume=true``: this run dir's own ``checkpoints/last.ckpt`` if any, else the newest one among
    sibling runs (and sibling multirun jobs) whose saved config matches this one except for
    ``resume``: Hydra gives the repeated command a new timestamped dir, the checkpoint lives in the
    old one. ``resume=auto``: this run dir's own checkpoint only, else None (a requeued submitit job
    reruns in the same dir). ``resume=<path>``: a run dir or a ``.ckpt`` file.
    """
    if resume in (None, False) or str(resume).lower() in ("false", "no", "0", "none", ""):
        return None
    if str(resume).lower() == "auto":
        own = run_checkpoint(out_dpath)
        if own is not None:
            log.info("resume=auto: %s already holds a checkpoint (a requeued job?): continuing from %s", out_dpath, own)
        return own
    if str(resume).lower() not in ("true", "yes", "1"):
        path = Path(str(resume)).expanduser()
        ckpt = run_checkpoint(path) if path.is_dir() else path
        if ckpt is None or not ckpt.is_file():
            where = path / "checkpoints" if path.is_dir() else path
            raise FileNotFoundError(
                f"resume={resume!r}: no checkpoint at {where} "
                "(give a train run dir with checkpoints/last.ckpt or a .ckpt file)"
            )
        return ckpt
    own = run_checkpoint(out_dpath)
    if own is not None:
        return own
    want = config_fingerprint(config)
    roots = [out_dpath.parent]
    if out_dpath.name.startswith("job_") or (out_dpath.parent / "multirun.yaml").exists():
        roots.append(out_dpath.parent.parent)
    candidates = []
    for root in roots:
        pattern = f"*/{formats.RUN_INFO_JSON}"
        for info_fpath in list(root.glob(pattern)) + list(root.glob(f"*/{pattern}")):
            run_dpath = info_fpath.parent
            ckpt = run_checkpoint(run_dpath)
            if run_dpath.resolve() == out_dpath.resolve() or ckpt is None:
                continue
            try:
                previous = formats.read_run_info(info_fpath).config
            except (OSError, ValueError):  # unreadable or another format: not a run to continue
                continue
            if config_fingerprint(previous) == want:
                candidates.append(ckpt)
    if not candidates:
        log.warning(
            "resume=true but no earlier run with this config has a checkpoint under %s: starting fresh",
            [str(r) for r in roots],
        )
        return None
    return max(candidates, key=lambda p: p.stat().st_mtime)

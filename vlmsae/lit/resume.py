"""Which run folder a training run writes to, and which Lightning checkpoint it continues from.

Hydra gives a repeated command a new dated run dir, so :func:`choose_run` looks among the earlier run dirs of
the same job for one whose ``run_info.json`` config matches (:func:`config_fingerprint`): an unfinished one is
continued IN its own folder and the new empty one is removed; a finished one is not trained again
(``resume=false`` does). This applies when Hydra chose the run dir; a run dir the caller chose is always the
one written to, and ``resume=auto`` there continues only its own checkpoint (a requeued SLURM job).
"""

from __future__ import annotations

import logging
import re
import shutil
from dataclasses import dataclass
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

    ``resume=true``: this run dir's own checkpoint, else the newest one of the sibling runs (and multirun jobs)
    whose config matches. ``resume=auto``: this run dir's own checkpoint only. ``resume=<path>``: a run dir or a
    ``.ckpt`` file.
    """
    if _is_off(resume):
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
    roots = [out_dpath.parent]
    if out_dpath.name.startswith("job_") or (out_dpath.parent / "multirun.yaml").exists():
        roots.append(out_dpath.parent.parent)
    candidates = [run.ckpt for run in _earlier_runs(roots, out_dpath, config) if run.ckpt is not None]
    if not candidates:
        log.warning(
            "resume=true but no earlier run with this config has a checkpoint under %s: starting fresh",
            [str(r) for r in roots],
        )
        return None
    return max(candidates, key=lambda p: p.stat().st_mtime)


@dataclass
class EarlierRun:
    """A run dir under the same root whose saved config matches this run's."""

    dpath: Path
    status: str | None  # run_info.json's status: running | failed | done (None: not recorded)
    ckpt: Path | None  # the checkpoint it would continue from
    mtime: float  # when its run_info.json was last written
    metrics: dict  # the final metrics a finished run recorded


def _earlier_runs(roots: list[Path], out_dpath: Path, config: dict) -> list[EarlierRun]:
    """Run dirs (and multirun job dirs) under ``roots``, other than ``out_dpath``, whose config matches ``config``."""
    want = config_fingerprint(config)
    found = []
    for root in roots:
        pattern = f"*/{formats.RUN_INFO_JSON}"
        for info_fpath in list(root.glob(pattern)) + list(root.glob(f"*/{pattern}")):
            run_dpath = info_fpath.parent
            if run_dpath.resolve() == out_dpath.resolve():
                continue
            try:
                info = formats.read_run_info(info_fpath)
            except (OSError, ValueError):  # unreadable or another format: not a run to continue
                continue
            if config_fingerprint(info.config) == want:
                status = info.extra.get("status")
                metrics = info.extra.get("metrics") or {}
                mtime = info_fpath.stat().st_mtime
                found.append(EarlierRun(run_dpath, status, run_checkpoint(run_dpath), mtime, metrics))
    return found


def checkpoint_step(ckpt: Path) -> int | None:
    """The step a checkpoint holds, read from its name (``step<N>.ckpt``, or what ``last.ckpt`` links to)."""
    match = re.fullmatch(r"step(\d+)", ckpt.resolve().stem)
    return int(match.group(1)) if match else None


@dataclass
class RunChoice:
    """Where a training run writes and what it continues from (:func:`choose_run`)."""

    out_dpath: Path  # the run folder to write to
    resume_ckpt: Path | None  # the checkpoint to continue from; None: a fresh run
    finished_metrics: dict | None = None  # set when this config already finished in out_dpath: nothing to train


def _is_off(resume: Any) -> bool:
    return resume in (None, False) or str(resume).lower() in ("false", "no", "0", "none", "never", "")


def choose_run(resume: Any, out_dpath: Path, config: dict, new_dpath: bool) -> RunChoice:
    """The run folder and checkpoint for ``resume`` (see the module docstring).

    ``new_dpath``: ``out_dpath`` is a new run dir Hydra chose (its default dated folder, not a multirun); this run
    may then write into an earlier folder instead, and ``out_dpath`` is removed (its log moves along). Otherwise
    ``out_dpath`` is kept and :func:`find_resume_checkpoint` decides. Says which folder it continues, or that the
    run already finished and how to train again.
    """
    out_dpath = Path(out_dpath)
    if not new_dpath or _is_off(resume):
        return RunChoice(out_dpath, find_resume_checkpoint(resume, out_dpath, config))
    if str(resume).lower() not in ("auto", "true", "yes", "1"):  # resume=<run dir or .ckpt>: continue in its folder
        ckpt = find_resume_checkpoint(resume, out_dpath, config)
        target = history_dpath(ckpt) if ckpt.parent.name == "checkpoints" else out_dpath
        return _continue(target, ckpt, out_dpath)
    runs = _earlier_runs([out_dpath.parent], out_dpath, config)
    if not runs:
        return RunChoice(out_dpath, None)
    latest = max(runs, key=lambda r: r.mtime)
    if latest.status == "done":
        _adopt(out_dpath, latest.dpath)
        log.info("already finished in %s; pass resume=false to train again in a new folder", latest.dpath)
        return RunChoice(latest.dpath, None, finished_metrics=dict(latest.metrics))
    if latest.ckpt is None:  # killed before its first checkpoint: nothing to continue, start again there
        _adopt(out_dpath, latest.dpath)
        log.info("restarting %s from step 0: it stopped before its first checkpoint", latest.dpath)
        return RunChoice(latest.dpath, None)
    return _continue(latest.dpath, latest.ckpt, out_dpath)


def _continue(target: Path, ckpt: Path, out_dpath: Path) -> RunChoice:
    if target.resolve() != out_dpath.resolve():
        _adopt(out_dpath, target)
    step = checkpoint_step(ckpt)
    log.info("continuing %s from step %s (%s)", target, step if step is not None else "?", ckpt)
    return RunChoice(target, ckpt)


def _adopt(new_dpath: Path, target: Path) -> None:
    """Write this run's log into ``target`` instead of the new run dir Hydra made, then remove that dir.

    Hydra opened ``<new run dir>/<job>.log`` and saved ``.hydra/`` there before the job started; the earlier run's
    folder already holds both (the same config), so the new one is dropped: one folder per run.
    """
    new_resolved = new_dpath.resolve()
    handlers = list(logging.root.handlers)
    for logger in logging.Logger.manager.loggerDict.values():
        handlers += getattr(logger, "handlers", [])
    for handler in handlers:
        if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).parent == new_resolved:
            handler.acquire()
            try:
                handler.close()
                handler.baseFilename = str((target / Path(handler.baseFilename).name).resolve())
                handler.mode = "a"  # the earlier run's log continues
            finally:
                handler.release()
    shutil.rmtree(new_dpath, ignore_errors=True)

"""Loggers that survive ``kill -9`` and ``resume=...``: each logged step appears once in the history.

A killed run has logged steps past its last checkpoint and the resumed run logs them again, so on resume the
history is rebuilt from the killed run's files, keeping the steps before the checkpoint's: ``csv/metrics.csv``
is rewritten atomically (union of columns; Lightning's in-place header rewrite, which a kill can truncate, is
atomic here too); an offline W&B run replays the kept rows into its own folder (W&B ignores ``resume`` offline,
and the killed run's ``.wandb`` log loses its last 15 s), and the killed run's ``run-<id>.wandb`` becomes
``*.wandb.superseded``. Online, W&B resumes the run server-side. User-facing detail: docs/wandb.md.

Steps: Lightning logs a training batch after the checkpoint of that batch was saved, at
``step = global_step - 1``; a checkpoint at global step G is followed by rows logged at steps >= G
only by the run that continues from it, so rows with ``step < G`` are kept.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import struct
import zlib
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from vlmsae.utils.io import write_csv_rows

log = logging.getLogger(__name__)

STEP_KEY = "trainer/global_step"  # Lightning's W&B x-axis; the CSV's column is "step"


# ------------------------------------------------------------------------------ CSV
def read_metrics_csv(fpath: str | Path) -> tuple[list[str], list[dict[str, str]]]:
    """(columns, rows) of a Lightning metrics.csv; a half-written last line (a kill mid-append) is dropped.

    Rows whose step is not an integer, or with more fields than the header, are dropped with a warning.
    """
    fpath = Path(fpath)
    if not fpath.is_file():
        return [], []
    text = fpath.read_text(encoding="utf-8", errors="replace")
    if text and not text.endswith("\n"):  # Lightning writes whole lines: no newline = torn by the kill
        text = text[: text.rfind("\n") + 1]
    reader = csv.DictReader(io.StringIO(text))
    columns = list(reader.fieldnames or [])
    read = list(reader)
    rows = [row for row in read if None not in row and _int_step(row.get("step")) is not None]
    bad = len(read) - len(rows)
    if bad:
        log.warning("%s: dropped %d malformed row(s) (a killed run's partial write?)", fpath, bad)
    return columns, rows


def _int_step(value: Any) -> int | None:
    try:
        return int(float(value))
    except (TypeError, ValueError):
        return None


class _ResumableWriter(ExperimentWriter):
    """Lightning's CSV writer, except: it never deletes the file itself (the logger decides) and it
    rewrites the file atomically when the header grows."""

    def _check_log_dir_exists(self) -> None:  # Lightning deletes metrics.csv here; resume needs it
        pass

    def _rewrite_with_new_header(self, fieldnames: list[str]) -> None:
        _, rows = read_metrics_csv(self.metrics_file_path)
        write_csv_rows(self.metrics_file_path, rows, list(fieldnames))


class ResumableCSVLogger(CSVLogger):
    """CSVLogger whose metrics.csv continues a killed run's history (see :func:`restore_history`).

    ``history_fpath``: the metrics.csv of the run being resumed (may be this run's own file), or
    None for a fresh run, which starts from an empty file like Lightning's.
    """

    def __init__(self, save_dir: str | Path, history_fpath: str | Path | None = None, **kwargs):
        super().__init__(save_dir=save_dir, **kwargs)
        self.history_fpath = Path(history_fpath) if history_fpath is not None else None

    @property
    def experiment(self):
        if self._experiment is not None:
            return self._experiment
        from lightning.pytorch.utilities.rank_zero import rank_zero_only

        if rank_zero_only.rank != 0:
            return super().experiment  # the dummy writer of non-zero ranks
        self._fs.makedirs(self.root_dir, exist_ok=True)
        self._experiment = _ResumableWriter(log_dir=self.log_dir)
        if self.history_fpath is None:  # a stale file from an earlier run in this dir
            Path(self._experiment.metrics_file_path).unlink(missing_ok=True)
        return self._experiment

    def restore_history(self, before_step: int) -> int:
        """Write metrics.csv = the history's rows with step < ``before_step``; returns how many were kept."""
        writer = self.experiment
        metrics_fpath = Path(writer.metrics_file_path)
        columns, rows = read_metrics_csv(self.history_fpath) if self.history_fpath else ([], [])
        if self.history_fpath is not None and not self.history_fpath.is_file():
            log.warning("resume: no CSV history at %s; metrics.csv starts at step %d", self.history_fpath, before_step)
        kept = [r for r in rows if _int_step(r["step"]) < before_step]
        # with anything logged before the restore (normally nothing); Lightning keeps its header sorted
        columns = sorted({*columns, *(k for row in writer.metrics for k in row)})
        if kept or columns:
            write_csv_rows(metrics_fpath, kept, columns)
        else:
            metrics_fpath.unlink(missing_ok=True)
        writer.metrics_keys = columns  # so the next save appends under this header
        log.info("resume: metrics.csv keeps %d of %d logged rows (steps < %d)", len(kept), len(rows), before_step)
        return len(kept)


# ------------------------------------------------------------------------------ W&B transaction log
_BLOCK = 32768  # the .wandb file is a LevelDB-style log: 32 KiB blocks of chunks
_CHUNK_HEADER = 7  # crc32 (4, zlib over type byte + data), length (2), type (1)
_FILE_HEADER = b":W&B"  # + 2 ident bytes + 1 version byte
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def iter_wandb_records(fpath: str | Path):
    """The protobuf ``Record`` messages of a ``.wandb`` file, stopping quietly at a torn tail.

    W&B no longer ships a Python reader of its transaction log; this one follows the format its
    writer uses (a LevelDB log whose chunk checksum is zlib's crc32 of the type byte and data).
    """
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(fpath).read_bytes()
    if not data.startswith(_FILE_HEADER):
        raise ValueError(f"{fpath} is not a W&B transaction log (no {_FILE_HEADER!r} header)")
    pos, pending = 7, b""
    while pos + _CHUNK_HEADER <= len(data):
        room = _BLOCK - pos % _BLOCK
        if room < _CHUNK_HEADER:  # block trailer padding
            pos += room
            continue
        crc, length, kind = struct.unpack_from("<IHB", data, pos)
        start, end = pos + _CHUNK_HEADER, pos + _CHUNK_HEADER + length
        if kind == 0 or end > len(data) or end - pos > room:
            return  # zero padding or a chunk cut by the kill
        chunk = data[start:end]
        if zlib.crc32(bytes([kind]) + chunk) & 0xFFFFFFFF != crc:
            log.warning("%s: checksum mismatch at byte %d; reading stops there", fpath, pos)
            return
        pos = end
        pending = chunk if kind in (_FULL, _FIRST) else pending + chunk
        if kind in (_FIRST, _MIDDLE):  # a record continues in the next chunk
            continue
        payload, pending = pending, b""
        record = pb.Record()
        try:
            record.ParseFromString(payload)
        except Exception:
            return
        yield record


def read_wandb_history(fpath: str | Path) -> list[dict[str, Any]]:
    """History rows of a ``.wandb`` file: {key: JSON-decoded value} (media as their dicts), with ``_step`` etc."""
    rows = []
    for record in iter_wandb_records(fpath):
        if record.WhichOneof("record_type") != "history":
            continue
        row: dict[str, Any] = {}
        for item in record.history.item:
            try:
                value = json.loads(item.value_json)
            except ValueError:
                continue
            path = [item.key] if item.key else list(item.nested_key)  # media: ["val/hist", "_type"], ...
            node = row
            for part in path[:-1]:
                node = node.setdefault(part, {})
            node[path[-1]] = value
        rows.append(row)
    return rows


def wandb_run_files(wandb_dpath: str | Path, run_id: str, superseded: bool = True) -> list[Path]:
    """This run id's transaction logs under ``<run dir>/wandb``, oldest first (folder names start with the time)."""
    wandb_dpath = Path(wandb_dpath)
    suffixes = (".wandb", ".wandb.superseded") if superseded else (".wandb",)
    files = [p for suffix in suffixes for p in wandb_dpath.glob(f"*-{run_id}/run-{run_id}{suffix}")]
    return sorted(files, key=lambda p: p.parent.name.split("-", 1)[-1])


def merged_wandb_history(files: list[Path], before_step: int) -> list[dict[str, Any]]:
    """One row per (step, metric keys) with ``STEP_KEY < before_step``, later files winning, sorted by step.

    Later files win because a resumed run's file repeats (replays) the earlier history.
    """
    merged: dict[tuple, dict] = {}
    for fpath in files:
        for row in read_wandb_history(fpath):
            step = _int_step(row.get(STEP_KEY))
            if step is None or step >= before_step:
                continue
            metrics = {k: v for k, v in row.items() if not k.startswith("_")}
            merged[(step, tuple(sorted(metrics)))] = metrics
    return sorted(merged.values(), key=lambda r: _int_step(r[STEP_KEY]))


def _wandb_value(value: Any) -> Any:
    if _is_histogram(value):
        import numpy as np
        import wandb

        return wandb.Histogram(np_histogram=(np.asarray(value["values"]), np.asarray(value["bins"])))
    return value


def replay_wandb_history(run, rows: list[dict[str, Any]]) -> int:
    """Log ``rows`` into ``run`` (scalars and histograms; other media are skipped); returns rows logged."""
    n = 0
    for row in rows:
        values = {k: _wandb_value(v) for k, v in row.items() if not isinstance(v, dict) or _is_histogram(v)}
        if len(values) > 1:  # more than the step key alone
            run.log(values)
            n += 1
    return n


# ------------------------------------------------------------------------------ the callback
class RestoreLogHistory(L.Callback):
    """On resume, rebuild the logger history up to the checkpoint's step before training continues.

    ``history_dpath``: the run dir of the checkpoint (it holds ``csv/`` or ``wandb/``). The
    checkpoint's global step arrives through ``on_load_checkpoint`` (called before ``on_fit_start``
    for single-device and DDP strategies); ``on_train_start`` is the fallback for strategies that
    restore later. ``loggers``: the loggers to restore (default: the trainer's; a ``sae_grid`` pass has one
    set per SAE, each with its own history folder).
    """

    def __init__(self, history_dpath: str | Path, wandb_id: str | None = None, loggers: list | None = None):
        self.history_dpath = Path(history_dpath)
        self.wandb_id = wandb_id
        self.loggers = loggers
        self._step: int | None = None
        self._done = False

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        self._step = int(checkpoint.get("global_step", 0))

    def on_fit_start(self, trainer, pl_module) -> None:
        if self._step is not None:
            self._restore(trainer)

    def on_train_start(self, trainer, pl_module) -> None:
        if self._step is None:
            self._step = int(trainer.global_step)
        self._restore(trainer)

    def _restore(self, trainer) -> None:
        if self._done or not trainer.is_global_zero:
            return
        self._done = True
        loggers = self.loggers if self.loggers is not None else trainer.loggers
        csv_loggers = [lg for lg in loggers if isinstance(lg, ResumableCSVLogger)]
        for logger in csv_loggers:  # first: the W&B replay reads the restored CSV
            logger.restore_history(self._step)
        for logger in loggers:
            if type(logger).__name__ == "WandbLogger" and self.wandb_id:
                self._restore_wandb(logger, csv_loggers[0] if csv_loggers else None)

    def _restore_wandb(self, logger, csv_logger: ResumableCSVLogger | None) -> None:
        run = logger.experiment
        if getattr(run, "offline", False) is not True:
            return  # online: the server resumed the run; disabled: nothing is written
        own_dpath = Path(run.dir).parent  # <wandb dir>/offline-run-<time>-<id>/files
        files = [p for p in wandb_run_files(self.history_dpath / "wandb", self.wandb_id) if p.parent != own_dpath]
        csv_rows = read_metrics_csv(csv_logger.experiment.metrics_file_path)[1] if csv_logger is not None else None
        n = replay_wandb_history(run, resumed_wandb_rows(files, csv_rows, self._step))
        for fpath in files:  # renamed *.wandb.superseded: wandb sync skips them
            if fpath.suffix == ".wandb":
                os.replace(fpath, fpath.with_name(fpath.name + ".superseded"))
        log.info(
            "resume: replayed %d history rows (steps < %d) into the offline W&B run %s; superseded %s",
            n,
            self._step,
            self.wandb_id,
            [str(p) for p in files],
        )


def resumed_wandb_rows(files: list[Path], csv_rows: list[dict[str, str]] | None, step: int) -> list[dict[str, Any]]:
    """What a resumed offline W&B run replays, sorted by step: what the uninterrupted run holds before it continues.

    Scalars at steps < ``step`` (the checkpoint's global step) come from the CSV mirror when there is one: W&B
    buffers its offline log (flushed every 15 s, and not at all when the process is killed), the CSV is written
    at every log. Histograms only exist in W&B (``files``, the killed run's logs), and they are kept up to and
    including ``step``: the validation right after the checkpoint at ``step`` logged its histogram at ``step``
    (its scalars at ``step - 1``, as Lightning counts), and the resumed run does not run that validation again.
    """
    hist_rows = [r for r in merged_wandb_history(files, step + 1) if any(_is_histogram(v) for v in r.values())]
    if csv_rows is None:
        rows = [r for r in merged_wandb_history(files, step) if not any(_is_histogram(v) for v in r.values())]
    else:
        rows = [_csv_row_to_wandb(r) for r in csv_rows if _int_step(r["step"]) < step]
    return sorted(rows + hist_rows, key=lambda r: _int_step(r[STEP_KEY]))


def _is_histogram(value: Any) -> bool:
    return isinstance(value, dict) and value.get("_type") == "histogram"


def _csv_row_to_wandb(row: dict[str, str]) -> dict[str, Any]:
    """A metrics.csv row as Lightning's WandbLogger logs it: numbers, the step as ``trainer/global_step``."""
    out: dict[str, Any] = {}
    for key, text in row.items():
        if key == "step" or text in ("", None):
            continue
        try:
            out[key] = int(text) if text.lstrip("-").isdigit() else float(text)
        except ValueError:
            continue
    out[STEP_KEY] = _int_step(row["step"])
    return out

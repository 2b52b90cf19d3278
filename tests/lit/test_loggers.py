"""kill -9 then resume, for every logger: the run finishes, the SAE is saved, each logged step is in the history once.

The CLI tests SIGKILL a real training process once a checkpoint exists and the logger has written steps past
it (those steps are logged again by the resumed run), then rerun the command with ``resume=...``. The unit
tests cover the pieces a kill can break: torn CSV lines, torn W&B transaction logs, the header union.
"""

from __future__ import annotations

import collections
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest

from vlmsae.lit.loggers import (
    ResumableCSVLogger,
    iter_wandb_records,
    merged_wandb_history,
    read_metrics_csv,
    read_wandb_history,
    resumed_wandb_rows,
    wandb_run_files,
)
from vlmsae.lit.resume import checkpoint_step, run_checkpoint

MAX_STEPS, CKPT_EVERY, LOG_EVERY = 240, 40, 5
TRAIN_STEPS = list(range(LOG_EVERY - 1, MAX_STEPS, LOG_EVERY))  # Lightning logs batch i at step i (0-based)
VAL_STEPS = [*range(CKPT_EVERY - 1, MAX_STEPS, CKPT_EVERY), MAX_STEPS]  # in-fit validations + the final one


# ------------------------------------------------------------------------------ CLI: kill -9, resume
def _cmd(planted_store, run_dpath, logger, *extra):
    return [
        sys.executable,
        "-m",
        "vlmsae.train",
        "data=acts",
        f"data.acts={planted_store}",
        "data.batch_size=64",
        "data.num_workers=0",
        f"trainer.max_steps={MAX_STEPS}",
        f"trainer.log_every_n_steps={LOG_EVERY}",
        f"trainer.checkpoint_every_n_steps={CKPT_EVERY}",
        f"trainer.val_check_interval={CKPT_EVERY}",
        "trainer.limit_val_batches=2",
        "trainer.scale_batches=2",
        f"logger={logger}",
        f"hydra.run.dir={run_dpath}",
        *extra,
    ]


def _env(tmp_path, wandb_mode="disabled"):
    wandb_home = tmp_path / "wandb_home"  # nothing of W&B's outside tmp_path
    # An earlier in-process W&B run of this pytest session (the browser test) leaves WANDB_SERVICE set: a child
    # would then attach to that shared service, which still holds the killed run's id ("run ID ... is in use").
    # Each run here starts its own service, as it does from a shell.
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_SERVICE")}
    return {
        **inherited,
        "OMP_NUM_THREADS": "1",
        "WANDB_MODE": wandb_mode,
        "WANDB_SILENT": "true",
        "WANDB_DIR": str(wandb_home),
        "WANDB_CACHE_DIR": str(wandb_home / "cache"),
        "WANDB_CONFIG_DIR": str(wandb_home / "config"),
        "WANDB_DATA_DIR": str(wandb_home / "data"),
    }


def _ckpt_steps(run_dpath: Path) -> list[int]:
    return sorted(int(p.stem[4:]) for p in (run_dpath / "checkpoints").glob("step*.ckpt") if p.stem[4:].isdigit())


def _csv_steps(run_dpath: Path) -> list[int]:
    return [int(r["step"]) for r in read_metrics_csv(run_dpath / "csv" / "metrics.csv")[1]]


def _run_and_kill(cmd, env, cwd, run_dpath: Path, logged: bool) -> int:
    """Start ``cmd``; SIGKILL it once a checkpoint exists (and, if ``logged``, a step at or past it is in the
    CSV); returns the step of the checkpoint the resume will start from. No wall-clock limit: a slow machine
    only waits longer (a run that ends first fails the test)."""
    log_fpath = run_dpath.parent / f"{run_dpath.name}.log"
    with log_fpath.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            while proc.poll() is None:
                ckpts = _ckpt_steps(run_dpath) if (run_dpath / "checkpoints").is_dir() else []
                if ckpts and (not logged or max(_csv_steps(run_dpath), default=-1) >= ckpts[-1]):
                    break
                time.sleep(0.02)
            assert proc.poll() is None, f"the run ended before it could be killed:\n{log_fpath.read_text()[-3000:]}"
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    return checkpoint_step(run_checkpoint(run_dpath))  # as resume picks it: a kill can land before last.ckpt links


def _resume(cmd, env, cwd):
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _assert_each_step_once(rows: list[dict], step_key: str) -> None:
    """Every metric has a value at each logged step exactly once: the whole run, before and after the kill."""
    for key, expected in (("train/loss", TRAIN_STEPS), ("train/fve", TRAIN_STEPS), ("val/fve", VAL_STEPS)):
        steps = [int(r[step_key]) for r in rows if r.get(key) not in (None, "")]
        repeated = [s for s, n in collections.Counter(steps).items() if n > 1]
        assert not repeated, f"{key}: steps logged twice: {repeated}"
        assert steps == expected, f"{key}: {steps} != {expected}"


def _assert_finished(run_dpath: Path) -> None:
    import json

    assert (run_dpath / "sae" / "sae.safetensors").is_file() and (run_dpath / "sae" / "config.json").is_file()
    assert json.loads((run_dpath / "metrics.json").read_text())["step"] == MAX_STEPS
    assert json.loads((run_dpath / "run_info.json").read_text())["status"] == "done"


@pytest.mark.slow
@pytest.mark.parametrize("same_dir", [False, True], ids=["resume=run_dir", "same_dir+resume=true"])
def test_csv_logger_survives_kill_and_resume(planted_store, tmp_path, same_dir):
    killed = tmp_path / "killed"
    env = _env(tmp_path)
    ckpt_step = _run_and_kill(_cmd(planted_store, killed, "csv"), env, tmp_path, killed, logged=True)
    assert max(_csv_steps(killed)) >= ckpt_step  # the killed run logged steps the resumed run logs again
    with (killed / "csv" / "metrics.csv").open("a") as fh:
        fh.write("0,99999,0.5")  # and a kill can leave a torn last line
    resumed = killed if same_dir else tmp_path / "resumed"
    _resume(_cmd(planted_store, resumed, "csv", "resume=true" if same_dir else f"resume={killed}"), env, tmp_path)
    _assert_finished(resumed)
    columns, rows = read_metrics_csv(resumed / "csv" / "metrics.csv")
    assert "val/l0" in columns and "train/l0" in columns
    _assert_each_step_once(rows, "step")


@pytest.mark.slow
def test_wandb_offline_logger_survives_kill_and_resume(planted_store, tmp_path):
    killed, resumed = tmp_path / "killed", tmp_path / "resumed"
    env = _env(tmp_path, wandb_mode="offline")
    ckpt_step = _run_and_kill(
        _cmd(planted_store, killed, "wandb", "logger.mode=offline"), env, tmp_path, killed, logged=True
    )
    run_id = (killed / "wandb_id.txt").read_text().strip()
    assert wandb_run_files(killed / "wandb", run_id) and max(_csv_steps(killed)) >= ckpt_step
    _resume(_cmd(planted_store, resumed, "wandb", "logger.mode=offline", f"resume={killed}"), env, tmp_path)
    _assert_finished(resumed)
    assert (resumed / "wandb_id.txt").read_text().strip() == run_id  # the same W&B run continues
    # What `wandb sync` would upload for this run: one transaction log holding the whole history.
    live = wandb_run_files(killed / "wandb", run_id, superseded=False) + wandb_run_files(
        resumed / "wandb", run_id, superseded=False
    )
    assert len(live) == 1 and live[0].is_relative_to(resumed), live
    assert list((killed / "wandb").glob(f"*/run-{run_id}.wandb.superseded"))
    _assert_each_step_once(read_wandb_history(live[0]), "trainer/global_step")
    _assert_each_step_once(read_metrics_csv(resumed / "csv" / "metrics.csv")[1], "step")  # the CSV mirror too


@pytest.mark.slow
def test_no_logger_survives_kill_and_resume(planted_store, tmp_path):
    killed, resumed = tmp_path / "killed", tmp_path / "resumed"
    env = _env(tmp_path)
    _run_and_kill(_cmd(planted_store, killed, "none"), env, tmp_path, killed, logged=False)
    _resume(_cmd(planted_store, resumed, "none", f"resume={killed}"), env, tmp_path)
    _assert_finished(resumed)
    assert not (resumed / "csv").exists() and not (resumed / "wandb").exists()


# ------------------------------------------------------------------------------ units: what a kill leaves behind
def test_read_metrics_csv_drops_a_torn_last_line(tmp_path):
    fpath = tmp_path / "metrics.csv"
    fpath.write_text("epoch,step,train/loss\n0,4,1.5\n0,9,1.25\n0,14,1.")
    columns, rows = read_metrics_csv(fpath)
    assert columns == ["epoch", "step", "train/loss"] and [r["step"] for r in rows] == ["4", "9"]


def test_restore_history_keeps_steps_before_the_checkpoint_with_all_columns(tmp_path):
    src = tmp_path / "old" / "metrics.csv"
    src.parent.mkdir()
    src.write_text("epoch,step,train/loss,val/fve,val/l0\n0,4,1.0,,\n0,9,0.9,,\n0,9,,0.5,3.0\n0,14,0.8,,\n")
    logger = ResumableCSVLogger(tmp_path / "new", history_fpath=src, name="csv", version="")
    assert logger.restore_history(before_step=10) == 3
    logger.log_metrics({"train/loss": 0.7}, step=14)  # a row without the val columns, as after any resume
    logger.log_metrics({"train/loss": 0.6, "train/l0": 8.0}, step=19)  # a new column: the header grows
    logger.save()
    columns, rows = read_metrics_csv(tmp_path / "new" / "csv" / "metrics.csv")
    assert columns == ["epoch", "step", "train/l0", "train/loss", "val/fve", "val/l0"]
    assert [(r["step"], r["train/loss"], r["val/fve"]) for r in rows] == [
        ("4", "1.0", ""),
        ("9", "0.9", ""),
        ("9", "", "0.5"),
        ("14", "0.7", ""),
        ("19", "0.6", ""),
    ]


def test_fresh_csv_logger_replaces_a_stale_file(tmp_path):
    stale = tmp_path / "csv" / "metrics.csv"
    stale.parent.mkdir()
    stale.write_text("step,train/loss\n4,9.0\n")
    logger = ResumableCSVLogger(tmp_path, name="csv", version="")
    logger.log_metrics({"train/loss": 1.0}, step=0)
    logger.save()
    assert [r["step"] for r in read_metrics_csv(stale)[1]] == ["0"]


def _wandb_log(records: list[bytes]) -> bytes:
    """A .wandb file as W&B writes it: header, then records split into chunks across 32 KiB blocks."""
    out = bytearray(b":W&B\xe1\xbe\x00")
    for payload in records:
        first = True
        while True:
            room = 32768 - len(out) % 32768
            if room < 7:
                out += b"\x00" * room
                continue
            piece, payload = payload[: room - 7], payload[room - 7 :]
            kind = (1 if not payload else 2) if first else (4 if not payload else 3)
            out += struct.pack("<IHB", zlib.crc32(bytes([kind]) + piece) & 0xFFFFFFFF, len(piece), kind) + piece
            first = False
            if not payload:
                break
    return bytes(out)


def _history_record(step: int, **metrics) -> bytes:
    import json

    from wandb.proto import wandb_internal_pb2 as pb

    record = pb.Record()
    for key, value in {**metrics, "trainer/global_step": step, "_step": step}.items():
        item = record.history.item.add()
        item.key = key
        item.value_json = json.dumps(value)
    return record.SerializeToString()


def test_wandb_reader_follows_chunks_across_blocks_and_stops_at_a_torn_tail(tmp_path):
    big = "x" * 50_000  # one record over two blocks: FIRST + MIDDLE/LAST chunks
    records = [_history_record(s, **{"train/loss": float(s)}) for s in range(5)]
    records.insert(2, _history_record(99, note=big))
    data = _wandb_log(records)
    fpath = tmp_path / "run-abc.wandb"
    fpath.write_bytes(data)
    rows = read_wandb_history(fpath)
    assert [r["trainer/global_step"] for r in rows] == [0, 1, 99, 2, 3, 4] and rows[2]["note"] == big
    fpath.write_bytes(data[:-5])  # killed mid-record
    assert [r["trainer/global_step"] for r in read_wandb_history(fpath)] == [0, 1, 99, 2, 3]
    corrupt = bytearray(data)
    corrupt[-3] ^= 0xFF  # a flipped byte fails the checksum: reading stops before it
    fpath.write_bytes(bytes(corrupt))
    assert len(list(iter_wandb_records(fpath))) == 5
    fpath.write_bytes(b"not a wandb file")
    with pytest.raises(ValueError, match="not a W&B transaction log"):
        read_wandb_history(fpath)


def test_merged_wandb_history_keeps_one_row_per_step_and_keys_before_the_checkpoint(tmp_path):
    old = tmp_path / "offline-run-20260101_000000-abc" / "run-abc.wandb.superseded"
    new = tmp_path / "offline-run-20260102_000000-abc" / "run-abc.wandb"
    for fpath, steps in ((old, range(0, 30, 5)), (new, range(0, 20, 5))):
        fpath.parent.mkdir()
        fpath.write_bytes(_wandb_log([_history_record(s, **{"train/loss": float(s) + (fpath == new)}) for s in steps]))
    files = wandb_run_files(tmp_path, "abc")
    assert files == [old, new]
    rows = merged_wandb_history(files, before_step=20)
    assert [(r["trainer/global_step"], r["train/loss"]) for r in rows] == [(0, 1.0), (5, 6.0), (10, 11.0), (15, 16.0)]
    assert wandb_run_files(tmp_path, "abc", superseded=False) == [new]


def test_resumed_wandb_rows_keep_the_histogram_logged_at_the_checkpoint_step(tmp_path):
    """Validation at step 10 runs right after the checkpoint at step 10 and logs its histogram at step 10 (its
    scalars at 9): the resumed run does not validate there again, so it must replay that histogram."""
    hist = {"_type": "histogram", "values": [1, 2], "bins": [0.0, 0.5, 1.0]}
    killed = tmp_path / "offline-run-20260101_000000-abc" / "run-abc.wandb"
    killed.parent.mkdir()
    records = [_history_record(s, **{"train/loss": float(s)}) for s in range(13)]
    records += [_history_record(s, **{"val/latent_density_log10": hist}) for s in (5, 10)]
    killed.write_bytes(_wandb_log(records))
    csv_rows = [{"step": str(s), "train/loss": str(float(s))} for s in range(12)]
    for mirror in (csv_rows, None):  # with the CSV mirror (scalars from it) and without (from the .wandb)
        rows = resumed_wandb_rows([killed], mirror, step=10)
        hist_steps = [r["trainer/global_step"] for r in rows if "val/latent_density_log10" in r]
        loss_steps = [r["trainer/global_step"] for r in rows if "train/loss" in r]
        assert hist_steps == [5, 10] and loss_steps == list(range(10)), (mirror is None, hist_steps, loss_steps)

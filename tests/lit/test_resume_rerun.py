"""Rerunning the same command continues the unfinished run in its own folder (vlmsae.lit.resume.choose_run).

The CLI test SIGKILLs a real training process launched with Hydra's default run dir (no ``hydra.run.dir``) once
it has a checkpoint, reruns the identical command line, and checks: one run folder, the same final SAE as an
uninterrupted run, and a third rerun that does not train again. The unit tests drive :func:`choose_run` directly.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

MAX_STEPS, CKPT_EVERY = 200, 40


def _overrides(planted_store) -> list[str]:
    return [
        "data=acts",
        f"data.acts={planted_store}",
        "data.batch_size=64",
        "data.num_workers=0",
        f"trainer.max_steps={MAX_STEPS}",
        f"trainer.checkpoint_every_n_steps={CKPT_EVERY}",
        "trainer.val_check_interval=1000",
        "trainer.limit_val_batches=2",
        "trainer.scale_batches=2",
        "logger=csv",
    ]


def _env():
    return {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}


def _run_dirs(cwd: Path) -> list[Path]:
    root = cwd / "outputs" / "train"
    return sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []


def _sae_state(run_dpath: Path) -> dict:
    from vlmsae.sae import load_sae

    return {k: v.clone() for k, v in load_sae(run_dpath / "sae").state_dict().items()}


def _kill_once_checkpointed(cmd, cwd: Path, timeout: float = 240.0) -> Path:
    log_fpath = cwd / "killed.log"
    with log_fpath.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, env=_env(), stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and proc.poll() is None:
                if any((d / "checkpoints" / "last.ckpt").exists() for d in _run_dirs(cwd)):
                    break
                time.sleep(0.02)
            assert proc.poll() is None, f"the run ended before it could be killed:\n{log_fpath.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"no checkpoint after {timeout} s:\n{log_fpath.read_text()[-3000:]}"
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=30)
    (run_dpath,) = _run_dirs(cwd)
    return run_dpath


@pytest.mark.slow
def test_rerunning_the_killed_command_continues_in_its_folder_to_the_same_sae(compose_cfg, planted_store, tmp_path):
    from vlmsae.train import run

    cwd = tmp_path / "work"
    cwd.mkdir()
    cmd = [sys.executable, "-m", "vlmsae.train", *_overrides(planted_store)]
    killed = _kill_once_checkpointed(cmd, cwd)
    assert json.loads((killed / "run_info.json").read_text())["status"] == "running"
    time.sleep(1.1)  # Hydra's dated folder has one-second resolution: the rerun gets a new one
    proc = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"continuing {killed} from step" in proc.stdout + proc.stderr, (proc.stdout + proc.stderr)[-3000:]
    assert _run_dirs(cwd) == [killed]  # one run folder: the killed one, finished
    info = json.loads((killed / "run_info.json").read_text())
    assert info["status"] == "done" and info["resumed_from"].startswith(str(killed))
    assert json.loads((killed / "metrics.json").read_text())["optimizer_steps"] == MAX_STEPS
    assert (killed / "train.log").read_text().count("continuing") == 1  # the rerun's log joined the run's

    ref = tmp_path / "ref"
    run(compose_cfg("train", _overrides(planted_store)), out_dpath=ref)
    a, b = _sae_state(ref), _sae_state(killed)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")

    # Once more: the run is finished, nothing is trained and no folder is added.
    time.sleep(1.1)
    before = (killed / "sae" / "sae.safetensors").stat().st_mtime_ns
    proc = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"already finished in {killed}; pass resume=false" in proc.stdout + proc.stderr
    assert _run_dirs(cwd) == [killed]
    assert (killed / "sae" / "sae.safetensors").stat().st_mtime_ns == before


def _fake_run(dpath: Path, config: dict, status: str, step: int | None) -> Path:
    from vlmsae.utils.provenance import write_run_info

    dpath.mkdir(parents=True)
    write_run_info(dpath, config, status=status, metrics={"fve": 0.5} if status == "done" else None)
    if step is not None:
        (dpath / "checkpoints").mkdir()
        (dpath / "checkpoints" / f"step{step:07d}.ckpt").write_bytes(b"x")
        (dpath / "checkpoints" / "last.ckpt").symlink_to(f"step{step:07d}.ckpt")
    return dpath


def test_choose_run_continues_the_matching_unfinished_run_in_its_folder(tmp_path, caplog):
    from vlmsae.lit.resume import choose_run

    root = tmp_path / "outputs" / "train"
    config = {"seed": 0, "resume": "auto", "sae": {"k": 8}}
    _fake_run(root / "2026-01-01_00-00-00", {**config, "seed": 1}, "failed", 20)  # another config
    killed = _fake_run(root / "2026-01-01_00-00-01", config, "running", 40)
    new = root / "2026-01-01_00-00-02"
    new.mkdir()
    with caplog.at_level("INFO", logger="vlmsae.lit.resume"):
        chosen = choose_run("auto", new, config, new_dpath=True)
    assert chosen.out_dpath == killed and chosen.resume_ckpt == killed / "checkpoints" / "last.ckpt"
    assert not new.exists() and f"continuing {killed} from step 40" in caplog.text
    # a run dir the caller chose is kept: resume=auto continues only its own checkpoint
    chosen = choose_run("auto", root / "mine", config, new_dpath=False)
    assert chosen.out_dpath == root / "mine" and chosen.resume_ckpt is None
    # resume=false: a fresh run in the new folder
    new.mkdir()
    assert choose_run("false", new, config, new_dpath=True).resume_ckpt is None and new.exists()


def test_choose_run_does_not_train_a_finished_run_again(tmp_path, caplog):
    from vlmsae.lit.resume import choose_run

    root = tmp_path / "outputs" / "train"
    config = {"seed": 0}
    done = _fake_run(root / "2026-01-01_00-00-00", config, "done", 100)
    new = root / "2026-01-01_00-00-09"
    new.mkdir()
    with caplog.at_level("INFO", logger="vlmsae.lit.resume"):
        chosen = choose_run("auto", new, config, new_dpath=True)
    assert chosen.finished_metrics == {"fve": 0.5} and chosen.out_dpath == done and not new.exists()
    assert f"already finished in {done}; pass resume=false to train again" in caplog.text


def test_resume_dir_continues_in_that_dir(tmp_path):
    from vlmsae.lit.resume import choose_run

    killed = _fake_run(tmp_path / "elsewhere" / "killed", {"seed": 0}, "failed", 60)
    new = tmp_path / "outputs" / "train" / "2026-01-01_00-00-00"
    new.mkdir(parents=True)
    chosen = choose_run(str(killed), new, {"seed": 0}, new_dpath=True)
    assert chosen.out_dpath == killed and chosen.resume_ckpt.parent == killed / "checkpoints" and not new.exists()
    # with a run dir the caller chose (hydra.run.dir=, out_dpath=), that dir is written to
    mine = tmp_path / "mine"
    chosen = choose_run(str(killed), mine, {"seed": 0}, new_dpath=False)
    assert chosen.out_dpath == mine and chosen.resume_ckpt.parent == killed / "checkpoints"

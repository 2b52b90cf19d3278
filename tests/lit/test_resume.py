"""Which checkpoint a training run continues from (vlmsae.lit.resume)."""

from __future__ import annotations

import pytest


def test_resume_falls_back_to_the_newest_step_checkpoint_when_last_link_is_missing(tmp_path):
    """A kill between Lightning's unlink and symlink of last.ckpt leaves only the step files."""
    from vlmsae.lit.resume import find_resume_checkpoint

    run_dpath = tmp_path / "killed"
    (run_dpath / "checkpoints").mkdir(parents=True)
    for step in (40, 120):
        (run_dpath / "checkpoints" / f"step{step:07d}.ckpt").write_bytes(b"x")
    assert find_resume_checkpoint(str(run_dpath), tmp_path / "new", {}).name == "step0000120.ckpt"
    assert find_resume_checkpoint("true", run_dpath, {}).name == "step0000120.ckpt"
    (run_dpath / "checkpoints" / "last.ckpt").symlink_to("step0000040.ckpt")
    assert find_resume_checkpoint(str(run_dpath), tmp_path / "new", {}).name == "last.ckpt"
    with pytest.raises(FileNotFoundError, match=r"resume=.*no checkpoint at .*empty.*give a train run dir"):
        (tmp_path / "empty").mkdir()
        find_resume_checkpoint(str(tmp_path / "empty"), tmp_path / "new", {})


def test_resume_auto_continues_only_the_run_dirs_own_checkpoint(tmp_path):
    """resume=auto (the default): a requeued job reruns in its own dir and continues; a new dir starts fresh
    even when a sibling run with the same config has a checkpoint (that is what resume=true is for)."""
    from vlmsae.lit.resume import find_resume_checkpoint

    job_dpath = tmp_path / "multirun" / "job_0"
    (job_dpath / "checkpoints").mkdir(parents=True)
    assert find_resume_checkpoint("auto", job_dpath, {}) is None  # first start: nothing yet
    (job_dpath / "checkpoints" / "step0000020.ckpt").write_bytes(b"x")
    (job_dpath / "checkpoints" / "last.ckpt").symlink_to("step0000020.ckpt")
    assert find_resume_checkpoint("auto", job_dpath, {}) == job_dpath / "checkpoints" / "last.ckpt"
    sibling = tmp_path / "multirun" / "job_1"
    assert find_resume_checkpoint("auto", sibling, {"seed": 0}) is None

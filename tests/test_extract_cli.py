"""The CLI end to end: ``python -m vlmsae.extract`` killed with SIGKILL mid-run, then the same command
again, gives exactly the rows of an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from vlmsae.data.concepts import make_concept_images
from vlmsae.data.shards import read_rows
from vlmsae.formats import read_manifest

pytestmark = pytest.mark.slow


def test_cli_sigkill_then_resume_equals_uninterrupted(tmp_path, repo_root):
    root = make_concept_images(tmp_path / "imgs", n_per_class=25, size=32, seed=2)
    (root / "cross_red" / "00000_bad.jpg").write_bytes(b"garbage")

    def command(out):
        return [sys.executable, "-m", "vlmsae.extract", "model=tiny", "data=folder", f"data.root={root}",
                "data.batch_size=2", "data.num_workers=1", "layer=1", "tokens=random_k", "rows_per_shard=8",
                "progress=false", f"out={out}", f"hydra.run.dir={tmp_path / 'hydra'}"]

    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    subprocess.run(command(tmp_path / "full"), cwd=repo_root, env=env, check=True, capture_output=True)
    proc = subprocess.Popen(command(tmp_path / "killed"), cwd=repo_root, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    progress = tmp_path / "killed" / "progress.json"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if progress.exists() and json.loads(progress.read_text())["n_shards"] >= 5:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "manifest.json").exists(), "the run finished before it could be killed"
    subprocess.run(command(tmp_path / "killed"), cwd=repo_root, env=env, check=True, capture_output=True)
    full, resumed = read_rows(tmp_path / "full"), read_rows(tmp_path / "killed")
    assert torch.equal(full["acts"], resumed["acts"]) and full["keys"] == resumed["keys"]
    assert torch.equal(full["token_idx"], resumed["token_idx"]) and torch.equal(full["image_idx"], resumed["image_idx"])
    m_full, m_res = read_manifest(tmp_path / "full"), read_manifest(tmp_path / "killed")
    assert m_full.n_rows == m_res.n_rows == 400 * 2 and m_res.n_skipped == 1
    assert m_full.image_list_digest == m_res.image_list_digest and m_full.mean == m_res.mean
    assert (tmp_path / "killed" / "run_info.json").exists()

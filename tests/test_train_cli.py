"""A two-job multirun through the CLI: one directory and one (disabled) W&B run per job, plus the sweep summary."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest

from vlmsae.data.synthetic import PlantedDictionary
from vlmsae.data.store import write_acts_store


@pytest.mark.slow
def test_multirun_two_jobs_writes_job_dirs_and_sweep_summary(tmp_path, repo_root):
    planted = PlantedDictionary.random(d_in=64, n_atoms=128, k=3, scale=5.0, seed=0)
    for layer in (1, 2):  # one store per layer, selected through ${layer} interpolation
        write_acts_store(tmp_path / f"layer{layer}", planted.sample(4000, seed=layer).x.half(), 500, 2,
                         meta={"model": "tiny", "layer": layer})
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "vlmsae.train", "-m", "layer=1,2", "data=acts",
           f"data.acts={tmp_path}/layer${{layer}}", "data.batch_size=128", "data.num_workers=0",
           "trainer.max_steps=30", "logger=wandb", f"hydra.sweep.dir={sweep}"]
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for job, layer in (("job_0", 1), ("job_1", 2)):
        metrics = json.loads((sweep / job / "metrics.json").read_text())
        assert metrics["step"] == 30 and metrics["layer"] == layer
        assert json.loads((sweep / job / "sae" / "config.json").read_text())["source"]["layer"] == layer
        assert (sweep / job / "wandb_id.txt").is_file()
    ids = {(sweep / j / "wandb_id.txt").read_text() for j in ("job_0", "job_1")}
    assert len(ids) == 2  # a fresh W&B run per job
    rows = list(csv.DictReader((sweep / "sweep_summary.csv").open()))
    assert [r["layer"] for r in rows] == ["1", "2"] and all(float(r["fve"]) > 0 for r in rows)
    md = (sweep / "sweep_summary.md").read_text()
    assert "| job_0 | 1 |" in md and "fve" in md


@pytest.mark.slow
def test_ddp_two_cpu_ranks_train_to_the_same_step(tmp_path):
    """trainer=ddp semantics on CPU (gloo): two ranks, disjoint shards, one set of outputs from rank 0."""
    planted = PlantedDictionary.random(d_in=64, n_atoms=128, k=3, scale=5.0, seed=0)
    write_acts_store(tmp_path / "acts", planted.sample(6000, seed=1).x.half(), 500, 2, meta={"model": "tiny", "layer": 2})
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "vlmsae.train", "data=acts", f"data.acts={tmp_path / 'acts'}", "data.batch_size=128",
           "data.num_workers=1", "trainer=cpu", "trainer.devices=2", "trainer.strategy=ddp", "trainer.max_steps=30",
           "trainer.val_check_interval=15", "trainer.limit_val_batches=2", "trainer.warmup_steps=5",
           "trainer.scale_batches=2", "trainer.enable_progress_bar=false", "logger=csv", f"hydra.run.dir={out}"]
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["step"] == 30 and metrics["optimizer_steps"] == 30 and metrics["fve"] > 0
    assert json.loads((out / "run_info.json").read_text())["status"] == "done"

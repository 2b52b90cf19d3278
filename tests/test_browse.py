"""``python -m vlmsae.browse``: the README's recipe run as written finds the hierarchy and steering runs of the SAE."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

JOBS = ("extract", "train", "monosemanticity", "hierarchy", "steer", "browse")


def readme_steps(readme: str) -> list[list[str]]:
    """The first command of each job in the README's real-model recipe (its bash block that ends in browse),
    as argument lists."""
    blocks = re.findall(r"```bash\n(.*?)```", readme, flags=re.S)
    block = next(b for b in blocks if "python -m vlmsae.browse run=" in b)
    text = re.sub(r"\\\n\s*", " ", block)  # join continued lines
    steps: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.split(" # ", 1)[0].strip()
        m = re.match(r"python -m vlmsae\.(\w+) (.*)", line)
        if m and m.group(1) in JOBS and m.group(1) not in steps and " -m " not in f" {m.group(2)} ":
            steps[m.group(1)] = shlex.split(m.group(2))
    assert set(steps) == set(JOBS), f"README steps missing: {set(JOBS) - set(steps)}"
    return [[job, *steps[job]] for job in JOBS]


def tiny_args(args: list[str], acts_root: Path, runs: dict[str, Path]) -> list[str]:
    """The README's arguments on the tiny models: the links between steps kept (out= / data.acts= / sae_path= /
    run=, with each <run> the folder Hydra made), real models and data swapped for the tiny ones."""
    swap = {"model": "model=tiny_llava", "data": None, "embedder": "embedder=tiny", "taxonomy": "taxonomy=tiny"}
    drop = {"data.root", "layer", "sae", "trainer", "logger", "experiment", "k"}
    out = []
    for arg in args:
        key, _, value = arg.partition("=")
        if key.startswith("sae.") or key in drop:
            continue
        if key in swap:
            if key == "data":
                out.append("data=acts" if value == "acts" else "data=tiny")
            else:
                out.append(swap[key])
            continue
        if value.startswith("/acts/"):
            value = str(acts_root / value[len("/acts/") :])
        for job, dpath in runs.items():
            value = value.replace(f"outputs/{job}/<run>", str(dpath.relative_to(dpath.parents[2])))
        out.append(f"{key}={value}")
    return out


@pytest.mark.slow
def test_readme_recipe_on_tiny_models_browses_the_hierarchy_and_steering_runs(repo_root, tmp_path):
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo_root)}
    runs: dict[str, Path] = {}
    outputs = tmp_path / "outputs"
    for job, *args in readme_steps((repo_root / "README.md").read_text()):
        cmd = [sys.executable, "-m", f"vlmsae.{job}", *tiny_args(args, tmp_path / "acts", runs)]
        if job == "train":
            cmd += ["trainer.max_steps=50", "data.batch_size=16", "data.num_workers=0"]  # a 128-row store
        before = set(outputs.glob(f"{job}/*")) if outputs.is_dir() else set()
        proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True)
        assert proc.returncode == 0, f"{shlex.join(cmd)}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
        # nothing waits in silence: a tqdm bar ("<n>/s]") wherever images go through a model (trainer=tiny turns
        # Lightning's bar off; hierarchy with ms_run= reads the MS run's top images)
        if job in ("extract", "monosemanticity", "steer") or (job == "hierarchy" and "ms_run=" not in str(args)):
            assert "/s]" in proc.stderr, f"{job}: no progress bar\n{proc.stderr[-2000:]}"
        if job == "steer":
            assert "generate:" in proc.stderr  # LLaVA's answers, the slow part of steering
        new = sorted(set(outputs.glob(f"{job}/*")) - before)
        if job != "browse":  # each job in its own default Hydra run dir: outputs/<job>/<time>
            assert len(new) == 1, (job, new)
            runs[job] = new[0]
    # browse run=outputs/monosemanticity/<run>: the hierarchy and steering runs sit in sibling folders
    result = json.loads((runs["monosemanticity"] / "browser" / "run_info.json").read_text())["result"]
    assert Path(result["hierarchy_run"]).resolve() == runs["hierarchy"].resolve()
    assert [Path(p).resolve() for p in result["steer_files"]] == [(runs["steer"] / "steer.json").resolve()]
    assert "hierarchy run:" in proc.stdout and "same sae_path" in proc.stdout and "steering runs: 1" in proc.stdout

"""Benchmark of a command line that answers at once (issue 22 §6): wall seconds of each job's ``--help``
and ``--cfg job`` in a fresh interpreter (``python -m vlmsae.<job> --help``), and of ``vlmsae --help``.

``cli_help_s`` is the slowest job's ``--help`` (the target: under 2 s on 2 CPU cores); each job has
``cli_help_s_<job>`` and ``cli_cfg_job_s_<job>``. A figure is the median of 3 runs; a quick run times
``train`` alone, once. Most of what remains is Hydra itself: ``--help`` lists every config group's
options, and Hydra copies its config store once per group.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import vlmsae
from vlmsae.cli import JOBS


def _seconds(args: list[str], repeats: int) -> float:
    """Median wall seconds of ``python <args>``, run with this checkout's vlmsae first on the path."""
    env = {**os.environ, "WANDB_MODE": "disabled"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(Path(vlmsae.__file__).parents[1]), env.get("PYTHONPATH")) if p)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([sys.executable, *args], env=env, check=True, capture_output=True, timeout=300)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run(quick: bool = False) -> dict[str, Any]:
    jobs, repeats = (("train",), 1) if quick else (JOBS, 3)
    out: dict[str, Any] = {"cli_vlmsae_help_s": _seconds(["-m", "vlmsae", "--help"], repeats)}
    for job in jobs:
        out[f"cli_help_s_{job}"] = _seconds(["-m", f"vlmsae.{job}", "--help"], repeats)
        out[f"cli_cfg_job_s_{job}"] = _seconds(["-m", f"vlmsae.{job}", "--cfg", "job"], repeats)
    out["cli_help_s"] = max(out[f"cli_help_s_{job}"] for job in jobs)
    out["cli_cfg_job_s"] = max(out[f"cli_cfg_job_s_{job}"] for job in jobs)
    out["cli_python_startup_s"] = _seconds(["-c", "pass"], repeats)  # the floor: an interpreter that does nothing
    return out

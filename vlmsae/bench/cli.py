"""Benchmark of a command line that answers at once (issue 22 §6): wall seconds of each job's ``--help``
and ``--cfg job`` in a fresh interpreter (``python -m vlmsae.<job> --help``), and of ``vlmsae --help``.

``cli_help_s`` is the slowest job's ``--help`` (the target: under 2 s on 2 CPU cores); each job has
``cli_help_s_<job>`` and ``cli_cfg_job_s_<job>``, and ``*_cpu_s`` the CPU seconds of the same runs (user +
system: on shared cores the wall time grows with the load, the CPU time much less). A figure is the median
of 3 runs; a quick run times ``train`` alone, once. Most of what remains is Hydra itself: ``--help`` lists
every config group's options, and Hydra copies its config store once per group.
"""

from __future__ import annotations

import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import vlmsae
from vlmsae.cli import JOBS


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _timed(name: str, args: list[str], repeats: int, job: str = "") -> dict[str, float]:
    """``{<name>_s[_<job>]: median wall s, <name>_cpu_s[_<job>]: median CPU s}`` of ``python <args>``, run with
    this checkout's vlmsae first on the path."""
    env = {**os.environ, "WANDB_MODE": "disabled"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(Path(vlmsae.__file__).parents[1]), env.get("PYTHONPATH")) if p)
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), _children_cpu_s()
        subprocess.run([sys.executable, *args], env=env, check=True, capture_output=True, timeout=300)
        wall.append(time.perf_counter() - start)
        cpu.append(_children_cpu_s() - start_cpu)
    tail = f"_{job}" if job else ""
    return {f"{name}_s{tail}": statistics.median(wall), f"{name}_cpu_s{tail}": statistics.median(cpu)}


def run(quick: bool = False) -> dict[str, Any]:
    jobs, repeats = (("train",), 1) if quick else (JOBS, 3)
    out: dict[str, Any] = _timed("cli_vlmsae_help", ["-m", "vlmsae", "--help"], repeats)
    out |= _timed("cli_python_startup", ["-c", "pass"], repeats)  # the floor: an interpreter that does nothing
    for job in jobs:
        out |= _timed("cli_help", ["-m", f"vlmsae.{job}", "--help"], repeats, job)
        out |= _timed("cli_cfg_job", ["-m", f"vlmsae.{job}", "--cfg", "job"], repeats, job)
    for key in ("cli_help_s", "cli_help_cpu_s", "cli_cfg_job_s", "cli_cfg_job_cpu_s"):  # the slowest job
        out[key] = max(out[f"{key}_{job}"] for job in jobs)
    return out

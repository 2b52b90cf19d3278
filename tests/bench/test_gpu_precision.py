"""vlmsae.bench.gpu_precision: the CUDA check of the precision policy, run on CPU at tiny shapes (--smoke)."""

import subprocess
import sys

import pytest


@pytest.mark.slow
def test_smoke_run_passes_every_check_and_times_both_paths():
    proc = subprocess.run(
        [sys.executable, "-m", "vlmsae.bench.gpu_precision", "--smoke"], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert sum(line.startswith("PASS ") for line in lines) == 10  # 3 runs x 3 checks + the overall line
    assert not any(line.startswith("FAIL") for line in lines)
    assert sum(line.startswith("TIME F=") for line in lines) == 2  # one row per smoke size, dense and sparse timed

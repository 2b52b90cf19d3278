"""The cli benchmark (vlmsae/bench/cli.py): every key a positive number of seconds; registered with the harness."""

from __future__ import annotations

import pytest

from vlmsae.bench import MODULES, cli


@pytest.mark.slow
def test_quick_run_times_train_help_and_the_vlmsae_command():
    results = cli.run(quick=True)
    names = ("cli_vlmsae_help", "cli_python_startup", "cli_help", "cli_cfg_job")
    per_job = ("cli_help_s_train", "cli_help_cpu_s_train", "cli_cfg_job_s_train", "cli_cfg_job_cpu_s_train")
    assert set(results) == {f"{n}{kind}" for n in names for kind in ("_s", "_cpu_s")} | set(per_job)
    assert all(isinstance(v, float) and v > 0 for v in results.values()), results
    assert results["cli_help_s"] == results["cli_help_s_train"]
    assert results["cli_help_cpu_s"] == results["cli_help_cpu_s_train"]


def test_registered():
    assert "cli" in MODULES

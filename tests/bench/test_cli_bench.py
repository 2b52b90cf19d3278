"""The cli benchmark (vlmsae/bench/cli.py): every key a positive number of seconds; registered with the harness."""

from __future__ import annotations

import pytest

from vlmsae.bench import MODULES, cli


@pytest.mark.slow
def test_quick_run_times_train_help_and_the_vlmsae_command():
    results = cli.run(quick=True)
    assert set(results) == {
        "cli_vlmsae_help_s",
        "cli_help_s_train",
        "cli_cfg_job_s_train",
        "cli_help_s",
        "cli_cfg_job_s",
        "cli_python_startup_s",
    }
    assert all(isinstance(v, float) and v > 0 for v in results.values()), results
    assert results["cli_help_s"] == results["cli_help_s_train"]


def test_registered():
    assert "cli" in MODULES

"""The many-SAEs-per-pass benchmark (vlmsae.bench.train_many) runs in quick mode and records the speedup."""

from __future__ import annotations

import pytest

from vlmsae.bench import harness, train_many


def test_train_many_is_a_bench_module():
    assert "train_many" in harness.MODULES


@pytest.mark.slow
def test_quick_run_records_the_speedup():
    out = train_many.run(quick=True)
    assert out["train_many_n_saes"] == 4
    assert out["train_many_speedup"] == pytest.approx(out["train_many_separate_s"] / out["train_many_pass_s"])
    assert out["train_many_speedup"] > 0

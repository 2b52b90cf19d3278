"""The benchmark harness: runs modules, records failures, writes results.json / results.md / run_info.json."""

from __future__ import annotations

import json
import subprocess
import sys
import types

from vlmsae.bench import run_all
from vlmsae.bench.harness import render_markdown, run_module

REQUIRED_POSITIVE = (
    "gemm_gflops",
    "sae_step_sparse_tokens_per_s",
    "sae_step_dense_tokens_per_s",
    "sae_step_reference_tokens_per_s",
    "sae_step_speedup_vs_reference",
    "sae_step_speedup_vs_dense",
    "sae_fve_sparse",
    "sae_fve_reference",
)


def test_quick_run_writes_flat_results(tmp_path):
    results = run_all(quick=True, out_dpath=tmp_path, only=["gemm", "sae_step"])
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk == json.loads(json.dumps(results))
    assert all(not isinstance(v, (dict, list)) for v in on_disk.values()), "results.json must be flat"
    for key in REQUIRED_POSITIVE:
        assert isinstance(on_disk[key], (int, float)) and on_disk[key] > 0, key
    sizes = [k for k in on_disk if k.startswith("sae_step_sparse_tokens_per_s_") and "best" not in k]
    assert len(sizes) == 2  # both dictionary sizes measured in the same run
    head = sizes[0].rsplit("_", 1)[1]
    assert on_disk["sae_step_speedup_vs_reference"] == on_disk[f"sae_step_speedup_vs_reference_{head}"]
    assert on_disk[f"sae_step_sparse_tokens_per_s_best_{head}"] >= on_disk[f"sae_step_sparse_tokens_per_s_{head}"]
    assert on_disk["machine_cpu_count"] >= 1 and on_disk["provenance_git_commit"]
    md = (tmp_path / "results.md").read_text()
    assert "| sparse (vlmsae) |" in md and "gemm_gflops" in md
    assert json.loads((tmp_path / "run_info.json").read_text())["config"]["quick"] is True


def test_missing_or_failing_module_is_recorded_not_fatal(monkeypatch):
    broken = types.ModuleType("vlmsae.bench._broken_for_test")

    def run(quick: bool = False) -> dict:
        raise RuntimeError("boom")

    broken.run = run
    monkeypatch.setitem(sys.modules, "vlmsae.bench._broken_for_test", broken)
    assert run_module("_broken_for_test", quick=True) == {"_broken_for_test_error": "RuntimeError: boom"}
    missing = run_module("_no_such_bench", quick=True)
    assert list(missing) == ["_no_such_bench_error"] and "missing" in missing["_no_such_bench_error"]


def test_markdown_lists_every_key():
    results = {"quick": True, "gemm_gflops": 123.4, "x_error": "missing: a|b"}
    md = render_markdown(results)
    assert "| gemm_gflops | 123.4 |" in md and "missing: a\\|b" in md


def test_cli_entrypoint(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "vlmsae.bench", "--quick", "--only", "gemm", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "results.json").read_text())["gemm_gflops"] > 0

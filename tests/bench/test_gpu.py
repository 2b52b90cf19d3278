"""The GPU benchmark module (``make bench-gpu``): skips cleanly without CUDA, measures every case on the
device it is given (run here on the CPU at quick sizes), and ``--merge`` keeps an earlier run's keys."""

from __future__ import annotations

import json

import pytest
import torch

from vlmsae.bench import gpu, harness, run_all


def test_gpu_is_a_bench_module_and_skips_without_cuda(monkeypatch):
    assert "gpu" in harness.MODULES
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = gpu.run(quick=True)
    assert list(out) == ["gpu_skipped"] and "no CUDA" in out["gpu_skipped"]


def test_sae_step_and_ms_cases_measure_on_the_given_device():
    cpu = torch.device("cpu")
    step = gpu.sae_step_keys(cpu, quick=True)
    for n in gpu.QUICK_STEP_SIZES:
        sparse, ref = step[f"gpu_sae_step_sparse_tokens_per_s_{n}"], step[f"gpu_sae_step_reference_tokens_per_s_{n}"]
        assert sparse > 0 and ref > 0
        assert step[f"gpu_sae_step_speedup_vs_reference_{n}"] == pytest.approx(sparse / ref)
        assert step[f"gpu_sae_step_sparse_peak_gib_{n}"] is None  # peak memory is a CUDA figure
    ms = gpu.ms_keys(cpu, quick=True)
    assert ms["gpu_ms_seconds"] > 0 and ms["gpu_ms_scored"] > 1000 and ms["gpu_ms_shape"].startswith("N=5000")


@pytest.mark.slow
def test_extraction_case_runs_end_to_end_on_cpu():
    out = gpu.extraction_keys(torch.device("cpu"), quick=True)
    assert out["gpu_extract_forward_float32_images_per_s"] > 0 and out["gpu_extract_forward_float16_images_per_s"] > 0
    assert out["gpu_extract_images_per_s"] > 0 and out["gpu_extract_end_to_end_images"] > 0


def test_merge_keeps_earlier_keys_and_records_the_machine(tmp_path, monkeypatch):
    earlier = {"sae_step_speedup_vs_reference": 3.5, "gpu_old": 1, "gpu_error": "an earlier failure"}
    (tmp_path / "results.json").write_text(json.dumps(earlier))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    results = run_all(quick=True, out_dpath=tmp_path, only=["gpu"], merge=True)
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["sae_step_speedup_vs_reference"] == 3.5 and on_disk["gpu_old"] == 1
    assert "gpu_error" not in on_disk  # this run's module succeeded: the earlier failure is gone
    assert on_disk["gpu_skipped"] == results["gpu_skipped"] and on_disk["gpu_machine_cpu_count"] >= 1
    replaced = run_all(quick=True, out_dpath=tmp_path, only=["gpu"])
    assert "sae_step_speedup_vs_reference" not in replaced  # without --merge the file is this run's alone
    (tmp_path / "results.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="expected a JSON object"):
        run_all(quick=True, out_dpath=tmp_path, only=["gpu"], merge=True)

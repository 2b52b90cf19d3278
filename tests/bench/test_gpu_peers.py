"""vlmsae.bench.gpu_peers: the --quick CPU path runs the GPU bench's code at tiny sizes (bf16 matmul)."""

import torch

from vlmsae.bench import gpu_peers


def test_quick_cpu_run_reports_every_key_and_zero_differing_selections():
    out = gpu_peers.measure(torch.device("cpu"), quick=True)
    for n_latents in gpu_peers.QUICK_SIZES:
        for arch in gpu_peers.ARCHS:
            for policy in gpu_peers.POLICIES:
                assert out[f"gpu_sae_step_{policy}_{arch}_tokens_per_s_{n_latents}"] > 0
        for peer in gpu_peers.PEERS:  # not installed here: null and a reason, never a crash
            value = out[f"gpu_peer_{peer}_topk_tokens_per_s_{n_latents}"]
            assert (value is None and out[f"gpu_peer_{peer}_topk_reason"]) or value > 0
    assert out["gpu_fast_matmul"] == "bf16"
    assert out["gpu_sae_step_fast_exact_65k_speedup"] > 0
    assert out["gpu_fast_exact_differing_selections"] == 0
    assert out["gpu_bf16_differing_selections_topk"] > 0  # plain bf16 does change selections
    for arch in gpu_peers.ARCHS:  # same selections, same float32 values: the same model on CPU
        fve = [out[f"gpu_fve_{policy}_{arch}_after_10"] for policy in ("fp32", "fast_exact")]
        assert fve[0] == fve[1] and 0 < fve[0] < 1


def test_without_cuda_the_full_run_skips_cleanly(capsys):
    if torch.cuda.is_available():
        return
    assert gpu_peers.main([]) == 0
    assert "gpu_skipped" in capsys.readouterr().out


def test_the_prepared_device_script_parses_and_names_both_runs():
    import subprocess
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "experiments" / "gpu_check" / "run.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    text = script.read_text()
    assert "vlmsae.bench.gpu_peers" in text and "vlmsae.bench.gpu_decode --smoke" in text

"""Benchmark of the monosemanticity score: the linear-time identity against the pairwise loop.

Two measurements, both in one ``run``:
- the target size of the MS study (METHOD §3): N = 50,000 images, K = 65,536 latents, k = 20 sparse
  codes per image, 768-d embeddings; wall time of ``monosemanticity_scores`` and the peak resident
  memory of a fresh subprocess that builds the inputs and scores them (VmHWM, so the number
  is the whole process: Python, torch, inputs and the scorer's temporaries);
- N = 2,000, K = 4,096: the pairwise double loop (row i against blocks of 100 later rows, weights
  a~_i * a~_j elementwise over all latents, as the reference implementation does) and the fast
  sparse scorer on the same codes, their ratio, and the largest difference between their scores.
"""

from __future__ import annotations

import json
import math
import os
import resource
import subprocess
import sys
import time

import torch

from vlmsae.metrics.monosemanticity import monosemanticity_scores


def random_sparse_codes(n_images: int, n_latents: int, k: int, seed: int = 0) -> torch.Tensor:
    """TopK-like codes: k latents per image drawn with a heavy-tailed frequency (a few latents fire
    often, most rarely, like a trained SAE's), positive values; sparse COO [N, K]."""
    g = torch.Generator().manual_seed(seed)
    # Zipf-ish latent popularity without building an [N, K] matrix: draw ranks from a log-uniform law.
    u_NK = torch.rand(n_images, k, generator=g)
    cols = (n_latents**u_NK).long().clamp_(1, n_latents) - 1
    cols = torch.randperm(n_latents, generator=g)[cols]  # popular latents spread over the index range
    rows = torch.arange(n_images).repeat_interleave(k)
    vals = torch.rand(n_images * k, generator=g) * 4.0 + 0.05
    codes = torch.sparse_coo_tensor(
        torch.stack([rows, cols.flatten()]), vals, (n_images, n_latents), check_invariants=False
    )
    return codes.coalesce()  # repeated (image, latent) draws add up: ~k distinct latents per image


def pairwise_ms_loop(acts_NK: torch.Tensor, emb_NE: torch.Tensor, block: int = 100) -> torch.Tensor:
    """The O(N^2 K) definition as the reference code computes it: for each image i, the later images
    j in blocks of ``block``; weights a~_i a~_j for all latents at once, times cos(e_i, e_j)."""
    acts_NK = acts_NK.float()
    lo, hi = acts_NK.min(0, keepdim=True).values, acts_NK.max(0, keepdim=True).values
    acts_NK = (acts_NK - lo) / (hi - lo)  # dead latents become NaN, as in the reference
    n_images, n_latents = acts_NK.shape
    weighted_sum_K = torch.zeros(n_latents)
    weight_sum_K = torch.zeros(n_latents)
    for i in range(n_images):
        for j0 in range(i + 1, n_images, block):
            j1 = min(j0 + block, n_images)
            cos_J = torch.nn.functional.cosine_similarity(emb_NE[i].expand(j1 - j0, -1), emb_NE[j0:j1], dim=1)
            weights_JK = acts_NK[i][None, :] * acts_NK[j0:j1]
            weighted_sum_K += (weights_JK * cos_J[:, None]).sum(0)
            weight_sum_K += weights_JK.sum(0)
    return torch.where(weight_sum_K != 0, weighted_sum_K / weight_sum_K, torch.nan)


def _own_peak_rss_bytes() -> int:
    """This process image's peak resident memory.

    Linux's VmHWM belongs to the address space made by exec, so it is this process's own peak.
    ``ru_maxrss`` is not: it survives fork + exec (getrusage(2)), so a child started by a harness
    that had already used 8 GB would report 8 GB. ``ru_maxrss`` is the fallback off Linux.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _large_case(n_images: int, n_latents: int, k: int, dim: int) -> dict:
    """Run inside a fresh process so that the peak memory is this case's own."""
    codes = random_sparse_codes(n_images, n_latents, k, seed=1)
    emb = torch.randn(n_images, dim, generator=torch.Generator().manual_seed(2))
    start = time.perf_counter()
    ms = monosemanticity_scores(codes, emb)
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "peak_rss_gb": _own_peak_rss_bytes() / 1e9,
        "nnz": int(codes._nnz()),
        "scored": int((~torch.isnan(ms)).sum()),
        "threads": torch.get_num_threads(),
    }


def _run_large_in_subprocess(n_images: int, n_latents: int, k: int, dim: int) -> dict:
    code = (
        "import json, sys; from vlmsae.bench.ms import _large_case; "
        f"print('RESULT ' + json.dumps(_large_case({n_images}, {n_latents}, {k}, {dim})))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ.copy())
    if proc.returncode != 0:
        raise RuntimeError(f"MS benchmark subprocess failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT ") :])


def run(quick: bool = False) -> dict:
    """Flat dict of timings; ``quick`` shrinks both sizes (a smoke run in seconds)."""
    if quick:
        big = dict(n_images=5_000, n_latents=8_192, k=20, dim=768)
        small = dict(n_images=300, n_latents=512, k=20, dim=768)
    else:
        big = dict(n_images=50_000, n_latents=65_536, k=20, dim=768)
        small = dict(n_images=2_000, n_latents=4_096, k=20, dim=768)

    large = _run_large_in_subprocess(**big)

    codes = random_sparse_codes(small["n_images"], small["n_latents"], small["k"], seed=3)
    emb = torch.randn(small["n_images"], small["dim"], generator=torch.Generator().manual_seed(4))
    dense = codes.to_dense()
    start = time.perf_counter()
    ms_pairwise = pairwise_ms_loop(dense, emb)
    pairwise_s = time.perf_counter() - start
    fast_s = math.inf
    for _ in range(3):  # best of 3: the fast call is short, so one scheduler hiccup would dominate it
        start = time.perf_counter()
        ms_fast = monosemanticity_scores(codes, emb)
        fast_s = min(fast_s, time.perf_counter() - start)
    both = ~torch.isnan(ms_pairwise) & ~torch.isnan(ms_fast)
    max_diff = float((ms_pairwise.double()[both] - ms_fast[both]).abs().max()) if bool(both.any()) else math.nan

    tag_big = "50k_65k" if not quick else "quick_big"
    tag_small = "2k_4k" if not quick else "quick_small"
    return {
        f"ms_{tag_big}_seconds": large["seconds"],
        f"ms_{tag_big}_peak_rss_gb": large["peak_rss_gb"],
        f"ms_{tag_big}_nnz": large["nnz"],
        f"ms_{tag_big}_shape": f"N={big['n_images']} K={big['n_latents']} k={big['k']} d={big['dim']}",
        f"ms_pairwise_{tag_small}_seconds": pairwise_s,
        f"ms_fast_{tag_small}_seconds": fast_s,
        "ms_speedup_vs_pairwise": pairwise_s / fast_s,
        "ms_pairwise_max_abs_diff": max_diff,
        "ms_threads": torch.get_num_threads(),
    }


if __name__ == "__main__":
    print(json.dumps(run(quick="--quick" in sys.argv), indent=2))

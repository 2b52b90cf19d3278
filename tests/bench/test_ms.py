"""The benchmark's pairwise reference loop agrees with the fast MS, so its speedup compares like with like."""

from __future__ import annotations

import torch

from vlmsae.bench.ms import pairwise_ms_loop, random_sparse_codes
from vlmsae.metrics import monosemanticity_scores


def test_reference_loop_matches_fast_scores() -> None:
    codes = random_sparse_codes(120, 300, 6, seed=0)
    assert codes.shape == (120, 300) and codes._nnz() <= 120 * 6
    emb = torch.randn(120, 16, generator=torch.Generator().manual_seed(1))
    ref = pairwise_ms_loop(codes.to_dense(), emb, block=7)
    fast = monosemanticity_scores(codes, emb)
    both = ~torch.isnan(ref) & ~torch.isnan(fast)
    assert both.sum() > 50
    torch.testing.assert_close(fast[both], ref[both].double(), atol=1e-5, rtol=0)
    # latents the loop leaves NaN (never fire: 0/0) are NaN in the fast scores too
    assert torch.isnan(fast[torch.isnan(ref)]).all()


def test_large_case_peak_memory_is_the_subprocess_own():
    """The MS peak must not inherit the harness's high-water mark (ru_maxrss survives fork + exec)."""
    import torch

    from vlmsae.bench.ms import _run_large_in_subprocess

    hog = torch.ones(3 * 1024**3 // 4)  # 3 GB resident in this (parent) process
    hog[::1024].fill_(2.0)  # touch it so the pages are resident
    result = _run_large_in_subprocess(2000, 1024, 20, 64)
    assert 0 < result["peak_rss_gb"] < 2.0, result
    del hog

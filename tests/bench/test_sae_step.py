"""The SAE-step benchmark (vlmsae.bench.sae_step): per-round speed ratios, the sparse path learns like the reference,
the GPU's bf16 branch runs."""

from __future__ import annotations

import statistics

import torch

from vlmsae.bench.sae_step import StepShape, learning_curve, measure_step_seconds


def test_round_ratio_pairs_steps_of_the_same_round():
    from vlmsae.bench.sae_step import round_ratio

    # Round 2 is slow for everyone (a burst of load): per-round ratios stay 4, medians would not.
    seconds = {"reference": [4.0, 40.0, 4.0], "sparse": [1.0, 10.0, 1.0]}
    assert round_ratio(seconds, "reference", "sparse") == 4.0


def test_learning_curve_sparse_matches_reference():
    """Reduced version of the bench's 1,000-step check: same data and seed, FVE within 1%."""
    fves = learning_curve(steps=150, d_in=32, n_latents=256, k=4, batch_size=128, lr=3e-3)
    assert fves["reference"] > 0.6, fves  # it really learned the planted features
    assert abs(fves["sparse"] - fves["reference"]) <= 0.01 * fves["reference"], fves


def test_bf16_autocast_branch_runs_on_cpu():
    """The GPU benchmark's code path (bf16 autocast) exercised on CPU autocast."""
    seconds = measure_step_seconds(StepShape(32, 256, 4, 64), "cpu", torch.bfloat16, warmup=0, rounds=1)
    tps = {path: 64 / statistics.median(ts) for path, ts in seconds.items()}  # tokens/s of each path
    assert set(tps) == {"sparse", "dense", "reference", "sparse_batchtopk", "encoder"}
    assert all(v > 0 for v in tps.values())

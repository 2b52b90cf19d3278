"""Training mechanics (vlmsae.sae.mechanics) on hand-made cases: decoder constraints, geometric median, input scale."""

from __future__ import annotations

import pytest
import torch

from vlmsae.sae import (
    SAEConfig,
    build_sae,
    constrain_decoder_grad_,
    estimate_input_scale,
    geometric_median,
    normalize_decoder_,
)


def test_decoder_constraint_functions():
    sae = build_sae(SAEConfig(arch="topk", d_in=6, n_latents=10, k=2), seed=0)
    sae.W_dec.grad = torch.randn(10, 6)
    grad_before = sae.W_dec.grad.clone()
    constrain_decoder_grad_(sae)
    parallel = (sae.W_dec.grad * sae.W_dec).sum(1)
    assert torch.allclose(parallel, torch.zeros(10), atol=1e-6)
    assert not torch.allclose(sae.W_dec.grad, grad_before)  # something was removed...
    orthogonal_before = grad_before - (grad_before * sae.W_dec).sum(1, keepdim=True) * sae.W_dec
    torch.testing.assert_close(sae.W_dec.grad, orthogonal_before)  # ...and only the parallel part
    with torch.no_grad():
        sae.W_dec.mul_(torch.linspace(0.5, 3.0, 10)[:, None])
    normalize_decoder_(sae)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(10))


def test_geometric_median_ignores_outliers():
    g = torch.Generator().manual_seed(0)
    inliers = torch.randn(200, 5, generator=g) * 0.1 + torch.tensor([1.0, 2, 3, 4, 5])
    outliers = torch.full((40, 5), 100.0)
    x = torch.cat([inliers, outliers])
    median = geometric_median(x)
    assert float((median - torch.tensor([1.0, 2, 3, 4, 5])).norm()) < 0.1
    assert float((x.mean(0) - median).norm()) > 10  # the mean is dragged away, the median is not
    # First-order optimality: the unit vectors from the median to the points sum to ~0.
    units = torch.nn.functional.normalize(x.double() - median.double(), dim=1)
    assert float(units.sum(0).norm()) < 1e-3 * len(x)


# ------------------------------------------------------------------------------ input scale estimate
def test_input_scale_estimate_refuses_bad_batches():
    assert estimate_input_scale([torch.full((4, 9), 3.0)], d_in=9) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="width d_in=9"):
        estimate_input_scale([torch.ones(4, 8)], d_in=9)
    with pytest.raises(ValueError, match="no rows"):
        estimate_input_scale([], d_in=9)
    with pytest.raises(ValueError, match="NaN or inf"):
        estimate_input_scale([torch.tensor([[float("nan")] * 9])], d_in=9)

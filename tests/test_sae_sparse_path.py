"""The sparse training path (vlmsae.sae.sparse kernels) gives the dense path's loss and gradients."""

from __future__ import annotations

import pytest
import torch

from vlmsae.sae import SAEConfig, build_sae, set_input_scale_, train_steps

D_IN, N_LATENTS, K, BATCH = 24, 96, 4, 80


def _pair(arch: str, with_dead: bool):
    extra = {"group_fractions": (0.25, 0.25, 0.5)} if arch == "matryoshka" else {}
    saes = {}
    for kernel in ("dense", "sparse"):
        cfg = SAEConfig(arch=arch, d_in=D_IN, n_latents=N_LATENTS, k=K, sparse_kernel=kernel,
                        dead_after_samples=1000, threshold_start_step=0, **extra)
        sae = build_sae(cfg, seed=0).double()
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            sae.b_enc.copy_(0.1 * torch.randn(N_LATENTS, generator=g))
            sae.b_dec.copy_(torch.randn(D_IN, generator=g))
        set_input_scale_(sae, 0.7)
        if with_dead:
            sae.samples_since_fired[::3] = 10**6
        saes[kernel] = sae.train()
    return saes


@pytest.mark.parametrize("with_dead", [False, True], ids=["no_dead", "auxk"])
@pytest.mark.parametrize("arch", ["topk", "batchtopk", "matryoshka"])
def test_sparse_and_dense_paths_agree(arch, with_dead):
    saes = _pair(arch, with_dead)
    x = torch.randn(BATCH, D_IN, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 3
    assert saes["sparse"].use_sparse_path(BATCH) and not saes["dense"].use_sparse_path(BATCH)
    outs = {}
    for kernel, sae in saes.items():
        outs[kernel] = sae.loss(x)
        outs[kernel]["loss"].backward()
    dense, sparse = outs["dense"], outs["sparse"]
    if with_dead:
        assert float(dense["aux"]) > 0
    for key in ("loss", "recon", "aux", "l0", "l1", "x_hat") + (("recon_prefix",) if arch == "matryoshka" else ()):
        torch.testing.assert_close(sparse[key].detach(), dense[key].detach(), msg=key)
    assert torch.equal(sparse["fired_F"], dense["fired_F"])
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        g_dense, g_sparse = getattr(saes["dense"], name).grad, getattr(saes["sparse"], name).grad
        assert g_dense is not None and float(g_dense.abs().sum()) > 0
        torch.testing.assert_close(g_sparse, g_dense, msg=name)
    for buf in ("threshold", "samples_since_fired", "n_steps"):
        torch.testing.assert_close(getattr(saes["sparse"], buf), getattr(saes["dense"], buf), msg=buf)


def test_sparse_path_trains_like_dense():
    saes = _pair("batchtopk", with_dead=False)
    g = torch.Generator().manual_seed(3)
    batches = [torch.randn(BATCH, D_IN, generator=g, dtype=torch.float64) for _ in range(10)]
    for sae in saes.values():
        train_steps(sae, batches, lr=1e-2, init=False)
    for name, p in saes["dense"].named_parameters():
        torch.testing.assert_close(dict(saes["sparse"].named_parameters())[name], p, msg=name)


def test_auto_kernel_resolves_by_shape():
    cfg = SAEConfig(arch="topk", d_in=16, n_latents=64, k=4, sparse_kernel="auto")
    sae = build_sae(cfg)
    assert sae.use_sparse_path(8) is False  # tiny batches: dense
    big = build_sae(SAEConfig(arch="topk", d_in=16, n_latents=4096, k=4, sparse_kernel="auto"))
    from vlmsae.sae.sparse import use_sparse_kernel

    assert big.use_sparse_path(4096) == use_sparse_kernel("auto", 4096, 4096, 16, "cpu", k=4)

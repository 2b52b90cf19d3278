"""The sparse TopK/BatchTopK primitives give exactly the dense autograd's values and gradients, and the SAEs'
sparse training path gives the dense path's loss and gradients."""

from __future__ import annotations

import pytest
import torch

from vlmsae.sae import SAEConfig, build_sae, set_input_scale_, train_steps
from vlmsae.sae.sparse import (
    _row_major_rows,
    batch_topk_select,
    gather_preacts,
    prefer_sparse,
    sparse_decode,
    use_sparse_kernel,
)

B, D, F_LAT, K = 12, 16, 40, 3


def topk_select(z_BF: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows_Z, cols_Z) of the k largest entries of each row of ``z_BF``, row-major, Z = B * k (moved here from
    vlmsae.sae.sparse, where nothing used it: TopKSAE selects through vlmsae.sae.select)."""
    batch_size, n_latents = z_BF.shape
    if not 0 < k <= n_latents:
        raise ValueError(f"k must be in [1, n_latents={n_latents}], got {k}.")
    cols_Z = z_BF.topk(k, dim=1, sorted=False).indices.reshape(-1)
    return _row_major_rows(batch_size, k, z_BF.device), cols_Z


def _params(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=g, dtype=torch.float64)
    W_enc = torch.randn(F_LAT, D, generator=g, dtype=torch.float64)
    b_enc = torch.randn(F_LAT, generator=g, dtype=torch.float64)
    W_dec = torch.randn(F_LAT, D, generator=g, dtype=torch.float64)
    return x, W_enc, b_enc, W_dec


def _fixed_k_indices(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    cols = torch.stack([torch.randperm(F_LAT, generator=g)[:K] for _ in range(B)]).reshape(-1)
    rows = torch.arange(B).repeat_interleave(K)
    return rows, cols


def _variable_indices(seed: int = 2):
    """BatchTopK-like: uneven counts per row, rows 0 and 5 empty, columns repeated across rows, unsorted."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(0, 6, (B,), generator=g)
    counts[0] = counts[5] = 0
    rows = torch.arange(B).repeat_interleave(counts)
    cols = torch.randint(0, 4, (rows.numel(),), generator=g) * 7  # only 4 distinct columns: many repeats
    perm = torch.randperm(rows.numel(), generator=g)
    return rows[perm], cols[perm]


def _dense_weights(rows, cols, vals):
    dense = torch.zeros(B, F_LAT, dtype=vals.dtype)
    return dense.index_put((rows, cols), vals, accumulate=True)


@pytest.mark.parametrize("indices", [_fixed_k_indices, _variable_indices], ids=["fixed_k", "variable"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_gather_preacts_matches_dense_autograd(indices, dtype):
    rows, cols = indices()
    x, W_enc, b_enc, _ = (t.to(dtype) for t in _params())
    g_out = torch.randn(rows.numel(), dtype=dtype, generator=torch.Generator().manual_seed(3))

    leaves_dense = [t.clone().requires_grad_() for t in (x, W_enc, b_enc)]
    z = leaves_dense[0] @ leaves_dense[1].T + leaves_dense[2]
    vals_dense = z[rows, cols]
    (vals_dense * g_out).sum().backward()

    for use_preacts in (False, True):
        leaves = [t.clone().requires_grad_() for t in (x, W_enc, b_enc)]
        pre = (x @ W_enc.T + b_enc) if use_preacts else None
        vals = gather_preacts(*leaves, rows, cols, preacts_BF=pre)
        (vals * g_out).sum().backward()
        tol = dict(atol=1e-10, rtol=1e-10) if dtype == torch.float64 else dict(atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(vals, vals_dense.detach(), **tol)
        for a, b in zip(leaves, leaves_dense):
            torch.testing.assert_close(a.grad, b.grad, **tol)


@pytest.mark.parametrize("indices", [_fixed_k_indices, _variable_indices], ids=["fixed_k", "variable"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_sparse_decode_matches_dense_autograd(indices, dtype):
    rows, cols = indices()
    _, _, _, W_dec = (t.to(dtype) for t in _params())
    g = torch.Generator().manual_seed(4)
    vals = torch.randn(rows.numel(), dtype=dtype, generator=g)
    g_out = torch.randn(B, D, dtype=dtype, generator=g)

    vals_d, W_d = vals.clone().requires_grad_(), W_dec.clone().requires_grad_()
    x_hat_dense = _dense_weights(rows, cols, vals_d) @ W_d
    (x_hat_dense * g_out).sum().backward()

    vals_s, W_s = vals.clone().requires_grad_(), W_dec.clone().requires_grad_()
    x_hat = sparse_decode(rows, cols, vals_s, W_s, B)
    (x_hat * g_out).sum().backward()

    tol = dict(atol=1e-10, rtol=1e-10) if dtype == torch.float64 else dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x_hat, x_hat_dense.detach(), **tol)
    torch.testing.assert_close(vals_s.grad, vals_d.grad, **tol)
    torch.testing.assert_close(W_s.grad, W_d.grad, **tol)
    if indices is _variable_indices:
        assert torch.all(x_hat[0] == 0) and torch.all(x_hat[5] == 0)
        untouched = torch.ones(F_LAT, dtype=torch.bool)
        untouched[cols] = False
        assert torch.all(W_s.grad[untouched] == 0)


def test_primitives_pass_gradcheck():
    """Float64 finite differences: the hand-written backwards are the true derivatives."""
    rows, cols = _variable_indices()
    x, W_enc, b_enc, W_dec = (t[:, :4].contiguous() if t.dim() == 2 else t for t in _params())
    leaves = [t.clone().requires_grad_() for t in (x, W_enc, b_enc)]
    assert torch.autograd.gradcheck(lambda a, b, c: gather_preacts(a, b, c, rows, cols), leaves)
    vals = torch.randn(rows.numel(), dtype=torch.float64, requires_grad=True)
    W = W_dec.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda v, w: sparse_decode(rows, cols, v, w, B), (vals, W))


def _topk_step(x, params, sparse: bool, k: int = K, batch: bool = False):
    """One TopK (or BatchTopK) SAE loss + backward, the two ways; returns loss and grads."""
    W_enc, b_enc, W_dec, b_dec = [p.clone().requires_grad_() for p in params]
    x_cent = x - b_dec
    if sparse:
        with torch.no_grad():
            z = torch.addmm(b_enc, x_cent, W_enc.T)
        rows, cols = batch_topk_select(z, k * x.shape[0]) if batch else topk_select(z, k)
        vals = gather_preacts(x_cent, W_enc, b_enc, rows, cols, preacts_BF=z).relu()
        x_hat = sparse_decode(rows, cols, vals, W_dec, x.shape[0]) + b_dec
    else:
        z = x_cent @ W_enc.T + b_enc
        if batch:
            flat = z.flatten()
            idx = flat.topk(k * x.shape[0]).indices
            codes = torch.zeros_like(flat).scatter(0, idx, flat[idx].relu()).view_as(z)
        else:
            top = z.topk(k, dim=1)
            codes = torch.zeros_like(z).scatter(1, top.indices, top.values.relu())
        x_hat = codes @ W_dec + b_dec
    loss = (x_hat - x).pow(2).sum(-1).mean()
    loss.backward()
    return loss.detach(), [p.grad for p in (W_enc, b_enc, W_dec, b_dec)]


@pytest.mark.parametrize("batch", [False, True], ids=["topk", "batchtopk"])
def test_full_step_same_loss_and_gradients(batch):
    g = torch.Generator().manual_seed(5)
    n, d, f = 64, 32, 256
    x = torch.randn(n, d, generator=g)
    W_dec = torch.nn.functional.normalize(torch.randn(f, d, generator=g), dim=1)
    params = [W_dec.clone(), torch.zeros(f), W_dec, x.mean(0)]
    loss_d, grads_d = _topk_step(x, params, sparse=False, k=4, batch=batch)
    loss_s, grads_s = _topk_step(x, params, sparse=True, k=4, batch=batch)
    torch.testing.assert_close(loss_s, loss_d, atol=1e-5, rtol=1e-5)
    for gs, gd in zip(grads_s, grads_d):
        torch.testing.assert_close(gs, gd, atol=1e-5, rtol=1e-5)


def test_batch_topk_select_is_exact_and_row_sorted():
    g = torch.Generator().manual_seed(6)
    z = torch.randn(256, 512, generator=g)
    z[3] += 10.0  # one outlier row owns many of the batch's slots: forces the retry/fallback
    k_total = 256 * 4
    rows, cols = batch_topk_select(z, k_total)
    assert rows.numel() == k_total and torch.all(rows[1:] >= rows[:-1])
    got = torch.sort(rows * 512 + cols).values
    want = torch.sort(z.flatten().topk(k_total).indices).values
    assert torch.equal(got, want)
    assert int((rows == 3).sum()) > 16  # the outlier row really exceeded 4x the mean count


def test_topk_select_shapes_and_errors():
    z = torch.randn(5, 9)
    rows, cols = topk_select(z, 2)
    assert rows.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert torch.equal(torch.sort(cols.view(5, 2), 1).values, torch.sort(z.topk(2, 1).indices, 1).values)
    with pytest.raises(ValueError, match="k must be"):
        topk_select(z, 10)
    with pytest.raises(ValueError, match="int64"):
        sparse_decode(rows.int(), cols, torch.ones(10), torch.ones(9, 3), 5)
    with pytest.raises(ValueError, match="share D"):
        gather_preacts(torch.ones(5, 3), torch.ones(9, 4), torch.ones(9), rows, cols)
    with pytest.raises(ValueError, match=">= 5"):
        sparse_decode(rows + 1, cols, torch.ones(10), torch.ones(9, 3), 5)


def test_kernel_choice():
    assert prefer_sparse(4096, 8192, 1024, "cpu", k=20)
    assert not prefer_sparse(4096, 64, 1024, "cpu", k=20)
    assert not prefer_sparse(8, 65536, 1024, "cpu", k=20)
    assert use_sparse_kernel("dense", 4096, 65536, 1024, "cpu") is False
    assert use_sparse_kernel("sparse", 8, 16, 4, "cpu") is True
    with pytest.raises(ValueError, match="sparse_kernel"):
        use_sparse_kernel("fast", 4096, 8192, 1024, "cpu")


def test_selection_preacts_matches_addmm_and_reuses_its_buffer():
    from vlmsae.sae.sparse import release_selection_buffers, selection_preacts

    g = torch.Generator().manual_seed(7)
    x, W, b = torch.randn(8, 5, generator=g), torch.randn(11, 5, generator=g, requires_grad=True), torch.randn(11)
    z1 = selection_preacts(x, W, b)
    torch.testing.assert_close(z1, torch.addmm(b, x, W.detach().T))
    assert not z1.requires_grad
    z2 = selection_preacts(x * 2, W, b)
    assert z2.data_ptr() == z1.data_ptr()  # same buffer: no fresh 128 MB allocation per step
    torch.testing.assert_close(z2, torch.addmm(b, 2 * x, W.detach().T))
    import vlmsae.sae.sparse as sparse_mod

    release_selection_buffers()
    assert not sparse_mod._PREACT_BUFFERS


@pytest.mark.parametrize("x_requires_grad", [False, True])
def test_bias_only_dx_shortcut_is_exact(x_requires_grad):
    """x_cent = x - b_dec: with x constant only the batch sum of dx_cent is needed (shortcut on);
    with x requiring grad the per-row gradient must be exact (shortcut off)."""
    rows, cols = _variable_indices()
    x, W_enc, b_enc, _ = _params()
    b_dec = torch.randn(D, dtype=torch.float64)
    g_out = torch.randn(rows.numel(), dtype=torch.float64)
    grads = {}
    for kind in ("dense", "sparse"):
        xl = x.clone().requires_grad_(x_requires_grad)
        W, b, bd = (t.clone().requires_grad_() for t in (W_enc, b_enc, b_dec))
        x_cent = xl - bd
        if kind == "dense":
            vals = (x_cent @ W.T + b)[rows, cols]
        else:
            vals = gather_preacts(x_cent, W, b, rows, cols)
            assert vals.grad_fn.dx_sum_only is (not x_requires_grad)
        (vals * g_out).sum().backward()
        grads[kind] = [t.grad for t in (W, b, bd)] + ([xl.grad] if x_requires_grad else [])
    for gs, gd in zip(grads["sparse"], grads["dense"]):
        torch.testing.assert_close(gs, gd)


def test_single_threaded_section_restores_the_thread_count():
    from vlmsae.sae.sparse import _single_threaded

    before = torch.get_num_threads()
    with pytest.raises(RuntimeError), _single_threaded(torch.device("cpu")):
        assert torch.get_num_threads() == 1
        raise RuntimeError("inside")
    assert torch.get_num_threads() == before


# ------------------------------------------------------------------------------ the sparse path inside the SAEs
# The sparse training path (vlmsae.sae.sparse kernels) gives the dense path's loss and gradients.
D_IN, N_LATENTS, K, BATCH = 24, 96, 4, 80


def _pair(arch: str, with_dead: bool):
    extra = {"group_fractions": (0.25, 0.25, 0.5)} if arch == "matryoshka" else {}
    saes = {}
    for kernel in ("dense", "sparse"):
        cfg = SAEConfig(
            arch=arch,
            d_in=D_IN,
            n_latents=N_LATENTS,
            k=K,
            sparse_kernel=kernel,
            dead_after_samples=1000,
            threshold_start_step=0,
            **extra,
        )
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

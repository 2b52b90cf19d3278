"""vlmsae.sae.select: the fast_exact policy selects exactly what float32 selects (CPU, bf16 matmul)."""

from __future__ import annotations

import pytest
import torch

from vlmsae.sae import SAEConfig, build_sae, set_input_scale_, train_steps
from vlmsae.sae.sampled_dots import csr_sampled_dots
from vlmsae.sae.sampled_dots import sampled_dots as canonical_preacts
from vlmsae.sae.select import (
    above_threshold_exact,
    batch_topk_exact,
    compute_preacts,
    masked_topk_exact,
    relative_bound,
    resolve_policy,
    topk_exact,
)


def _reference(x, W, b):
    """The canonical float32 value of every entry (what both exact policies select from)."""
    B, F = x.shape[0], W.shape[0]
    rows, cols = torch.arange(B).repeat_interleave(F), torch.arange(F).repeat(B)
    return canonical_preacts(x, W, b, rows, cols).view(B, F)


def _float64(x, W, b):
    return x.double() @ W.double().T + b.double()


def _ref_topk(z_BF, k):
    """Top-k per row by (value desc, column asc), as flat indices sorted."""
    order = torch.sort(z_BF, dim=1, descending=True, stable=True).indices[:, :k]
    rows = torch.arange(z_BF.shape[0])[:, None].expand_as(order)
    return torch.sort((rows * z_BF.shape[1] + order).reshape(-1)).values


def _ref_batch_topk(z_BF, k_total):
    return torch.sort(torch.sort(z_BF.reshape(-1), descending=True, stable=True).indices[:k_total]).values


def _flat(rows, cols, n_latents):
    return torch.sort(rows * n_latents + cols).values


def _cases():
    """(name, x, W, b): random and adversarial batches."""
    g = torch.Generator().manual_seed(0)
    out = []
    for seed in range(6):  # random
        B, F, D = 16 + 8 * seed, 64 + 32 * seed, 32 + 16 * seed
        x = torch.randn(B, D, generator=g) * (1 + seed)
        W = torch.randn(F, D, generator=g) / D**0.5
        out.append((f"random{seed}", x, W, 0.1 * torch.randn(F, generator=g)))
    # Near-ties: z is a ladder with steps of 1e-4 (clear in float32, far inside the bf16 bound), through an
    # orthogonal W so every value comes from a real dot product.
    D = F = 48
    Q = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=torch.float64)).Q
    target = 1.0 + 1e-4 * torch.stack([torch.randperm(F, generator=g) for _ in range(32)]).double()
    out.append(("near_ties", (target @ Q).float(), Q.float(), torch.zeros(F)))
    # Exact ties: duplicated encoder rows and biases, and rows of x that are zero (z = b with repeated b).
    W = torch.randn(40, 24, generator=g)
    W[20:] = W[:20]
    b = torch.randn(40, generator=g).repeat(2)[:40]
    b[20:] = b[:20]
    x = torch.randn(30, 24, generator=g)
    x[::3] = 0
    out.append(("exact_ties", x, W, b))
    out.append(("all_equal", torch.zeros(8, 16), torch.randn(32, 16, generator=g), torch.full((32,), 0.5)))
    # Huge and tiny norms (tiny: products underflow float32's normal range).
    out.append(
        ("huge", 1e15 * torch.randn(20, 32, generator=g), 1e10 * torch.randn(96, 32, generator=g), torch.zeros(96))
    )
    out.append(
        ("tiny", 1e-25 * torch.randn(20, 32, generator=g), 1e-15 * torch.randn(96, 32, generator=g), torch.zeros(96))
    )
    mixed = torch.randn(20, 32, generator=g) * torch.logspace(-20, 20, 20)[:, None]
    out.append(("mixed_scales", mixed, torch.randn(96, 32, generator=g), torch.randn(96, generator=g)))
    return out


CASES = _cases()
IDS = [name for name, *_ in CASES]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_error_bound_holds(case):
    _, x, W, b = case
    ref = _reference(x, W, b)
    for policy in ("fp32", "fast_exact"):
        pre = compute_preacts(x, W, b, policy)
        assert bool(((pre.z_BF - ref).abs() <= pre.err_B[:, None]).all()), policy
    # The canonical values are float32's: as accurate as a float32 dot product (products below float32's normal
    # range lose absolute accuracy, as in any float32 matmul).
    exact = _float64(x, W, b)
    scale = x.double().norm(dim=1)[:, None] * W.double().norm(dim=1)[None] + b.double().abs()[None]
    d_in = x.shape[1]
    gamma = (d_in + 1) * 2**-24 / (1 - (d_in + 1) * 2**-24)  # a float32 dot product's worst case
    assert bool(((ref.double() - exact).abs() <= (2 * 2**-24 + gamma) * scale + d_in * 2**-126).all())


def test_canonical_values_do_not_depend_on_the_batch_of_entries():
    _, x, W, b = CASES[0]
    rows, cols = torch.randint(0, x.shape[0], (20_000,)), torch.randint(0, W.shape[0], (20_000,))
    all_N = canonical_preacts(x, W, b, rows, cols)
    for start, stop in ((0, 1), (5, 9000), (17, 20_000)):
        assert torch.equal(canonical_preacts(x, W, b, rows[start:stop], cols[start:stop]), all_N[start:stop])
    # ... and on random inputs, the float32 top-k of the exact values is the one selected
    rows, cols, _ = topk_exact(compute_preacts(x, W, b, "fast_exact"), 5)
    assert torch.equal(_flat(rows, cols, W.shape[0]), _ref_topk(_float64(x, W, b), 5))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_topk_and_batch_topk_equal_float32(case):
    _, x, W, b = case
    ref = _reference(x, W, b)
    B, F = ref.shape
    pres = {policy: compute_preacts(x, W, b, policy) for policy in ("fp32", "fast_exact")}
    for k in sorted({1, 2, 5, F // 3, F - 1}):
        want = _ref_topk(ref, k)
        for policy, pre in pres.items():
            rows, cols, vals = topk_exact(pre, k)
            assert torch.equal(_flat(rows, cols, F), want), (policy, k)
            assert torch.equal(rows * F + cols, want)  # row-major, columns ascending
            assert torch.equal(vals, ref[rows, cols]), (policy, k)  # the values handed on are float32's
        for k_total in sorted({1, k * B, B * F - 1}):
            want = _ref_batch_topk(ref, k_total)
            for policy, pre in pres.items():
                rows, cols, vals = batch_topk_exact(pre, k_total)
                assert torch.equal(rows * F + cols, want), (policy, k_total)
                assert torch.equal(vals, ref[rows, cols])


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_threshold_and_masked_topk_equal_float32(case):
    _, x, W, b = case
    ref = _reference(x, W, b)
    B, F = ref.shape
    keep_F = torch.arange(F) % 3 != 0
    masked = ref.masked_fill(~keep_F, float("-inf"))
    for theta in (ref.reshape(-1).median(), ref.max(), torch.tensor(0.0)):  # thresholds equal to real values
        want = torch.nonzero(ref.reshape(-1) > theta).reshape(-1)
        for policy in ("fp32", "fast_exact"):
            rows, cols, vals = above_threshold_exact(compute_preacts(x, W, b, policy), theta)
            assert torch.equal(rows * F + cols, want), policy
            assert torch.equal(vals, ref[rows, cols])
    for policy in ("fp32", "fast_exact"):
        cols, vals = masked_topk_exact(compute_preacts(x, W, b, policy), keep_F, 3)
        rows = torch.arange(B).repeat_interleave(3)
        assert torch.equal(_flat(rows, cols, F), _ref_topk(masked, 3)), policy
        assert bool(keep_F[cols].all())


def test_plain_bf16_changes_the_adversarial_selections():
    _, x, W, b = CASES[IDS.index("near_ties")]
    ref = _reference(x, W, b)
    pre = compute_preacts(x, W, b, "bf16")
    rows, cols, _ = topk_exact(pre, 5)
    assert not torch.equal(_flat(rows, cols, ref.shape[1]), _ref_topk(ref, 5))
    rows, cols, _ = batch_topk_exact(pre, 5 * ref.shape[0])
    assert not torch.equal(rows * ref.shape[1] + cols, _ref_batch_topk(ref, 5 * ref.shape[0]))


def test_policy_resolution_and_bound():
    assert resolve_policy("auto", "cpu") == "fp32" and resolve_policy("auto", "cuda") == "fast_exact"
    assert resolve_policy("bf16", "cpu") == "bf16"
    with pytest.raises(ValueError, match="precision policy must be"):
        resolve_policy("fp16", "cpu")
    assert 2**-7 < relative_bound(1024, "bf16") < 2**-5 and relative_bound(1024, "fp32") < 2**-11
    with pytest.raises(ValueError, match="only applies to the top-k archs"):
        SAEConfig(arch="relu", precision="fast_exact")
    with pytest.raises(ValueError, match="SAEConfig.precision must be one of"):
        SAEConfig(arch="topk", precision="half")


def _trained(arch, kernel, precision, steps=6):
    extra = {"group_fractions": (0.25, 0.25, 0.5)} if arch == "matryoshka" else {}
    cfg = SAEConfig(
        arch=arch,
        d_in=24,
        n_latents=96,
        k=4,
        sparse_kernel=kernel,
        precision=precision,
        dead_after_samples=64,
        threshold_start_step=2,
        threshold_beta=0.5,
        **extra,
    )
    sae = build_sae(cfg, seed=0)
    set_input_scale_(sae, 0.7)
    g = torch.Generator().manual_seed(2)
    batches = [3 * torch.randn(80, 24, generator=g) for _ in range(steps)]
    selections = []
    select = sae._select

    def recording_select(pre):
        rows, cols, vals = select(pre)
        selections.append(_flat(rows, cols, 96))
        return rows, cols, vals

    sae._select = recording_select
    train_steps(sae, batches, lr=1e-2, init=False)
    return sae, selections


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "matryoshka"])
@pytest.mark.parametrize("kernel", ["dense", "sparse"])
def test_fast_exact_training_equals_float32(arch, kernel):
    ref, ref_sel = _trained(arch, kernel, "fp32")
    fast, fast_sel = _trained(arch, kernel, "fast_exact")
    assert len(ref_sel) == len(fast_sel) == 6
    for step, (a, b) in enumerate(zip(ref_sel, fast_sel)):
        assert torch.equal(a, b), f"step {step}"
    assert bool(ref.dead_latents.any())  # AuxK ran on some dead latents
    for name, p in ref.named_parameters():
        torch.testing.assert_close(dict(fast.named_parameters())[name], p, rtol=0, atol=1e-6, msg=name)
    torch.testing.assert_close(fast.threshold, ref.threshold, rtol=0, atol=1e-6)
    x = 3 * torch.randn(50, 24, generator=torch.Generator().manual_seed(9))
    for sae in (ref, fast):
        sae.eval()
    torch.testing.assert_close(fast.encode(x), ref.encode(x), rtol=0, atol=1e-6)
    assert torch.equal(fast.encode(x) > 0, ref.encode(x) > 0)


_TRITON_CHECK = """
import torch
from vlmsae.sae.sampled_dots import sampled_dots
g = torch.Generator().manual_seed(0)
x, W, b = torch.randn(40, 200, generator=g), torch.randn(300, 200, generator=g), torch.randn(300, generator=g)
rows, cols = torch.randint(0, 40, (1000,), generator=g), torch.randint(0, 300, (1000,), generator=g)
kernel = sampled_dots(x, W, b, rows, cols, use_triton=True)
fallback = sampled_dots(x, W, b, rows, cols, use_triton=False)
exact = (x.double()[rows] * W.double()[cols]).sum(1) + b.double()[cols]
scale = x.norm(dim=1).double()[rows] * W.norm(dim=1).double()[cols] + b.abs().double()[cols]
assert bool(((kernel.double() - exact).abs() <= 4 * 2**-24 * scale).all())
assert bool(((kernel - fallback).abs() <= 2**-23 * fallback.abs()).all())  # at most an ulp apart
assert torch.equal(sampled_dots(x, W, b, rows[17:500], cols[17:500], use_triton=True), kernel[17:500])
cpu = sampled_dots(x, W, b, rows, cols)  # the CPU kernel (sampled_addmm): float32 accumulation
assert bool(((cpu.double() - exact).abs() <= 2 * 201 * 2**-24 * scale).all())
print("ok")
"""


def test_triton_kernel_agrees_with_the_torch_path():
    """The CUDA kernel of the canonical values, run by Triton's interpreter on CPU."""
    import os
    import subprocess
    import sys

    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", _TRITON_CHECK], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


def test_cpu_sampled_dots_use_the_sampled_addmm_kernel(monkeypatch):
    """On CPU (no Triton interpreter) the default path is the CSR sampled_addmm kernel, never the gathered one."""
    import vlmsae.sae.sampled_dots as sd

    def refuse(*args):
        raise AssertionError("the CPU default took the gathered path")

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(sd, "_torch_dots", refuse)
    calls = []
    monkeypatch.setattr(sd, "csr_sampled_dots", lambda *a: calls.append(1) or csr_sampled_dots(*a))
    gen = torch.Generator().manual_seed(0)
    x, W, b = torch.randn(6, 16, generator=gen), torch.randn(10, 16, generator=gen), torch.randn(10, generator=gen)
    rows, cols = torch.tensor([0, 5, 2, 2, 0]), torch.tensor([3, 1, 9, 9, 0])
    got = sd.sampled_dots(x, W, b, rows, cols)
    assert calls == [1]
    torch.testing.assert_close(got, (x[rows] * W[cols]).sum(1) + b[cols])

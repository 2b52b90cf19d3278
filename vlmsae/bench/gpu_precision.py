"""CUDA check of the SAE precision policy (vlmsae.sae.precision); prints PASS/FAIL lines and step timings.

Run from the repository root on a GPU machine (about 30 s on one H100/H200):

    python -m vlmsae.bench.gpu_precision            # CUDA
    python -m vlmsae.bench.gpu_precision --smoke    # tiny shapes on CPU (tests the script)

Checks, on the same batches (BatchTopK, d = 1024, F = 16,384, k = 20, B = 4,096, threshold from step 5):
  1. dense and sparse kernel under ``sae.precision=fp32``, and the sparse kernel under ``fast_exact``, all
     under bf16 autocast and with TF32 allowed globally (what Lightning's bf16-mixed and its tensor-core hint
     would set): the same latents are selected as by the plain float32 dense run (exactly at step 0, where
     all weights are equal; later steps may differ in a few near-tie entries, as float32 gradients differ
     between kernels and CUDA atomics are unordered: the weights drift apart, not the selection rule);
  2. the BatchTopK threshold agrees (relative difference < 1e-3);
  3. for scale: how many entries a bf16 encoder (the old behaviour) would have selected differently.
Then the training-step throughput of the dense and sparse paths in float32, of the sparse path under
fast_exact, and of the dense path with the whole SAE cast to bf16 (the speed the policy gives up), at
F = 4,096 / 16,384 / 65,536; the sparse/dense ratio tells where ``prefer_sparse``'s GPU crossover
(``_GPU_MIN_LATENTS_PER_K``) belongs.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import torch

from vlmsae.bench.timing import interleaved_seconds
from vlmsae.sae import SAEConfig, build_sae, sae_step, set_input_scale_
from vlmsae.sae.sparse import batch_topk_select

results: list[bool] = []


def report(ok: bool, what: str) -> None:
    results.append(ok)
    print(f"{'PASS' if ok else 'FAIL'} {what}", flush=True)


def make_sae(arch: str, d: int, f: int, k: int, kernel: str, device: str, precision: str = "fp32"):
    cfg = SAEConfig(
        arch=arch,
        precision=precision,
        d_in=d,
        n_latents=f,
        k=k,
        sparse_kernel=kernel,
        threshold_start_step=5,
        threshold_beta=0.9,
        dead_after_samples=10**9,
    )
    sae = build_sae(cfg, seed=0).to(device)
    set_input_scale_(sae, 1.0)
    return sae.train()


def run_recorded(kernel: str, amp: bool, batches, shape, device: str, precision: str = "fp32"):
    """Train on ``batches``; returns the sorted flat selection and the threshold after each step."""
    d, f, k = shape
    sae = make_sae("batchtopk", d, f, k, kernel, device, precision)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-3, fused=device == "cuda")
    selections, thresholds = [], []
    select = sae._select

    def recording_select(pre):
        rows_Z, cols_Z, vals_Z = select(pre)
        selections.append(torch.sort(rows_Z * f + cols_Z).values.cpu())
        return rows_Z, cols_Z, vals_Z

    sae._select = recording_select
    previous = torch.get_float32_matmul_precision()
    if amp:
        torch.set_float32_matmul_precision("high")  # TF32 allowed outside the SAE
    try:
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=amp):
            for x_BD in batches:
                sae_step(sae, x_BD, opt)  # backward in the policy's float32 region, as every trainer
                thresholds.append(float(sae.threshold))
    finally:
        torch.set_float32_matmul_precision(previous)
    return sae, selections, thresholds


def check_selection(device: str, shape, batch: int, n_steps: int) -> None:
    d, f, k = shape
    g = torch.Generator(device=device).manual_seed(1)
    batches = [(torch.randn(batch, d, generator=g, device=device) * 2).to(torch.bfloat16) for _ in range(n_steps)]
    _ref_sae, ref_sel, ref_thr = run_recorded("dense", False, batches, shape, device)
    for kernel, precision in (("dense", "fp32"), ("sparse", "fp32"), ("sparse", "fast_exact")):
        t0 = time.perf_counter()
        _, sel, thr = run_recorded(kernel, True, batches, shape, device, precision)
        seconds = time.perf_counter() - t0
        tag = f"{kernel} path, precision={precision}, under bf16 autocast + TF32 vs plain float32 dense"
        report(torch.equal(sel[0], ref_sel[0]), f"{tag}: step-0 selection identical ({sel[0].numel()} entries)")
        differing = [1.0 - torch.isin(a, b).float().mean().item() for a, b in zip(sel, ref_sel)]
        report(
            max(differing) < 1e-3,
            f"{tag}: selections agree at every step (max fraction of differing entries "
            f"{max(differing):.2e} over {n_steps} steps; {seconds:.1f} s)",
        )
        rel = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(thr, ref_thr) if b >= 0)
        report(
            ref_thr[-1] > 0 and rel < 1e-3,
            f"{tag}: threshold {thr[-1]:.6g} vs {ref_thr[-1]:.6g} (max relative difference {rel:.2e})",
        )
    # The old behaviour, for scale: the step-0 encoder in bf16 under autocast selects other latents.
    sae = make_sae("batchtopk", d, f, k, "dense", device)
    x_BD = batches[0].float()
    with torch.no_grad():
        z32 = torch.addmm(sae.b_enc, x_BD - sae.b_dec, sae.W_enc.T)
        with torch.autocast(device_type=device, dtype=torch.bfloat16):
            z16 = torch.addmm(sae.b_enc, x_BD - sae.b_dec, sae.W_enc.T)
    flat = [torch.sort(r * f + c).values for r, c in (batch_topk_select(z, k * batch) for z in (z32, z16))]
    frac = 1.0 - torch.isin(flat[1], flat[0]).float().mean().item()
    print(f"INFO a bf16 encoder (old behaviour) would select {frac:.2%} of the step-0 entries differently", flush=True)


def time_steps(
    kernel: str,
    f: int,
    d: int,
    k: int,
    batch: int,
    device: str,
    bf16_weights: bool = False,
    precision: str = "fp32",
) -> float:
    sae = make_sae("topk", d, f, k, kernel, device, precision)
    if bf16_weights:
        sae = sae.to(torch.bfloat16)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4, fused=device == "cuda")
    x_BD = torch.randn(batch, d, device=device).to(sae.W_enc.dtype)
    step = {"step": functools.partial(sae_step, sae, x_BD, opt)}
    seconds = statistics.mean(interleaved_seconds(step, 10, warmup=3, device=device)["step"])
    del sae, opt, x_BD, step
    if device == "cuda":
        torch.cuda.empty_cache()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU, to test the script itself")
    args = parser.parse_args()
    if args.smoke:
        device, shape, batch, n_steps, sizes = "cpu", (32, 256, 4), 128, 8, (256, 1024)
    else:
        if not torch.cuda.is_available():
            raise SystemExit("FAIL no CUDA device (use --smoke to test the script on CPU)")
        device, shape, batch, n_steps, sizes = "cuda", (1024, 16384, 20), 4096, 12, (4096, 16384, 65536)
        print(f"INFO {torch.cuda.get_device_name()} torch {torch.__version__}", flush=True)
    t0 = time.perf_counter()
    check_selection(device, shape, batch, n_steps)
    d, _, k = shape
    for f in sizes:
        dense = time_steps("dense", f, d, k, batch, device)
        sparse = time_steps("sparse", f, d, k, batch, device)
        fast = time_steps("sparse", f, d, k, batch, device, precision="fast_exact")
        dense16 = time_steps("dense", f, d, k, batch, device, bf16_weights=True)
        print(
            f"TIME F={f:>6} d={d} k={k} B={batch}: dense fp32 {dense * 1e3:8.2f} ms/step "
            f"({batch / dense:,.0f} tok/s) | sparse fp32 {sparse * 1e3:8.2f} ms/step ({batch / sparse:,.0f} tok/s, "
            f"{dense / sparse:.2f}x dense) | sparse fast_exact {fast * 1e3:8.2f} ms/step ({sparse / fast:.2f}x "
            f"sparse fp32) | dense all-bf16 (not the policy) {dense16 * 1e3:8.2f} ms/step",
            flush=True,
        )
    print(
        f"{'PASS' if all(results) else 'FAIL'} overall ({sum(results)}/{len(results)} checks, "
        f"{time.perf_counter() - t0:.1f} s)",
        flush=True,
    )
    raise SystemExit(0 if all(results) else 1)


if __name__ == "__main__":
    main()

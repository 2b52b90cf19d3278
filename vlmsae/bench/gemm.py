"""The machine's fp32 GEMM rate: the ceiling every dense SAE step is measured against.

One SAE encoder forward at d = 1024, 8,192 latents, batch 4,096 is exactly this product
(4096 x 1024 @ 1024 x 8192 = 68.7 GFLOP), so ``gemm_gflops`` bounds the tokens/s any exact
TopK trainer can reach: it must compute every pre-activation once to select the top k.
"""

from __future__ import annotations

import statistics

import torch

from vlmsae.bench.timing import interleaved_seconds


def gemm_seconds(m: int, k: int, n: int, repeats: int, device: str = "cpu", dtype=torch.float32) -> float:
    """Median seconds of one (m x k) @ (k x n) product, after one warmup."""
    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(m, k, generator=g, dtype=dtype).to(device)
    b = torch.randn(k, n, generator=g, dtype=dtype).to(device)
    out = torch.empty(m, n, dtype=dtype, device=device)
    product = {"matmul": lambda: torch.matmul(a, b, out=out)}
    return statistics.median(interleaved_seconds(product, repeats, warmup=1, device=device)["matmul"])


def run(quick: bool = False) -> dict:
    """``gemm_gflops``: fp32 GFLOP/s of 4096x1024 @ 1024x8192 on CPU (smaller when ``quick``)."""
    m, k, n = (512, 256, 1024) if quick else (4096, 1024, 8192)
    seconds = gemm_seconds(m, k, n, repeats=3 if quick else 5)
    out = {"gemm_gflops": 2.0 * m * k * n / seconds / 1e9, "gemm_shape": f"{m}x{k}@{k}x{n}", "gemm_seconds": seconds}
    if torch.cuda.is_available():
        seconds = gemm_seconds(m, k, n, repeats=3 if quick else 20, device="cuda", dtype=torch.bfloat16)
        out["gemm_gpu_bf16_gflops"] = 2.0 * m * k * n / seconds / 1e9
    return out

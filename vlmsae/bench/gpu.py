"""GPU benchmarks (``make bench-gpu``): every key starts with ``gpu_``; without CUDA the module skips cleanly.

Measured on the first visible CUDA device, each case with its own peak memory (:func:`~vlmsae.bench.timing.peak_memory`;
the cases and one run's figures: docs/benchmarks.md): the SAE step under the precision policy training uses
(sparse path vs the dense reference, as in :mod:`vlmsae.bench.sae_step`); precision policies and peers
(:mod:`vlmsae.bench.gpu_peers`); extraction through a random-weight ViT-L/14-336 (the tap's forward alone per dtype,
then end to end with exact, draft and nvjpeg decoding: ``gpu_extract_{,fast_decode_cpu_,fast_decode_gpu_}*``); MS
at N = 50,000 x K = 65,536 on the GPU; many SAEs per pass (:func:`vlmsae.bench.train_many.run`, ``trainer=gpu``).

``python -m vlmsae.bench --only gpu --merge`` (what ``make bench-gpu`` runs) adds these keys to an
existing ``outputs/bench/results.json`` instead of replacing it.
"""

from __future__ import annotations

import functools
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from vlmsae.bench import gpu_peers, sae_step, train_many
from vlmsae.bench.decode import folder_plan, make_photo_jpegs
from vlmsae.bench.extract import random_vit
from vlmsae.bench.ms import random_sparse_codes
from vlmsae.bench.timing import interleaved_seconds, peak_memory, sync
from vlmsae.metrics.monosemanticity import monosemanticity_scores
from vlmsae.models import load_tap
from vlmsae.models.extraction import StoreExtraction
from vlmsae.sae.precision import fp32_region

QUICK_STEP_SIZES = (512, 2048)
QUICK_STEP_SHAPE = dict(d_in=64, k=8, batch_size=256)
VIT, VIT_QUICK = "ViT-L-14-336", "ViT-B-32"  # the LLaVA-1.5 tower's shape; quick: ViT-B/32 at 224 px


def sae_step_keys(device: torch.device, quick: bool) -> dict[str, Any]:
    """Sparse vs dense-reference step tokens/s and peak memory per F, under the SAE precision policy."""
    # the full shapes: the precision and peer cases' (the paper's d, k and batch; F = 16,384 and 65,536)
    shape_kw, sizes = (QUICK_STEP_SHAPE, QUICK_STEP_SIZES) if quick else (gpu_peers.SHAPE, gpu_peers.SIZES)
    rounds = 2 if quick else 10
    out: dict[str, Any] = {f"gpu_sae_step_{k}": v for k, v in shape_kw.items()}
    out["gpu_sae_step_precision"] = (
        "sae.precision=auto: fast_exact on CUDA (TF32 selecting matmul, exact float32 selection), float32 elsewhere; "
        "autocast off, matmul precision highest otherwise (vlmsae.sae.precision)"
    )
    for n_latents in sizes:
        shape = sae_step.StepShape(n_latents=n_latents, **shape_kw)
        for path in ("sparse", "reference"):  # one path at a time so each peak is its own
            with peak_memory(device) as peak, fp32_region(device):
                seconds = sae_step.measure_step_seconds(shape, device, None, warmup=2, rounds=rounds, paths=(path,))
            out[f"gpu_sae_step_{path}_tokens_per_s_{n_latents}"] = shape.batch_size / statistics.median(seconds[path])
            out[f"gpu_sae_step_{path}_peak_gib_{n_latents}"] = peak.gib
        out[f"gpu_sae_step_speedup_vs_reference_{n_latents}"] = (
            out[f"gpu_sae_step_sparse_tokens_per_s_{n_latents}"]
            / out[f"gpu_sae_step_reference_tokens_per_s_{n_latents}"]
        )
    return out


def extraction_keys(device: torch.device, quick: bool) -> dict[str, Any]:
    """Forward-only images/s at batch 256 per dtype, then the end-to-end extraction rate."""
    batch = 8 if quick else 256
    layer = 5 if quick else 22  # LLaVA-1.5 reads the second-to-last block (METHOD §1)
    out: dict[str, Any] = {"gpu_extract_batch_size": batch, "gpu_extract_layer": layer}
    for dtype in ("float16", "float32"):
        spec = random_vit(VIT_QUICK if quick else VIT, dtype, str(device))
        tap = load_tap(spec)
        x = torch.randn(batch, 3, spec.image_size, spec.image_size, device=tap.device, dtype=getattr(torch, dtype))
        with peak_memory(tap.device) as peak:
            forward = {"forward": functools.partial(tap.forward_to, x, layer)}
            seconds = interleaved_seconds(forward, 2 if quick else 8, warmup=2, device=tap.device)["forward"]
        out["gpu_extract_model"] = f"{spec.arch} random weights ({spec.n_layers} blocks, width {spec.width})"
        out[f"gpu_extract_forward_{dtype}_images_per_s"] = batch / statistics.median(seconds)
        out[f"gpu_extract_forward_{dtype}_peak_gib"] = peak.gib
        del tap, x, forward

    spec = random_vit(VIT_QUICK if quick else VIT, "float16", str(device))
    workers = 0 if quick else min(14, max(1, (os.cpu_count() or 1) - 2))
    n_images = 16 if quick else 1024
    out["gpu_extract_num_workers"] = workers
    out["gpu_extract_end_to_end_images"] = n_images
    with tempfile.TemporaryDirectory(prefix="vlmsae-bench-gpu-extract-") as tmp:
        root = make_photo_jpegs(Path(tmp) / "jpegs", n_images, seed=0)  # ~500 x 375 photo-like JPEGs
        # exact Pillow decoding; fast_decode with Pillow's draft mode; fast_decode with nvjpeg on the GPU
        for name, fast, gpu_decode in (
            ("", False, False),
            ("fast_decode_cpu_", True, False),
            ("fast_decode_gpu_", True, True),
        ):
            plan = folder_plan(
                root, layer=layer, tokens="random_k", k=16, rows_per_shard=1 << 20, rows_per_chunk=1 << 16,
                batch_size=batch, num_workers=workers, fast_decode=fast, gpu_decode=gpu_decode,
            )  # fmt: skip
            with peak_memory(device) as peak:
                extraction = StoreExtraction(spec, plan, Path(tmp) / f"acts_{name or 'exact'}")
                summary = extraction.run()
            out[f"gpu_extract_{name}images_per_s"] = summary["images_per_s"]
            out[f"gpu_extract_{name}decode"] = extraction.decode
            out[f"gpu_extract_{name}peak_gib"] = peak.gib
    return out


def ms_keys(device: torch.device, quick: bool) -> dict[str, Any]:
    """The MS study's scorer at 50k images x 65k latents, inputs on ``device``."""
    n_images, n_latents, k, dim = (5_000, 8_192, 20, 768) if quick else (50_000, 65_536, 20, 768)
    codes = random_sparse_codes(n_images, n_latents, k, seed=1).to(device)
    emb = torch.randn(n_images, dim, generator=torch.Generator().manual_seed(2)).to(device)
    warm = random_sparse_codes(256, 512, k, seed=3).to(device)  # first CUDA calls load kernels: not the scorer's cost
    monosemanticity_scores(warm, emb[:256])
    with peak_memory(device) as peak:
        start = time.perf_counter()
        ms = monosemanticity_scores(codes, emb)
        sync(device)
        seconds = time.perf_counter() - start
    return {
        "gpu_ms_shape": f"N={n_images} K={n_latents} k={k} d={dim}",
        "gpu_ms_seconds": seconds,
        "gpu_ms_peak_gib": peak.gib,
        "gpu_ms_scored": int((~torch.isnan(ms)).sum()),
    }


def run(quick: bool = False, device: str | None = None) -> dict[str, Any]:
    """Every GPU case on ``device`` (default: cuda, or a skip note without CUDA)."""
    if device is None:
        if not torch.cuda.is_available():
            return {"gpu_skipped": "no CUDA device visible (torch.cuda.is_available() is False): nothing measured"}
        device = "cuda"
    dev = torch.device(device)
    out: dict[str, Any] = {"gpu_device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else str(dev)}
    out.update(sae_step_keys(dev, quick))
    out.update(gpu_peers.measure(dev, quick))  # per precision policy, sparsify and SAELens side by side
    out.update(extraction_keys(dev, quick))
    out.update(ms_keys(dev, quick))
    out.update(train_many.run(quick, trainer="gpu" if dev.type == "cuda" else "cpu", prefix="gpu_train_many"))
    return out

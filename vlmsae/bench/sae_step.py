"""SAE training-step throughput (tokens/s): sparse path vs dense path vs the dense reference.

Four ways to take the same TopK SAE training step (loss, backward, decoder-gradient projection,
grad-norm clip 1.0, Adam, unit-norm decoder rows) on the same weights and batch:

``sparse``     vlmsae's TopKSAE with ``sparse_kernel="sparse"`` (vlmsae.sae.sparse): one no-grad
               encoder matmul to select, then gather_preacts + sparse_decode, O(B*k*D) after;
``dense``      the same TopKSAE with ``sparse_kernel="dense"``: dense autograd (the fallback);
``reference``  written out here as the paper's reference code does it: top-k scattered into a
               dense B x F code, a dense decoder matmul, plain autograd (6 B x F x D matmuls);
``sparse_batchtopk``  the paper's BatchTopK SAE on the sparse path (k*B kept over the batch);
``encoder``    (not a trainer) the selecting encoder matmul alone: the bound for any exact
               TopK step, since every pre-activation must be computed once to pick the top k.

Every path takes the trainers' step (:func:`vlmsae.sae.step.sae_step`) with its own loss; all share
one set of parameters and one fused Adam (so the ratio measures the compute path, not the optimiser)
and are timed interleaved, one step of each per round, so background load from other processes hits
them alike; the median over rounds after warmup is reported. ``learning_curve`` trains the sparse path
and the reference from the same seed on the same planted-feature data (vlmsae.data.synthetic) and
compares their FVE.
"""

from __future__ import annotations

import functools
import os
import statistics
from dataclasses import dataclass

import torch
from tqdm import tqdm

from vlmsae.bench.timing import interleaved_seconds
from vlmsae.data.synthetic import PlantedDictionary
from vlmsae.metrics import reconstruction
from vlmsae.sae import (
    SAE,
    SAEConfig,
    build_sae,
    default_lr,
    init_from_batches_,
    make_optimizer,
    sae_step,
)

PATHS = ("sparse", "dense", "reference", "sparse_batchtopk", "encoder")


@dataclass(frozen=True)
class StepShape:
    """One benchmark configuration; the paper's is d = 1024, k = 20, batch 4096."""

    d_in: int
    n_latents: int
    k: int
    batch_size: int


FULL_SIZES = (8192, 65536)
FULL = dict(d_in=1024, k=20, batch_size=4096)
QUICK_SIZES = (512, 2048)
QUICK = dict(d_in=64, k=8, batch_size=128)


# The (architecture, sparse_kernel) of each compute path's SAE; the first owns the shared parameters.
PATH_SAES = {
    "sparse": ("topk", "sparse"),
    "dense": ("topk", "dense"),
    "reference": ("topk", "dense"),
    "sparse_batchtopk": ("batchtopk", "sparse"),
}


def shared_saes(
    shape: StepShape, x_init_BD: torch.Tensor, seed: int, device: torch.device
) -> tuple[dict[str, SAE], torch.optim.Optimizer]:
    """TopK SAEs on each compute path (and a BatchTopK one) sharing one set of Parameters + Adam.

    Sharing means every path steps the same weights: no path gets an easier state, and memory
    stays at one model + one optimiser (2.5 GB at 65,536 latents instead of 10 GB).
    """
    saes: dict[str, SAE] = {}
    for path, (arch, kernel) in PATH_SAES.items():
        cfg = SAEConfig(arch=arch, d_in=shape.d_in, n_latents=shape.n_latents, k=shape.k, sparse_kernel=kernel)
        sae = saes[path] = build_sae(cfg, seed=seed, device=device).train()
        if path == "sparse":
            init_from_batches_(sae, [x_init_BD])
        else:
            for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
                setattr(sae, name, getattr(saes["sparse"], name))
            sae.input_scale.copy_(saes["sparse"].input_scale)
    opt, _ = make_optimizer(list(saes["sparse"].parameters()), default_lr(shape.n_latents))  # fused, as every trainer
    return saes, opt


def reference_loss(sae: SAE, x_BD: torch.Tensor, k: int) -> torch.Tensor:
    """The dense reference: every B x F tensor materialised and differentiated (scaled space, as
    the SAE's own loss, so the two train the same objective from the same state)."""
    x_s_BD = x_BD * sae.input_scale
    z_BF = (x_s_BD - sae.b_dec) @ sae.W_enc.T + sae.b_enc
    top = z_BF.topk(k, dim=1)
    codes_BF = torch.zeros_like(z_BF).scatter(1, top.indices, top.values.relu())
    x_hat_BD = codes_BF @ sae.W_dec + sae.b_dec
    return (x_hat_BD.float() - x_s_BD.float()).pow(2).sum(-1).mean()


def train_step(
    sae: SAE,
    opt: torch.optim.Optimizer,
    x_BD: torch.Tensor,
    reference: bool = False,
    amp_dtype: torch.dtype | None = None,
) -> float:
    """One full training step (:func:`vlmsae.sae.step.sae_step`); ``reference`` swaps in the dense reference loss."""

    def loss_fn(sae: SAE, x_BD: torch.Tensor) -> dict:
        with torch.autocast(device_type=x_BD.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            return {"loss": reference_loss(sae, x_BD, sae.cfg.k)} if reference else sae.loss(x_BD)

    return float(sae_step(sae, x_BD, opt, loss_fn=loss_fn)["loss"].detach())


def _encoder_only(sae: SAE, x_BD: torch.Tensor, amp_dtype: torch.dtype | None = None) -> None:
    with torch.no_grad(), torch.autocast(device_type=x_BD.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        torch.addmm(sae.b_enc, x_BD * sae.input_scale - sae.b_dec, sae.W_enc.T)


# ---------------------------------------------------------------------------------------------
# Throughput


def measure_step_seconds(
    shape: StepShape,
    device: str | torch.device = "cpu",
    amp_dtype: torch.dtype | None = None,
    warmup: int = 1,
    rounds: int = 5,
    paths: tuple[str, ...] = PATHS,
) -> dict[str, list[float]]:
    """Seconds per step of each path at ``shape``, one list entry per round (after ``warmup``
    rounds), measured interleaved on shared weights."""
    device = torch.device(device)
    x_BD = torch.randn(shape.batch_size, shape.d_in, generator=torch.Generator().manual_seed(1)).to(device)
    saes, opt = shared_saes(shape, x_BD, 0, device)

    def one(path: str) -> None:
        if path == "encoder":
            _encoder_only(saes["sparse"], x_BD, amp_dtype)
        else:
            train_step(saes[path], opt, x_BD, reference=path == "reference", amp_dtype=amp_dtype)

    desc = f"sae_step F={shape.n_latents} {device.type}{'' if amp_dtype is None else ' ' + str(amp_dtype)}"
    return interleaved_seconds({p: functools.partial(one, p) for p in paths}, rounds, warmup, device, desc)


def round_ratio(seconds: dict[str, list[float]], slow: str, fast: str) -> float:
    """Median over rounds of time(slow) / time(fast) within the same round.

    Robust to load from other processes that slows whole rounds (bursts of several seconds are
    common on a shared machine): a ratio of two medians can pair a quiet round of one path with a
    busy round of the other.
    """
    return statistics.median(a / b for a, b in zip(seconds[slow], seconds[fast]))


# ---------------------------------------------------------------------------------------------
# Learning curve: sparse vs reference on the same planted-feature data


def learning_curve(
    steps: int = 1000,
    d_in: int = 256,
    n_latents: int = 2048,
    k: int = 20,
    batch_size: int = 512,
    seed: int = 0,
    lr: float = 1e-3,
) -> dict[str, float]:
    """Train the sparse path and the reference ``steps`` steps each, from the same init on the same
    planted-feature batches; return their FVE on held-out data from the same distribution."""
    planted = PlantedDictionary.random(
        d_in=d_in, n_atoms=n_latents // 2, k=max(1, k // 2), noise_std=0.05, scale=3.0, offset_norm=2.0, seed=seed
    )
    x_eval_BD = planted.sample(4 * batch_size, seed=10_000_019).x
    x_first_BD = planted.sample(batch_size, seed=seed * 1_000_003).x
    cfg = SAEConfig(arch="topk", d_in=d_in, n_latents=n_latents, k=k, sparse_kernel="sparse")
    out: dict[str, float] = {}
    for path in ("sparse", "reference"):
        sae = build_sae(cfg, seed=seed, device="cpu").train()
        init_from_batches_(sae, [x_first_BD])
        opt, _ = make_optimizer(list(sae.parameters()), lr)  # a short run: a larger constant lr than the recipe's
        for x_BD in tqdm(
            planted.batches(batch_size, steps, seed=seed), total=steps, desc=f"learning curve ({path})", leave=False
        ):
            train_step(sae, opt, x_BD, reference=path == "reference")
        with torch.no_grad():
            out[path] = reconstruction.fve(x_eval_BD, sae.eval()(x_eval_BD))  # the inference encoder
    return out


# ---------------------------------------------------------------------------------------------
# The benchmark module's entry


def _throughput_keys(
    prefix: str, shape_kw: dict, sizes: tuple[int, ...], device: str, amp_dtype, warmup: int, rounds: dict[int, int]
) -> dict:
    """Flat keys: tokens/s (median step time) of every path, best-round tokens/s of the sparse and
    reference paths, and speedups as the median of per-round ratios, for each size; the headline
    keys (no size suffix) are those of the first size."""
    out: dict = {}
    for n_latents in sizes:
        shape = StepShape(n_latents=n_latents, **shape_kw)
        seconds = measure_step_seconds(shape, device, amp_dtype, warmup=warmup, rounds=rounds[n_latents])
        for path, ts in seconds.items():
            name = "encoder_bound" if path == "encoder" else path
            out[f"{prefix}_{name}_tokens_per_s_{n_latents}"] = shape.batch_size / statistics.median(ts)
        for path in ("sparse", "reference"):
            out[f"{prefix}_{path}_tokens_per_s_best_{n_latents}"] = shape.batch_size / min(seconds[path])
        out[f"{prefix}_speedup_vs_reference_{n_latents}"] = round_ratio(seconds, "reference", "sparse")
        out[f"{prefix}_speedup_vs_dense_{n_latents}"] = round_ratio(seconds, "dense", "sparse")
        out[f"{prefix}_fraction_of_encoder_bound_{n_latents}"] = round_ratio(seconds, "encoder", "sparse")
        out[f"{prefix}_batchtopk_speedup_vs_reference_{n_latents}"] = round_ratio(
            seconds, "reference", "sparse_batchtopk"
        )
        out[f"{prefix}_rounds_{n_latents}"] = rounds[n_latents]
    for name in ("sparse", "dense", "reference"):
        out[f"{prefix}_{name}_tokens_per_s"] = out[f"{prefix}_{name}_tokens_per_s_{sizes[0]}"]
    for name in ("speedup_vs_reference", "speedup_vs_dense"):
        out[f"{prefix}_{name}"] = out[f"{prefix}_{name}_{sizes[0]}"]
    return out


def run(quick: bool = False) -> dict:
    """SAE step throughput at d = 1024, F = 8,192 and 65,536, k = 20, batch 4,096, CPU fp32
    (headline keys at 8,192), plus a bf16-autocast GPU run when CUDA exists, and the FVE check."""
    shape_kw, sizes = (QUICK, QUICK_SIZES) if quick else (FULL, FULL_SIZES)
    rounds = {n: 2 for n in sizes} if quick else {8192: 9, 65536: 3}
    load_start = os.getloadavg()[0]
    out: dict = {f"sae_step_{key}": value for key, value in shape_kw.items()}  # d_in, k, batch_size
    out.update(sae_step_threads=torch.get_num_threads(), sae_step_arch="topk (+ batchtopk sparse)")
    out.update(_throughput_keys("sae_step", shape_kw, sizes, "cpu", None, warmup=1, rounds=rounds))
    out["sae_step_loadavg_1min"] = max(load_start, os.getloadavg()[0])

    curve_kw = dict(steps=100, d_in=32, n_latents=256, k=4, batch_size=128) if quick else dict(steps=1000)
    curve = learning_curve(**curve_kw)
    out["sae_fve_steps"] = curve_kw["steps"]
    out["sae_fve_sparse"], out["sae_fve_reference"] = curve["sparse"], curve["reference"]
    out["sae_fve_rel_diff"] = abs(curve["sparse"] - curve["reference"]) / abs(curve["reference"])
    out["sae_fve_within_1pct"] = out["sae_fve_rel_diff"] <= 0.01

    if torch.cuda.is_available():
        gpu_rounds = {n: 3 if quick else 20 for n in sizes}
        out.update(
            _throughput_keys("sae_step_gpu_bf16", shape_kw, sizes, "cuda", torch.bfloat16, warmup=3, rounds=gpu_rounds)
        )
        out["sae_step_gpu_name"] = torch.cuda.get_device_name()
    return out

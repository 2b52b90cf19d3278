"""The SAE training step per precision policy, side by side with sparsify and SAELens (``make bench-gpu``).

In one process and on the same shapes (d = 1,024, k = 20, batch 4,096, F = 16,384 and 65,536; TopK and
BatchTopK), :func:`measure` times vlmsae's step under ``sae.precision`` = fp32 and fast_exact (sparse kernels,
Adam), sparsify's training step (package ``eai-sparsify``, its own kernels) and SAELens' TopK training step
(both from the optional ``bench`` extra: ``pip install -e '.[bench]'``; a peer that does not import is recorded
as null with the reason). Per case: tokens/s and peak memory; per peer: the fraction of its selected (row,
latent) entries that differ from the float32 top-k of its own weights on the same inputs. Then, on planted data:
the selections of fp32 and fast_exact over the same steps from the same init (``gpu_fast_exact_differing_selections``,
must be 0) and the FVE after those steps per policy (fp32, fast_exact, bf16).

``--quick`` runs the same code at tiny sizes (on CPU: fast_exact's matmul is bf16 there), so a test covers it.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import warnings
from typing import Any

import torch

from vlmsae.bench.timing import interleaved_seconds, peak_memory
from vlmsae.data.synthetic import PlantedDictionary
from vlmsae.metrics import reconstruction
from vlmsae.sae import SAEConfig, build_sae
from vlmsae.sae.select import compute_preacts, fast_matmul_kind, topk_exact

SIZES = (16_384, 65_536)
SHAPE = dict(d_in=1024, k=20, batch_size=4096)
QUICK_SIZES = (256, 1024)
QUICK_SHAPE = dict(d_in=32, k=4, batch_size=128)
POLICIES = ("fp32", "fast_exact")
ARCHS = ("topk", "batchtopk")


def _timed(step, device: torch.device, warmup: int, rounds: int) -> tuple[float, float | None]:
    """(median seconds per step, peak GiB on CUDA or None)."""
    for _ in range(warmup):
        step()
    with peak_memory(device) as peak:
        seconds = interleaved_seconds({"step": step}, rounds, warmup=0, device=device)["step"]
    return sorted(seconds)[len(seconds) // 2], peak.gib


def _vlmsae(arch: str, n_latents: int, d_in: int, k: int, policy: str, device: torch.device, seed: int = 0):
    cfg = SAEConfig(arch=arch, d_in=d_in, n_latents=n_latents, k=k, sparse_kernel="sparse", precision=policy)
    sae = build_sae(cfg, seed=seed).to(device).train()
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4, fused=device.type == "cuda")
    return sae, opt


def _vlmsae_step(sae, opt, x_BD: torch.Tensor) -> torch.Tensor:
    out = sae.loss(x_BD)
    out["loss"].backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return out["recon"]


def _peer_sparsify(arch: str, n_latents: int, d_in: int, k: int, device: torch.device):
    """(step, selected [B, k] columns, (W_enc, b_enc, b_dec)) of sparsify's SparseCoder."""
    from sparsify import SaeConfig, SparseCoder

    sae = SparseCoder(d_in, SaeConfig(num_latents=n_latents, k=k), device=device)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4)

    def step(x_BD):
        out = sae(x_BD)
        out.fvu.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.latent_indices

    return step, (sae.encoder.weight, sae.encoder.bias, sae.b_dec)


def _peer_saelens(arch: str, n_latents: int, d_in: int, k: int, device: torch.device):
    from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.saes.sae import TrainStepInput

    cfg = TopKTrainingSAEConfig(d_in=d_in, d_sae=n_latents, k=k, device=str(device))
    sae = TopKTrainingSAE(cfg)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4)

    fields = {f.name for f in dataclasses.fields(TrainStepInput)}
    extra = {"n_training_steps": 0} if "n_training_steps" in fields else {}  # newer SAELens releases

    def step(x_BD):
        step_input = TrainStepInput(sae_in=x_BD, coefficients={}, dead_neuron_mask=None, **extra)
        out = sae.training_forward_pass(step_input)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.feature_acts.topk(k, dim=1).indices

    return step, (sae.W_enc.T, sae.b_enc, sae.b_dec)


PEERS = {"sparsify": _peer_sparsify, "saelens": _peer_saelens}
PEER_ARCHS = {"sparsify": ("topk",), "saelens": ("topk",)}


def _differing_fraction(cols_BK: torch.Tensor, x_BD: torch.Tensor, weights, k: int) -> float:
    """Fraction of a peer's selected entries that the float32 top-k of its own weights does not select."""
    W_FD, b_F, b_dec_D = (t.detach().float() for t in weights)
    with torch.no_grad():
        rows, cols, _ = topk_exact(compute_preacts(x_BD.float() - b_dec_D, W_FD, b_F, "fp32"), k)
        want = torch.zeros(x_BD.shape[0], W_FD.shape[0], dtype=torch.bool, device=x_BD.device)
        want[rows, cols] = True
        got = want.gather(1, cols_BK.long().reshape(x_BD.shape[0], -1))
    return float(1 - got.float().mean())


def step_keys(device: torch.device, quick: bool) -> dict[str, Any]:
    """Tokens/s and peak memory of every (engine, arch, F); the fast_exact speedup at the largest F."""
    shape, sizes = (QUICK_SHAPE, QUICK_SIZES) if quick else (SHAPE, SIZES)
    d_in, k, batch = shape["d_in"], shape["k"], shape["batch_size"]
    warmup, rounds = (1, 2) if quick else (3, 10)
    out: dict[str, Any] = {"gpu_peers_shape": dict(shape), "gpu_fast_matmul": fast_matmul_kind(device)}
    g = torch.Generator(device="cpu").manual_seed(0)
    x_BD = torch.randn(batch, d_in, generator=g).to(device)
    for n_latents in sizes:
        for arch in ARCHS:
            for policy in POLICIES:
                sae, opt = _vlmsae(arch, n_latents, d_in, k, policy, device)
                seconds, peak = _timed(functools.partial(_vlmsae_step, sae, opt, x_BD), device, warmup, rounds)
                out[f"gpu_sae_step_{policy}_{arch}_tokens_per_s_{n_latents}"] = batch / seconds
                out[f"gpu_sae_step_{policy}_{arch}_peak_gib_{n_latents}"] = peak
                del sae, opt
            for name, make in PEERS.items():
                key = f"gpu_peer_{name}_{arch}"
                if arch not in PEER_ARCHS[name]:
                    continue
                try:
                    step, weights = make(arch, n_latents, d_in, k, device)
                    seconds, peak = _timed(functools.partial(step, x_BD), device, warmup, rounds)
                    out[f"{key}_tokens_per_s_{n_latents}"] = batch / seconds
                    out[f"{key}_peak_gib_{n_latents}"] = peak
                    out[f"{key}_differing_fraction_{n_latents}"] = _differing_fraction(step(x_BD), x_BD, weights, k)
                except Exception as err:  # a missing or changed peer: recorded, never fatal
                    out[f"{key}_tokens_per_s_{n_latents}"] = None
                    out[f"{key}_reason"] = f"{type(err).__name__}: {err}"[:300]
    largest = sizes[-1]
    out["gpu_sae_step_fast_exact_65k_speedup"] = (
        out[f"gpu_sae_step_fast_exact_topk_tokens_per_s_{largest}"]
        / out[f"gpu_sae_step_fp32_topk_tokens_per_s_{largest}"]
    )
    return out


def agreement_keys(device: torch.device, quick: bool) -> dict[str, Any]:
    """On planted data: (1) a fast_exact training run in which every step's selection is also made by the fp32
    policy from the same weights and inputs; the differing (row, latent) entries summed over the steps
    (``gpu_fast_exact_differing_selections``, must be 0; bf16's count for scale); (2) the FVE after the same
    steps from the same init for each policy (fp32, fast_exact, bf16)."""
    shape = QUICK_SHAPE if quick else SHAPE
    n_latents = QUICK_SIZES[-1] if quick else SIZES[0]
    n_steps = 10 if quick else 100
    d_in, k, batch = shape["d_in"], shape["k"], shape["batch_size"]
    planted = PlantedDictionary.random(d_in=d_in, n_atoms=4 * d_in, k=k, scale=5.0, seed=0)
    x_val = planted.sample(batch, seed=2).x.float().to(device)
    out: dict[str, Any] = {}
    for arch in ARCHS:
        for policy in ("fp32", "fast_exact", "bf16"):
            sae, opt = _vlmsae(arch, n_latents, d_in, k, policy, device, seed=0)
            differing = {"fast_exact": 0, "bf16": 0}
            if policy == "fast_exact":
                select = sae._select

                def checked(pre, select=select, differing=differing):
                    rows, cols, vals = select(pre)
                    got = rows * n_latents + cols
                    for other, key in (("fp32", "fast_exact"), ("bf16", "bf16")):
                        o_rows, o_cols, _ = select(compute_preacts(pre.x_BD, pre.W_FD, pre.b_F, other))
                        want = o_rows * n_latents + o_cols
                        differing[key] += int(got.numel() + want.numel() - 2 * torch.isin(got, want).sum())
                    return rows, cols, vals

                sae._select = checked
            for x_BD in planted.batches(batch, n_steps, seed=1):  # the same batches for every policy
                _vlmsae_step(sae, opt, x_BD.float().to(device))
            if policy == "fast_exact":
                out[f"gpu_fast_exact_differing_selections_{arch}"] = differing["fast_exact"]
                out[f"gpu_bf16_differing_selections_{arch}"] = differing["bf16"]
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # BatchTopK's threshold starts later: per-sample top-k here
                sae.eval()
                out[f"gpu_fve_{policy}_{arch}_after_{n_steps}"] = reconstruction.fve(x_val, sae(x_val))
    out["gpu_fast_exact_differing_selections"] = sum(out[f"gpu_fast_exact_differing_selections_{a}"] for a in ARCHS)
    out["gpu_fast_exact_differing_steps"] = n_steps
    return out


def measure(device: torch.device, quick: bool) -> dict[str, Any]:
    return {**step_keys(device, quick), **agreement_keys(device, quick)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (CPU works: bf16 matmul there)")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu with --quick")
    args = parser.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu" and not args.quick:
        print(json.dumps({"gpu_skipped": "no CUDA device: run with --quick for the CPU smoke path"}))
        return 0
    print(json.dumps(measure(torch.device(device), args.quick), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Extraction benchmark: stopping the forward after block L vs the full forward (METHOD §1).

On a random ViT-B/32-sized open_clip model (12 blocks, width 768, built without weights), the tap's
``forward_to(x, L)`` should cost about ``(L+1)/n_layers`` of the full image forward (all blocks +
ln_post + projection): the patch embedding and the tail are small next to the blocks. Forwards
are timed interleaved (one of each per round) so background load hits all alike, and the best
(minimum) time of each is used: load from other processes only ever adds time.
``extract_images_per_s`` is the end-to-end ``vlmsae.extract.run`` rate (decode, preprocess, forward, token
selection, shard writing) at the middle layer on generated 224 px images. The ``decode_*``,
``extract_vs_decode_limit`` and ``fast_decode_*`` rows come from :mod:`vlmsae.bench.decode`.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch

from vlmsae.bench.decode import folder_plan
from vlmsae.bench.decode import run as run_decode
from vlmsae.bench.timing import interleaved_seconds
from vlmsae.data.concepts import make_concept_images
from vlmsae.models import ModelSpec, load_tap
from vlmsae.models.extraction import StoreExtraction

# (image size, blocks, width, embedding dim) of the open_clip ViTs the benchmarks build without weights
RANDOM_VITS = {"ViT-B-32": (224, 12, 768, 512), "ViT-L-14-336": (336, 24, 1024, 768)}


def random_vit(arch: str, dtype: str = "float32", device: str = "auto") -> ModelSpec:
    """An open_clip ``arch`` of :data:`RANDOM_VITS` with random weights (nothing downloaded)."""
    size, n_layers, width, embed = RANDOM_VITS[arch]
    return ModelSpec(
        name=f"{arch}_random",
        backend="open_clip",
        arch=arch,
        pretrained=None,
        image_size=size,
        n_layers=n_layers,
        width=width,
        embed_dim=embed,
        dtype=dtype,
        device=device,
    )


def run(quick: bool = False) -> dict[str, Any]:
    """Ratios ``extract_layer{L}_over_full_ratio`` next to ``extract_expected_ratio_layer{L}`` + images/s."""
    spec = random_vit("ViT-B-32")
    tap = load_tap(spec)
    batch = 4 if quick else 16
    rounds = 3 if quick else 7
    x = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(0)).to(tap.device)
    layers = [2, 5, 8] if not quick else [5]

    def full() -> None:
        with torch.no_grad():  # as forward_to
            tap.visual(x)

    fns = {"full": full}
    for layer in layers:
        fns[f"layer{layer}"] = lambda layer=layer: tap.forward_to(x, layer)
    best = {name: min(ts) for name, ts in interleaved_seconds(fns, rounds, device=tap.device).items()}
    out: dict[str, Any] = {
        "extract_model": f"{spec.arch} random ({tap.n_layers} blocks, width {tap.width})",
        "extract_device": str(tap.device),
        "extract_batch_size": batch,
        "extract_full_forward_images_per_s": batch / best["full"],
    }
    for layer in layers:
        out[f"extract_layer{layer}_over_full_ratio"] = best[f"layer{layer}"] / best["full"]
        out[f"extract_expected_ratio_layer{layer}"] = (layer + 1) / tap.n_layers
        out[f"extract_layer{layer}_forward_images_per_s"] = batch / best[f"layer{layer}"]
    mid = layers[len(layers) // 2]
    out["extract_expected_ratio"] = out[f"extract_expected_ratio_layer{mid}"]
    out["extract_layer_ratio"] = out[f"extract_layer{mid}_over_full_ratio"]

    # End to end through the extract job's library call on generated images (decode + preprocess + forward +
    # write), as vlmsae.extract.run makes it.
    with tempfile.TemporaryDirectory(prefix="vlmsae-bench-extract-") as tmp:
        n_per_class = 2 if quick else 8
        root = make_concept_images(Path(tmp) / "images", n_per_class=n_per_class, size=224, seed=0)
        plan = folder_plan(root, layer=mid, k=2, batch_size=batch)
        summary = StoreExtraction(spec, plan, Path(tmp) / "acts").run()
    out["extract_images_per_s"] = summary["images_per_s"]
    out["extract_end_to_end_images"] = summary["n_images"]
    # Issue 18: extraction vs the decode + preprocess limit on real-sized JPEGs, and data.fast_decode.
    out.update(run_decode(tap, quick=quick))
    return out

"""Extraction against the image-decode limit, and ``data.fast_decode`` (issue 18), for ``vlmsae.bench.extract``.

Every row is measured on two sets in the same run: generated photo-like JPEGs (smooth gradients + noise,
~500 x 375, quality 90: real JPEG sizes; keys as named below) and real photographs (issue 23 §9: the same keys
ending in ``_photos``; :mod:`vlmsae.bench.photos` says which set, in ``photos_origin``, or why none, in
``photos_error``). Real photographs hold edges at every scale, which the generated images lack.

- ``extract_vs_decode_limit``: images/s of the real extraction (:class:`StoreExtraction`, tiny model, a
  store written) / images/s of a plain DataLoader doing only PIL open + the model's preprocess of the same
  files with the same workers and batch size (the most any extraction on these cores can reach). The
  extraction reads block 0 of the tiny model, so the model's own compute stays small next to decoding (on a
  GPU machine it leaves the CPU altogether); ``extract_vs_decode_limit_last_layer`` reads its last block:
  there the forward (about 0.4 ms of one core per image, some 11% of the decode's CPU time) competes with
  the decode workers for the same two cores, and the ratio drops by about that share.
- ``fast_decode_speedup``: extraction images/s with ``fast_decode`` / without; ``fast_decode_speedup_224``
  the same for the plain decode + ViT-B/32 (224 px) preprocessing (draft mode gains less at 224 px).
  ``fast_decode_vs_decode_limit``: extraction with ``fast_decode`` / its own limit, a DataLoader doing only
  ``load_image(draft_size=...)`` + the preprocess.
- ``fast_decode_act_cosine_<model>`` / ``fast_decode_act_rel_err_<model>``: the tapped layer's CLS rows
  from fast vs exact decoding of the same images (mean cosine; ||fast - exact|| / ||exact||, mean).

Paths are timed interleaved (one of each per round) and the best round of each is kept: load from
other processes only ever adds time.
"""

from __future__ import annotations

import functools
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from vlmsae.bench.photos import PhotosUnavailable, photo_set
from vlmsae.data.images import load_image
from vlmsae.models import get_model_spec, load_tap
from vlmsae.models.extraction import ExtractionPlan, StoreExtraction


def make_photo_jpegs(dpath: Path, n: int, seed: int = 0) -> Path:
    """``n`` JPEGs of 400..640 x 300..480 px (median ~500 x 375), gradients + noise, quality 90."""
    import numpy as np
    from PIL import Image

    dpath.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        w, h = int(rng.integers(400, 641)), int(rng.integers(300, 481))
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        gains = rng.uniform(60, 255, size=3)
        pixels = np.stack([xx / w * gains[0], yy / h * gains[1], (xx + yy) / (w + h) * gains[2]], axis=-1)
        pixels += rng.normal(0, 12, size=(h, w, 3))  # sensor-like noise: realistic JPEG sizes (~70 kB)
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(dpath / f"{i:05d}.jpg", quality=90)
    return dpath


def _decode_only(fpaths: list[str], preprocess: Any, draft_size: int | None) -> torch.Tensor:
    """PIL open + the model's preprocess of a batch of files, nothing else: the decode limit's work."""
    from PIL import Image

    if draft_size is not None:  # fast_decode's own decode (draft + exact-area resample): its limit
        return torch.stack([preprocess(load_image(f, draft_size=draft_size)) for f in fpaths])
    images = []
    for fpath in fpaths:
        with Image.open(fpath) as img:
            images.append(preprocess(img.convert("RGB")))
    return torch.stack(images)


def decode_images_per_s(files: list[str], preprocess: Any, workers: int, batch: int, draft: int | None = None) -> float:
    decode = functools.partial(_decode_only, preprocess=preprocess, draft_size=draft)  # runs in the workers
    loader = torch.utils.data.DataLoader(files, batch_size=batch, num_workers=workers, collate_fn=decode)
    t0, n = time.perf_counter(), 0
    for x in loader:
        n += len(x)
    return n / (time.perf_counter() - t0)


def folder_plan(root: str | Path, **overrides: Any) -> ExtractionPlan:
    """An extraction plan over an image folder with the benchmarks' defaults (CLS of the last block, float16,
    seeded order, no progress bar); ``overrides`` replace any :class:`ExtractionPlan` field."""
    fields: dict[str, Any] = dict(
        source="folder", root=str(root), layer=-1, tokens="cls", k=1, seed=0, dtype="float16", rows_per_shard=65536,
        rows_per_chunk=4096, order_seed=0, max_images=None, batch_size=32, num_workers=0, exif_transpose=True,
        progress=False,
    )  # fmt: skip
    return ExtractionPlan(**{**fields, **overrides})


def extract_images_per_s(
    spec: Any, root: Path, workers: int, batch: int, fast_decode: bool = False, layer: int = 0
) -> float:
    plan = folder_plan(root, layer=layer, batch_size=batch, num_workers=workers, fast_decode=fast_decode)
    with tempfile.TemporaryDirectory(prefix="vlmsae-bench-decode-") as tmp:
        return StoreExtraction(spec, plan, Path(tmp) / "acts").run()["images_per_s"]


def activation_difference(tap: Any, files: list[str], layer: int) -> tuple[float, float]:
    """Mean cosine and mean relative error of the CLS rows at ``layer``: fast vs exact decoding."""

    def rows(draft: int | None) -> torch.Tensor:
        x = torch.stack([tap.preprocess(load_image(f, draft_size=draft)) for f in files]).to(tap.device)
        return tap.forward_to(x, layer)[:, 0].float().cpu()

    exact, fast = rows(None), rows(tap.image_size)
    cosine = torch.nn.functional.cosine_similarity(exact, fast, dim=-1).mean().item()
    rel_err = ((fast - exact).norm(dim=-1) / exact.norm(dim=-1).clamp_min(1e-12)).mean().item()
    return cosine, rel_err


def _best_rounds(fns: dict[str, Any], rounds: int) -> dict[str, float]:
    best = {name: 0.0 for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            best[name] = max(best[name], fn())
    return best


def _linked_folder(files: list[str], dpath: Path) -> Path:
    """A folder of links to ``files`` (the images both the decode limit and the extraction read)."""
    dpath.mkdir(parents=True)
    for i, fpath in enumerate(files):
        (dpath / f"{i:05d}{Path(fpath).suffix.lower()}").symlink_to(Path(fpath).resolve())
    return dpath


def _measure(files: list[str], root: Path, tiny: Any, vit_tap: Any, workers: int, batch: int, rounds: int) -> dict:
    """Every rate and accuracy row of one image set (keys without the set's suffix)."""
    spec = get_model_spec("tiny")
    best = _best_rounds(
        {
            "decode_limit": lambda: decode_images_per_s(files, tiny.preprocess, workers, batch),
            "extract": lambda: extract_images_per_s(spec, root, workers, batch),
            "extract_last": lambda: extract_images_per_s(spec, root, workers, batch, layer=-1),
            "decode_limit_fast": lambda: decode_images_per_s(files, tiny.preprocess, workers, batch, tiny.image_size),
            "extract_fast": lambda: extract_images_per_s(spec, root, workers, batch, fast_decode=True),
            "decode_224": lambda: decode_images_per_s(files, vit_tap.preprocess, workers, batch),
            "decode_224_fast": lambda: decode_images_per_s(files, vit_tap.preprocess, workers, batch, 224),
        },
        rounds,
    )
    n_act = 8 if len(files) < 200 else 64
    acts = {
        "tiny": activation_difference(tiny, files[:n_act], tiny.n_layers // 2),
        "vit_b32": activation_difference(vit_tap, files[:n_act], vit_tap.n_layers // 2),
    }
    out: dict[str, Any] = {
        "decode_jpegs": len(files),
        "decode_jpeg_mean_kb": sum(Path(f).stat().st_size for f in files) / len(files) / 1000,
        "decode_limit_images_per_s": best["decode_limit"],
        "extract_real_jpeg_images_per_s": best["extract"],
        "extract_vs_decode_limit": best["extract"] / best["decode_limit"],
        "extract_last_layer_images_per_s": best["extract_last"],
        "extract_vs_decode_limit_last_layer": best["extract_last"] / best["decode_limit"],
        "fast_decode_extract_images_per_s": best["extract_fast"],
        "fast_decode_speedup": best["extract_fast"] / best["extract"],
        "fast_decode_decode_limit_images_per_s": best["decode_limit_fast"],
        "fast_decode_vs_decode_limit": best["extract_fast"] / best["decode_limit_fast"],
        "decode_limit_224_images_per_s": best["decode_224"],
        "fast_decode_speedup_224": best["decode_224_fast"] / best["decode_224"],
    }
    for name, (cosine, rel_err) in acts.items():
        out[f"fast_decode_act_cosine_{name}"] = cosine
        out[f"fast_decode_act_rel_err_{name}"] = rel_err
    out["fast_decode_act_cosine"] = min(cos for cos, _ in acts.values())  # the worse model
    out["fast_decode_act_rel_err"] = max(err for _, err in acts.values())
    return out


def run(vit_tap: Any, quick: bool = False, photos_dpath: str | None = None) -> dict[str, Any]:
    """The issue-18 rows (module docstring) on generated JPEGs, and the same rows with the suffix ``_photos`` on
    real photographs (:mod:`vlmsae.bench.photos`; ``photos_origin`` says which set, ``photos_error`` why none).
    ``vit_tap``: the random ViT-B/32 the extract bench built."""
    n_images, rounds, batch = (96, 1, 32) if quick else (1000, 3, 64)
    workers = max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 2))
    tiny = load_tap(get_model_spec("tiny"))
    out: dict[str, Any] = {"decode_workers": workers, "decode_batch_size": batch}
    try:
        photos = photo_set(n_images, photos_dpath=photos_dpath)
        out["photos_origin"] = photos.origin
        print(f"[bench] decode: real photographs: {photos.origin}", flush=True)
    except PhotosUnavailable as err:
        photos = None
        out["photos_origin"], out["photos_error"] = None, str(err)
        print(f"[bench] decode: no real photographs ({err}); the *_photos keys are null", flush=True)
    with tempfile.TemporaryDirectory(prefix="vlmsae-bench-jpegs-") as tmp:
        root = make_photo_jpegs(Path(tmp) / "jpegs", n_images)
        out.update(_measure(sorted(str(p) for p in root.iterdir()), root, tiny, vit_tap, workers, batch, rounds))
        if photos is not None:
            files = list(photos.files)
            linked = _linked_folder(files, Path(tmp) / "photos")
            measured = _measure(files, linked, tiny, vit_tap, workers, batch, rounds)
            out.update({f"{key}_photos": value for key, value in measured.items()})
        else:
            out.update({f"{key}_photos": None for key in ("extract_vs_decode_limit", "fast_decode_act_rel_err")})
    return out

"""Planted-concept images: coloured shapes on noisy backgrounds, concept = shape x colour.

A known ground truth for tests and the demo (``data=tiny``): images of one class share exactly one
shape and one colour, and nothing else (position, size, rotation, background are random), so a
monosemantic latent should fire for one shape, one colour, or one combination. Written as an
ImageFolder tree ``<dpath>/<shape>_<colour>/<i>.png`` plus ``concepts.json``; deterministic from the
seed (the same call writes the same bytes), written to a temporary folder and renamed.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40)}


def _draw_one(shape: str, rgb: tuple[int, int, int], size: int, rng: np.random.Generator):
    from PIL import Image, ImageDraw

    base = rng.integers(60, 200)
    noise = rng.normal(0, 25, (size, size, 3)) + base + rng.normal(0, 20, 3)
    image = Image.fromarray(np.clip(noise, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    radius = size * rng.uniform(0.18, 0.32)
    cx, cy = rng.uniform(radius, size - radius, 2)
    jitter = rng.integers(-15, 16, 3)
    fill = tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(rgb, jitter))
    angle = rng.uniform(0, 2 * np.pi)
    if shape == "circle":
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=fill)
    elif shape in ("square", "triangle"):
        n = 4 if shape == "square" else 3
        pts = [
            (cx + radius * np.cos(angle + 2 * np.pi * i / n), cy + radius * np.sin(angle + 2 * np.pi * i / n))
            for i in range(n)
        ]
        draw.polygon(pts, fill=fill)
    elif shape == "cross":
        w = radius * 0.35
        for a in (angle, angle + np.pi / 2):
            dx, dy = np.cos(a), np.sin(a)
            px, py = -dy * w, dx * w
            pts = [
                (cx - dx * radius + px, cy - dy * radius + py),
                (cx + dx * radius + px, cy + dy * radius + py),
                (cx + dx * radius - px, cy + dy * radius - py),
                (cx - dx * radius - px, cy - dy * radius - py),
            ]
            draw.polygon(pts, fill=fill)
    else:
        raise ValueError(f"Unknown shape {shape!r}: use one of {list(SHAPES)}.")
    return image


def concept_classes(shapes: tuple[str, ...] = SHAPES, colours: tuple[str, ...] = tuple(COLOURS)) -> list[str]:
    """Class folder names ``<shape>_<colour>``, in the order ImageFolder sorts them."""
    return sorted(f"{s}_{c}" for s in shapes for c in colours)


def make_concept_images(
    dpath: str | Path,
    n_per_class: int = 8,
    size: int = 64,
    seed: int = 0,
    shapes: tuple[str, ...] = SHAPES,
    colours: tuple[str, ...] = tuple(COLOURS),
) -> Path:
    """Write ``n_per_class`` PNGs per shape x colour class under ``dpath`` (replaced atomically)."""
    unknown = [c for c in colours if c not in COLOURS]
    if unknown:
        raise ValueError(f"Unknown colour(s) {unknown}: use some of {list(COLOURS)}.")
    if n_per_class < 1 or size < 8:
        raise ValueError(f"n_per_class={n_per_class} must be >= 1 and size={size} >= 8.")
    dpath = Path(dpath)
    dpath.parent.mkdir(parents=True, exist_ok=True)
    tmp_dpath = dpath.parent / f".{dpath.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp_dpath, ignore_errors=True)
    classes = []
    for s_i, shape in enumerate(shapes):
        for c_i, colour in enumerate(colours):
            name = f"{shape}_{colour}"
            classes.append({"name": name, "shape": shape, "colour": colour})
            (tmp_dpath / name).mkdir(parents=True)
            for i in range(n_per_class):
                # one generator per image: any image can be regenerated alone, and order never matters
                rng = np.random.default_rng([seed, s_i, c_i, i])
                _draw_one(shape, COLOURS[colour], size, rng).save(tmp_dpath / name / f"{i:05d}.png")
    meta = {"seed": seed, "n_per_class": n_per_class, "size": size, "classes": sorted(classes, key=lambda c: c["name"])}
    (tmp_dpath / "concepts.json").write_text(json.dumps(meta, indent=1))
    if dpath.exists():
        shutil.rmtree(dpath)
    os.replace(tmp_dpath, dpath)
    return dpath


def ensure_concept_images(root: str | Path | None = None, n_per_class: int = 8, size: int = 64, seed: int = 0) -> Path:
    """The concept-image folder for these settings, generated on first use.

    ``root=None``: ``$VLMSAE_HOME/data/concepts-n{n}-s{size}-seed{seed}`` (default ``~/.cache/vlmsae``).
    """
    if root is None:
        home = Path(os.environ.get("VLMSAE_HOME", "~/.cache/vlmsae")).expanduser()
        root = home / "data" / f"concepts-n{n_per_class}-s{size}-seed{seed}"
    root = Path(root).expanduser()
    if (root / "concepts.json").exists():
        return root
    try:
        return make_concept_images(root, n_per_class=n_per_class, size=size, seed=seed)
    except OSError:
        if (root / "concepts.json").exists():  # a concurrent process finished first
            return root
        raise

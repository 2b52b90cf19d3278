"""Real handwritten digits, offline: scikit-learn's ``load_digits`` (1,797 8x8 greyscale digits, no download)
written once as one ImageFolder tree per split, ``$VLMSAE_HOME/data/digits-v1/{train,heldout}/<zero..nine>/``,
plus ``digits.json`` (docs/trained-network.md). The split is the folder, so held-out images cannot reach SAE
training by accident; it is a fixed permutation (:data:`SPLIT_SEED`), stratified by class. Pixels are dark ink
on white (``255 - 255 * v / 16``), upsampled to :data:`IMAGE_PX` so a browser shows them at a readable size.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from vlmsae.utils.io import publish_dir

DIGITS_VERSION = "digits-v1"  # bump when the pixels or the split change: a new folder, nothing stale is read
SPLITS = ("train", "heldout")
CLASS_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SPLIT_SEED = 0
HELDOUT_PER_CLASS = 36  # 10 x 36 = 360 held-out images (20%), the rest (1,437) train
IMAGE_PX = 32
META_FILE = "digits.json"


def load_digit_arrays() -> tuple[np.ndarray, np.ndarray]:
    """``(images_N88 in 0..16 float64, digit_N int)`` from scikit-learn (imported here: only this needs it)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return np.asarray(bunch.images), np.asarray(bunch.target, dtype=np.int64)


def split_indices(digit_N: np.ndarray, seed: int = SPLIT_SEED) -> dict[str, np.ndarray]:
    """``{"train": idx, "heldout": idx}``: per class, :data:`HELDOUT_PER_CLASS` images of a seeded permutation
    are held out; both index lists sorted."""
    rng = np.random.default_rng(seed)
    per_class = [rng.permutation(np.flatnonzero(digit_N == d))[:HELDOUT_PER_CLASS] for d in range(len(CLASS_NAMES))]
    held = np.sort(np.concatenate(per_class))
    train = np.setdiff1d(np.arange(len(digit_N)), held)
    return {"train": train, "heldout": held}


def digit_image(pixels_88: np.ndarray):
    """One 8x8 digit (0..16, ink high) as a :data:`IMAGE_PX`-pixel greyscale PIL image, dark ink on white."""
    from PIL import Image

    grey = np.clip(np.rint(255.0 - pixels_88 * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    return Image.fromarray(grey, mode="L").resize((IMAGE_PX, IMAGE_PX), Image.Resampling.BILINEAR)


def _complete(root: Path) -> bool:
    try:
        meta = json.loads((root / META_FILE).read_text())
    except (OSError, ValueError):
        return False
    if meta.get("version") != DIGITS_VERSION:
        return False
    counts = meta.get("counts", {})
    return all(sum(1 for _ in (root / s).rglob("*.png")) == counts.get(s, -1) for s in SPLITS)


def ensure_digits(root: str | Path | None = None) -> Path:
    """The digits folder (both splits; default ``$VLMSAE_HOME/data/<DIGITS_VERSION>``, ``$VLMSAE_HOME`` default
    ``~/.cache/vlmsae``), written on first use and rewritten when incomplete; returns its root."""
    if root is None:
        root = Path(os.environ.get("VLMSAE_HOME", "~/.cache/vlmsae")) / "data" / DIGITS_VERSION
    root = Path(root).expanduser()
    if _complete(root):
        return root
    images, digits = load_digit_arrays()
    split = split_indices(digits)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".{root.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    for name, idx in split.items():
        for i in idx.tolist():
            dpath = tmp / name / CLASS_NAMES[digits[i]]
            dpath.mkdir(parents=True, exist_ok=True)
            digit_image(images[i]).save(dpath / f"{i:04d}.png")
    meta = {
        "version": DIGITS_VERSION,
        "source": "sklearn.datasets.load_digits (UCI optical recognition of handwritten digits, test part)",
        "split_seed": SPLIT_SEED,
        "heldout_per_class": HELDOUT_PER_CLASS,
        "image_px": IMAGE_PX,
        "classes": list(CLASS_NAMES),
        "counts": {name: len(idx) for name, idx in split.items()},
        "heldout_indices": split["heldout"].tolist(),
    }
    (tmp / META_FILE).write_text(json.dumps(meta, indent=1))
    if root.exists() and not _complete(root):  # a broken earlier copy: replaced, never mixed in
        shutil.rmtree(root, ignore_errors=True)
    if _complete(root):  # a concurrent process finished first
        shutil.rmtree(tmp, ignore_errors=True)
        return root
    return publish_dir(tmp, root)

"""Two small networks trained offline on the real digits (:mod:`vlmsae.data.digits`): a ViT and a CNN.

``model=digits_vit`` is an open_clip ``CLIP`` whose vision tower is a 10-way digit classifier, saved as a
``local-dir`` folder so that the real taps and extraction load it; ``embedder=digits_cnn`` is a separate CNN
whose penultimate features are the MS embedder E. How they are trained, cached and trusted
(``trained.json``: :data:`TRAINED_VERSION`, seed, weights sha256, held-out accuracy) is in
docs/trained-network.md; an untrusted cache is named in a warning, deleted and trained again, never loaded.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vlmsae.data.digits import CLASS_NAMES, digit_image, ensure_digits, load_digit_arrays, split_indices
from vlmsae.models.tiny import (
    OPEN_CLIP_WEIGHTS,
    build_folder,
    clip_preprocess_cfg,
    tiny_open_clip_cfg,
    write_open_clip_folder,
)

log = logging.getLogger(__name__)

DIGITS_VIT_ARCH = "vlmsae-digits-vit"  # conf/model/digits_vit.yaml's arch: the spec that trains this ViT
DIGITS_VIT_RANDOM_ARCH = "vlmsae-digits-vit-random"  # conf/model/digits_vit_random.yaml: same shapes, untrained
DIGITS_VIT_ARCHS = (DIGITS_VIT_ARCH, DIGITS_VIT_RANDOM_ARCH)
TRAINED_VERSION = "digits-trained-v1"  # bump when a recipe changes (and conf/embedder/digits_cnn.yaml pretrained)
TRAINED_META = "trained.json"
CNN_WEIGHTS = "cnn.safetensors"
VIT_IMAGE_PX = 24  # 24 px / patch 4 = 6 x 6 patches + CLS = 37 tokens
VIT_PATCH = 4
VIT_WIDTH = 48  # residual stream width d (4 blocks, 4 heads)
CNN_IMAGE_PX = 16
MIN_ACCURACY = 0.9  # a training run below this on the held-out split is an error, not a cache


@dataclass(frozen=True)
class Recipe:
    """How one network is trained (AdamW, cosine decay, mini-batches in a seeded order)."""

    epochs: int
    lr: float
    batch_size: int = 64
    weight_decay: float = 0.01


VIT_RECIPE = Recipe(epochs=12, lr=4e-3, batch_size=128)  # ~19 s of one CPU thread, ~96% held out
CNN_RECIPE = Recipe(epochs=15, lr=3e-3)  # ~3 s of one CPU thread, ~96% held out


def file_sha256(fpath: Path) -> str:
    with open(fpath, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def cache_problem(dpath: Path, weights_name: str, seed: int, recipe: Recipe | None = None) -> str | None:
    """Why the cached network in ``dpath`` cannot be trusted (None: it can): missing, unreadable metadata,
    another version, seed or ``recipe``, or weights whose digest differs from the recorded one (truncated,
    altered)."""
    meta_fpath, weights_fpath = dpath / TRAINED_META, dpath / weights_name
    if not meta_fpath.is_file():
        return f"no {TRAINED_META}"
    try:
        meta = json.loads(meta_fpath.read_text())
    except (OSError, ValueError) as err:
        return f"unreadable {TRAINED_META} ({err})"
    if not isinstance(meta, dict) or meta.get("version") != TRAINED_VERSION:
        found = meta.get("version") if isinstance(meta, dict) else None
        return f"version {found!r}, this vlmsae trains {TRAINED_VERSION!r}"
    if meta.get("seed") != seed:
        return f"trained with seed {meta.get('seed')!r}, asked for seed {seed}"
    if recipe is not None and meta.get("recipe") != dataclasses.asdict(recipe):
        return f"trained with recipe {meta.get('recipe')!r}, this vlmsae uses {dataclasses.asdict(recipe)!r}"
    if not weights_fpath.is_file():
        return f"no {weights_name}"
    if file_sha256(weights_fpath) != meta.get("weights_sha256"):
        return f"{weights_name} does not match its recorded sha256 (truncated or altered)"
    return None


def read_trained_meta(dpath: str | Path) -> dict[str, Any]:
    """The ``trained.json`` of a cached network (version, seed, digest, accuracies)."""
    return json.loads((Path(dpath) / TRAINED_META).read_text())


def _ensure(dpath: Path, weights_name: str, seed: int, recipe: Recipe, build: Any) -> Path:
    ensure_digits()  # the image folder data=digits reads: the same pixels the networks train on
    problem = cache_problem(dpath, weights_name, seed, recipe)
    if problem is None:
        return dpath
    if dpath.exists():
        log.warning("Cached network %s is not trusted (%s): deleting it and training it again.", dpath, problem)
        shutil.rmtree(dpath, ignore_errors=True)
    return build_folder(dpath, build)


def _write_meta(tmp: Path, weights_name: str, seed: int, **fields: Any) -> None:
    meta = {"version": TRAINED_VERSION, "seed": seed, "weights_sha256": file_sha256(tmp / weights_name), **fields}
    (tmp / TRAINED_META).write_text(json.dumps(meta, indent=1))


def _split_arrays() -> tuple[dict[str, list[Any]], dict[str, torch.Tensor]]:
    """``({split: PIL images}, {split: labels})``: the pixels the image folder holds, labels = sorted class-folder
    order (what ``data=folder`` gives), so a classifier's label ids match the folder's."""
    images, digits = load_digit_arrays()
    label_of = {name: i for i, name in enumerate(sorted(CLASS_NAMES))}
    splits = split_indices(digits)
    pils = {s: [digit_image(images[i]).convert("RGB") for i in idx.tolist()] for s, idx in splits.items()}
    labels = {s: torch.tensor([label_of[CLASS_NAMES[digits[i]]] for i in idx.tolist()]) for s, idx in splits.items()}
    return pils, labels


def _fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, recipe: Recipe, seed: int) -> None:
    """Seeded mini-batch AdamW with cosine decay; ``model(x_B) -> logits_B10``."""
    gen = torch.Generator().manual_seed(seed)
    n_batches = (len(x) + recipe.batch_size - 1) // recipe.batch_size
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=recipe.epochs * n_batches)
    model.train()
    for _ in range(recipe.epochs):
        order = torch.randperm(len(x), generator=gen)
        for b in range(n_batches):
            idx = order[b * recipe.batch_size : (b + 1) * recipe.batch_size]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()


def _train(what: str, model: nn.Module, x: dict, y: dict, recipe: Recipe, seed: int, fit: bool = True) -> dict:
    """The ``trained.json`` fields (recipe, train and held-out accuracy, classes) of ``model`` after :func:`_fit`
    on the train split (``fit``), which must reach :data:`MIN_ACCURACY` held out."""
    if fit:
        _fit(model, x["train"], y["train"], recipe, seed)
    with torch.no_grad():
        acc = {s: float((model(x[s]).argmax(1) == y[s]).float().mean()) for s in x}
    if fit and acc["heldout"] < MIN_ACCURACY:
        raise RuntimeError(
            f"{what} reached only {acc['heldout']:.3f} held-out accuracy (< {MIN_ACCURACY}): its training recipe is "
            "broken on this machine's torch; report it with `pip freeze`."
        )
    return {
        "recipe": dataclasses.asdict(recipe),
        "train_accuracy": acc["train"],
        "heldout_accuracy": acc["heldout"],
        "classes": sorted(CLASS_NAMES),
    }


# ---------------------------------------------------------------------------------------------- the ViT


def digits_vit_cfg() -> dict[str, Any]:
    """The open_clip ``model_cfg``: the tiny CLIP layout with a 24 px, patch-4 tower and a 10-d projection."""
    return tiny_open_clip_cfg(
        image_size=VIT_IMAGE_PX, patch_size=VIT_PATCH, width=VIT_WIDTH, layers=4, heads=4, embed_dim=len(CLASS_NAMES)
    )


def _vit_transform() -> Any:
    """The eval transform open_clip builds from the ViT's ``preprocess_cfg`` (what the tap's preprocess is)."""
    import open_clip

    cfg = clip_preprocess_cfg(VIT_IMAGE_PX)
    return open_clip.image_transform(cfg.pop("size"), is_train=False, **cfg)


def build_digits_vit(dpath: Path, seed: int = 0, random_init: bool = False) -> None:
    """Train the ViT into ``dpath`` (an empty folder): open_clip config, safetensors weights, ``trained.json``.
    ``random_init``: save the seeded initial weights untrained (the control of the paper's claims)."""
    import open_clip

    pils, y = _split_arrays()
    transform = _vit_transform()
    x = {s: torch.stack([transform(im) for im in images]) for s, images in pils.items()}
    model_cfg = digits_vit_cfg()
    torch.manual_seed(seed)
    model = open_clip.CLIP(**model_cfg).eval()
    fields = _train("The digits ViT", model.visual, x, y, VIT_RECIPE, seed, fit=not random_init)
    write_open_clip_folder(
        dpath, model, model_cfg, seed, "open_clip ViT trained on the sklearn digits (vlmsae.models.digits)"
    )
    _write_meta(dpath, OPEN_CLIP_WEIGHTS, seed, network="digits_vit", random_init=random_init, **fields)


def ensure_digits_vit(dpath: str | Path, seed: int = 0, random_init: bool = False) -> Path:
    """The trained (or ``random_init``) digits ViT's open_clip folder, trained on first use, checked each time."""
    return _ensure(
        Path(dpath),
        OPEN_CLIP_WEIGHTS,
        seed,
        VIT_RECIPE,
        lambda tmp: build_digits_vit(tmp, seed=seed, random_init=random_init),
    )


# ---------------------------------------------------------------------------------------------- the CNN


class DigitsCNN(nn.Module):
    """conv3x3(16) - pool - conv3x3(32) - pool - fc(64) [the embedding] - fc(10), on 16 px greyscale."""

    embed_dim = 64

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(32 * (CNN_IMAGE_PX // 4) ** 2, self.embed_dim),
            nn.ReLU(),
        )
        self.head = nn.Linear(self.embed_dim, len(CLASS_NAMES))

    def embed(self, x_B1HW: torch.Tensor) -> torch.Tensor:
        return self.features(x_B1HW)

    def forward(self, x_B1HW: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x_B1HW))


def cnn_inputs(images: list[Any]) -> torch.Tensor:
    """[B, 1, 16, 16] in [-1, 1] from PIL images (any mode): greyscale, bilinear resize, centred."""
    from PIL import Image

    size = (CNN_IMAGE_PX, CNN_IMAGE_PX)
    arr = np.stack(
        [np.asarray(im.convert("L").resize(size, Image.Resampling.BILINEAR), dtype=np.float32) for im in images]
    )
    return torch.from_numpy(arr / 127.5 - 1.0).unsqueeze(1)


def build_digits_cnn(dpath: Path, seed: int = 1) -> None:
    """Train the CNN into ``dpath`` (an empty folder): ``cnn.safetensors`` and ``trained.json``."""
    from safetensors.torch import save_file

    pils, y = _split_arrays()
    x = {s: cnn_inputs(images) for s, images in pils.items()}
    torch.manual_seed(seed)
    model = DigitsCNN()
    fields = _train("The digits CNN", model, x, y, CNN_RECIPE, seed)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(dpath / CNN_WEIGHTS))
    _write_meta(dpath, CNN_WEIGHTS, seed, network="digits_cnn", **fields, embed_dim=DigitsCNN.embed_dim)


def ensure_digits_cnn(dpath: str | Path, seed: int = 1) -> Path:
    """The trained digits CNN's folder, trained on first use, checked each time."""
    return _ensure(Path(dpath), CNN_WEIGHTS, seed, CNN_RECIPE, lambda tmp: build_digits_cnn(tmp, seed=seed))


def load_digits_cnn(dpath: str | Path, seed: int = 1) -> DigitsCNN:
    """The CNN from a checked folder (safetensors only)."""
    from safetensors.torch import load_file

    dpath = ensure_digits_cnn(dpath, seed)
    model = DigitsCNN()
    model.load_state_dict(load_file(str(dpath / CNN_WEIGHTS)))
    return model.eval()

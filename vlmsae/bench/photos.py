"""Real photographs for the decode benchmarks (issue 23 §9), fetched for the benchmark only, never shipped.

Generated JPEGs (smooth gradients + noise) flatter both JPEG decoding and ``data.fast_decode``: real photographs
hold edges and texture at every scale. Without network access to an image collection, the benchmark builds an
ImageNet-like set from the twelve nature photographs (1280 x 1024 to 2560 x 1920: a ladybird, dunes, a storm,
flowers, leaves, wood...) of Debian's public package ``mate-backgrounds`` (GPL, 46 MB), fetched once with
``apt-get download`` and unpacked with ``dpkg -x`` into the bench cache. The package's other images (renders,
paintings, logos) are not photographs and are left out. Each photo gives many tiles: the photo is scaled down by
a random factor (as a camera picture is scaled for ImageNet), a crop of an ImageNet-like size taken at a random
position (fixed seed), and saved as a baseline JPEG, quality 90, 4:2:0 chroma subsampling (as ImageNet's are).

A user's own folder (``python -m vlmsae.bench --photos DIR``, e.g. ImageNet's validation images) replaces the
set; every result records which set was used (``photos_origin``), and a set that cannot be had gives the reason.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from vlmsae.models.tiny import vlmsae_home
from vlmsae.utils.io import atomic_write_json

PACKAGE = "mate-backgrounds"
PHOTOS_IN_PACKAGE = "usr/share/backgrounds/mate/nature"  # the package's photographs (the rest are renders)
PHOTOS_ENV = "VLMSAE_BENCH_PHOTOS"  # a folder of the user's own JPEGs, as --photos DIR
# ImageNet's most common sizes (landscape and portrait); the set cycles through them.
TILE_SIZES = ((500, 375), (500, 333), (375, 500), (500, 400), (500, 334), (333, 500), (500, 500), (640, 480))
FETCH_TIMEOUT_S = 300
SET_VERSION = 2  # bump when the tiling changes: a cached set of another version is rebuilt
_JPEG_SUFFIXES = (".jpg", ".jpeg", ".JPG", ".JPEG")


class PhotosUnavailable(RuntimeError):
    """The real-photo set cannot be had here (no apt-get, no network, an empty folder): the message says why."""


@dataclass(frozen=True)
class PhotoSet:
    """JPEG files of real photographs and where they came from (``origin``: recorded with every result)."""

    files: tuple[str, ...]
    origin: str


def folder_photos(root: str | Path, n: int | None = None) -> PhotoSet:
    """The JPEGs of a user's folder (searched recursively, sorted; the first ``n``), used as they are."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise PhotosUnavailable(f"--photos {root}: not a folder; give a folder of JPEG photographs")
    files = sorted(str(p) for p in root.rglob("*") if p.suffix in _JPEG_SUFFIXES and p.is_file())
    if not files:
        raise PhotosUnavailable(f"--photos {root}: no .jpg/.jpeg file in it; give a folder of JPEG photographs")
    files = files[:n] if n is not None else files
    return PhotoSet(tuple(files), f"user folder {root} ({len(files)} JPEGs, used as they are)")


def fetch_package_photos(cache_dpath: Path) -> list[Path]:
    """The package's photographs, unpacked under ``cache_dpath/<PACKAGE>/`` (downloaded the first time)."""
    unpacked = cache_dpath / PACKAGE
    photos_dpath = unpacked / PHOTOS_IN_PACKAGE
    if not photos_dpath.is_dir():
        for tool in ("apt-get", "dpkg"):
            if shutil.which(tool) is None:
                raise PhotosUnavailable(f"{tool} not found: the photo set needs Debian's {PACKAGE}; or --photos DIR")
        cache_dpath.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache_dpath, prefix=".fetch-") as tmp:
            try:  # offline, apt-get may retry for minutes: give up after FETCH_TIMEOUT_S
                got = subprocess.run(
                    ["apt-get", "download", PACKAGE], cwd=tmp, capture_output=True, text=True, timeout=FETCH_TIMEOUT_S
                )
            except subprocess.TimeoutExpired as err:
                why = f"apt-get download {PACKAGE} took over {FETCH_TIMEOUT_S} s (no network?); or --photos DIR"
                raise PhotosUnavailable(why) from err
            debs = sorted(Path(tmp).glob(f"{PACKAGE}_*.deb"))
            if got.returncode != 0 or not debs:
                why = (got.stderr or got.stdout).strip().splitlines()[-1:] or ["no .deb written"]
                raise PhotosUnavailable(f"apt-get download {PACKAGE} failed: {why[0]} (or give --photos DIR)")
            staging = Path(tmp) / "root"
            subprocess.run(["dpkg", "-x", str(debs[0]), str(staging)], check=True, capture_output=True)
            if unpacked.exists():
                shutil.rmtree(unpacked)
            os.replace(staging, unpacked)  # whole or absent: a killed fetch leaves no half-unpacked folder
    photos = sorted(photos_dpath.glob("*.jpg"))
    if not photos:
        raise PhotosUnavailable(f"{photos_dpath} holds no .jpg: the package changed; give --photos DIR")
    return photos


def make_tiles(photos: list[Path], out_dpath: Path, n: int, seed: int = 0) -> list[str]:
    """``n`` ImageNet-like JPEG tiles cut from ``photos`` (module docstring), photo ``i % len(photos)`` for tile i."""
    import numpy as np
    from PIL import Image

    out_dpath.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    files: list[str] = []
    opened: dict[Path, Image.Image] = {}
    for i in range(n):
        photo = photos[i % len(photos)]
        if photo not in opened:
            with Image.open(photo) as img:
                opened[photo] = img.convert("RGB")
        src = opened[photo]
        w, h = TILE_SIZES[int(rng.integers(len(TILE_SIZES)))]
        # The photo shrunk by sqrt(m)..m (log-uniform; m = the most that still fills the tile), as a camera
        # picture is shrunk for ImageNet: most tiles show much of the scene, some a detail at more pixels.
        max_shrink = max(1.0, min(src.width / w, src.height / h))
        shrink = float(np.exp(rng.uniform(0.5 * np.log(max_shrink), np.log(max_shrink))))
        bw, bh = w * shrink, h * shrink  # the tile's area in the photo, at a random position
        x0, y0 = float(rng.uniform(0, src.width - bw)), float(rng.uniform(0, src.height - bh))
        box = (x0, y0, min(src.width, x0 + bw), min(src.height, y0 + bh))
        tile = src.resize((w, h), Image.Resampling.LANCZOS, box=box)
        fpath = out_dpath / f"{i:05d}.jpg"
        tile.save(fpath, quality=90, subsampling=2, optimize=False, progressive=False)  # 4:2:0, baseline
        files.append(str(fpath))
    return files


def photo_set(
    n: int, seed: int = 0, photos_dpath: str | Path | None = None, cache_dpath: Path | None = None
) -> PhotoSet:
    """``n`` real-photo JPEGs: a user's folder (``photos_dpath`` or ``$VLMSAE_BENCH_PHOTOS``), else tiles of the
    package's photographs, built once into the bench cache. Raises :class:`PhotosUnavailable` naming why not."""
    photos_dpath = photos_dpath or os.environ.get(PHOTOS_ENV) or None
    if photos_dpath is not None:
        return folder_photos(photos_dpath, n)
    cache_dpath = cache_dpath or vlmsae_home() / "bench"  # downloads and the sets the benchmarks build
    photos = fetch_package_photos(cache_dpath)
    tiles_dpath = cache_dpath / "photos" / f"{PACKAGE}-v{SET_VERSION}-n{n}-seed{seed}"
    done_fpath = tiles_dpath / "photos.json"  # written last: its presence means the set is whole
    if done_fpath.exists():
        files = json.loads(done_fpath.read_text())["files"]
        files = [str(tiles_dpath / name) for name in files]
    else:
        files = make_tiles(photos, tiles_dpath, n, seed)
        atomic_write_json(done_fpath, {"photos": [p.name for p in photos], "files": [Path(f).name for f in files]})
    names = ", ".join(p.stem for p in photos)
    origin = f"{n} tiles of the {len(photos)} photographs of Debian's {PACKAGE} ({names}), seed {seed}"
    return PhotoSet(tuple(files), origin)

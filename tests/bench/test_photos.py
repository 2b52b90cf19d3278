"""The real-photo set of the decode benchmark (issue 23 §9): tiles shaped as ImageNet's JPEGs, a user's folder
used as it is, and a clear reason when neither can be had. Offline: scikit-image's sample photographs stand in
for the package's."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from vlmsae.bench import photos as photos_mod
from vlmsae.bench.photos import TILE_SIZES, PhotosUnavailable, folder_photos, make_tiles, photo_set

skimage_data = pytest.importorskip("skimage.data")


@pytest.fixture
def sources(tmp_path):
    out = []
    for name in ("astronaut", "coffee", "chelsea"):
        fpath = tmp_path / "src" / f"{name}.jpg"
        fpath.parent.mkdir(exist_ok=True)
        Image.fromarray(getattr(skimage_data, name)()).resize((1200, 900)).save(fpath, quality=95)
        out.append(fpath)
    return out


def test_tiles_are_baseline_420_jpegs_of_imagenet_sizes_and_reproducible(sources, tmp_path):
    files = make_tiles(sources, tmp_path / "a", 9, seed=3)
    again = make_tiles(sources, tmp_path / "b", 9, seed=3)
    assert len(files) == 9
    for fpath, fpath_again in zip(files, again):
        with Image.open(fpath) as img:
            assert img.format == "JPEG" and img.size in TILE_SIZES and img.mode == "RGB"
            assert not img.info.get("progressive") and img.layer[1][1:3] == (1, 1) and img.layer[0][1:3] == (2, 2)
        assert Path(fpath).read_bytes() == Path(fpath_again).read_bytes()  # fixed seed: the same set


def test_a_user_folder_is_used_as_it_is(tmp_path, sources):
    got = folder_photos(sources[0].parent, n=2)
    assert got.files == tuple(str(p) for p in sorted(sources)[:2]) and "user folder" in got.origin
    (tmp_path / "empty").mkdir()
    with pytest.raises(PhotosUnavailable, match="no .jpg"):
        folder_photos(tmp_path / "empty")
    with pytest.raises(PhotosUnavailable, match="not a folder"):
        folder_photos(tmp_path / "missing")


def test_without_apt_get_the_reason_is_given(tmp_path, monkeypatch):
    monkeypatch.delenv(photos_mod.PHOTOS_ENV, raising=False)
    monkeypatch.setattr(photos_mod.shutil, "which", lambda tool: None)
    with pytest.raises(PhotosUnavailable, match="apt-get not found.*--photos DIR"):
        photo_set(4, cache_dpath=tmp_path)


def test_the_package_set_is_built_once_from_the_unpacked_photos(tmp_path, sources, monkeypatch):
    monkeypatch.delenv(photos_mod.PHOTOS_ENV, raising=False)
    unpacked = tmp_path / photos_mod.PACKAGE / photos_mod.PHOTOS_IN_PACKAGE
    unpacked.mkdir(parents=True)
    for fpath in sources:
        (unpacked / fpath.name).write_bytes(fpath.read_bytes())
    first = photo_set(5, cache_dpath=tmp_path)  # already unpacked: no apt-get call
    assert len(first.files) == 5 and "3 photographs" in first.origin and "astronaut" in first.origin
    monkeypatch.setattr(photos_mod, "make_tiles", lambda *a, **k: pytest.fail("the cached set was rebuilt"))
    assert photo_set(5, cache_dpath=tmp_path).files == first.files

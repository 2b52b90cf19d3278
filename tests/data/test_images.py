"""Image sources: folder (ImageFolder, iNat 2021 names, flat), list file, WebDataset tars, synthetic
concepts; corrupt files are skipped and logged; positions and worker sharding keep the order. Faithful decoding
(``load_image``): 16-bit and float greyscale scaled, transparency over white, EXIF orientation, skip reasons."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from vlmsae.data.concepts import concept_classes, ensure_concept_images, make_concept_images
from vlmsae.data.images import (
    ALPHA_BACKGROUND,
    SKIP_REASONS,
    SkipLog,
    iter_images,
    list_file,
    list_folder,
    load_image,
    skip_reason,
    to_rgb,
)

INAT = [
    "00000_Animalia_Annelida_Clitellata_Crassiclitellata_Lumbricidae_Lumbricus_terrestris",
    "00001_Plantae_Tracheophyta_Magnoliopsida_Rosales_Rosaceae_Rosa_canina",
]


def _png(fpath, value: int, size=(20, 16)):
    fpath.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), value, np.uint8)).save(fpath)


@pytest.fixture
def inat_root(tmp_path):
    root = tmp_path / "inat"
    for c, name in enumerate(INAT):
        for i in range(3):
            _png(root / name / f"img{i}.jpg", 10 * c + i)
    (root / INAT[1] / "broken.jpg").write_bytes(b"not a jpeg at all")
    return root


def test_folder_inat_layout_labels_keys_and_corrupt_skip(inat_root):
    listing = list_folder(inat_root)
    assert listing.classes == INAT  # full directory names kept (the hierarchy parses them)
    skip = SkipLog()
    records = list(iter_images("folder", inat_root, skip_log=skip))
    assert [r.label for r in records] == [0, 0, 0, 1, 1, 1]
    assert records[0].key == f"{INAT[0]}/img0.jpg" and records[0].image.mode == "RGB"
    assert len(skip) == 1 and skip.entries[0]["key"] == f"{INAT[1]}/broken.jpg" and skip.entries[0]["error"]
    # ``pos`` counts the corrupt record too (sorted: broken.jpg comes before img*.jpg in class 1)
    assert [r.pos for r in records] == [0, 1, 2, 4, 5, 6]
    assert np.asarray(records[3].image)[0, 0, 0] == 10


def test_start_max_images_workers_and_yield_skipped(inat_root):
    all_pos = [r.pos for r in iter_images("folder", inat_root, yield_skipped=True)]
    assert all_pos == list(range(7))
    assert [r.pos for r in iter_images("folder", inat_root, start=4)] == [4, 5, 6]
    assert [r.pos for r in iter_images("folder", inat_root, max_images=2)] == [0, 1]
    w0 = [r.pos for r in iter_images("folder", inat_root, start=1, worker=(0, 2), yield_skipped=True)]
    w1 = [r.pos for r in iter_images("folder", inat_root, start=1, worker=(1, 2), yield_skipped=True)]
    assert w0 == [1, 3, 5] and w1 == [2, 4, 6]  # round-robin over workers gives 1, 2, 3, ...
    bad = [r for r in iter_images("folder", inat_root, yield_skipped=True) if r.image is None]
    assert len(bad) == 1 and bad[0].error


def test_flat_folder_and_missing_root(tmp_path):
    _png(tmp_path / "flat" / "a.png", 1)
    _png(tmp_path / "flat" / "b.png", 2)
    records = list(iter_images("folder", tmp_path / "flat"))
    assert [(r.key, r.label) for r in records] == [("a.png", -1), ("b.png", -1)]
    with pytest.raises(FileNotFoundError, match="data.root=.*nowhere"):
        list(iter_images("folder", tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="Unknown image source 'ftp'"):
        list(iter_images("ftp", tmp_path))


def test_list_file_relative_paths_and_labels(tmp_path):
    _png(tmp_path / "imgs" / "x.png", 5)
    _png(tmp_path / "imgs" / "y.png", 6)
    list_fpath = tmp_path / "list.txt"
    list_fpath.write_text(f"# comment\nimgs/x.png\tdog\n{tmp_path / 'imgs' / 'y.png'}\tcat\nimgs/missing.png\n")
    listing = list_file(list_fpath)
    assert listing.classes == ["cat", "dog"]
    skip = SkipLog()
    records = list(iter_images("list", list_fpath, skip_log=skip))
    assert [(r.key, r.label) for r in records] == [("imgs/x.png", 1), (str(tmp_path / "imgs" / "y.png"), 0)]
    assert len(skip) == 1 and skip.entries[0]["key"] == "imgs/missing.png"
    (tmp_path / "int.txt").write_text("imgs/x.png\t7\n")
    assert [r.label for r in iter_images("list", tmp_path / "int.txt")] == [7]


def _write_wds(fpath, samples):
    with tarfile.open(fpath, "w") as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def _png_bytes(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_webdataset_shards_with_cls_and_json(tmp_path):
    _write_wds(
        tmp_path / "train-000000.tar",
        [
            ("s000", {"png": _png_bytes(1), "cls": b"3"}),
            ("s001", {"jpg": b"garbage", "cls": b"4"}),
        ],
    )
    _write_wds(
        tmp_path / "train-000001.tar",
        [
            ("s002", {"png": _png_bytes(2), "json": json.dumps({"label": 9}).encode()}),
            ("s003", {"txt": b"no image"}),
            ("s004", {"png": _png_bytes(3)}),
        ],
    )
    skip = SkipLog()
    records = list(iter_images("wds", str(tmp_path / "train-{000000..000001}.tar"), skip_log=skip))
    assert [(r.key, r.label, r.pos) for r in records] == [("s000", 3, 0), ("s002", 9, 2), ("s004", -1, 4)]
    assert [e["key"] for e in skip.entries] == ["s001", "s003"]
    assert np.asarray(records[1].image)[0, 0, 0] == 2


def test_concept_images_deterministic_and_complete(tmp_path):
    a = make_concept_images(tmp_path / "a", n_per_class=2, size=32, seed=5)
    b = make_concept_images(tmp_path / "b", n_per_class=2, size=32, seed=5)
    c = make_concept_images(tmp_path / "c", n_per_class=2, size=32, seed=6)
    listing = list_folder(a)
    assert listing.classes == concept_classes() and len(listing.classes) == 16 and len(listing.items) == 32
    name = f"{listing.classes[0]}/00001.png"
    assert (a / name).read_bytes() == (b / name).read_bytes()
    assert (a / name).read_bytes() != (c / name).read_bytes()
    meta = json.loads((a / "concepts.json").read_text())
    assert {c["shape"] for c in meta["classes"]} == {"circle", "square", "triangle", "cross"}
    # the planted colour is really there: red-class images have more red than blue-class images
    red = np.mean([np.asarray(Image.open(p)).astype(float)[..., 0].mean() for p in (a / "circle_red").glob("*.png")])
    blue = np.mean([np.asarray(Image.open(p)).astype(float)[..., 0].mean() for p in (a / "circle_blue").glob("*.png")])
    assert red > blue + 5


def test_synthetic_source_uses_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VLMSAE_HOME", str(tmp_path / "home"))
    records = list(iter_images("synthetic", None, synthetic={"n_per_class": 1, "size": 16, "seed": 0}))
    assert len(records) == 16 and records[0].image.size == (16, 16)
    assert ensure_concept_images(n_per_class=1, size=16, seed=0).parent == tmp_path / "home" / "data"


def test_order_seed_visits_a_permutation_pos_is_visit_order_index_is_listing(tmp_path):
    from vlmsae.data.images import image_order

    root = make_concept_images(tmp_path / "c", n_per_class=2, size=16, seed=0)
    listing = list_folder(root)
    n = len(listing.items)
    order = image_order(n, 7)
    assert order.tolist() == np.random.default_rng(7).permutation(n).tolist() != list(range(n))
    assert image_order(n, None).tolist() == list(range(n))
    records = list(iter_images("folder", root, order_seed=7, decode=False))
    assert [r.index for r in records] == order.tolist() and [r.pos for r in records] == list(range(n))
    assert [(r.key, r.label) for r in records] == [listing.items[i][0::2] for i in order.tolist()]
    plain = list(iter_images("folder", root, decode=False))
    assert [r.index for r in plain] == [r.pos for r in plain] == list(range(n))  # no seed: index == pos
    # start, max_images and the worker split count in the visiting order
    assert [r.index for r in iter_images("folder", root, order_seed=7, start=5, decode=False)] == order[5:].tolist()
    subset = iter_images("folder", root, order_seed=7, max_images=4, decode=False)
    assert [r.index for r in subset] == order[:4].tolist()
    w0 = [r.index for r in iter_images("folder", root, order_seed=7, start=3, worker=(0, 2), decode=False)]
    w1 = [r.index for r in iter_images("folder", root, order_seed=7, start=3, worker=(1, 2), decode=False)]
    assert w0 == order[3::2].tolist() and w1 == order[4::2].tolist()
    decoded = next(iter(iter_images("folder", root, order_seed=7)))
    assert decoded.index == order[0] and decoded.image.size == (16, 16)


def test_order_seed_permutes_wds_tars_only(tmp_path):
    from vlmsae.data.images import image_order

    for t in range(4):
        _write_wds(tmp_path / f"s-{t:06d}.tar", [(f"t{t}_{i}", {"png": _png_bytes(t), "cls": b"1"}) for i in range(2)])
    tars = image_order(4, 2).tolist()
    assert tars != [0, 1, 2, 3]
    records = list(iter_images("wds", str(tmp_path / "s-{000000..000003}.tar"), order_seed=2))
    assert [r.key for r in records] == [f"t{t}_{i}" for t in tars for i in range(2)]  # samples keep tar order
    assert [r.pos for r in records] == [r.index for r in records] == list(range(8))


# ------------------------------------------------------------------------------ faithful decoding (load_image)
# Faithful decoding (``vlmsae.data.images.load_image``): 16-bit and float greyscale are scaled, not
# clipped; transparency is composited over white; EXIF orientation is applied (or not, on request);
# CMYK converts; unreadable files are skipped under stable reason names.
def _encode_png(img: Image.Image, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", **kwargs)
    return buf.getvalue()


def _grey(img: Image.Image) -> np.ndarray:
    arr = np.asarray(img)
    assert img.mode == "RGB" and (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all()
    return arr[..., 0].astype(int)


def test_16bit_png_gradient_is_scaled_not_clipped(tmp_path):
    ramp_W = np.arange(256, dtype=np.uint16) * 257  # 0, 257, ..., 65535: 8-bit 0..255 exactly
    dark_W = np.linspace(0, 4000, 256).astype(np.uint16)  # a dark 16-bit image stays dark
    fpath = tmp_path / "ramp16.png"
    Image.fromarray(np.stack([ramp_W, dark_W])).save(fpath)
    assert Image.open(fpath).mode in ("I;16", "I")  # what Pillow opens a 16-bit greyscale PNG as
    grey = _grey(load_image(fpath))
    assert grey[0].tolist() == list(range(256))  # proportional: v / 257
    np.testing.assert_array_equal(grey[1], np.rint(dark_W / 257.0).astype(int))
    assert grey[1].max() == 16  # a bare convert("RGB") gives 255 almost everywhere
    big_endian = Image.frombytes("I;16B", (256, 1), ramp_W.astype(">u2").tobytes())
    assert _grey(to_rgb(big_endian))[0].tolist() == list(range(256))
    as_int32 = Image.fromarray((np.arange(256) * 257).astype(np.int32).reshape(1, 256))
    assert as_int32.mode == "I" and _grey(to_rgb(as_int32))[0].tolist() == list(range(256))


def test_float_and_wide_int_images_are_stretched():
    unit = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert unit.mode == "F" and _grey(to_rgb(unit))[0].tolist() == [0, 128, 255]  # [0, 1]: normalised floats
    wide = Image.fromarray(np.array([[-10.0, 40.0, 90.0, np.nan]], dtype=np.float32))
    assert _grey(to_rgb(wide))[0].tolist() == [0, 128, 255, 0]  # min-max stretch, NaN -> 0
    signed = Image.fromarray(np.array([[-100, 0, 100]], dtype=np.int32))
    assert _grey(to_rgb(signed))[0].tolist() == [0, 128, 255]


def test_palette_with_transparent_index_gets_the_background():
    pal = Image.new("P", (4, 2))
    pal.putpalette([10, 200, 30, 200, 0, 0] + [0] * 762)
    pal.putdata([0, 1, 0, 1, 1, 0, 1, 0])
    img = load_image(_encode_png(pal, transparency=0))
    arr = np.asarray(img)
    assert ALPHA_BACKGROUND == (255, 255, 255)
    assert arr[0, 0].tolist() == [255, 255, 255]  # the transparent index, not its palette colour (10, 200, 30)
    assert arr[0, 1].tolist() == [200, 0, 0]
    assert load_image(_encode_png(pal)).getpixel((0, 0)) == (10, 200, 30)  # no transparency: the palette colour


def test_rgba_and_la_half_transparent_are_composited_over_white():
    rgba = Image.new("RGBA", (3, 3), (0, 0, 255, 128))
    r, g, b = load_image(_encode_png(rgba)).getpixel((1, 1))
    want = round(255 * (1 - 128 / 255))  # 0 * a + 255 * (1 - a)
    assert abs(r - want) <= 1 and abs(g - want) <= 1 and b == 255
    clear = Image.new("RGBA", (2, 2), (0, 0, 0, 0))  # alpha 0 over black RGB: white, not black
    assert load_image(_encode_png(clear)).getpixel((0, 0)) == (255, 255, 255)
    la = Image.new("LA", (2, 2), (0, 64))
    assert abs(load_image(_encode_png(la)).getpixel((0, 0))[0] - round(255 * (1 - 64 / 255))) <= 1


def _exif_rotated_jpeg(fpath):
    """A 20x10 JPEG (left half red, right half blue) whose EXIF says: rotate 90 degrees clockwise to view."""
    arr = np.zeros((10, 20, 3), np.uint8)
    arr[:, :10] = (255, 0, 0)
    arr[:, 10:] = (0, 0, 255)
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = 6  # Orientation: 6 = the viewer rotates 90 degrees clockwise
    img.save(fpath, format="JPEG", quality=95, exif=exif.tobytes())


def test_exif_orientation_is_applied_by_default_and_optional(tmp_path):
    _exif_rotated_jpeg(tmp_path / "rot.jpg")
    shown = load_image(tmp_path / "rot.jpg")
    assert shown.size == (10, 20)  # upright as displayed: 10 wide, 20 tall
    top, bottom = np.asarray(shown)[2, 5].astype(int), np.asarray(shown)[17, 5].astype(int)
    assert top[0] > 200 and top[2] < 60 and bottom[2] > 200 and bottom[0] < 60  # left (red) went to the top
    stored = load_image(tmp_path / "rot.jpg", exif_transpose=False)
    assert stored.size == (20, 10)
    (record,) = iter_images("folder", tmp_path, exif_transpose=False)
    assert record.image.size == (20, 10)
    (record,) = iter_images("folder", tmp_path)
    assert record.image.size == (10, 20)


def test_cmyk_converts(monkeypatch):
    buf = io.BytesIO()
    Image.new("CMYK", (16, 16), (0, 255, 0, 64)).save(buf, format="JPEG", quality=95)  # magenta, 25% black
    rgb = np.asarray(load_image(buf.getvalue())).astype(int)
    np.testing.assert_allclose(rgb[8, 8], [191, 0, 191], atol=3)  # 255 (1 - C)(1 - K)
    assert to_rgb(Image.new("CMYK", (2, 2), (255, 0, 0, 0))).getpixel((0, 0)) == (0, 255, 255)  # cyan

    # With an embedded ICC profile the colour-managed conversion is used; an unusable one falls back.
    from PIL import ImageCms

    img = Image.new("CMYK", (2, 2), (0, 0, 0, 0))
    img.info["icc_profile"] = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    calls = []

    def managed(im, src, dst, outputMode):
        calls.append(outputMode)
        return Image.new("RGB", im.size, (1, 2, 3))

    with monkeypatch.context() as patch:
        patch.setattr(ImageCms, "profileToProfile", managed)
        assert to_rgb(img).getpixel((0, 0)) == (1, 2, 3) and calls == ["RGB"]
    img.info["icc_profile"] = b"not a profile"
    assert to_rgb(img).getpixel((0, 0)) == (255, 255, 255)


def test_unreadable_files_are_skipped_by_reason(tmp_path):
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, format="JPEG")
    (tmp_path / "a_good.jpg").write_bytes(buf.getvalue())
    (tmp_path / "b_truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) * 6 // 10])
    (tmp_path / "c_text.jpg").write_text("this is not a jpeg\n")
    (tmp_path / "d_truncated.png").write_bytes(
        _encode_png(Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)))[:3000]
    )
    skip = SkipLog()
    records = list(iter_images("folder", tmp_path, skip_log=skip, yield_skipped=True))
    assert [r.reason for r in records] == [None, "truncated", "not an image", "truncated"]
    assert [e["reason"] for e in skip.entries] == ["truncated", "not an image", "truncated"]
    assert skip.by_reason() == {"not an image": 1, "truncated": 2}
    assert list(skip.by_reason()) == ["not an image", "truncated"]  # SKIP_REASONS order
    list_fpath = tmp_path / "l.txt"
    list_fpath.write_text("a_good.jpg\nnowhere.jpg\n")
    skip = SkipLog()
    list(iter_images("list", list_fpath, skip_log=skip))
    assert skip.by_reason() == {"missing file": 1}
    assert skip_reason(IsADirectoryError("x")) == "unreadable file" and skip_reason(RuntimeError()) == "other"
    assert skip_reason(ValueError("conversion from LAB to RGB not supported")) == "unsupported mode"
    assert set(SKIP_REASONS) >= {"truncated", "not an image", "missing file", "no image member", "preprocess failed"}
    with pytest.raises(ValueError, match="Unknown skip reason 'bad'"):
        SkipLog().add("k", None, "err", "bad")

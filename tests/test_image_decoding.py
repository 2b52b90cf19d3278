"""Faithful decoding (``vlmsae.data.images.load_image``): 16-bit and float greyscale are scaled, not
clipped; transparency is composited over white; EXIF orientation is applied (or not, on request);
CMYK converts; unreadable files are skipped under stable reason names."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from vlmsae.data.images import ALPHA_BACKGROUND, SKIP_REASONS, SkipLog, iter_images, load_image, skip_reason, to_rgb


def _png_bytes(img: Image.Image, **kwargs) -> bytes:
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
    img = load_image(_png_bytes(pal, transparency=0))
    arr = np.asarray(img)
    assert ALPHA_BACKGROUND == (255, 255, 255)
    assert arr[0, 0].tolist() == [255, 255, 255]  # the transparent index, not its palette colour (10, 200, 30)
    assert arr[0, 1].tolist() == [200, 0, 0]
    assert load_image(_png_bytes(pal)).getpixel((0, 0)) == (10, 200, 30)  # no transparency: the palette colour


def test_rgba_and_la_half_transparent_are_composited_over_white():
    rgba = Image.new("RGBA", (3, 3), (0, 0, 255, 128))
    r, g, b = load_image(_png_bytes(rgba)).getpixel((1, 1))
    want = round(255 * (1 - 128 / 255))  # 0 * a + 255 * (1 - a)
    assert abs(r - want) <= 1 and abs(g - want) <= 1 and b == 255
    clear = Image.new("RGBA", (2, 2), (0, 0, 0, 0))  # alpha 0 over black RGB: white, not black
    assert load_image(_png_bytes(clear)).getpixel((0, 0)) == (255, 255, 255)
    la = Image.new("LA", (2, 2), (0, 64))
    assert abs(load_image(_png_bytes(la)).getpixel((0, 0))[0] - round(255 * (1 - 64 / 255))) <= 1


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
    (tmp_path / "d_truncated.png").write_bytes(_png_bytes(Image.fromarray(
        rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)))[:3000])
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

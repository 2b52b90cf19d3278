"""Issue 18: batched JPEG decoding + preprocessing on the device (``decode=cuda_nvjpeg``), checked on the CPU:
torchvision's ``decode_jpeg(device="cpu")`` stands in for nvjpeg, the preprocessing math is the same tensor code."""

from __future__ import annotations

import io
import itertools

import numpy as np
import pytest
import torch
from PIL import Image

from vlmsae.bench.decode import make_photo_jpegs
from vlmsae.data.images import iter_images, jpeg_for_device, load_image
from vlmsae.data.shards import read_rows
from vlmsae.formats import read_manifest
from vlmsae.models import extraction as extraction_mod
from vlmsae.models import get_model_spec, load_tap
from vlmsae.models.extraction import ExtractionPlan, StoreExtraction
from vlmsae.models.gpu_decode import (
    BlockDecoder,
    UnsupportedPreprocess,
    choose_decode,
    decode_path,
    gpu_jpeg_supported,
    gpu_preprocess_of,
    gpu_preprocess_of_tap,
)


@pytest.fixture(scope="module")
def jpeg_root(tmp_path_factory):
    return make_photo_jpegs(tmp_path_factory.mktemp("jpegs"), 6, seed=2)


@pytest.fixture(scope="module")
def tap():
    return load_tap(get_model_spec("tiny"))


def _decode_cpu(fpath) -> torch.Tensor:
    from torchvision.io import ImageReadMode, decode_jpeg

    return decode_jpeg(torch.frombuffer(bytearray(fpath.read_bytes()), dtype=torch.uint8), mode=ImageReadMode.RGB)


def _corrupt_jpeg() -> bytes:
    """A JPEG whose scan header names undefined Huffman tables: its header parses, Pillow and torchvision
    both fail to decode it."""
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 80, 3), dtype=np.uint8)).save(buf, format="JPEG")
    good = buf.getvalue()
    sos = good.index(b"\xff\xda")
    return good[:sos] + b"\xff\xda\x00\x0c\x03\x01\x77\x02\x77\x03\x77\x00\x3f\x00" + good[sos + 14 :]


def test_decode_path_on_every_combination():
    for device, fast, gpu_ok, kind in itertools.product(
        ("cpu", "cuda", "mps"), (False, True), (False, True), ("jpeg", "other")
    ):
        got = decode_path(device, fast, gpu_ok, kind)
        if not fast:
            assert got == "cpu"
        elif device == "cuda" and gpu_ok and kind == "jpeg":
            assert got == "cuda_nvjpeg"
        else:
            assert got == "cpu_draft", (device, fast, gpu_ok, kind)
    with pytest.raises(ValueError, match="file_kind='png'"):
        decode_path("cuda", True, True, "png")


def test_choose_decode_stays_on_the_cpu_without_cuda(tap):
    assert not gpu_jpeg_supported("cpu")
    assert choose_decode(tap, fast_decode=True) == ("cpu_draft", None)
    assert choose_decode(tap, fast_decode=False) == ("cpu", None)


def _cosines(a_BCHW, b_BCHW):
    return torch.nn.functional.cosine_similarity(a_BCHW.flatten(1), b_BCHW.flatten(1), dim=1)


def _compare(preprocess, files, **kw):
    gpu = gpu_preprocess_of(preprocess)
    exact = torch.stack([preprocess(load_image(str(f))) for f in files])
    device = gpu([_decode_cpu(f) for f in files])
    assert device.shape == exact.shape and device.dtype == torch.float32
    return _cosines(device, exact), (device - exact).abs()


def test_gpu_preprocess_matches_the_pil_path_of_open_clip(tap, jpeg_root):
    from open_clip.transform import image_transform

    files = sorted(jpeg_root.glob("*.jpg"))
    assert gpu_preprocess_of_tap(tap).size == tap.image_size
    for preprocess in (
        tap._preprocess,
        image_transform(224, is_train=False),
        image_transform(224, is_train=False, resize_mode="squash"),
    ):
        cos, err = _compare(preprocess, files)
        # PIL and torch resample differently (fixed-point vs float kernels) and libjpeg-turbo's IDCT in
        # torchvision is not always Pillow's build: measured: max 1 level (0.015 normalised), mean ~0.002
        assert cos.mean() >= 0.99 and cos.min() >= 0.98, cos
        assert err.mean() < 0.01 and err.max() < 0.1, (err.mean(), err.max())


def test_gpu_preprocess_matches_the_hf_clip_processor(jpeg_root):
    from transformers import CLIPImageProcessor

    proc = CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    gpu = gpu_preprocess_of(proc)
    assert gpu.crop_style == "floor" and gpu.interpolation == "bicubic"
    files = sorted(jpeg_root.glob("*.jpg"))
    exact = torch.stack([proc(images=load_image(str(f)), return_tensors="pt")["pixel_values"][0] for f in files])
    device = gpu([_decode_cpu(f) for f in files])
    cos = _cosines(device, exact)
    assert cos.mean() >= 0.99 and (device - exact).abs().max() < 0.1


def test_unsupported_preprocess_is_refused_naming_the_step():
    from torchvision import transforms as T

    flip = T.Compose([T.Resize(32), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize((0.5,) * 3, (0.5,) * 3)])
    with pytest.raises(UnsupportedPreprocess, match="RandomHorizontalFlip"):
        gpu_preprocess_of(flip)
    nearest = T.Compose([T.Resize(32, interpolation=T.InterpolationMode.NEAREST), T.ToTensor()])
    with pytest.raises(UnsupportedPreprocess, match="bicubic and bilinear"):
        gpu_preprocess_of(nearest)


def test_workers_send_raw_jpegs_and_decode_the_rest(tmp_path, jpeg_root):
    root = tmp_path / "mixed"
    root.mkdir()
    (root / "a.jpg").write_bytes((jpeg_root / "00000.jpg").read_bytes())
    Image.new("RGB", (40, 30), (10, 200, 30)).save(root / "b.png")
    rotated = Image.open(jpeg_root / "00001.jpg")
    exif = rotated.getexif()
    exif[0x0112] = 6
    rotated.save(root / "c.jpg", exif=exif)
    records = {r.key: r for r in iter_images("folder", root, raw_jpeg=True)}
    assert records["a.jpg"].jpeg is not None and records["a.jpg"].image is None
    assert records["b.png"].jpeg is None and records["b.png"].image is not None  # PNG: decoded by Pillow
    assert records["c.jpg"].jpeg is None and records["c.jpg"].image is not None  # EXIF-rotated: Pillow applies it
    assert next(iter_images("folder", root, raw_jpeg=True, exif_transpose=False, max_images=3)).key == "a.jpg"
    assert jpeg_for_device((root / "c.jpg").read_bytes(), exif_transpose=False)
    assert not jpeg_for_device((root / "a.jpg").read_bytes()[:-200], exif_transpose=True)  # truncated: Pillow


def _plan(root, **kw):
    args = dict(source="folder", root=str(root), layer=1, tokens="cls", k=1, seed=0, dtype="float32")
    args.update(rows_per_shard=4, rows_per_chunk=2, order_seed=None, max_images=None, batch_size=4, num_workers=0)
    args.update(exif_transpose=True, progress=False, fast_decode=True)
    return ExtractionPlan(**{**args, **kw})


def test_device_path_skips_and_counts_like_the_cpu_path(tmp_path, jpeg_root, monkeypatch):
    root = tmp_path / "imgs"
    root.mkdir()
    for f in sorted(jpeg_root.glob("*.jpg")):
        (root / f.name).write_bytes(f.read_bytes())
    Image.new("RGB", (300, 200), (200, 20, 90)).save(root / "00002b.png")
    (root / "00003b.jpg").write_bytes(_corrupt_jpeg())
    assert jpeg_for_device((root / "00003b.jpg").read_bytes(), True)  # it reaches the device decoder
    spec = get_model_spec("tiny")
    cpu = StoreExtraction(spec, _plan(root), tmp_path / "cpu")
    assert cpu.decode == "cpu_draft"
    cpu_summary = cpu.run()

    def on_cpu_device(tap, fast_decode, allow_gpu=True):  # the CPU device stands in for CUDA
        return "cuda_nvjpeg", gpu_preprocess_of_tap(tap)

    monkeypatch.setattr(extraction_mod, "choose_decode", on_cpu_device)
    dev = StoreExtraction(spec, _plan(root), tmp_path / "dev")
    dev_summary = dev.run()
    assert dev_summary["n_images"] == cpu_summary["n_images"] == 7
    m_cpu, m_dev = read_manifest(tmp_path / "cpu"), read_manifest(tmp_path / "dev")
    assert (m_cpu.decode, m_dev.decode) == ("cpu_draft", "cuda_nvjpeg")
    assert m_dev.skipped_by_reason == m_cpu.skipped_by_reason == {"corrupt": 1}
    assert [s["key"] for s in m_dev.skipped] == ["00003b.jpg"]
    a, b = read_rows(tmp_path / "cpu"), read_rows(tmp_path / "dev")
    assert a["keys"] == b["keys"] and a["image_idx"].tolist() == b["image_idx"].tolist()
    assert _cosines(a["acts"], b["acts"]).mean() > 0.99


def test_block_decoder_falls_back_to_pillow_per_image(tap, jpeg_root):
    good = (jpeg_root / "00000.jpg").read_bytes()
    jpegs = [good, _corrupt_jpeg(), good]
    ends = np.cumsum([len(j) for j in jpegs]).tolist()
    records = [{"ok": False, "jpeg": True, "error": None, "reason": None} for _ in jpegs]
    records.insert(1, {"ok": True, "jpeg": False})
    cpu_pixels = tap.preprocess(Image.new("RGB", (50, 40)))[None]
    block = {
        "records": records,
        "pixels": cpu_pixels,
        "jpeg_offsets": list(zip([0, *ends[:-1]], ends)),
        "jpeg_bytes": torch.frombuffer(bytearray(b"".join(jpegs)), dtype=torch.uint8),
    }
    calls = []

    def decode(datas, device):
        calls.append(len(datas))
        from vlmsae.models.gpu_decode import _decode_jpeg

        return _decode_jpeg(datas, device)

    out = BlockDecoder(gpu_preprocess_of_tap(tap), "cpu", tap.preprocess, True, tap.image_size, decode)(block)
    assert calls == [3, 1, 1, 1]  # the batch failed on the corrupt file: one by one
    assert [r["ok"] for r in out["records"]] == [True, True, False, True]
    assert out["records"][2]["reason"] == "corrupt"
    assert out["pixels"].shape == (3, 3, tap.image_size, tap.image_size)
    assert torch.equal(out["pixels"][1], cpu_pixels[0]) and torch.equal(out["pixels"][0], out["pixels"][2])


def test_gpu_decode_bench_skips_without_cuda(capsys, monkeypatch):
    from vlmsae.bench import gpu_decode

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_decode.main(["--smoke"]) == 0
    assert "skipped (no CUDA device)" in capsys.readouterr().out

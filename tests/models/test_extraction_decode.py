"""Issue 18: extraction's worker blocks keep the order and rows, the main process's torch threads on CPU,
and ``data.fast_decode`` (JPEG draft + reduce): right shape/dtype, close to exact, default path unchanged."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from PIL import Image

from vlmsae.bench.decode import make_photo_jpegs
from vlmsae.data.images import iter_images, load_image
from vlmsae.data.shards import read_rows
from vlmsae.models import get_model_spec, load_tap
from vlmsae.models.extraction import ExtractionPlan, StoreExtraction, _stack_rows, main_threads


@pytest.fixture(scope="module")
def jpeg_root(tmp_path_factory):
    return make_photo_jpegs(tmp_path_factory.mktemp("jpegs"), 7, seed=1)


def _plan(root, **kw):
    args = dict(source="folder", root=str(root), layer=1, tokens="cls", k=1, seed=0, dtype="float32")
    args.update(rows_per_shard=4, rows_per_chunk=2, order_seed=3, max_images=None, batch_size=3, num_workers=0)
    args.update(exif_transpose=True, progress=False)
    return ExtractionPlan(**{**args, **kw})


def test_worker_blocks_cover_every_position_once_in_order(jpeg_root):
    got = {}
    for wid in range(2):
        got[wid] = [r.pos for r in iter_images("folder", jpeg_root, start=1, worker=(wid, 2), worker_block=3)]
    assert got == {0: [1, 2, 3], 1: [4, 5, 6]}  # positions 1..6: blocks of 3, taken in turn
    with pytest.raises(ValueError, match="worker_block=0"):
        list(iter_images("folder", jpeg_root, worker_block=0))


def test_blocks_and_workers_give_the_rows_of_one_process(jpeg_root, tmp_path):
    spec = get_model_spec("tiny")
    one = StoreExtraction(spec, _plan(jpeg_root), tmp_path / "w0").run()
    two = StoreExtraction(spec, _plan(jpeg_root, num_workers=2, batch_size=2), tmp_path / "w2").run()
    assert one["n_images"] == two["n_images"] == 7
    a, b = read_rows(tmp_path / "w0"), read_rows(tmp_path / "w2")
    assert a["keys"] == b["keys"] and a["image_idx"].tolist() == b["image_idx"].tolist()
    torch.testing.assert_close(a["acts"], b["acts"], rtol=1e-5, atol=1e-6)


def test_stack_rows_views_one_block_and_copies_otherwise():
    block_a, block_b = torch.arange(24.0).view(4, 6), torch.arange(24.0, 48.0).view(4, 6)
    view = _stack_rows([(block_a, 1), (block_a, 2)])
    assert view.data_ptr() == block_a[1].data_ptr() and torch.equal(view, block_a[1:3])
    mixed = _stack_rows([(block_a, 3), (block_b, 0)])
    assert torch.equal(mixed, torch.stack([block_a[3], block_b[0]]))
    assert torch.equal(_stack_rows([(block_a, 0), (block_a, 2)]), block_a[[0, 2]])


def test_main_threads_leave_the_workers_their_cores():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert main_threads(cpu, 2, n_cores=2) == 1
    assert main_threads(cpu, 4, n_cores=2) == 1
    assert main_threads(cpu, 2, n_cores=64) == min(torch.get_num_threads(), 62)
    assert main_threads(cpu, 0, n_cores=2) is None and main_threads(cuda, 2, n_cores=2) is None


def test_fast_decode_shape_dtype_and_closeness(jpeg_root):
    tap = load_tap(get_model_spec("tiny"))
    fpaths = sorted(jpeg_root.iterdir())
    for fpath in fpaths:
        exact, fast = load_image(fpath), load_image(fpath, draft_size=tap.image_size)
        assert fast.mode == "RGB" and min(fast.size) >= tap.image_size
        assert 2 * tap.image_size <= min(fast.size) < 4 * tap.image_size < min(exact.size)  # 1/4 (375 -> 94 px)
        x_exact, x_fast = tap.preprocess(exact), tap.preprocess(fast)
        assert x_fast.shape == x_exact.shape and x_fast.dtype == x_exact.dtype == torch.float32
        cosine = torch.nn.functional.cosine_similarity(x_exact.flatten(), x_fast.flatten(), dim=0)
        assert cosine > 0.99, fpath
    # reduce: a non-JPEG far larger than the target is box-reduced, keeping >= 2 x the target side
    big = Image.fromarray(np.full((400, 300, 3), 128, np.uint8))
    png = jpeg_root.parent / "big.png"
    big.save(png)
    assert load_image(png, draft_size=32).size == (75, 100)  # factor 300 // 64 = 4
    assert load_image(png).size == (300, 400)


def test_default_decoding_is_byte_identical_to_plain_pil(jpeg_root):
    for fpath in sorted(jpeg_root.iterdir()):
        with Image.open(fpath) as img:
            plain = img.convert("RGB").tobytes()
        assert hashlib.sha256(load_image(fpath).tobytes()).digest() == hashlib.sha256(plain).digest()


def test_fast_decode_store_is_marked_and_close_to_exact(jpeg_root, tmp_path):
    spec = get_model_spec("tiny")
    StoreExtraction(spec, _plan(jpeg_root), tmp_path / "exact").run()
    StoreExtraction(spec, _plan(jpeg_root, fast_decode=True), tmp_path / "fast").run()
    exact, fast = read_rows(tmp_path / "exact"), read_rows(tmp_path / "fast")
    assert exact["keys"] == fast["keys"]
    cosine = torch.nn.functional.cosine_similarity(exact["acts"], fast["acts"], dim=-1)
    assert cosine.min() > 0.99 and not torch.equal(exact["acts"], fast["acts"])
    from vlmsae.formats import read_manifest

    assert read_manifest(tmp_path / "fast").extra.get("fast_decode") is True
    assert "fast_decode" not in read_manifest(tmp_path / "exact").extra  # an old store's meta still matches


def test_workers_take_the_main_process_listing(jpeg_root, tmp_path, monkeypatch):
    import vlmsae.data.images as images

    extraction = StoreExtraction(get_model_spec("tiny"), _plan(jpeg_root), tmp_path / "acts")  # lists here, once
    monkeypatch.setattr(images, "list_source", lambda *args, **kwargs: pytest.fail("the source was listed again"))
    assert extraction.run()["n_images"] == 7

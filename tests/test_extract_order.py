"""Extraction's row order: a class-sorted folder extracted with default settings and streamed by the
default training stream gives batches as class-diverse as uniform sampling (the seeded visiting
order); a changed order on resume is refused; skipped files are counted by reason in the manifest."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from PIL import Image

from vlmsae.data.shards import read_rows
from vlmsae.formats import read_manifest
from vlmsae.extract import run

torch.set_num_threads(1)
N_CLASSES, PER_CLASS, BATCH = 40, 30, 256


def expected_distinct_classes(class_sizes: list[int], n: int) -> float:
    """E[#distinct classes] in ``n`` rows drawn uniformly without replacement: sum_c 1 - C(N - n_c, n) / C(N, n)."""
    total = sum(class_sizes)
    return sum(1 - math.comb(total - n_c, n) / math.comb(total, n) for n_c in class_sizes)


@pytest.fixture(scope="module")
def sorted_folder(tmp_path_factory):
    """40 class folders x 30 tiny noise images (every image distinct, so every row maps back to its class)."""
    root = tmp_path_factory.mktemp("order") / "imgs"
    rng = np.random.default_rng(0)
    for c in range(N_CLASSES):
        (root / f"class{c:02d}").mkdir(parents=True)
        for i in range(PER_CLASS):
            pixels = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / f"class{c:02d}" / f"{i:02d}.png")
    return root


def _distinct_classes_per_batch(store, n_batches: int = 30, shuffle_buffer: int | None = None) -> list[int]:
    from vlmsae.data.stream import StreamConfig
    from vlmsae.lit.datamodule import ActsDataModule

    rows = read_rows(store)
    label_of = {row.numpy().tobytes(): label for row, label in zip(rows["acts"], rows["label"].tolist())}
    assert len(label_of) == N_CLASSES * PER_CLASS  # distinct rows: each one names its image's class
    stream = StreamConfig(batch_size=BATCH) if shuffle_buffer is None else StreamConfig(batch_size=BATCH,
                                                                                          shuffle_buffer=shuffle_buffer)
    dm = ActsDataModule(store, stream)  # default: the trainer's default shuffle settings
    distinct = []
    for batch in dm.train_stream():
        distinct.append(len({label_of[row.numpy().tobytes()] for row in batch}))
        if len(distinct) == n_batches:
            return distinct
    raise AssertionError("the training stream ended")


def test_default_extraction_gives_uniformly_mixed_training_batches(compose_cfg, sorted_folder, tmp_path):
    # default settings (order_seed=0); worker processes only cost start-up time here and never change rows
    cfg = compose_cfg("extract", ["model=tiny", "data=folder", f"data.root={sorted_folder}", "progress=false",
                                  "data.num_workers=0"])
    run(cfg, out_dpath=tmp_path / "store")
    manifest = read_manifest(tmp_path / "store")
    assert manifest.order_seed == 0 and manifest.n_rows == N_CLASSES * PER_CLASS
    want = expected_distinct_classes([PER_CLASS] * N_CLASSES, BATCH)
    got = float(np.mean(_distinct_classes_per_batch(tmp_path / "store")))
    assert abs(got - want) <= 0.1 * want, (got, want)
    # the order itself is uniform: even a shuffle window of one batch (a real store is ~100x its window) mixes
    got_one_window = float(np.mean(_distinct_classes_per_batch(tmp_path / "store", shuffle_buffer=BATCH)))
    assert abs(got_one_window - want) <= 0.1 * want, (got_one_window, want)


def test_listing_order_is_still_available_and_is_class_sorted(compose_cfg, sorted_folder, tmp_path):
    """order_seed=null keeps the folder order: the stream's batches then hold far fewer classes.

    This 1,200-row store fits in one default shuffle window, which hides any order; a window of one batch
    (what a real store is, relative to the 16,384-row window: ~1% of ImageNet) shows it."""
    cfg = compose_cfg("extract", ["model=tiny", "data=folder", f"data.root={sorted_folder}", "progress=false",
                                  "order_seed=null", "data.num_workers=0"])
    run(cfg, out_dpath=tmp_path / "store")
    rows = read_rows(tmp_path / "store")
    assert rows["image_idx"].tolist() == list(range(N_CLASSES * PER_CLASS)) and read_manifest(
        tmp_path / "store").order_seed is None
    want = expected_distinct_classes([PER_CLASS] * N_CLASSES, BATCH)
    assert float(np.mean(_distinct_classes_per_batch(tmp_path / "store", n_batches=4, shuffle_buffer=BATCH))) < 0.5 * want


def test_max_images_is_a_random_subset(compose_cfg, sorted_folder, tmp_path):
    from vlmsae.data.images import image_order

    cfg = compose_cfg("extract", ["model=tiny", "data=folder", f"data.root={sorted_folder}", "progress=false",
                                  "data.max_images=100", "data.num_workers=0", "tokens=cls"])
    run(cfg, out_dpath=tmp_path / "sub")
    rows = read_rows(tmp_path / "sub")
    assert rows["image_idx"].tolist() == image_order(N_CLASSES * PER_CLASS, 0)[:100].tolist()
    assert len(set(rows["label"].tolist())) > 30  # the first 100 in folder order would be 4 classes


def test_resume_refuses_a_changed_order(compose_cfg, sorted_folder, tmp_path):
    base = ["model=tiny", "data=folder", f"data.root={sorted_folder}", "progress=false", "data.num_workers=0",
            "data.max_images=40", "rows_per_shard=8"]
    run(compose_cfg("extract", base), out_dpath=tmp_path / "out")
    (tmp_path / "out" / "manifest.json").unlink()  # as if killed before the end
    with pytest.raises(ValueError, match=r"different extraction.*order_digest.*order_seed: was 0, now 1"):
        run(compose_cfg("extract", [*base, "order_seed=1"]), out_dpath=tmp_path / "out")
    with pytest.raises(ValueError, match=r"order_seed='x' must be an integer"):
        run(compose_cfg("extract", [*base, "order_seed=x"]), out_dpath=tmp_path / "other")


def test_manifest_counts_skips_by_reason(compose_cfg, tmp_path):
    root = tmp_path / "imgs" / "only"
    root.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / f"ok{i}.png")
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(buf, format="JPEG")
    (root / "cut.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (root / "notes.jpg").write_text("a text file named .jpg")
    Image.fromarray((np.arange(64, dtype=np.uint16) * 1000).reshape(8, 8)).save(root / "deep.png")  # 16-bit: kept
    cfg = compose_cfg("extract", ["model=tiny", "data=folder", f"data.root={tmp_path / 'imgs'}", "progress=false",
                                  "data.num_workers=0", "tokens=cls"])
    run(cfg, out_dpath=tmp_path / "out")
    manifest = read_manifest(tmp_path / "out")
    assert manifest.n_images == 5 and manifest.n_skipped == 2
    assert manifest.skipped_by_reason == {"not an image": 1, "truncated": 1}
    assert {e["key"]: e["reason"] for e in manifest.skipped} == {"only/cut.jpg": "truncated",
                                                                   "only/notes.jpg": "not an image"}

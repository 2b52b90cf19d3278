"""Image sources: folder (ImageFolder, iNat 2021 names, flat), list file, WebDataset tars, synthetic
concepts; corrupt files are skipped and logged; positions and worker sharding keep the order."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from vlmsae.data.concepts import concept_classes, ensure_concept_images, make_concept_images
from vlmsae.data.images import SkipLog, iter_images, list_file, list_folder

INAT = ["00000_Animalia_Annelida_Clitellata_Crassiclitellata_Lumbricidae_Lumbricus_terrestris",
        "00001_Plantae_Tracheophyta_Magnoliopsida_Rosales_Rosaceae_Rosa_canina"]


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
    _write_wds(tmp_path / "train-000000.tar", [
        ("s000", {"png": _png_bytes(1), "cls": b"3"}),
        ("s001", {"jpg": b"garbage", "cls": b"4"}),
    ])
    _write_wds(tmp_path / "train-000001.tar", [
        ("s002", {"png": _png_bytes(2), "json": json.dumps({"label": 9}).encode()}),
        ("s003", {"txt": b"no image"}),
        ("s004", {"png": _png_bytes(3)}),
    ])
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

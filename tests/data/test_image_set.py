"""vlmsae.data.image_set: the typed images of the metric jobs (a data node's source, root, cap, batch size)."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from vlmsae.data.image_set import ImageSet


def _node(**over):
    return {"source": "folder", "root": None, "max_images": None, "batch_size": 4, "seed": 0, "extra": {}, **over}


@pytest.fixture
def folder(tmp_path):
    for cls in ("cat", "dog"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(tmp_path / "imgs" / cls / f"{i}.png")
    return tmp_path / "imgs"


def test_from_data_refuses_non_image_sources_naming_job_and_fix():
    with pytest.raises(
        ValueError,
        match=r"hierarchy reads images: data.source='acts' must be folder, list, wds or "
        r"synthetic \(or pass ms_run",
    ):
        ImageSet.from_data(_node(source="acts"), job="hierarchy", hint=" (or pass ms_run=<dir>)")


def test_listing_caps_and_records(folder):
    images = ImageSet.from_data(_node(root=str(folder), max_images=4), job="monosemanticity")
    assert images.listable and images.synthetic is None and images.batch_size == 4
    listing = images.listing()
    assert listing.classes == ["cat", "dog"] and len(images.items(listing)) == 4
    assert [r.key for r in images.records()] == [k for k, _, _ in images.items(listing)]
    assert len(list(images.records(max_images=2))) == 2  # a lower cap wins
    assert len(list(images.records(max_images=10))) == 4  # a higher one never lifts the data cap
    uncapped = ImageSet.from_data(_node(root=str(folder)), job="monosemanticity")
    assert len(list(uncapped.records(max_images=5))) == 5 and len(list(uncapped.records())) == 6


def test_where_names_the_origin_of_relative_keys(folder, tmp_path):
    a = ImageSet.from_data(_node(root=str(folder)), job="x")
    assert json.loads(a.where())["root"] == str(folder.resolve())
    assert a.where() != ImageSet.from_data(_node(root=str(tmp_path)), job="x").where()
    s1 = ImageSet.from_data(_node(source="synthetic", extra={"size": 32}), job="x")
    s2 = ImageSet.from_data(_node(source="synthetic", extra={"size": 48}), job="x")
    assert s1.synthetic["size"] == 32 and s1.where() != s2.where()
    assert not ImageSet.from_data(_node(source="wds", root="a.tar"), job="x").listable

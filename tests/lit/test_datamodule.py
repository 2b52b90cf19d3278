"""The training datamodules (vlmsae.lit.datamodule) at scale: O(1) resume seek (rows read do not grow with
the step), exact resumed batches, validation held out by image, clear answers for small or odd stores, and
data=images epochs that visit the images in a fresh order."""

from __future__ import annotations

import functools
import json
import logging
import operator
from types import SimpleNamespace

import pytest
import torch

import vlmsae.data.stream as stream_mod
from vlmsae.data.shards import iter_chunks, list_shards
from vlmsae.data.store import check_store_width, open_store, write_acts_store
from vlmsae.data.stream import StreamConfig
from vlmsae.lit.datamodule import ActsDataModule

D = 8


def _store(tmp_path, n_rows=960, rows_per_chunk=40, chunks_per_shard=3, rows_per_image=1, name="acts"):
    """Column 0 holds the image id (row // rows_per_image), column 1 the row id: both traceable."""
    acts = torch.randn(n_rows, D)
    acts[:, 0] = torch.arange(n_rows) // rows_per_image
    acts[:, 1] = torch.arange(n_rows)
    return write_acts_store(
        tmp_path / name,
        acts.to(torch.float32),
        rows_per_chunk,
        chunks_per_shard,
        dtype="float32",
        rows_per_image=rows_per_image,
    )


def _col(batches, c: int) -> list[int]:
    return [int(v) for b in batches for v in b[:, c].round().tolist()]


def _dm(store, trainer=None, **kw) -> ActsDataModule:
    cfg = dict(batch_size=20, shuffle_buffer=100, num_workers=0, val_fraction=0.1)
    cfg.update(kw)
    dm = ActsDataModule(store, StreamConfig(**cfg))
    dm.trainer = trainer
    dm.setup("fit")
    return dm


def _fake_trainer(rank=0, world=1, step=0):
    return SimpleNamespace(global_rank=rank, world_size=world, global_step=step)


# ------------------------------------------------------------------------------- O(1) resume
def test_resume_reads_only_the_current_window_whatever_the_step(tmp_path, monkeypatch):
    store = _store(tmp_path)  # 24 chunks of 40 rows in 8 shards; 48 batches of 20 per epoch
    dm = _dm(store, val_fraction=0.0)
    decoded = []

    def counting_iter_chunks(*args, **kwargs):
        for chunk in iter_chunks(*args, **kwargs):
            decoded.append(chunk["acts"].shape[0])
            yield chunk

    monkeypatch.setattr(stream_mod, "iter_chunks", counting_iter_chunks)
    window, chunk = 100, 40
    bound = (window // chunk + 2) * chunk  # the chunks a window overlaps (+ one straddling chunk)
    read = {}
    for step in (3, 300, 3001):  # 300 and 3001 batches are ~6 and ~60 epochs in
        decoded.clear()
        next(iter(dm.train_stream(skip_batches=step)))
        read[step] = sum(decoded)
    assert all(0 < n <= bound for n in read.values()), read
    assert max(read.values()) <= bound < 300 * 20  # replaying would have decoded every earlier row


@pytest.mark.parametrize("workers", [0, 2])
def test_resumed_batches_equal_the_uninterrupted_run(tmp_path, workers):
    store = _store(tmp_path, n_rows=600, rows_per_image=2)  # 5 shards -> image-hash holdout, across epochs
    dm = _dm(store, num_workers=workers, val_fraction=0.1)
    assert dm.train_keep[0] == "train"

    def loader(skip):
        return torch.utils.data.DataLoader(dm.train_stream(skip_batches=skip), batch_size=None, num_workers=workers)

    ref = [b for b, _ in zip(loader(0), range(90))]  # ~3 epochs
    for skip in (1, 29, 61):
        got = [b for b, _ in zip(loader(skip), range(90 - skip))]
        assert len(got) == 90 - skip
        assert all(torch.equal(a, b) for a, b in zip(ref[skip:], got)), f"skip={skip} workers={workers}"


def test_datamodule_state_round_trip_seeks_and_falls_back_on_changes(tmp_path, caplog):
    store = _store(tmp_path)
    dm = _dm(store, trainer=_fake_trainer(step=37))
    state = dm.state_dict()
    assert state["batches_seen"] == 37 and state["store"]["n_rows"] == 960 and state["layout"]["window"] == 100
    fresh = _dm(store)
    fresh.load_state_dict(state)
    assert fresh.batches_seen == 37
    ref = [b for b, _ in zip(_dm(store).train_stream(), range(40))]
    got = next(iter(fresh.train_dataloader()))
    assert torch.equal(got, ref[37])
    # a different batch size or store: the position is meaningless, restart with a warning
    other = _dm(_store(tmp_path, n_rows=480, name="other"))
    with caplog.at_level(logging.WARNING):
        other.load_state_dict(state)
    assert other.batches_seen == 0 and "restarts from its beginning" in caplog.text and "store" in caplog.text
    caplog.clear()
    smaller = _dm(store, batch_size=10)
    with caplog.at_level(logging.WARNING):
        smaller.load_state_dict(state)
    assert smaller.batches_seen == 0 and "batch size 20 -> 10" in caplog.text
    # a different worker count keeps the position but says the order differs
    caplog.clear()
    more = _dm(store, num_workers=2)
    more.load_state_dict(state)
    with caplog.at_level(logging.WARNING):
        more.train_dataloader()
    assert more.batches_seen == 37 and "row order differs" in caplog.text


# --------------------------------------------------------------------- validation by image
@pytest.mark.parametrize("kind", ["random_k", "single_chunk", "shard_split"])
def test_validation_images_never_train(tmp_path, kind):
    if kind == "random_k":  # 2 rows per image, 5 shards: too few for whole-shard holdout at 10%
        store, n_images, frac = _store(tmp_path, n_rows=600, rows_per_image=2), 300, 0.1
    elif kind == "single_chunk":  # one chunk of 4 rows per image
        store, n_images, frac = (
            _store(tmp_path, n_rows=400, rows_per_chunk=400, chunks_per_shard=1, rows_per_image=4),
            100,
            0.1,
        )
    else:  # 8 shards: 2 held out whole; extraction keeps each image inside one shard
        store, n_images, frac = _store(tmp_path, n_rows=960, rows_per_image=4), 240, 0.25
    dm = _dm(store, val_fraction=frac)
    assert (dm.train_keep == ("all",)) == (kind == "shard_split")
    val = set(_col(dm.val_stream(), 0))
    n_per_epoch = dm._rows_in(dm.train_fpaths, dm.train_keep) // 20
    train = set(_col((b for b, _ in zip(dm.train_stream(), range(4 * n_per_epoch))), 0))
    assert val and train and not (val & train)
    assert val | train == set(range(n_images))


def test_holdout_is_by_image_not_row_position(tmp_path):
    store = _store(tmp_path, n_rows=600, rows_per_image=2)
    dm = _dm(store, val_fraction=0.1)
    val_rows = _col(dm.val_stream(), 1)
    assert sorted(val_rows) == [r for r in range(600) if (r // 2) % 10 == 0]  # both rows of every 10th image


# ------------------------------------------------------------------ small or odd stores
def test_store_smaller_than_one_batch_names_the_numbers(tmp_path):
    store = _store(tmp_path, n_rows=1000, rows_per_chunk=500, chunks_per_shard=2)  # 1,000 CLS rows, one shard
    # validation holds out 20% (the cap of the one-batch floor), every 5th image
    with pytest.raises(
        ValueError,
        match=r"acts has 800 training rows \(200 held out.*data.batch_size=4096.*"
        r"Lower data.batch_size \(<= 800\)",
    ):
        _dm(store, batch_size=4096, shuffle_buffer=16384, val_fraction=0.1)


def test_validation_holds_out_one_batch_by_image_and_warns_when_the_store_is_too_small(tmp_path, caplog):
    # 128 images of 1 row at val_fraction 0.01 held out 2 rows: now at least one batch, whole images
    store = _store(tmp_path, n_rows=128, rows_per_chunk=32, chunks_per_shard=4)
    with caplog.at_level(logging.WARNING):
        dm = _dm(store, batch_size=16, shuffle_buffer=32, val_fraction=0.01)
    val = _col(dm.val_stream(), 0)
    assert dm.n_val_rows == len(val) >= 16 and not caplog.text
    assert sorted(val) == [i for i in range(128) if i % dm.val_keep[1] == 0]
    # 8 shards of 120 rows at 1% (10 rows) and a batch of 100: one whole shard (120 rows) instead of 0 shards
    big = _store(tmp_path, n_rows=960, rows_per_image=4, name="big")
    dm = _dm(big, batch_size=100, val_fraction=0.01)
    assert dm.train_keep == ("all",) and len(dm.val_fpaths) == 1 and dm.n_val_rows == 120
    # too small for one batch: at most 20% of the rows, and a warning with the numbers
    with caplog.at_level(logging.WARNING):
        dm = _dm(store, batch_size=100, shuffle_buffer=100, val_fraction=0.01)
    assert dm.n_val_rows <= 0.2 * 128 + 1
    assert f"holds out only {dm.n_val_rows} of its 128 rows" in caplog.text and "data.batch_size=100" in caplog.text


def test_fewer_shards_than_workers_adapts_and_fewer_than_ranks_fails(tmp_path, caplog):
    store = _store(tmp_path, n_rows=80, chunks_per_shard=2)  # one shard of 2 chunks
    with caplog.at_level(logging.WARNING):
        dm = _dm(store, num_workers=4, val_fraction=0.0)
        workers = dm.train_workers()
    assert workers == 2 and "data.num_workers=4 lowered to 2" in caplog.text
    loader = torch.utils.data.DataLoader(dm.train_stream(), batch_size=None, num_workers=workers)
    assert len([b for b, _ in zip(loader, range(30))]) == 30  # every worker fills batches, epoch after epoch
    with pytest.raises(ValueError, match=r"1 training shard\(s\) in .*acts for 2 ranks.*fewer devices"):
        _dm(store, trainer=_fake_trainer(world=2), val_fraction=0.0)


def test_shuffle_buffer_smaller_than_a_batch_works(tmp_path):
    store = _store(tmp_path)
    dm = _dm(store, batch_size=50, shuffle_buffer=7, val_fraction=0.0)
    batches = [b for b, _ in zip(dm.train_stream(), range(19))]
    assert all(b.shape == (50, D) for b in batches)
    assert len(set(_col(batches, 1))) == 19 * 50  # one epoch: no row twice


@pytest.mark.parametrize(
    "edit, match",
    [
        ({"complete": False}, r"incomplete \(complete=False"),
        ({"n_rows": None}, r"incomplete .*n_rows=None"),
    ],
)
def test_incomplete_manifest_fails(tmp_path, edit, match):
    store = _store(tmp_path)
    manifest = json.loads((store / "manifest.json").read_text())
    for key, value in edit.items():
        if value is None:
            del manifest[key]
        else:
            manifest[key] = value
    (store / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=match + r".*re-running the same"):
        open_store(store)


def test_truncated_shard_fails_naming_the_file(tmp_path):
    store = _store(tmp_path)
    shard = list_shards(store)[3]
    shard.write_bytes(shard.read_bytes()[:3000])
    with pytest.raises(ValueError, match=rf"{shard.name}.*(truncated|not a readable tar)"):
        _dm(store)


def test_corrupt_chunk_fails_naming_the_shard(tmp_path):
    store = _store(tmp_path)
    shard = list_shards(store)[1]
    data = bytearray(shard.read_bytes())
    at = data.index(b'"dtype"')  # inside the first chunk's safetensors header: no longer JSON
    data[at : at + 7] = b"#######"
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=rf"{shard.name}: chunk \d+ is corrupt"):
        _dm(store)
    with pytest.raises(ValueError, match=rf"{shard.name}: chunk \d+ is corrupt"):  # the reader says so too
        list(iter_chunks([shard]))


def test_store_width_must_match_the_sae(tmp_path):
    store = _store(tmp_path)
    assert check_store_width(store, D) == D
    with pytest.raises(ValueError, match=rf"acts has d={D} .*expects d_in=16"):
        check_store_width(store, 16)
    with pytest.raises(ValueError, match="width mismatch"):
        ActsDataModule(store, StreamConfig(batch_size=20, num_workers=0), d_expected=16)
    manifest = json.loads((store / "manifest.json").read_text())
    manifest["d"] = 12  # chunks of width 8 under a manifest that says 12: a mixed store
    (store / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"acts-000000.tar: chunk 0 has rows of shape \[40, 8\].*d=12"):
        ActsDataModule(store, StreamConfig(batch_size=20, num_workers=0))


# ---------------------------------------------------------------------- data=images epochs
class _PixelTap(torch.nn.Module):
    """A stand-in encoder: the row of an image is its red value at (0, 0), so rows name their image."""

    has_cls = True

    def __init__(self):
        super().__init__()
        self.p = torch.nn.Parameter(torch.zeros(1))

    def preprocess(self, image):
        return torch.tensor([float(image.getpixel((0, 0))[0])] * 4)

    def forward_to(self, x, layer):
        return x


def test_images_epochs_visit_a_fresh_permutation_and_hold_out_by_listing_index(tmp_path, monkeypatch):
    from PIL import Image

    import vlmsae.models.image_rows as image_rows
    from vlmsae.models.image_rows import ImageChunkMaker

    root = tmp_path / "imgs"
    root.mkdir()
    for i in range(40):
        Image.new("RGB", (4, 4), (i, 0, 0)).save(root / f"im{i:03d}.png")
    monkeypatch.setattr(image_rows, "load_tap", lambda spec: _PixelTap())
    common = dict(
        model_spec=SimpleNamespace(device="cpu"),
        image_kwargs={"source": "folder", "root": str(root)},
        layer="last",
        tokens="cls",
        k_tokens=1,
        images_per_forward=3,
        seed=0,
        holdout_every=5,
    )
    train, val = ImageChunkMaker(split="train", **common), ImageChunkMaker(split="val", **common)

    def ids(maker, epoch, part=0, n_parts=1):
        return [int(v) for rows in maker(epoch, part, n_parts) for v in rows[:, 0].tolist()]

    e0, e1 = ids(train, 0), ids(train, 1)
    train_images = [i for i in range(40) if i % 5]
    assert sorted(e0) == sorted(e1) == train_images
    assert e0 != e1 and e0 != train_images  # a fresh order every epoch, not file order
    assert e0 == ids(train, 0)  # seeded
    assert ids(val, 0) == ids(val, 3) == list(range(0, 40, 5))  # validation: stable images, file order
    parts = [ids(train, 2, p, 3) for p in range(3)]  # ranks x workers split one epoch's permutation
    assert sorted(functools.reduce(operator.iadd, parts, [])) == train_images

"""The activation row stream (vlmsae.data.stream): disjoint equal rank/worker streams, reshuffled epochs,
bounded memory, exact fast-forward on resume, and clear errors for bad stores."""

from __future__ import annotations

import shlex

import numpy as np
import pytest
import torch

from vlmsae.data.store import open_store, write_acts_store
from vlmsae.data.stream import RowShuffleBuffer, ShardRowStream, StreamConfig
from vlmsae.lit.datamodule import ActsDataModule

D = 8


def _ids_store(tmp_path, n_rows=960, rows_per_chunk=40, chunks_per_shard=3):
    """A store whose first column is the row id, so every row can be traced through the stream."""
    acts = torch.randn(n_rows, D).to(torch.float16)
    acts[:, 0] = torch.arange(n_rows, dtype=torch.float32).to(torch.float16) if n_rows <= 2048 else 0
    return write_acts_store(tmp_path / "acts", acts, rows_per_chunk, chunks_per_shard)


def _ids(batches) -> list[int]:
    return [int(v) for b in batches for v in b[:, 0].float().round().tolist()]


def _stream(store, **kw):
    from vlmsae.data.shards import list_shards

    kw.setdefault("batch_size", 20)
    kw.setdefault("shuffle_buffer", 100)
    kw.setdefault("seed", 0)
    return ShardRowStream([str(p) for p in list_shards(store)], **kw)


def test_rank_and_worker_split_disjoint_equal_and_complete(tmp_path):
    store = _ids_store(tmp_path)  # 24 chunks in 8 shards
    per_part = []
    world, workers = 2, 2
    for rank in range(world):
        stream = _stream(store, rank=rank, world_size=world, n_epochs=1)
        for worker in range(workers):
            per_part.append([r for rows in stream.rows_from(stream.plan(0, worker, workers), 0) for r in _ids([rows])])
    sets = [set(p) for p in per_part]
    for i in range(len(sets)):
        for j in range(i + 1, len(sets)):
            assert not sets[i] & sets[j], f"parts {i} and {j} overlap"
    assert set().union(*sets) == set(range(960))
    assert len({len(p) for p in per_part}) == 1, [len(p) for p in per_part]


def test_fewer_shards_than_workers_splits_by_chunk(tmp_path):
    store = _ids_store(tmp_path, n_rows=480, chunks_per_shard=12)  # 1 shard, 12 chunks
    stream = _stream(store, n_epochs=1)
    parts = [set(_ids(list(stream.rows_from(stream.plan(0, w, 3), 0)))) for w in range(3)]
    assert all(len(p) == 160 for p in parts)
    assert not (parts[0] & parts[1]) and not (parts[1] & parts[2])


def test_ranks_get_equal_batch_counts_through_dataloader(tmp_path):
    # Uneven shards per rank (5 shards, 2 ranks): the infinite stream still gives each rank what it asks.
    store = _ids_store(tmp_path, n_rows=600, chunks_per_shard=3)
    counts = []
    for rank in range(2):
        loader = torch.utils.data.DataLoader(_stream(store, rank=rank, world_size=2), batch_size=None, num_workers=2)
        it = iter(loader)
        counts.append(sum(1 for _ in range(37) if next(it) is not None))
    assert counts == [37, 37]


def test_epochs_reshuffle_and_cover_every_row(tmp_path):
    store = _ids_store(tmp_path)
    e0 = _ids(_stream(store, n_epochs=1, drop_last=False))
    e1 = _ids(_stream(store, n_epochs=1, drop_last=False, start_epoch=1))
    assert sorted(e0) == sorted(e1) == list(range(960))
    assert e0 != e1
    # one infinite stream: the second pass is not a replay of the first
    inf = _ids(b for b, _ in zip(_stream(store), range(2 * 960 // 20)))
    assert inf[:960] != inf[960:]
    # the same seed gives the same order (reproducible runs)
    assert e0 == _ids(_stream(store, n_epochs=1, drop_last=False))


def test_shuffle_buffer_memory_is_bounded():
    rng = np.random.default_rng(0)
    buf = RowShuffleBuffer(capacity=64, batch_size=16, rng=rng)
    n_out = 0
    peak = 0
    for c in range(200):  # 200 chunks x 50 rows streamed through a 64-row buffer
        rows = torch.full((50, 4), float(c))
        for batch in buf.add(rows):
            assert batch.shape == (16, 4)
            n_out += 16
        peak = max(peak, buf.buf_QD.shape[0] + buf.n_pending)
    assert buf.buf_QD.shape[0] == 64
    assert peak < 64 + 16 + 50
    n_out += sum(b.shape[0] for b in buf.flush(drop_last=False))
    assert n_out == 200 * 50


def test_shuffle_buffer_mixes_rows():
    buf = RowShuffleBuffer(capacity=200, batch_size=50, rng=np.random.default_rng(0))
    out = []
    for c in range(20):
        out += [b[:, 0] for b in buf.add(torch.arange(c * 50, c * 50 + 50, dtype=torch.float32)[:, None])]
    out += [b[:, 0] for b in buf.flush(drop_last=False)]
    ids = torch.cat(out).long().tolist()
    assert sorted(ids) == list(range(1000))
    assert ids != list(range(1000))


def test_skip_batches_fast_forwards_exactly(tmp_path):
    store = _ids_store(tmp_path)
    for workers in (0, 2):
        full = torch.utils.data.DataLoader(_stream(store), batch_size=None, num_workers=workers)
        ref = [b for b, _ in zip(full, range(30))]
        resumed = torch.utils.data.DataLoader(_stream(store, skip_batches=17), batch_size=None, num_workers=workers)
        got = [b for b, _ in zip(resumed, range(13))]
        assert all(torch.equal(a, b) for a, b in zip(ref[17:], got)), f"workers={workers}"


def test_datamodule_val_split_never_in_training(tmp_path):
    store = _ids_store(tmp_path)  # 8 shards
    for frac, shard_level in ((0.25, True), (0.05, False)):
        dm = ActsDataModule(store, StreamConfig(batch_size=20, shuffle_buffer=100, num_workers=0, val_fraction=frac))
        dm.setup("fit")
        val = set(_ids(dm.val_stream()))
        train = set(_ids(b for b, _ in zip(dm.train_stream(), range(100))))
        assert val and train and not (val & train)
        assert (dm.train_keep == ("all",)) == shard_level


def test_bad_store_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        open_store(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        open_store(tmp_path / "empty")
    with pytest.raises(ValueError, match="data.acts is not set"):
        open_store(None)
    store = _ids_store(tmp_path, n_rows=120, chunks_per_shard=3)  # 1 shard
    with pytest.raises(ValueError, match="every rank needs its own shard"):
        _stream(store, rank=1, world_size=2)


def test_fast_reader_matches_the_store_reader(tmp_path):
    from vlmsae.data.shards import iter_chunks, list_shards

    store = _ids_store(tmp_path)
    for fpath in list_shards(store):
        ours = list(iter_chunks([fpath], with_keys=False))  # what training reads: local, by member offset
        ref = list(iter_chunks([f"pipe:cat {shlex.quote(str(fpath))}"]))  # the streaming reader
        assert [c["chunk"] for c in ours] == [r["chunk"] for r in ref]
        assert all(torch.equal(c["acts"], r["acts"]) for c, r in zip(ours, ref))
    # chunks refused by the filter are skipped
    fpath = str(list_shards(store)[0])
    assert [c["chunk"] for c in iter_chunks([fpath], lambda i: i % 3 == 1)] == [1]


def test_single_chunk_store_holds_out_rows(tmp_path):
    store = _ids_store(tmp_path, n_rows=300, rows_per_chunk=300, chunks_per_shard=1)  # one chunk in all
    dm = ActsDataModule(store, StreamConfig(batch_size=10, shuffle_buffer=50, num_workers=2, val_fraction=0.1))
    dm.setup("fit")
    assert dm.train_workers() == 0  # one chunk cannot feed two workers
    val = set(_ids(dm.val_stream()))
    train = set(_ids(b for b, _ in zip(dm.train_stream(), range(60))))
    assert val == set(range(0, 300, 10)) and train == set(range(300)) - val


def test_image_rows_stream_shows_the_shuffle_window_filling(capsys, compose_cfg):
    from vlmsae.data.stream import ImageRowsStream

    def make_chunks(epoch, part, n_parts):
        for i in range(40):
            yield torch.full((10, 4), float(i))

    stream = ImageRowsStream(make_chunks, 20, 200, 0, 0, 1, 1, progress=True)
    next(iter(stream))
    err = capsys.readouterr().err
    assert "filling the shuffle window" in err and "220" in err  # the window plus one batch, then the first batch
    quiet = ImageRowsStream(make_chunks, 20, 200, 0, 0, 1, 1)
    next(iter(quiet))
    assert "shuffle window" not in capsys.readouterr().err
    # data=images: the default window is one batch, so the first batch comes after two batches of rows
    data = compose_cfg("train", ["data=images", "data.root=/x"]).data
    assert data.shuffle_buffer == data.batch_size

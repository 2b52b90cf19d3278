"""Activation store: the tar/safetensors layout of ARCHITECTURE.md, exact round trips, statistics,
resume after a kill, and refusal to mix different extractions in one folder."""

from __future__ import annotations

import io
import json
import tarfile

import pytest
import torch

from vlmsae.data.shards import (
    ImageListDigest,
    RunningStats,
    ShardWriter,
    image_list_digest,
    iter_chunks,
    list_shards,
    read_rows,
)
from vlmsae.formats import PROGRESS_JSON, read_manifest


def _rows(n: int, d: int, start: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed + start)
    acts = torch.randn(n, d, generator=g) * 3 + 1
    token_idx = torch.arange(n, dtype=torch.long) % 5
    image_idx = torch.arange(start, start + n, dtype=torch.long)
    label = image_idx % 3
    keys = [f"img{int(i):04d}" for i in image_idx]
    return acts, token_idx, image_idx, label, keys


def test_layout_round_trip_and_manifest(tmp_path):
    writer = ShardWriter(tmp_path, d=6, dtype="float16", rows_per_chunk=4, rows_per_shard=10, meta={"model": "m"})
    parts = [_rows(5, 6, start) for start in (0, 5, 10, 15, 20)]
    for acts, tok, img, lab, keys in parts:
        writer.add(acts, tok, img, lab, keys)
        if writer.buffered_rows >= writer.rows_per_shard:
            writer.flush({"next": int(img[-1]) + 1})
    writer.flush({"next": 25, "done": True})
    manifest = writer.write_manifest(n_images=25)
    assert [p.name for p in list_shards(tmp_path)] == ["acts-000000.tar", "acts-000001.tar", "acts-000002.tar"]
    with tarfile.open(tmp_path / "acts-000000.tar") as tar:
        names = tar.getnames()
    assert names == [
        "000000.acts.safetensors",
        "000000.keys.json",
        "000001.acts.safetensors",
        "000001.keys.json",
        "000002.acts.safetensors",
        "000002.keys.json",
    ]  # 10 rows in chunks of 4, 4, 2
    chunks = list(iter_chunks(list_shards(tmp_path)))
    assert [c["chunk"] for c in chunks] == list(range(len(chunks)))  # global chunk index across shards
    assert chunks[0]["acts"].dtype == torch.float16 and chunks[0]["token_idx"].dtype == torch.int32
    assert chunks[0]["image_idx"].dtype == torch.int64 and chunks[0]["label"].dtype == torch.int64
    got = read_rows(tmp_path)
    want_acts = torch.cat([p[0] for p in parts]).half()
    assert torch.equal(got["acts"], want_acts)
    assert got["keys"] == [k for p in parts for k in p[4]]
    assert torch.equal(got["image_idx"], torch.arange(25)) and torch.equal(got["label"], torch.arange(25) % 3)
    on_disk = read_manifest(tmp_path)
    assert on_disk == manifest
    assert on_disk.n_rows == 25 and on_disk.n_shards == 3 and on_disk.model == "m" and on_disk.d == 6
    x = want_acts.double()
    torch.testing.assert_close(torch.tensor(on_disk.mean, dtype=torch.float64), x.mean(0))
    torch.testing.assert_close(torch.tensor(on_disk.var, dtype=torch.float64), x.var(0, unbiased=False))
    assert abs(on_disk.mean_sq_norm - float((x**2).sum(1).mean())) < 1e-9
    assert {"versions", "git_commit"} <= set(on_disk.to_dict())


def test_bf16_store(tmp_path):
    writer = ShardWriter(tmp_path, d=3, dtype="bfloat16", rows_per_shard=100)
    acts, tok, img, lab, keys = _rows(7, 3, 0)
    writer.add(acts, tok, img, lab, keys)
    writer.flush({})
    writer.write_manifest()
    assert torch.equal(read_rows(tmp_path)["acts"], acts.bfloat16())


def test_running_stats_merge_matches_direct():
    x = torch.randn(1000, 4, dtype=torch.float64) * 5 + 100  # a large offset tests the numerical care
    stats = RunningStats(4)
    for part in x.split(77):
        stats.update(part)
    stats = RunningStats.from_state(json.loads(json.dumps(stats.state_dict())))
    torch.testing.assert_close(stats.mean, x.mean(0))
    torch.testing.assert_close(stats.var, x.var(0, unbiased=False))


def test_resume_drops_shard_newer_than_progress_and_refuses_other_meta(tmp_path):
    meta = {"model": "m", "layer": 3}
    writer = ShardWriter(tmp_path, d=4, rows_per_shard=5, meta=meta)
    for start in (0, 5):
        writer.add(*_rows(5, 4, start))
        writer.flush({"next": start + 5})
    progress = (tmp_path / PROGRESS_JSON).read_text()
    writer.add(*_rows(5, 4, 10))
    writer.flush({"next": 15})
    # Simulate a kill after the third shard's rename but before its progress record, plus a temp file.
    (tmp_path / PROGRESS_JSON).write_text(progress)
    (tmp_path / ".acts-000003.abc.tmp").write_bytes(b"partial")
    resumed = ShardWriter(tmp_path, d=4, rows_per_shard=5, meta=meta)
    assert resumed.state == {"next": 10} and resumed.n_rows == 10 and resumed.n_shards == 2
    assert [p.name for p in list_shards(tmp_path)] == ["acts-000000.tar", "acts-000001.tar"]
    assert not list(tmp_path.glob(".acts-*.tmp"))
    assert resumed.stats.n == 10
    with pytest.raises(ValueError, match=r"different extraction.*\['layer'\]"):
        ShardWriter(tmp_path, d=4, rows_per_shard=5, meta={"model": "m", "layer": 4})
    with pytest.raises(FileNotFoundError, match="interrupted: rerun the same command"):
        read_manifest(tmp_path)


def test_image_list_digest_is_resumable_and_order_sensitive():
    keys = [f"k{i}" for i in range(ImageListDigest.BLOCK + 10)]
    one = image_list_digest(keys)
    digest = ImageListDigest()
    for key in keys[:5000]:
        digest.update(key)
    digest = ImageListDigest.from_state(json.loads(json.dumps(digest.state_dict())))
    for key in keys[5000:]:
        digest.update(key)
    assert digest.hexdigest() == one
    assert image_list_digest(keys[::-1]) != one and image_list_digest(keys[:-1]) != one


def test_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="Unknown store dtype 'int8'"):
        ShardWriter(tmp_path, d=2, dtype="int8")
    writer = ShardWriter(tmp_path, d=2)
    with pytest.raises(ValueError, match=r"Expected rows \[N, 2\]"):
        writer.add(torch.zeros(3, 5), torch.zeros(3), torch.zeros(3), torch.zeros(3), ["a"] * 3)


def test_streamed_reader_equals_the_local_reader_and_checks_chunks(tmp_path):
    """A shard that cannot be seeked (a URL, a pipe) is streamed: same chunks, keys and filter as a local file."""
    import shlex

    writer = ShardWriter(tmp_path, d=3, rows_per_chunk=2, rows_per_shard=5)
    writer.add(*_rows(5, 3, 0))
    writer.flush({})
    fpath = list_shards(tmp_path)[0]
    url = f"pipe:cat {shlex.quote(str(fpath))}"
    local, streamed = list(iter_chunks([fpath])), list(iter_chunks([url]))
    assert [c["chunk"] for c in local] == [c["chunk"] for c in streamed] == [0, 1, 2]
    for a, b in zip(local, streamed):
        assert a["keys"] == b["keys"]
        assert all(torch.equal(a[n], b[n]) for n in ("acts", "token_idx", "image_idx", "label"))
    assert [c["chunk"] for c in iter_chunks([url], lambda i: i != 1)] == [0, 2]
    assert "keys" not in next(iter_chunks([fpath], with_keys=False))
    # a chunk without its keys.json is refused by both readers
    with tarfile.open(fpath) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers() if m.name != "000001.keys.json"]
    broken = tmp_path / "broken.tar"
    with tarfile.open(broken, "w") as tar:
        for member, data in members:
            tar.addfile(member, io.BytesIO(data))
    for source in (broken, f"pipe:cat {shlex.quote(str(broken))}"):
        with pytest.raises(ValueError, match=r"incomplete chunk\(s\) \['000001'\]"):
            list(iter_chunks([source]))

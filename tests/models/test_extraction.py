"""Extraction split across torchrun ranks (``vlmsae.models.extraction.Ranks``): 2 gloo processes on CPU write
exactly the rows of 1 process, the merged manifest counts them, the training stream reads the store; a store is
never continued with another world size; ranks that see different image lists fail before any shard (slow)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vlmsae.data.concepts import make_concept_images
from vlmsae.data.shards import RANK_DIR_PATTERN, list_shards, rank_dpaths, read_rows
from vlmsae.data.store import open_store
from vlmsae.data.stream import ShardRowStream
from vlmsae.extract import run
from vlmsae.formats import read_manifest
from vlmsae.models.extraction import Ranks, StoreExtraction, check_world_size

ARGS = ["model=tiny", "data=folder", "data.images_per_forward=3", "data.num_workers=0", "layer=1", "tokens=patches"]
ARGS += ["rows_per_shard=40", "rows_per_chunk=16", "progress=false"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    return {**env, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "CUDA_VISIBLE_DEVICES": ""}


def _torchrun(nproc: int, tail: list[str]) -> list[str]:
    launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}"]
    return [*launcher, "--master_addr=127.0.0.1", f"--master_port={_free_port()}", *tail]


def _rows(dpath: Path) -> dict[tuple[str, int], torch.Tensor]:
    rows = read_rows(dpath)
    return {(key, int(t)): rows["acts"][i] for i, (key, t) in enumerate(zip(rows["keys"], rows["token_idx"]))}


@pytest.mark.slow
def test_two_ranks_write_the_rows_of_one_process(tmp_path, repo_root, compose_cfg):
    root = make_concept_images(tmp_path / "imgs", n_per_class=2, size=32, seed=3)
    (root / "cross_red" / "00000_bad.jpg").write_bytes(b"garbage")
    one, two = tmp_path / "one", tmp_path / "two"
    cfg = compose_cfg("extract", [*ARGS, f"data.root={root}"])
    run(cfg, one)  # one process (no WORLD_SIZE), in this process
    cmd = _torchrun(2, ["-m", "vlmsae.extract", *ARGS, f"data.root={root}", f"out={two}"])
    proc = subprocess.run(
        [*cmd, f"hydra.run.dir={tmp_path / 'hydra'}"], cwd=repo_root, env=_env(), capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]

    assert [p.name for p in rank_dpaths(two)] == [RANK_DIR_PATTERN % (r, 2) for r in range(2)]
    assert all(list_shards(p) for p in rank_dpaths(two)), "each rank writes its own shards"
    rows_one, rows_two = _rows(one), _rows(two)
    assert rows_one.keys() == rows_two.keys() and len(rows_one) > 0
    assert all(torch.equal(rows_one[k], rows_two[k]) for k in rows_one)
    m_one, m_two = read_manifest(one), read_manifest(two)
    assert (m_two.n_rows, m_two.n_images, m_two.n_skipped) == (m_one.n_rows, m_one.n_images, m_one.n_skipped)
    assert m_two.image_list_digest == m_one.image_list_digest and m_two.n_listed == m_one.n_listed
    assert m_two.n_shards == len(m_two.shards) == len(list_shards(two)) and m_two.extra["world_size"] == 2
    assert torch.allclose(torch.tensor(m_two.mean), torch.tensor(m_one.mean), atol=1e-6)
    assert torch.allclose(torch.tensor(m_two.var), torch.tensor(m_one.var), atol=1e-5)

    _, manifest, shard_fpaths = open_store(two)  # the training stream reads the 2-rank store, every row once
    stream = ShardRowStream(shard_fpaths, batch_size=8, shuffle_buffer=8, seed=0, n_epochs=1, drop_last=False)
    assert sum(batch.shape[0] for batch in stream) == manifest.n_rows

    # the 2-rank store is not continued by one process (nor the 1-process store by two: see below)
    with pytest.raises(ValueError, match=r"extracted by \[2\] torchrun processes .* world size 1"):
        run(cfg, two)


@pytest.mark.slow
def test_ranks_that_see_different_images_fail_before_any_shard(tmp_path, repo_root):
    make_concept_images(tmp_path / "r0", n_per_class=2, size=32, seed=3)
    make_concept_images(tmp_path / "r1", n_per_class=3, size=32, seed=3)
    out = tmp_path / "out"
    script = f"exec {sys.executable} -m vlmsae.extract {' '.join(ARGS)} data.root={tmp_path}/r$RANK out={out} "
    script += f"hydra.run.dir={tmp_path / 'hydra'}"
    proc = subprocess.run(
        _torchrun(2, ["--no-python", "sh", "-c", script]), cwd=repo_root, env=_env(), capture_output=True, text=True
    )
    assert proc.returncode != 0
    assert "the 2 torchrun ranks disagree on the image list" in proc.stderr
    assert "rank 0: {'listing_digest':" in proc.stderr and "rank 1: {'listing_digest':" in proc.stderr
    assert not rank_dpaths(out) and not list_shards(out)


def test_a_store_is_not_continued_with_another_world_size(tmp_path):
    (tmp_path / (RANK_DIR_PATTERN % (0, 4))).mkdir()
    with pytest.raises(ValueError, match=r"extracted by \[4\] torchrun processes .* world size 2"):
        check_world_size(tmp_path, 2)
    with pytest.raises(ValueError, match=r"extracted by \[4\] torchrun processes .* world size 1"):
        check_world_size(tmp_path, 1)
    check_world_size(tmp_path, 4)
    single = tmp_path / "single"
    single.mkdir()
    (single / "progress.json").write_text("{}")
    with pytest.raises(ValueError, match="holds a single-process extraction but this run has world size 2"):
        check_world_size(single, 2)
    check_world_size(single, 1)


class _RankOf(Ranks):
    """Rank ``rank`` of ``world`` in this process, without a process group: the other ranks are simulated by
    running them one after another (every rank sees the same images, so gathering repeats this rank's value)."""

    def gather(self, obj):
        return [obj] * self.world


def test_one_rank_killed_midway_then_rerun_ends_with_the_rows_of_an_uninterrupted_run(
    tmp_path, compose_cfg, monkeypatch
):
    from vlmsae.data.shards import ShardWriter

    root = make_concept_images(tmp_path / "imgs", n_per_class=2, size=32, seed=3)
    cfg = compose_cfg("extract", [*ARGS, f"data.root={root}", "rows_per_shard=16"])
    run(cfg, tmp_path / "one")  # one uninterrupted process
    monkeypatch.setattr(torch.distributed, "barrier", lambda *a, **k: None)  # the ranks run one after another here
    out, flush = tmp_path / "two", ShardWriter.flush

    def run_rank(rank: int, kill_at_flush: int | None = None):
        calls = {"n": 0}

        def flush_or_die(self, *args, **kwargs):
            calls["n"] += 1
            if calls["n"] == kill_at_flush:
                raise KeyboardInterrupt(f"rank {rank} killed at its shard {calls['n']}")
            return flush(self, *args, **kwargs)

        with monkeypatch.context() as patch:
            patch.setattr(ShardWriter, "flush", flush_or_die)
            patch.setattr(Ranks, "from_env", classmethod(lambda cls: _RankOf(rank=rank, world=2)))
            if rank != 0:  # under torchrun it waits in the barrier for rank 0's merged manifest; here it stops
                patch.setattr(StoreExtraction, "_merge", lambda self, seconds, n_new: {"n_new": n_new})
            return run(cfg, out)

    part1 = out / (RANK_DIR_PATTERN % (1, 2))
    with pytest.raises(KeyboardInterrupt, match="rank 1 killed"):
        run_rank(1, kill_at_flush=3)
    n_before = len(list_shards(part1))
    assert n_before == 2 and not (out / "manifest.json").exists()
    resumed1 = run_rank(1)  # rank 1 rerun: continues after its 2 shards
    with pytest.raises(KeyboardInterrupt, match="rank 0 killed"):
        run_rank(0, kill_at_flush=2)
    summary = run_rank(0)  # rank 0 rerun: finishes its part, then merges both
    rows_one, rows_two = _rows(tmp_path / "one"), _rows(out)
    assert rows_one.keys() == rows_two.keys() and len(rows_one) == summary["n_rows"] > 0
    assert all(torch.equal(rows_one[k], rows_two[k]) for k in rows_one)
    m_one, m_two = read_manifest(tmp_path / "one"), read_manifest(out)
    assert (m_two.n_rows, m_two.n_images) == (m_one.n_rows, m_one.n_images) and m_two.extra["world_size"] == 2
    assert len(list_shards(part1)) > n_before
    assert 0 < resumed1["n_new"] < m_one.n_listed - m_one.n_listed // 2  # fewer images than rank 1's block

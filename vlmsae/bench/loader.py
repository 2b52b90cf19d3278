"""Data-loader benchmark: rows/s the training stream reads from activation shards (d = 1024, fp16).

Issue 9 asks that the loader never be the bottleneck: shards must be read at least 5x faster than
the training step consumes rows. This module measures both sides on the same machine:

* ``loader_rows_per_s`` (and ``_w0`` / ``_w2`` per DataLoader worker count): batches of 4096 rows
  streamed through :class:`vlmsae.data.stream.ShardRowStream` exactly as training reads them
  (shard shuffling, a 16k-row shuffle buffer, tar + safetensors decoding);
* ``loader_train_step_rows_per_s``: a full BatchTopK training step (loss, backward, decoder-gradient
  projection, clip, Adam, renormalisation) at 8192 latents on fp32 CPU;
* ``loader_vs_train_ratio`` = the first over the second (target >= 5), ``loader_rss_growth_mb``:
  resident memory added while streaming the whole store (flat = independent of the store size).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from vlmsae.data.shards import list_shards
from vlmsae.data.store import write_acts_store
from vlmsae.data.stream import ShardRowStream
from vlmsae.sae import SAEConfig, build_sae, make_optimizer, sae_step

D = 1024
BATCH = 4096


def _rss_mb() -> float:
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):
        return float("nan")


def _stream_rate(shard_fpaths: list[str], workers: int, n_batches: int) -> tuple[float, float]:
    stream = ShardRowStream(shard_fpaths, batch_size=BATCH, shuffle_buffer=16384, seed=0)
    loader = DataLoader(stream, batch_size=None, num_workers=workers, prefetch_factor=4 if workers else None)
    it = iter(loader)
    next(it)  # worker start-up and buffer fill are not throughput
    rss0 = _rss_mb()
    start = time.perf_counter()
    rows = 0
    for _ in range(n_batches):
        rows += next(it).shape[0]
    elapsed = time.perf_counter() - start
    growth = _rss_mb() - rss0
    del it, loader
    return rows / elapsed, growth


def _train_step_rate(n_latents: int, batch: int, n_steps: int) -> float:
    sae = build_sae(SAEConfig(arch="batchtopk", d_in=D, n_latents=n_latents, k=20), seed=0)
    optimizer, _ = make_optimizer(sae.parameters(), lr=1e-4)
    x = torch.randn(batch, D)
    sae_step(sae, x, optimizer)  # warm-up
    start = time.perf_counter()
    for _ in range(n_steps):
        sae_step(sae, x, optimizer)
    return batch * n_steps / (time.perf_counter() - start)


def run(quick: bool = False) -> dict:
    """Loader and training-step throughput; see the module docstring for the keys."""
    n_rows = 32_768 if quick else 262_144  # 64 MB / 512 MB of fp16 rows
    with tempfile.TemporaryDirectory(prefix="vlmsae-loader-bench-", ignore_cleanup_errors=True) as tmp_name:
        tmp = Path(tmp_name)
        gen = torch.Generator().manual_seed(0)
        acts = torch.randn(n_rows, D, generator=gen).to(torch.float16)
        write_acts_store(tmp / "acts", acts, rows_per_chunk=4096, chunks_per_shard=4, meta={"model": "bench"})
        del acts
        fpaths = [str(p) for p in list_shards(tmp / "acts")]
        n_batches = 8 if quick else 48
        results: dict = {
            "loader_d": D,
            "loader_batch_size": BATCH,
            "loader_dtype": "float16",
            "loader_store_rows": n_rows,
            "loader_shards": len(fpaths),
        }
        for workers in (0, 2):
            rate, growth = _stream_rate(fpaths, workers, n_batches)
            results[f"loader_rows_per_s_w{workers}"] = rate
            results[f"loader_rss_growth_mb_w{workers}"] = growth
        results["loader_rows_per_s"] = max(results["loader_rows_per_s_w0"], results["loader_rows_per_s_w2"])
        results["loader_rss_growth_mb"] = results["loader_rss_growth_mb_w0"]
        train_batch = 1024 if quick else BATCH
        train = _train_step_rate(n_latents=8192, batch=train_batch, n_steps=1 if quick else 3)
        results["loader_train_step_rows_per_s"] = train
        results["loader_train_step_n_latents"] = 8192
        results["loader_vs_train_ratio"] = results["loader_rows_per_s"] / train
        results["loader_meets_5x"] = bool(results["loader_vs_train_ratio"] >= 5.0)
        return results


if __name__ == "__main__":
    print(json.dumps(run(quick=True), indent=2))

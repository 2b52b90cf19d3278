"""Many SAEs per pass benchmark (``sae_grid=``, :mod:`vlmsae.lit.fit`): N = 4 SAEs trained in one pass
over an activation store against 4 separate ``vlmsae.train`` runs over the same store.

``train_many_speedup`` = (time of the 4 separate runs) / (time of the one 4-SAE pass): what reading and
shuffling each batch once, and starting Lightning once, saves. Both sides go through ``vlmsae.train.run``
on CPU (fp32), the same steps and batch size; the grid is 2 expansions x 2 k of BatchTopK.
``make bench-gpu`` runs the same comparison with ``trainer=gpu`` (:func:`run`, keys ``gpu_train_many_*``).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from vlmsae.data.store import write_acts_store
from vlmsae.demo import compose
from vlmsae.train import run as train_run

GRID = [(4, 8), (4, 16), (8, 8), (8, 16)]  # (expansion, k)


def run(quick: bool = False, trainer: str = "cpu", prefix: str = "train_many") -> dict:
    """N = 4 separate runs vs one 4-SAE pass on ``trainer`` (a conf/trainer choice: cpu | gpu); keys ``<prefix>_*``."""
    d, rows, steps, batch = (64, 4000, 20, 128) if quick else (256, 60_000, 200, 1024)
    with tempfile.TemporaryDirectory(prefix="vlmsae-bench-many-", ignore_cleanup_errors=True) as tmp_name:
        tmp = Path(tmp_name)
        x = torch.randn(rows, d, generator=torch.Generator().manual_seed(0))
        store = write_acts_store(tmp / "acts", x.half(), rows_per_chunk=1000, chunks_per_shard=4, meta={"layer": 2})
        common = [
            "data=acts",
            f"data.acts={store}",
            f"data.batch_size={batch}",
            "data.num_workers=0",
            f"trainer.max_steps={steps}",
            f"trainer.val_check_interval={steps}",
            f"trainer.checkpoint_every_n_steps={steps}",
            "logger=none",
            f"trainer={trainer}",
            f"model.width={d}",
        ]
        start = time.perf_counter()
        for i, (expansion, k) in enumerate(GRID):
            train_run(
                compose("train", [*common, f"sae.expansion={expansion}", f"sae.k={k}"]), out_dpath=tmp / f"single{i}"
            )
        separate_s = time.perf_counter() - start
        grid = "[" + ",".join(f"{{expansion:{e},k:{k}}}" for e, k in GRID) + "]"
        start = time.perf_counter()
        train_run(compose("train", [*common, f"sae_grid={grid}"]), out_dpath=tmp / "many")
        pass_s = time.perf_counter() - start
    return {
        f"{prefix}_n_saes": len(GRID),
        f"{prefix}_d_in": d,
        f"{prefix}_steps": steps,
        f"{prefix}_batch_size": batch,
        f"{prefix}_trainer": trainer,
        f"{prefix}_separate_s": separate_s,
        f"{prefix}_pass_s": pass_s,
        f"{prefix}_speedup": separate_s / pass_s,
    }

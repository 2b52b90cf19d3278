"""Many SAEs per pass (vlmsae.lit.many, ``sae_grid=``): each SAE ends exactly where a separate single-SAE run
with the same seed and data order ends; resume restores every SAE; bad grids fail naming the entry."""

from __future__ import annotations

import json
import subprocess
import sys

import lightning as L
import pytest
import torch

from vlmsae.data.store import write_acts_store
from vlmsae.lit.many import resolve_grid
from vlmsae.sae import load_sae
from vlmsae.train import run

GRID = "[{expansion:4,k:8},{expansion:8,k:4,arch:topk,lr:0.003},{expansion:2,k:8,arch:relu}]"
SINGLE = [  # the same SAEs as separate runs
    ["sae.expansion=4", "sae.k=8"],
    ["sae.expansion=8", "sae.k=4", "sae.arch=topk", "trainer.lr=0.003"],
    ["sae.expansion=2", "sae.k=8", "sae.arch=relu"],
]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    x = torch.randn(3000, 64, generator=torch.Generator().manual_seed(0)) * 3 + 1
    dpath = tmp_path_factory.mktemp("acts") / "layer2"
    return write_acts_store(dpath, x.half(), rows_per_chunk=250, chunks_per_shard=4, meta={"model": "tiny", "layer": 2})


def _over(store, steps, *extra):
    return [
        "data=acts",
        f"data.acts={store}",
        "data.batch_size=64",
        "data.num_workers=0",
        "data.shuffle_buffer=512",
        f"trainer.max_steps={steps}",
        "trainer.val_check_interval=1000",
        "trainer.checkpoint_every_n_steps=10",
        "trainer.warmup_steps=5",
        "sae.threshold_start_step=8",  # the threshold EMA runs too
        "logger=csv",
        *extra,
    ]


def _assert_same(a_dpath, b_dpath):
    a, b = load_sae(a_dpath), load_sae(b_dpath)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key], rtol=0, atol=1e-6, msg=f"{key} differs")


@pytest.fixture(scope="module")
def many_run(store, tmp_path_factory):
    """The grid trained for 20 steps in one pass: (run dir, returned metrics)."""
    from hydra import compose, initialize_config_dir

    from vlmsae.config import conf_dir, register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose(config_name="train", overrides=_over(store, 20, f"sae_grid={GRID}"))
    out = tmp_path_factory.mktemp("many")
    return out, run(cfg, out_dpath=out)


def test_each_grid_sae_equals_its_separate_run(compose_cfg, store, many_run, tmp_path):
    many, metrics = many_run
    assert list(metrics) == ["sae_0", "sae_1", "sae_2"]
    assert [m["arch"] for m in metrics.values()] == ["batchtopk", "topk", "relu"]
    assert metrics["sae_1"]["lr"] == 0.003 and metrics["sae_1"]["n_latents"] == 512
    for i, extra in enumerate(SINGLE):
        m = metrics[f"sae_{i}"]
        assert m["step"] == 20 and m["optimizer_steps"] == 20  # one Adam step per batch, per SAE
        run(compose_cfg("train", _over(store, 20, *extra)), out_dpath=tmp_path / f"single{i}")
        _assert_same(many / f"sae_{i}" / "sae", tmp_path / f"single{i}" / "sae")
        single = json.loads((tmp_path / f"single{i}" / "metrics.json").read_text())
        assert json.loads((many / f"sae_{i}" / "metrics.json").read_text())["fve"] == single["fve"]
    assert json.loads((many / "metrics.json").read_text()).keys() == metrics.keys()
    for i in range(3):  # each SAE's own logger run, under a single run's metric names
        header = (many / f"sae_{i}" / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
        assert "train/loss" in header and "val/fve" in header and not any(h.startswith("sae_") for h in header)
    assert not (many / "csv").exists()


class _Kill(Exception):
    pass


class _StopAt(L.Callback):
    def __init__(self, step):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            raise _Kill(f"killed at {self.step}")


def test_resume_restores_every_sae(compose_cfg, store, many_run, tmp_path):
    over = _over(store, 20, f"sae_grid={GRID}")
    with pytest.raises(_Kill):  # killed at step 15, after the step-10 checkpoint
        run(compose_cfg("train", over), out_dpath=tmp_path / "runs" / "killed", callbacks=[_StopAt(15)])
    metrics = run(compose_cfg("train", [*over, "resume=true"]), out_dpath=tmp_path / "runs" / "resumed")
    for i in range(3):
        assert metrics[f"sae_{i}"]["optimizer_steps"] == 20
        _assert_same(many_run[0] / f"sae_{i}" / "sae", tmp_path / "runs" / "resumed" / f"sae_{i}" / "sae")


def test_bad_grid_fails_naming_the_entry():
    with pytest.raises(ValueError, match="sae_grid entry 1.*expanson"):
        resolve_grid([{"k": 8}, {"expanson": 4}], {"arch": "topk", "expansion": 4, "k": 8}, 64, None)
    with pytest.raises(ValueError, match="non-empty list"):
        resolve_grid({"k": 8}, {"arch": "topk", "expansion": 4, "k": 8}, 64, None)


@pytest.mark.slow
def test_cli_sae_grid_writes_one_folder_per_sae(store, tmp_path, repo_root):
    cmd = [sys.executable, "-m", "vlmsae.train", *_over(store, 12, f"sae_grid={GRID}", "logger=none")]
    cmd.append(f"hydra.run.dir={tmp_path / 'cli'}")
    subprocess.run(cmd, cwd=repo_root, check=True, capture_output=True, timeout=120)
    for i in range(3):
        assert (tmp_path / "cli" / f"sae_{i}" / "sae").is_dir()
        assert json.loads((tmp_path / "cli" / f"sae_{i}" / "metrics.json").read_text())["step"] == 12

"""Many SAEs per pass (vlmsae.lit.fit, ``sae_grid=``): each SAE ends exactly where a separate single-SAE run
with the same seed and data order ends; resume restores every SAE; bad grids fail naming the entry."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import lightning as L
import pytest
import torch

from vlmsae.data.store import write_acts_store
from vlmsae.lit.fit import resolve_grid
from vlmsae.lit.loggers import read_metrics_csv
from vlmsae.sae import SAEConfig, load_sae
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
        resolve_grid([{"k": 8}, {"expanson": 4}], SAEConfig(arch="topk", expansion=4, k=8), 64, None)
    with pytest.raises(ValueError, match="non-empty list"):
        resolve_grid({"k": 8}, SAEConfig(arch="topk", expansion=4, k=8), 64, None)


@pytest.mark.slow
def test_cli_sae_grid_writes_one_folder_per_sae(store, tmp_path, repo_root):
    cmd = [sys.executable, "-m", "vlmsae.train", *_over(store, 12, f"sae_grid={GRID}", "logger=none")]
    cmd.append(f"hydra.run.dir={tmp_path / 'cli'}")
    subprocess.run(cmd, cwd=repo_root, check=True, capture_output=True)
    for i in range(3):
        assert (tmp_path / "cli" / f"sae_{i}" / "sae").is_dir()
        assert json.loads((tmp_path / "cli" / f"sae_{i}" / "metrics.json").read_text())["step"] == 12


# ------------------------------------------------------------------------------ one W&B run per SAE
def _wandb_env(monkeypatch, tmp_path):
    home = tmp_path / "wandb_home"
    for key in [k for k in os.environ if k.startswith("WANDB_SERVICE")]:
        monkeypatch.delenv(key)
    for key, value in {
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "WANDB_DIR": str(home),
        "WANDB_CACHE_DIR": str(home / "cache"),
        "WANDB_CONFIG_DIR": str(home / "config"),
        "WANDB_DATA_DIR": str(home / "data"),
    }.items():
        monkeypatch.setenv(key, value)


def _wandb_run(sae_dpath):
    """(config, group, history rows) of the SAE's newest offline W&B run, read back from its .wandb file."""
    from vlmsae.lit.loggers import iter_wandb_records, read_wandb_history, wandb_run_files

    run_id = (sae_dpath / "wandb_id.txt").read_text().strip()
    fpath = wandb_run_files(sae_dpath / "wandb", run_id, superseded=False)[-1]
    config, group = {}, None
    for record in iter_wandb_records(fpath):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            group = record.run.run_group
            config.update({i.key: json.loads(i.value_json) for i in record.run.config.update})
        elif kind == "config":
            config.update({i.key: json.loads(i.value_json) for i in record.config.update})
    return config, group, read_wandb_history(fpath)


GRID2 = "[{expansion:4,k:8},{expansion:8,k:4,arch:topk,lr:0.003}]"


def test_wandb_offline_writes_one_run_per_sae_with_its_own_metrics_and_config(
    compose_cfg, store, monkeypatch, tmp_path
):
    _wandb_env(monkeypatch, tmp_path)
    over = _over(store, 12, f"sae_grid={GRID2}", "logger=wandb", "trainer.log_every_n_steps=2")
    out = tmp_path / "pass"
    run(compose_cfg("train", over), out_dpath=out)
    assert len(list(out.glob("sae_*/wandb/offline-run-*"))) == 2
    assert len({(out / f"sae_{i}" / "wandb_id.txt").read_text() for i in range(2)}) == 2
    job = json.loads((out / "run_info.json").read_text())["config"]
    losses = []
    for i in range(2):
        config, group, rows = _wandb_run(out / f"sae_{i}")
        assert group == "pass"  # one group for the pass: its run dir's name
        assert config["grid"] == {"name": f"sae_{i}", "index": i, "group": "pass", "overrides": job["sae_grid"][i]}
        assert {k: v for k, v in config.items() if k not in ("sae", "trainer", "grid", "_wandb")} == {
            k: v for k, v in job.items() if k not in ("sae", "trainer")
        }
        assert config["sae"] == {**job["sae"], **{k: v for k, v in job["sae_grid"][i].items() if k != "lr"}}
        assert config["sae"]["expansion"] == [4, 8][i]
        assert config["trainer"]["lr"] == json.loads((out / f"sae_{i}" / "metrics.json").read_text())["lr"]
        keys = {k for r in rows for k in r if not k.startswith("_")}
        assert {"train/loss", "val/fve"} <= keys and not any(k.startswith("sae_") for k in keys)
        # only this SAE's scalars: the same as its own CSV mirror, row by row
        _, csv_rows = read_metrics_csv(out / f"sae_{i}" / "csv" / "metrics.csv")
        want = [float(r["train/loss"]) for r in csv_rows if r.get("train/loss")]
        got = [r["train/loss"] for r in rows if "train/loss" in r]
        assert len(got) == 6 and got == pytest.approx(want)
        losses.append(got)
    assert losses[0] != losses[1]


def test_wandb_offline_resume_continues_each_sae_run(compose_cfg, store, monkeypatch, tmp_path):
    _wandb_env(monkeypatch, tmp_path)
    over = _over(store, 20, f"sae_grid={GRID2}", "logger=wandb", "trainer.log_every_n_steps=2")
    killed, resumed = tmp_path / "runs" / "killed", tmp_path / "runs" / "resumed"
    with pytest.raises(_Kill):  # killed at step 15, after the step-10 checkpoint: steps 10-14 get logged twice
        run(compose_cfg("train", over), out_dpath=killed, callbacks=[_StopAt(15)])
    run(compose_cfg("train", [*over, f"resume={killed}"]), out_dpath=resumed)
    want = list(range(1, 20, 2))  # Lightning logs batch i at step i
    for i in range(2):
        sae_id = (killed / f"sae_{i}" / "wandb_id.txt").read_text()
        assert (resumed / f"sae_{i}" / "wandb_id.txt").read_text() == sae_id  # the same W&B run continues
        _, csv_rows = read_metrics_csv(resumed / f"sae_{i}" / "csv" / "metrics.csv")
        assert [int(r["step"]) for r in csv_rows if r.get("train/loss")] == want
        _, _, rows = _wandb_run(resumed / f"sae_{i}")
        assert [r["trainer/global_step"] for r in rows if "train/loss" in r] == want  # replayed, then continued
        assert list((killed / f"sae_{i}" / "wandb").glob(f"*/run-{sae_id}.wandb.superseded"))


# ------------------------------------------------------------------------------ sae_devices
def test_place_saes_round_robins_over_visible_gpus_and_names_a_missing_device():
    from vlmsae.lit.fit import place_saes

    assert place_saes(3, "auto", 2) == ["cuda:0", "cuda:1", "cuda:0"]
    assert place_saes(5, "auto", 4) == ["cuda:0", "cuda:1", "cuda:2", "cuda:3", "cuda:0"]
    assert place_saes(2, "auto", 0) == ["cpu", "cpu"]
    assert place_saes(3, [1, "cuda:0", "CPU"], 2) == ["cuda:1", "cuda:0", "cpu"]
    with pytest.raises(ValueError, match=r"sae_devices\[1\]=2: there is no CUDA device 2 \(2 visible.*below 2"):
        place_saes(2, [0, 2], 2)
    with pytest.raises(ValueError, match=r"sae_devices=\['cpu'\]: expected auto or a list of 2 devices"):
        place_saes(2, ["cpu"], 2)
    with pytest.raises(ValueError, match=r"sae_devices\[0\]='tpu'"):
        place_saes(1, ["tpu"], 0)


def test_a_missing_sae_device_fails_before_training(compose_cfg, store, tmp_path):
    n = torch.cuda.device_count()
    over = _over(store, 5, f"sae_grid={GRID2}", f"sae_devices=[cpu,cuda:{n}]")
    with pytest.raises(ValueError, match=rf"sae_devices\[1\]='cuda:{n}': there is no CUDA device {n}"):
        run(compose_cfg("train", over), out_dpath=tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()

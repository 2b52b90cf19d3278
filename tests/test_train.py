"""End to end through vlmsae.train.run on planted-feature activation shards: learning, outputs,
resume without repeated steps, NaN handling, and clear errors for bad input; the CLI: a two-job multirun and
two DDP CPU ranks (slow)."""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import subprocess
import sys

import lightning as L
import pytest
import torch

from vlmsae.data.store import write_acts_store
from vlmsae.data.synthetic import PlantedDictionary
from vlmsae.train import run

D = 64  # = conf/model/tiny.yaml width


@pytest.fixture(scope="module")
def planted_store(tmp_path_factory):
    """20k rows of d=64 planted-feature activations (128 atoms, 3 per row, big norm and offset), 10 shards."""
    planted = PlantedDictionary.random(d_in=D, n_atoms=128, k=3, scale=5.0, offset_norm=10.0, seed=0)
    x = planted.sample(20_000, seed=1).x
    dpath = tmp_path_factory.mktemp("acts") / "layer2"
    write_acts_store(dpath, x.half(), rows_per_chunk=500, chunks_per_shard=4, meta={"model": "tiny", "layer": 2})
    return dpath


def _overrides(store, steps, *extra):
    return [
        "data=acts",
        f"data.acts={store}",
        "data.batch_size=256",
        "data.num_workers=0",
        "data.shuffle_buffer=2048",
        "data.val_fraction=0.1",
        f"trainer.max_steps={steps}",
        "logger=csv",
        *extra,
    ]


def test_train_learns_planted_features_and_writes_outputs(compose_cfg, planted_store, tmp_path):
    cfg = compose_cfg("train", _overrides(planted_store, 300))
    metrics = run(cfg, out_dpath=tmp_path / "run")
    assert metrics["fve"] > 0.5, metrics
    assert metrics["step"] == 300 and metrics["optimizer_steps"] == 300
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    for key in ("fve", "mse", "l0", "dead_fraction", "step"):
        assert key in saved and math.isfinite(saved[key])
    assert saved["n_val_rows"] >= 1000  # the held-out shard
    info = json.loads((tmp_path / "run" / "run_info.json").read_text())
    assert info["status"] == "done" and info["config"]["sae"]["arch"] == "batchtopk"
    # The SAE checkpoint takes raw activations and records what it was trained on.
    from vlmsae.sae import load_sae

    sae = load_sae(tmp_path / "run" / "sae")
    sae_cfg = json.loads((tmp_path / "run" / "sae" / "config.json").read_text())
    assert sae_cfg["trained_on"]["layer"] == 2 and sae_cfg["trained_on"]["model"] == "tiny"
    x = PlantedDictionary.random(d_in=D, n_atoms=128, k=3, scale=5.0, offset_norm=10.0, seed=0).sample(2000, seed=9).x
    fve = 1 - (x - sae(x)).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    assert fve > 0.5
    header = (tmp_path / "run" / "csv" / "metrics.csv").read_text().splitlines()[0]
    for name in (
        "train/mse",
        "train/nmse",
        "train/fve",
        "train/l0",
        "train/dead_fraction",
        "train/dense_fraction",
        "train/aux_loss",
        "train/lr",
        "val/fve",
        "val/mse",
    ):
        assert name in header
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").exists()


# Recorded at 07e0b22, before the training step was shared by every trainer (tests/fixtures/engine_reference).
REFERENCE_OVERRIDES = [
    "trainer.max_steps=12",
    "trainer.warmup_steps=5",  # past the warmup ...
    "sae.threshold_start_step=8",  # ... and into the threshold EMA
    "sae.expansion=1",
    "trainer.val_check_interval=1000",
    "logger=none",
    # a validation share at which the image hold-out of 07e0b22 and of today's (at least one batch, issue 23)
    # pick the same images, so the SAE sees the same rows: the recording stays a check of the engine alone
    "data.val_fraction=0.25",
]


def test_single_sae_run_ends_with_the_recorded_sae(compose_cfg, repo_root, tmp_path):
    """The tiny default (tiny CLIP on generated images) ends with the same SAE as before issue 22's one engine."""
    from safetensors.torch import load_file

    from vlmsae.sae import load_sae

    run(compose_cfg("train", REFERENCE_OVERRIDES), out_dpath=tmp_path / "run")
    got = load_sae(tmp_path / "run" / "sae").state_dict()
    want = load_file(str(repo_root / "tests" / "fixtures" / "engine_reference" / "train_tiny.safetensors"))
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-6, msg=f"{key} differs from the recording")


class _Kill(Exception):
    pass


class _StopAt(L.Callback):
    """Simulates a kill: raises after ``step`` optimizer steps."""

    def __init__(self, step):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            raise _Kill(f"killed at {self.step}")


class _Record(L.Callback):
    """Records (step before the update, batch checksum) for every training batch."""

    def __init__(self):
        self.seen = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen.append((trainer.global_step, float(batch.float().sum())))


def test_resume_continues_without_repeating_steps(compose_cfg, planted_store, tmp_path):
    over = _overrides(planted_store, 40, "trainer.checkpoint_every_n_steps=10", "trainer.val_check_interval=1000")
    reference = _Record()
    ref_metrics = run(compose_cfg("train", over), out_dpath=tmp_path / "ref" / "a", callbacks=[reference])

    first = _Record()
    with pytest.raises(_Kill):
        run(compose_cfg("train", over), out_dpath=tmp_path / "runs" / "killed", callbacks=[first, _StopAt(25)])
    assert [s for s, _ in first.seen] == list(range(25))
    # The same command with resume=true: a new run dir, continued from the killed run's last checkpoint (step 20).
    second = _Record()
    metrics = run(
        compose_cfg("train", [*over, "resume=true"]), out_dpath=tmp_path / "runs" / "resumed", callbacks=[second]
    )
    steps = [s for s, _ in second.seen]
    assert steps == list(range(20, 40)), steps
    assert metrics["step"] == 40 and metrics["optimizer_steps"] == 40  # Adam saw exactly 40 updates
    # The data stream fast-forwarded: the resumed run sees exactly the batches the uninterrupted run saw.
    assert second.seen == reference.seen[20:]
    assert metrics["fve"] == pytest.approx(ref_metrics["fve"], abs=1e-4)
    info = json.loads((tmp_path / "runs" / "resumed" / "run_info.json").read_text())
    assert info["resumed_from"].endswith("last.ckpt") and "killed" in info["resumed_from"]


def test_resume_without_checkpoint_starts_fresh_and_config_must_match(compose_cfg, planted_store, tmp_path):
    over = _overrides(planted_store, 10, "trainer.checkpoint_every_n_steps=5")
    run(compose_cfg("train", over), out_dpath=tmp_path / "runs" / "a")
    # A different SAE is not the same run: resume=true must not pick up run a's checkpoint.
    rec = _Record()
    run(compose_cfg("train", [*over, "sae.k=4", "resume=true"]), out_dpath=tmp_path / "runs" / "b", callbacks=[rec])
    assert rec.seen[0][0] == 0


class _CorruptAt(L.Callback):
    def __init__(self, step):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            with torch.no_grad():
                pl_module.sae.W_enc[0, 0] = float("nan")


def test_nan_loss_stops_with_step_and_batch_stats_keeping_last_good_checkpoint(compose_cfg, planted_store, tmp_path):
    from vlmsae.lit.module import NonFiniteLossError

    over = _overrides(planted_store, 50, "trainer.checkpoint_every_n_steps=5")
    with pytest.raises(NonFiniteLossError, match=r"step 7.*batch 256 rows x 64.*last good checkpoint") as err:
        run(compose_cfg("train", over), out_dpath=tmp_path / "run", callbacks=[_CorruptAt(7)])
    assert "mean" in str(err.value) and "max row norm" in str(err.value)
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 5
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())
    info = json.loads((tmp_path / "run" / "run_info.json").read_text())
    assert info["status"] == "failed" and "step 7" in info["error"]
    assert not (tmp_path / "run" / "sae").exists()


def test_missing_activations_dir_fails_before_training(compose_cfg, tmp_path):
    cfg = compose_cfg("train", _overrides(tmp_path / "nowhere", 10))
    with pytest.raises(FileNotFoundError, match="does not exist.*vlmsae.extract"):
        run(cfg, out_dpath=tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_width_mismatch_fails_before_training(compose_cfg, tmp_path):
    store = write_acts_store(tmp_path / "acts32", torch.randn(400, 32).half(), 100, 2, meta={"layer": 2})
    with pytest.raises(ValueError, match=r"width mismatch.*d=32.*model=tiny.*64"):
        run(compose_cfg("train", _overrides(store, 10)), out_dpath=tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_layer_mismatch_with_store_fails(compose_cfg, planted_store, tmp_path):
    with pytest.raises(ValueError, match=r"layer=3 but the activation store .* holds layer 2"):
        run(compose_cfg("train", _overrides(planted_store, 10, "layer=3")), out_dpath=tmp_path / "run")


def test_trainer_gpu_without_a_gpu_names_trainer_cpu(compose_cfg, planted_store, tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    cfg = compose_cfg("train", _overrides(planted_store, 10, "trainer=gpu"))
    with pytest.raises(ValueError, match=r"trainer.accelerator=gpu but no GPU is visible.*trainer=cpu"):
        run(cfg, out_dpath=tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_default_config_trains_on_the_fly_from_images(compose_cfg, tmp_path, caplog):
    """`python -m vlmsae.train` alone: tiny CLIP + generated images, activations computed as training runs."""
    cfg = compose_cfg("train", ["trainer.max_steps=30", "trainer.val_check_interval=1000", "logger=none"])
    assert cfg.data.source == "synthetic" and cfg.model.name == "tiny"
    with caplog.at_level(logging.INFO):
        metrics = run(cfg, out_dpath=tmp_path / "run")
    # at least one batch of held-out images, not 1% of 128 (2 rows); the final line says what it measured
    assert metrics["step"] == 30 and metrics["n_val_rows"] >= cfg.data.batch_size and math.isfinite(metrics["fve"])
    assert f"held-out validation fve {metrics['fve']:.3f} over {metrics['n_val_rows']} rows" in caplog.text
    trained_on = json.loads((tmp_path / "run" / "sae" / "config.json").read_text())["trained_on"]
    assert trained_on["layer"] == 2 and trained_on["tokens"] == "cls" and trained_on["data_source"] == "synthetic"


@pytest.mark.parametrize(
    "name, expect",
    [
        (
            "ms_layer_sweep",
            {"sae.arch": "batchtopk", "sae.k": 20, "layer": 22, "model.name": "clip_l14", "data.batch_size": 4096},
        ),
        (
            "matryoshka_last",
            {"sae.arch": "matryoshka", "layer": "last", "sae.group_fractions": [0.0625, 0.125, 0.25, 0.5625]},
        ),
        (
            "llava_steering_sae",
            {
                "sae.arch": "matryoshka",
                "sae.expansion": 64,
                "layer": 22,
                "model.name": "clip_l14_336",
                "tokens": "random_k",
                "tokens_k": 2,
            },
        ),
        ("tiny", {"sae.arch": "batchtopk", "model.name": "tiny"}),
        ("inat_hierarchy", {"sae.arch": "matryoshka", "sae.expansion": 2, "layer": "last"}),
    ],
)
def test_experiment_recipes_compose(compose_cfg, name, expect):
    from omegaconf import OmegaConf

    cfg = compose_cfg("train", [f"experiment={name}", "data.acts=/somewhere"])
    for key, value in expect.items():
        got = OmegaConf.select(cfg, key)
        assert (list(got) if OmegaConf.is_list(got) else got) == value, (key, got)
    assert cfg.trainer.max_steps == (300 if name == "tiny" else 110_000)


def test_negative_layer_counts_from_the_end(compose_cfg, planted_store, tmp_path):
    metrics = run(
        compose_cfg("train", _overrides(planted_store, 2, "layer=-2", "logger=none")), out_dpath=tmp_path / "r"
    )
    assert metrics["layer"] == 2 and metrics["step"] == 2


def test_data_images_computes_activations_from_an_image_folder(compose_cfg, tmp_path):
    """data=images: no activation store; the encoder runs on the images of a folder as training goes."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(20):
            Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(
                tmp_path / "imgs" / cls / f"{i}.png"
            )
    over = [
        "data=images",
        f"data.root={tmp_path / 'imgs'}",
        "data.batch_size=16",
        "data.num_workers=0",
        "data.shuffle_buffer=32",
        "data.val_fraction=0.1",
        "tokens=all",
        "layer=1",
        "trainer.max_steps=8",
        "logger=none",
    ]
    metrics = run(compose_cfg("train", over), out_dpath=tmp_path / "run")
    assert metrics["step"] == 8 and metrics["n_val_rows"] > 0 and metrics["layer"] == 1
    trained_on = json.loads((tmp_path / "run" / "sae" / "config.json").read_text())["trained_on"]
    assert (
        trained_on["tokens"] == "all"
        and trained_on["data_source"] == "images"
        and trained_on["data"] == str(tmp_path / "imgs")
    )


def test_sweep_summary_tables_the_final_metrics_of_every_job(tmp_path):
    from vlmsae.lit.callbacks import write_sweep_summary

    for i, (expansion, fve) in enumerate(((2, 0.7), (4, 0.8))):
        job = tmp_path / f"job_{i}"
        (job / ".hydra").mkdir(parents=True)
        (job / ".hydra" / "overrides.yaml").write_text(f"- sae.expansion={expansion}\n- logger=none\n")
        (job / "metrics.json").write_text(
            json.dumps({"fve": fve, "mse": 0.1, "l0": 20.0, "dead_fraction": 0.0, "step": 10})
        )
    (tmp_path / "job_2" / ".hydra").mkdir(parents=True)
    (tmp_path / "job_2" / ".hydra" / "overrides.yaml").write_text("- sae.expansion=8\n- logger=none\n")
    (tmp_path / "job_2" / "run_info.json").write_text(json.dumps({"status": "failed"}))
    csv_fpath, md_fpath = write_sweep_summary(tmp_path)
    lines = csv_fpath.read_text().splitlines()
    assert lines[0].startswith("job,sae.expansion,logger,status") and len(lines) == 4
    assert "job_0,2,none,done" in lines[1] and ",0.7," in lines[1] and "job_2" in lines[3] and "failed" in lines[3]
    md = md_fpath.read_text()
    assert "`logger=none`" in md and "| job_1 | 4 | done |" in md


def test_tiny_extraction_then_training(compose_cfg, tmp_path):
    """The real hand-off: vlmsae.extract writes a store (tiny CLIP, generated images), train reads it."""
    from vlmsae.extract import run as extract

    extract(compose_cfg("extract", ["tokens=all", "rows_per_chunk=256", "progress=false"]), out_dpath=tmp_path / "acts")
    metrics = run(
        compose_cfg(
            "train",
            [
                "data=acts",
                f"data.acts={tmp_path / 'acts'}",
                "data.batch_size=64",
                "data.val_fraction=0.1",
                "trainer.max_steps=60",
                "logger=none",
            ],
        ),
        out_dpath=tmp_path / "train",
    )
    assert metrics["step"] == 60 and metrics["n_val_rows"] > 0 and metrics["fve"] > 0
    trained_on = json.loads((tmp_path / "train" / "sae" / "config.json").read_text())["trained_on"]
    assert trained_on["model"] == "tiny" and trained_on["layer"] == 2 and trained_on["tokens"] == "all"


def test_a_misspelt_or_mistyped_key_fails_at_compose_time_naming_it(tmp_path, compose_error):
    import shutil

    from vlmsae.config import conf_dir

    assert "Key 'layr' not in 'TrainJob'" in compose_error(conf_dir(), "train", ["layr=3"])
    assert "full_key: seed" in compose_error(conf_dir(), "train", ["seed=abc"])  # the schema types the keys
    # A typo in a recipe (no override involved) is caught too: the schema closes the top level.
    conf_copy = shutil.copytree(conf_dir(), tmp_path / "user_conf")
    (conf_copy / "experiment" / "typo.yaml").write_text("# @package _global_\ntokns: cls\n", encoding="utf-8")
    assert "Key 'tokns' not in 'TrainJob'" in compose_error(conf_copy, "train", ["experiment=typo"])


def test_run_is_thin():
    """The job only turns the config into a FitPlan and calls vlmsae.lit.fit (issue 13)."""
    import inspect

    import vlmsae.train

    assert len(inspect.getsource(vlmsae.train.run).splitlines()) <= 45


# ------------------------------------------------------------------------------ CLI: multirun and DDP
# A two-job multirun through the CLI: one directory and one (disabled) W&B run per job, plus the sweep summary.
@pytest.mark.slow
def test_multirun_two_jobs_writes_job_dirs_and_sweep_summary(tmp_path, repo_root):
    planted = PlantedDictionary.random(d_in=64, n_atoms=128, k=3, scale=5.0, seed=0)
    for layer in (1, 2):  # one store per layer, selected through ${layer} interpolation
        write_acts_store(
            tmp_path / f"layer{layer}",
            planted.sample(4000, seed=layer).x.half(),
            500,
            2,
            meta={"model": "tiny", "layer": layer},
        )
    sweep = tmp_path / "sweep"
    cmd = [
        sys.executable,
        "-m",
        "vlmsae.train",
        "-m",
        "layer=1,2",
        "data=acts",
        f"data.acts={tmp_path}/layer${{layer}}",
        "data.batch_size=128",
        "data.num_workers=0",
        "trainer.max_steps=30",
        "logger=wandb",
        f"hydra.sweep.dir={sweep}",
    ]
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for job, layer in (("job_0", 1), ("job_1", 2)):
        metrics = json.loads((sweep / job / "metrics.json").read_text())
        assert metrics["step"] == 30 and metrics["layer"] == layer
        assert json.loads((sweep / job / "sae" / "config.json").read_text())["trained_on"]["layer"] == layer
        assert (sweep / job / "wandb_id.txt").is_file()
    ids = {(sweep / j / "wandb_id.txt").read_text() for j in ("job_0", "job_1")}
    assert len(ids) == 2  # a fresh W&B run per job
    rows = list(csv.DictReader((sweep / "sweep_summary.csv").open()))
    assert [r["layer"] for r in rows] == ["1", "2"] and all(float(r["fve"]) > 0 for r in rows)
    md = (sweep / "sweep_summary.md").read_text()
    assert "| job_0 | 1 |" in md and "fve" in md


@pytest.mark.slow
def test_ddp_two_cpu_ranks_train_to_the_same_step(tmp_path):
    """trainer=ddp on CPU (gloo): two ranks, disjoint shards, one set of outputs from rank 0. The same
    conf/trainer/ddp.yaml a SLURM job uses (there trainer.num_nodes=N and Lightning reads the ranks from SLURM)."""
    planted = PlantedDictionary.random(d_in=64, n_atoms=128, k=3, scale=5.0, seed=0)
    write_acts_store(
        tmp_path / "acts", planted.sample(6000, seed=1).x.half(), 500, 2, meta={"model": "tiny", "layer": 2}
    )
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "vlmsae.train",
        "data=acts",
        f"data.acts={tmp_path / 'acts'}",
        "data.batch_size=128",
        "data.num_workers=1",
        "trainer=ddp",  # the config path a SLURM job takes, on CPU: gloo, two ranks on one node
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.num_nodes=1",
        "trainer.max_steps=30",
        "trainer.val_check_interval=15",
        "trainer.limit_val_batches=2",
        "trainer.warmup_steps=5",
        "trainer.scale_batches=2",
        "trainer.enable_progress_bar=false",
        "logger=csv",
        f"hydra.run.dir={out}",
    ]
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["step"] == 30 and metrics["optimizer_steps"] == 30 and metrics["fve"] > 0
    assert json.loads((out / "run_info.json").read_text())["status"] == "done"


# ------------------------------------------------------------------- SLURM / submitit launcher and requeue
def _sae_state(run_dpath):
    from vlmsae.sae import load_sae

    return {k: v.clone() for k, v in load_sae(run_dpath / "sae").state_dict().items()}


def _assert_same_sae(a_dpath, b_dpath):
    a, b = _sae_state(a_dpath), _sae_state(b_dpath)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


def test_rerun_in_the_same_dir_continues_its_checkpoint_to_the_same_sae(compose_cfg, planted_store, tmp_path):
    """What a requeued job does: the same config (resume left at its default, auto) in the same job dir
    continues from that dir's last checkpoint and ends with the SAE an uninterrupted run ends with."""
    over = _overrides(planted_store, 40, "trainer.checkpoint_every_n_steps=10", "trainer.val_check_interval=1000")
    run(compose_cfg("train", over), out_dpath=tmp_path / "ref")
    with pytest.raises(_Kill):
        run(compose_cfg("train", over), out_dpath=tmp_path / "job_0", callbacks=[_StopAt(25)])
    rerun = _Record()
    metrics = run(compose_cfg("train", over), out_dpath=tmp_path / "job_0", callbacks=[rerun])
    assert [s for s, _ in rerun.seen] == list(range(20, 40)) and metrics["optimizer_steps"] == 40
    assert json.loads((tmp_path / "job_0" / "run_info.json").read_text())["resumed_from"].endswith("last.ckpt")
    _assert_same_sae(tmp_path / "ref", tmp_path / "job_0")
    # resume=false in the same dir starts over (step 0) instead.
    fresh = _Record()
    run(compose_cfg("train", [*over, "resume=false"]), out_dpath=tmp_path / "job_0", callbacks=[fresh])
    assert fresh.seen[0][0] == 0


def test_slurm_launcher_carries_resources_and_requires_partition_and_account(tmp_path):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from vlmsae.config import conf_dir, register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose("train", ["hydra/launcher=slurm"], return_hydra_config=True)
        launcher = cfg.hydra.launcher
        assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
        assert OmegaConf.missing_keys(launcher) == {"hydra.launcher.partition", "hydra.launcher.account"}
        assert launcher.gpus_per_node == 1 and launcher.cpus_per_task > 0 and launcher.mem_gb > 0
        assert launcher.timeout_min > 0 and launcher.signal_delay_s > 0
        cfg = compose(
            "train",
            ["hydra/launcher=slurm", "hydra.launcher.partition=gpu", "hydra.launcher.account=lab"],
            return_hydra_config=True,
        )
        assert OmegaConf.missing_keys(cfg.hydra.launcher) == set()
        # Every key is one the plugin's SlurmQueueConf knows (an unknown one would fail at submission).
        from hydra_plugins.hydra_submitit_launcher.config import SlurmQueueConf

        assert set(cfg.hydra.launcher) <= set(OmegaConf.structured(SlurmQueueConf)) | {"_target_"}


def _train_cli(*args):
    return [sys.executable, "-m", "vlmsae.train", *args]


_CLI_ENV = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
def test_slurm_sweep_without_partition_stops_before_submitting_naming_the_key(tmp_path):
    sweep = tmp_path / "sweep"
    cmd = _train_cli("-m", "hydra/launcher=slurm", "hydra.launcher.account=lab", "seed=1,2", f"hydra.sweep.dir={sweep}")
    proc = subprocess.run(cmd, cwd=tmp_path, env=_CLI_ENV, capture_output=True, text=True)
    assert proc.returncode != 0
    assert "Missing mandatory value: hydra.launcher.partition" in proc.stderr, proc.stderr[-2000:]
    assert not sweep.exists()  # nothing was submitted


@pytest.mark.slow
def test_submitit_local_sweep_runs_two_jobs_and_writes_sweep_summary(planted_store, tmp_path):
    sweep = tmp_path / "sweep"
    cmd = _train_cli(
        "-m", "hydra/launcher=submitit_local", "seed=1,2", *_overrides(planted_store, 20), f"hydra.sweep.dir={sweep}"
    )
    proc = subprocess.run(cmd, cwd=tmp_path, env=_CLI_ENV, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for job in ("job_0", "job_1"):
        assert json.loads((sweep / job / "metrics.json").read_text())["step"] == 20
    rows = list(csv.DictReader((sweep / "sweep_summary.csv").open()))
    assert [r["seed"] for r in rows] == ["1", "2"] and all(float(r["fve"]) > 0 for r in rows)
    assert (sweep / ".submitit").is_dir()  # the jobs went through submitit's local executor


def _submitit_task_pid(folder):
    """The pid of the python task submitit's local executor started for jobs under ``folder``."""
    from pathlib import Path

    for environ_fpath in Path("/proc").glob("[0-9]*/environ"):
        try:
            environ = environ_fpath.read_bytes()
        except OSError:
            continue
        if b"SUBMITIT_LOCAL_GLOBALID=0" in environ and str(folder).encode() in environ:
            return int(environ_fpath.parent.name)
    return None


@pytest.mark.slow
def test_submitit_requeue_after_preemption_continues_to_the_same_sae(compose_cfg, planted_store, tmp_path):
    """The real submitit path on the local executor: SIGUSR2 (submitit's preemption signal) once the job has
    a checkpoint -> the launcher's checkpoint() resubmits the same call -> the job reruns in the same job dir
    and resume=auto continues there. The SAE equals an uninterrupted run's."""
    import signal
    import time

    over = _overrides(planted_store, 80, "trainer.checkpoint_every_n_steps=10", "trainer.val_check_interval=1000")
    over += ["sae.expansion=16", "data.batch_size=1024"]  # slow enough steps to signal mid-run
    sweep = tmp_path / "sweep"
    cmd = _train_cli("-m", "hydra/launcher=submitit_local", "seed=3", *over, f"hydra.sweep.dir={sweep}")
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=_CLI_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    signalled = False  # no wall-clock limit: the job either gets preempted or ends first (which fails below)
    while proc.poll() is None and not signalled:
        if list((sweep / "job_0" / "checkpoints").glob("step*.ckpt")):
            pid = _submitit_task_pid(sweep / ".submitit")
            if pid is not None:
                os.kill(pid, signal.SIGUSR2)
                signalled = True
        time.sleep(0.05)
    _, err = proc.communicate()
    assert signalled, "the job finished before it could be preempted: make its steps slower"
    assert proc.returncode == 0, err[-3000:]
    job = sweep / "job_0"
    logs = "".join(p.read_text() for p in (sweep / ".submitit").rglob("*.err"))
    assert "this job is preempted" in logs and "Restored all states from the checkpoint" in logs, logs[-2000:]
    info = json.loads((job / "run_info.json").read_text())
    assert info["status"] == "done" and info["resumed_from"].startswith(str(job)), info["resumed_from"]
    assert json.loads((job / "metrics.json").read_text())["optimizer_steps"] == 80
    run(compose_cfg("train", [*over, "seed=3"]), out_dpath=tmp_path / "ref")
    _assert_same_sae(tmp_path / "ref", job)

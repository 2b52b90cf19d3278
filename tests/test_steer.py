"""``python -m vlmsae.steer``: the real configs composed with model=tiny_llava, run in-process and via the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from vlmsae.sae import SAEConfig, build_sae, save_sae


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("VLMSAE_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture
def sae_dpath(tmp_path):
    sae = build_sae(SAEConfig(arch="topk", d_in=32, n_latents=64, k=8), seed=0)
    return save_sae(sae, tmp_path / "sae", trained_on={"model": "tiny_llava", "layer": 2, "tokens": "random_2"})


def test_steer_run_writes_answers_side_by_side(compose_cfg, home, sae_dpath, tmp_path, capsys):
    from vlmsae.steer import run

    cfg = compose_cfg(
        "steer",
        [
            f"sae_path={sae_dpath}",
            "latent=[5,9]",
            "alpha=60",
            "image=[white,skimage:astronaut]",
            "max_new_tokens=4",
            "sweep=[0,60]",
            "prompt=Write me a short love poem",
        ],
    )
    assert cfg.model.name == "tiny_llava" and cfg.mode == "replace"
    with pytest.raises(ValueError, match="single latent"):
        run(cfg, out_dpath=tmp_path / "bad")
    cfg.sweep = None
    out = run(cfg, out_dpath=tmp_path / "run")
    saved = json.loads((tmp_path / "run" / "steer.json").read_text())
    assert {"steered", "baseline", "settings", "activation_steering"} <= set(saved)
    assert len(saved["steered"]) == len(saved["baseline"]) == 2
    assert saved["settings"]["layer"] == 2 and saved["settings"]["latents"] == {"5": 60.0, "9": 60.0}
    assert saved["steered"] != saved["baseline"]
    assert (tmp_path / "run" / "run_info.json").exists()
    printed = capsys.readouterr().out
    assert "baseline" in printed and "steered (replace)" in printed and saved["baseline"][0][:20] in printed
    assert (home / "models" / "tiny_llava" / "config.json").exists()  # built where model=tiny_llava says

    # The steered answers are what a direct steer() gives: the CLI adds no hidden state.
    from vlmsae.models.llava import load_llava_spec
    from vlmsae.sae import load_sae
    from vlmsae.steering import generate_answers, steer, white_image

    model, processor = load_llava_spec(dict(cfg.model))
    with steer(model, load_sae(sae_dpath), {5: 60.0, 9: 60.0}):  # layer from config.json
        direct = generate_answers(model, processor, [white_image(32)], cfg.prompt, max_new_tokens=4)
    assert direct[0] == out["steered"][0]


def test_steer_sweep_and_errors(compose_cfg, home, sae_dpath, tmp_path):
    from vlmsae.steer import run

    cfg = compose_cfg(
        "steer",
        [
            f"sae_path={sae_dpath}",
            "latent=5",
            "sweep=[0,30,60]",
            "max_new_tokens=3",
            "compare_add=false",
            "mode=error_preserving",
            "patches=[0,1,2,3]",
        ],
    )
    out = run(cfg, out_dpath=tmp_path / "sweep")
    assert list(out["sweep"]) == ["0.0", "30.0", "60.0"] and "activation_steering" not in out
    cfg.image = "/no/such.png"
    with pytest.raises(FileNotFoundError, match="no/such.png"):
        run(cfg, out_dpath=tmp_path / "bad")
    cfg.image = "white"
    cfg.sae_path = str(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="sae_path"):
        run(cfg, out_dpath=tmp_path / "bad")


@pytest.mark.slow
def test_steer_cli_subprocess(repo_root, home, sae_dpath, tmp_path):
    env = {**os.environ, "VLMSAE_HOME": str(home), "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    cmd = [
        sys.executable,
        "-m",
        "vlmsae.steer",
        f"sae_path={sae_dpath}",
        "latent=5",
        "alpha=50",
        "max_new_tokens=3",
        f"hydra.run.dir={tmp_path / 'cli'}",
    ]
    proc = subprocess.run(cmd, cwd=repo_root, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    saved = json.loads((tmp_path / "cli" / "steer.json").read_text())
    assert saved["settings"]["latents"] == {"5": 50.0}
    assert len(saved["steered"]) == len(saved["baseline"]) == 1


@pytest.mark.slow
def test_logger_wandb_offline_run_holds_changed_answers(compose_cfg, home, sae_dpath, tmp_path, wandb_offline):
    from vlmsae.steer import run

    overrides = [f"sae_path={sae_dpath}", "latent=5", "alpha=60", "image=[white]", "max_new_tokens=3"]
    out = run(compose_cfg("steer", [*overrides, "logger=wandb"]), out_dpath=tmp_path / "run")
    logged = wandb_offline(tmp_path / "run")
    changed = sum(s != b for s, b in zip(out["steered"], out["baseline"]))
    assert logged["summary"]["steer/n_images"] == 1 and logged["summary"]["steer/changed"] == changed
    assert "answers" in logged["logged"] and logged["job_type"] == "steer"

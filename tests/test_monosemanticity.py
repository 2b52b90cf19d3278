"""End to end: tiny CLIP + tiny SAE checkpoint + generated concept images -> MS run dir."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys

import pytest
import torch


@pytest.fixture
def tiny_sae_dpath(tmp_path, monkeypatch):
    """A TopK SAE on the tiny open_clip's block 2 (64-d), saved with its source like a training run."""
    monkeypatch.setenv("VLMSAE_HOME", str(tmp_path / "home"))
    from vlmsae.sae import SAEConfig, build_sae, save_sae

    sae = build_sae(SAEConfig(arch="topk", d_in=64, n_latents=128, k=6), seed=0)
    return save_sae(sae, tmp_path / "sae", source={"model": "tiny", "pretrained": None, "layer": 2, "tokens": "cls"})


def _compose(compose_cfg, sae_dpath, tmp_path, *extra):
    return compose_cfg(
        "monosemanticity",
        [
            f"sae_path={sae_dpath}",
            "data=tiny",
            "data.n_per_class=4",
            "embedder=pixels",
            f"embed_cache={tmp_path / 'emb_cache'}",
            "progress=false",
            "top_k=5",
            *extra,
        ],
    )


def test_run_writes_everything(compose_cfg, tiny_sae_dpath, tmp_path, monkeypatch) -> None:
    from vlmsae.metrics import monosemanticity_scores
    from vlmsae.metrics.topimages import TopImages
    from vlmsae.monosemanticity import run

    out = tmp_path / "out"
    summary = run(_compose(compose_cfg, tiny_sae_dpath, tmp_path), out_dpath=out)
    for name in (
        "latents.csv",
        "ms_summary.json",
        "ms_hist.png",
        "ms_vs_freq.png",
        "run_info.json",
        "top_images/top.safetensors",
        "top_images/images.json",
        "top_images/meta.json",
    ):
        assert (out / name).exists(), name
    saved = json.loads((out / "ms_summary.json").read_text())
    for key in ("mean", "std", "min", "max", "dead", "n_latents", "n_images"):
        assert key in saved and key in saved["baseline"], key
    assert saved["n_images"] == 64 and saved["n_latents"] == 128 and saved["baseline"]["n_latents"] == 64
    assert -1.0 <= saved["min"] <= saved["mean"] <= saved["max"] <= 1.0
    assert 0 < saved["reconstruction"]["l0"] <= 6

    lines = (out / "latents.csv").read_text().splitlines()
    assert lines[0] == "# vlmsae latents.csv format_version=2"  # the version line, then a plain CSV
    rows = list(csv.DictReader(lines[1:]))
    assert [r["latent"] for r in rows] == [str(i) for i in range(128)]
    ms_csv = torch.tensor([float(r["ms"]) for r in rows], dtype=torch.float64)
    assert math.isclose(float(ms_csv.nanmean()), saved["mean"], rel_tol=1e-5)
    assert int(torch.isnan(ms_csv).sum()) == saved["dead"] + saved["undefined"]
    top = TopImages.load(out / "top_images")
    assert top.n_latents == 128 and top.top_k == 5 and len(top.keys) == 64
    fired = [r for r in rows if float(r["freq"]) > 0]
    assert fired and all(r["top_keys"].split("|")[0] in top.keys for r in fired)
    assert all(r["top_keys"] == "" for r in rows if float(r["freq"]) == 0)

    # Recompute one latent's MS from scratch: the SAE on the CLS tokens, the embedder on the images.
    from PIL import Image

    from vlmsae.models import load_tap
    from vlmsae.models.embedders import load_embedder
    from vlmsae.sae import load_sae

    tap, sae = load_tap("tiny"), load_sae(tiny_sae_dpath)
    images = [Image.open(p).convert("RGB") for p in top.paths]
    cls = tap.forward_to(torch.stack([tap.preprocess(im) for im in images]), 2)[:, 0]
    emb = load_embedder({"name": "pixels", "backend": "pixels", "arch": "pixels"}).embed(images)
    with torch.no_grad():
        ms_ref = monosemanticity_scores(sae.encode(cls), emb)
    torch.testing.assert_close(ms_csv, ms_ref, atol=1e-5, rtol=0, equal_nan=True)

    # Second run: embeddings come from the cache (the embedder is never even loaded), same numbers.
    def no_embedder(_spec):
        raise AssertionError("the embedder was loaded although every embedding is cached")

    with monkeypatch.context() as m:
        m.setattr("vlmsae.models.embedders.load_embedder", no_embedder)
        again = run(_compose(compose_cfg, tiny_sae_dpath, tmp_path), out_dpath=tmp_path / "out2")
    assert again["embeddings_cached"] and not summary["embeddings_cached"]
    assert again["mean"] == pytest.approx(summary["mean"], abs=1e-9)
    # Same keys, other images (a different image size): the cache must not be reused.
    other = run(_compose(compose_cfg, tiny_sae_dpath, tmp_path, "data.size=48"), out_dpath=tmp_path / "out3")
    assert not other["embeddings_cached"]


def test_pooling_over_tokens(compose_cfg, tiny_sae_dpath, tmp_path) -> None:
    from vlmsae.monosemanticity import run

    mean_run = run(
        _compose(compose_cfg, tiny_sae_dpath, tmp_path, "pool=mean", "zero_shot=true"), out_dpath=tmp_path / "mean"
    )
    zs = mean_run["zero_shot"]
    assert zs["n_images"] == 64 and zs["n_classes"] == 16 and zs["spliced_tokens"] == "cls"
    assert zs["kl"] > 0 and 0.0 <= zs["top1_agreement"] <= 1.0 and "accuracy_spliced" in zs
    max_run = run(_compose(compose_cfg, tiny_sae_dpath, tmp_path, "pool=max"), out_dpath=tmp_path / "max")
    assert mean_run["pool"] == "mean" and max_run["pool"] == "max"
    # mean over 16 patches fires whenever any patch fires: denser than the CLS token's codes
    assert mean_run["n_scored"] > 0 and max_run["n_scored"] == mean_run["n_scored"]
    assert mean_run["reconstruction"]["n_samples"] == 64 * 16
    with pytest.raises(ValueError, match="pool"):
        run(_compose(compose_cfg, tiny_sae_dpath, tmp_path, "pool=median"), out_dpath=tmp_path / "bad")


def test_bad_sae_path_is_clear(compose_cfg, tmp_path) -> None:
    from vlmsae.monosemanticity import run

    with pytest.raises(FileNotFoundError, match="does not exist"):
        run(_compose(compose_cfg, tmp_path / "nope", tmp_path), out_dpath=tmp_path / "o")


@pytest.mark.slow
def test_cli(tiny_sae_dpath, tmp_path, repo_root) -> None:
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "vlmsae.monosemanticity",
        f"sae_path={tiny_sae_dpath}",
        "model=tiny",
        "data=tiny",
        "data.n_per_class=2",
        "embedder=tiny",
        f"embed_cache={tmp_path / 'c'}",
        "progress=false",
        f"hydra.run.dir={tmp_path / 'cli'}",
    ]
    proc = subprocess.run(cmd, cwd=repo_root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "cli" / "ms_summary.json").read_text())
    assert summary["n_images"] == 32 and summary["embedder"] == "tiny" and "baseline" in summary


def _compose_user_yaml(tmp_path, text: str):
    """Compose a user's YAML that extends conf/monosemanticity.yaml (as a recipe or a lab config would)."""
    from hydra import compose, initialize_config_dir

    from vlmsae.config import conf_dir, register_configs

    register_configs()
    (tmp_path / "mine.yaml").write_text(
        f"defaults:\n  - monosemanticity\n  - _self_\nhydra:\n  searchpath: [file://{conf_dir()}]\n{text}"
    )
    with initialize_config_dir(config_dir=str(tmp_path), version_base="1.3"):
        return compose(config_name="mine", overrides=["sae_path=x"])


def test_misspelt_key_fails_at_compose_time_naming_it(compose_cfg, tmp_path) -> None:
    """The job schema (vlmsae.config.jobs.monosemanticity) types every top-level key: a typo in a YAML
    that extends the job config, or a wrong type, fails at compose time and names the key."""
    assert _compose_user_yaml(tmp_path, "top_k: 3\n").top_k == 3
    with pytest.raises(Exception, match="Key 'topk' not in 'MonosemanticityJob'"):
        _compose_user_yaml(tmp_path, "topk: 3\n")
    with pytest.raises(Exception) as info:
        compose_cfg("monosemanticity", ["sae_path=x", "top_k=abc"])
    assert "full_key: top_k" in str(info.value.__cause__)
    with pytest.raises(Exception, match="topk"):
        compose_cfg("monosemanticity", ["sae_path=x", "topk=3"])
    # the defaults live in the schema: the composed job config holds every key with its default
    from vlmsae.config.jobs.monosemanticity import MonosemanticityJob

    cfg = compose_cfg("monosemanticity", ["sae_path=x"])
    assert cfg.top_k == MonosemanticityJob.top_k == 16 and cfg.zero_shot_template == "a photo of a {}."


def test_missing_sae_path_says_what_to_pass(compose_cfg, tmp_path) -> None:
    from vlmsae.monosemanticity import run

    with pytest.raises(ValueError, match="Pass sae_path="):
        run(compose_cfg("monosemanticity", ["data=tiny"]), out_dpath=tmp_path / "o")


def test_run_is_thin() -> None:
    """run() only wires the config to library calls: about 40 lines, and no other job or private name imported."""
    import ast
    import inspect

    from vlmsae import monosemanticity

    assert len(inspect.getsource(monosemanticity.run).splitlines()) <= 45
    tree = ast.parse(inspect.getsource(monosemanticity))
    jobs = {"extract", "train", "monosemanticity", "hierarchy", "steer", "steer_eval", "browse", "demo"}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("vlmsae"):
            names = [a.name for a in node.names]
            assert node.module not in {f"vlmsae.{job}" for job in jobs}, node.module
            assert not any(n in jobs or n.startswith("_") for n in names), (node.module, names)


@pytest.mark.slow
def test_logger_wandb_offline_run_holds_the_headline_figures(compose_cfg, tiny_sae_dpath, tmp_path, wandb_offline):
    from vlmsae.monosemanticity import run

    out = tmp_path / "out"
    summary = run(_compose(compose_cfg, tiny_sae_dpath, tmp_path, "logger=wandb", "data.n_per_class=2"), out_dpath=out)
    logged = wandb_offline(out)
    s = logged["summary"]
    assert s["ms/mean"] == pytest.approx(summary["mean"]) and s["ms/std"] == pytest.approx(summary["std"])
    assert s["ms/dead"] == summary["dead"] and s["neurons/mean"] == pytest.approx(summary["baseline"]["mean"])
    assert s["recon/fve"] == pytest.approx(summary["reconstruction"]["fve"]) and s["recon/l0"] == 6.0
    assert {"plots/ms_hist", "plots/ms_vs_freq", "latents"} <= logged["logged"]
    assert logged["job_type"] == "monosemanticity" and logged["config"]["sae"]["n_latents"] == 128

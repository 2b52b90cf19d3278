"""An SAE scored on activations it does not fit is stopped, not scored (vlmsae.models.open_sae.check_fit)."""

from __future__ import annotations

import math

import pytest
import torch


@pytest.fixture(scope="module")
def trained_tiny_sae(tmp_path_factory):
    """An SAE vlmsae.train trained on the tiny model (seed 0), block 2, CLS tokens."""
    from hydra import compose, initialize_config_dir

    from vlmsae.config import conf_dir, register_configs
    from vlmsae.train import run

    home = tmp_path_factory.mktemp("home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLMSAE_HOME", str(home))
        register_configs()
        over = ["layer=2", "tokens=cls", "trainer.max_steps=150", "logger=csv", "data.num_workers=0"]
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            cfg = compose(config_name="train", overrides=over)
        out = tmp_path_factory.mktemp("train")
        run(cfg, out_dpath=out)
    return out / "sae", home


def _ms_cfg(compose_cfg, sae_dpath, tmp_path, *extra):
    return compose_cfg(
        "monosemanticity",
        [
            f"sae_path='{sae_dpath}'",
            "data=tiny",
            "data.n_per_class=4",
            "embedder=pixels",
            f"embed_cache={tmp_path / 'emb_cache'}",
            "progress=false",
            "top_k=5",
            "baseline=false",
            *extra,
        ],
    )


def test_sae_records_the_model_seed_and_scores_on_its_own_model(compose_cfg, trained_tiny_sae, tmp_path, monkeypatch):
    from vlmsae.monosemanticity import run
    from vlmsae.sae import load_sae

    sae_dpath, home = trained_tiny_sae
    monkeypatch.setenv("VLMSAE_HOME", str(home))
    assert load_sae(sae_dpath).trained_on["model_seed"] == 0
    summary = run(_ms_cfg(compose_cfg, sae_dpath, tmp_path), out_dpath=tmp_path / "ok")  # no model=: its own
    assert summary["n_latents"] > 0


def test_sae_scored_on_another_seed_is_stopped_naming_the_cause(compose_cfg, trained_tiny_sae, tmp_path, monkeypatch):
    from vlmsae.monosemanticity import run

    sae_dpath, home = trained_tiny_sae
    monkeypatch.setenv("VLMSAE_HOME", str(home))
    cfg = _ms_cfg(compose_cfg, sae_dpath, tmp_path, "model=tiny", "model.seed=7")
    fix = r"does not fit the activations.*'seed': 7.*model.seed=<seed>.*check_fit=false"
    with pytest.raises(ValueError, match=fix) as err:
        run(cfg, out_dpath=tmp_path / "bad")
    print(err.value)
    assert not (tmp_path / "bad" / "ms_summary.json").exists()
    # check_fit=false scores it anyway
    run(_ms_cfg(compose_cfg, sae_dpath, tmp_path, "model=tiny", "model.seed=7", "check_fit=false"), tmp_path / "any")
    assert (tmp_path / "any" / "ms_summary.json").exists()


def test_check_fit_judges_trained_saes_on_fve_and_silent_rows():
    from vlmsae.models.open_sae import check_fit
    from vlmsae.sae import SAEConfig, build_sae

    sae = build_sae(SAEConfig(arch="relu", d_in=8, n_latents=16), seed=0)
    x_RD = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
    reads = {"model": "tiny", "layer": 2}
    fve, silent = check_fit(sae, x_RD, {"train_steps": 0}, reads)  # untrained (tests, baselines): not judged
    assert math.isnan(fve) and math.isnan(silent)
    with torch.no_grad():
        sae.b_enc.fill_(-1e3)  # nothing fires: every row silent
    with pytest.raises(ValueError, match=r"at runs/a/sae does not fit.*100% of rows silent.*check_fit=false"):
        check_fit(sae, x_RD, {"train_steps": 10, "model": "tiny"}, reads, "runs/a/sae")


def test_an_sae_of_a_random_network_rebuilds_that_network_not_a_download():
    """``model.pretrained=null`` on clip_b32 trains on a random network drawn from the seed: without ``model=``
    the job rebuilds it (no OpenAI download), with the recorded seed."""
    from vlmsae.models.open_sae import trained_on_model_spec

    spec = trained_on_model_spec({"model": "clip_b32", "pretrained": None, "model_seed": 3, "layer": 10})
    assert spec.name == "clip_b32" and spec.pretrained is None and spec.seed == 3
    spec = trained_on_model_spec({"model": "clip_b32", "pretrained": "openai", "model_seed": None})
    assert spec.pretrained == "openai" and spec.seed == 0

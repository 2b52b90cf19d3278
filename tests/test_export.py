"""python -m vlmsae.export: any supported SAE -> another library's layout (dictionary_learning end to end here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from vlmsae.export import run
from vlmsae.formats import read_run_info
from vlmsae.sae import SAEConfig, build_sae, load, save_sae


@pytest.fixture
def sae_dpath(tmp_path):
    sae = build_sae(SAEConfig(arch="matryoshka", d_in=8, n_latents=32, k=3, group_fractions=(0.25, 0.75)), seed=0)
    with torch.no_grad():
        sae.threshold.fill_(0.05)
        sae.b_dec.normal_()
    sae.trained_on = {"model": "tiny", "pretrained": None, "layer": 1, "tokens": "cls"}
    return save_sae(sae, tmp_path / "sae")


def test_export_to_dictionary_learning_and_back(compose_cfg, sae_dpath, tmp_path):
    out = tmp_path / "dl"
    cfg = compose_cfg("export", [f"sae_path={sae_dpath}", "format=dictionary_learning", f"out={out}"])
    result = run(cfg, out_dpath=tmp_path / "run")
    assert result["files"] == ["ae.pt", "config.json"] and result["from_format"] == "vlmsae"
    assert json.loads((out / "config.json").read_text())["trainer"]["dict_class"] == "MatryoshkaBatchTopKSAE"
    x = torch.randn(16, 8)
    original, back = load(sae_dpath), load(out)
    assert back.trained_on["format"] == "dictionary_learning" and back.group_sizes == original.group_sizes == [8, 24]
    torch.testing.assert_close(back.encode(x), original.encode(x), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(back(x), original(x), atol=1e-6, rtol=1e-6)
    info = read_run_info(tmp_path / "run")
    assert info.extra["result"]["out"] == str(out)
    # the export reads back through the same job, to vlmsae's own layout
    cfg = compose_cfg("export", [f"sae_path={out}", "format=vlmsae", f"out={tmp_path / 'v'}"])
    assert run(cfg, out_dpath=tmp_path / "run2")["from_format"] == "dictionary_learning"
    torch.testing.assert_close(load(tmp_path / "v").encode(x), original.encode(x), atol=1e-6, rtol=1e-6)


def test_export_refuses_a_non_empty_out_and_unknown_formats(compose_cfg, sae_dpath, tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("keep")
    cfg = compose_cfg("export", [f"sae_path={sae_dpath}", "format=dictionary_learning", f"out={tmp_path / 'full'}"])
    with pytest.raises(FileExistsError, match="is not empty; choose a new out= folder or pass overwrite=true"):
        run(cfg, out_dpath=tmp_path / "run")
    cfg.overwrite = True
    assert (tmp_path / "full" / "ae.pt").exists() is False and run(cfg, out_dpath=tmp_path / "run")
    cfg = compose_cfg("export", [f"sae_path={sae_dpath}", "format=msae", f"out={tmp_path / 'x'}"])
    with pytest.raises(ValueError, match=r"format='msae' cannot be exported; export targets: vlmsae, dictionary"):
        run(cfg, out_dpath=tmp_path / "run")


def test_export_for_the_papers_code_spells_the_matryoshka_class_its_way(compose_cfg, sae_dpath, tmp_path):
    """sae-for-vlm's load_dictionary knows only MatroyshkaBatchTopKSAE (sic): matryoshka_class= writes that name."""
    out = tmp_path / "paper"
    overrides = [f"sae_path={sae_dpath}", "format=dictionary_learning", f"out={out}"]
    cfg = compose_cfg("export", [*overrides, "matryoshka_class=MatroyshkaBatchTopKSAE"])
    run(cfg, out_dpath=tmp_path / "run")
    assert json.loads((out / "config.json").read_text())["trainer"]["dict_class"] == "MatroyshkaBatchTopKSAE"
    x = torch.randn(16, 8)
    torch.testing.assert_close(load(out).encode(x), load(sae_dpath).encode(x), atol=1e-6, rtol=1e-6)
    cfg = compose_cfg("export", [f"sae_path={sae_dpath}", "format=saelens", f"out={tmp_path / 'sl'}"])
    cfg.matryoshka_class = "MatroyshkaBatchTopKSAE"  # an option for another format is refused, not dropped
    with pytest.raises(ValueError, match="drop matryoshka_class"):
        run(cfg, out_dpath=tmp_path / "run2")


def test_export_out_expands_the_home_folder(compose_cfg, sae_dpath, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    cfg = compose_cfg("export", [f"sae_path={sae_dpath}", "format=vlmsae", 'out="~/exports/v"'])
    result = run(cfg, out_dpath=tmp_path / "run")
    assert result["out"] == str(tmp_path / "home" / "exports" / "v") and (tmp_path / "home" / "exports" / "v").is_dir()


def test_export_schema_refuses_unknown_keys(compose_cfg):
    with pytest.raises(Exception, match="formt"):
        compose_cfg("export", ["sae_path=x", "formt=saelens", "out=y"])


@pytest.mark.slow
def test_export_cli_subprocess(repo_root, sae_dpath, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    cmd = [
        sys.executable,
        "-m",
        "vlmsae.export",
        f"sae_path={sae_dpath}",
        "format=dictionary_learning",
        f"out={tmp_path / 'dl'}",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    proc = subprocess.run(cmd, cwd=repo_root, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "exported matryoshka SAE (8 -> 32) from vlmsae to dictionary_learning" in proc.stdout
    assert (tmp_path / "dl" / "ae.pt").is_file() and (tmp_path / "run" / "run_info.json").is_file()

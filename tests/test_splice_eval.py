"""``python -m vlmsae.splice_eval``: the real configs composed with model=tiny_llava, run in-process (the built-in
prompt set, a prompt file) and via the CLI; bad inputs are refused naming the value and the fix."""

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


def test_splice_eval_run(compose_cfg, home, sae_dpath, tmp_path):
    from vlmsae.formats import read_splice
    from vlmsae.splice_eval import run

    cfg = compose_cfg(
        "splice_eval", [f"sae_path={sae_dpath}", "n_images=2", "max_new_tokens=4", "batch_size=2", "zero_shot=true"]
    )
    assert cfg.model.name == "tiny_llava" and cfg.prompts is None
    out = run(cfg, out_dpath=tmp_path / "run")
    keys = ("kl", "nll_clean", "nll_spliced", "nll_zero", "nll_mean", "frac_recovered_zero", "frac_recovered_mean")
    assert all(isinstance(out[k], float) for k in keys)
    assert out["kl"] > 0 and out["kl_error_preserving"] <= 1e-6 and out["n_answers"] == 2
    saved = read_splice(tmp_path / "run")
    assert saved.summary["kl"] == pytest.approx(out["kl"]) and saved.settings["layer"] == 2
    assert len(saved.per_answer) == 2 and saved.rows[0]["condition"] == "clean"
    assert any("clean model's greedy answer" in n for n in saved.notes)
    assert any("zero-shot" in n and "skipped" in n for n in saved.notes)  # the SAE reads LLaVA, not open_clip
    md = (tmp_path / "run" / "splice.md").read_text()
    assert "| spliced (replace) |" in md and "| mean-ablated |" in md and "NLL / answer token" in md
    assert (tmp_path / "run" / "run_info.json").exists()

    # A prompt file with reference answers; relative images are read under images=<folder>.
    from PIL import Image

    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (32, 32), "red").save(tmp_path / "imgs" / "red.png")
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps([{"image": "red.png", "prompt": "what is shown?", "answer": "a red image"}]))
    cfg.prompts, cfg.images, cfg.zero_shot = str(prompts), str(tmp_path / "imgs"), False
    again = run(cfg, out_dpath=tmp_path / "file")
    per = read_splice(tmp_path / "file").per_answer
    assert again["n_answers"] == 1 and per[0]["answer"] == "a red image" and per[0]["n_tokens"] == 3


def test_splice_eval_bad_inputs(compose_cfg, home, sae_dpath, tmp_path):
    from vlmsae.splice_eval import run

    no_answers = tmp_path / "no_answers.csv"
    no_answers.write_text("image,prompt\nwhite,describe the image.\n")
    cfg = compose_cfg("splice_eval", [f"sae_path={sae_dpath}", f"prompts={no_answers}"])
    with pytest.raises(ValueError, match=r"no_answers\.csv.*no answer.*reference answer"):
        run(cfg, out_dpath=tmp_path / "bad")
    empty = tmp_path / "empty.csv"
    empty.write_text("image,prompt,answer\n")
    cfg.prompts = str(empty)
    with pytest.raises(ValueError, match=r"empty\.csv.*holds no rows"):
        run(cfg, out_dpath=tmp_path / "bad")
    cfg.prompts = None
    wide = save_sae(
        build_sae(SAEConfig(arch="topk", d_in=64, n_latents=64, k=8)), tmp_path / "wide", trained_on={"layer": 2}
    )
    cfg.sae_path = str(wide)
    with pytest.raises(ValueError, match=r"64-d activations.*32-d.*use an SAE trained on this model's vision tower"):
        run(cfg, out_dpath=tmp_path / "bad")
    cfg.sae_path, cfg.layer = str(sae_dpath), 3
    with pytest.raises(ValueError, match=r"layer 3 comes after block 2.*pass layer=<block> <= 2"):
        run(cfg, out_dpath=tmp_path / "bad")
    cfg.layer = 9
    with pytest.raises(ValueError, match=r"layer=9 is out of range.*4 blocks"):
        run(cfg, out_dpath=tmp_path / "bad")


@pytest.mark.slow
def test_splice_eval_cli_subprocess(repo_root, home, sae_dpath, tmp_path):
    env = {**os.environ, "VLMSAE_HOME": str(home), "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    cmd = [
        sys.executable,
        "-m",
        "vlmsae.splice_eval",
        f"sae_path={sae_dpath}",
        "n_images=1",
        "max_new_tokens=3",
        f"hydra.run.dir={tmp_path / 'cli'}",
    ]
    proc = subprocess.run(cmd, cwd=repo_root, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    saved = json.loads((tmp_path / "cli" / "splice.json").read_text())
    assert saved["summary"]["n_answers"] == 1 and saved["format_version"] == 1
    assert "| clean |" in (tmp_path / "cli" / "splice.md").read_text()
    assert '"frac_recovered_zero"' in proc.stdout

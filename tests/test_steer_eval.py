"""``vlmsae.steer_eval.run`` (METHOD §5) end to end on the tiny LLaVA, the tiny CLIP embedder and a top-images index
of generated images; bad inputs name the problem. The score's maths is in tests/steering/test_score.py."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from vlmsae.steering.score import concept_embeddings


@pytest.fixture
def eval_setup(tmp_path, monkeypatch):
    """A tiny SAE at block 2, 12 generated colour images, and a top-images index for latents 0..2."""
    from PIL import Image

    from vlmsae.metrics.topimages import TopImages
    from vlmsae.sae import SAEConfig, build_sae, save_sae

    monkeypatch.setenv("VLMSAE_HOME", str(tmp_path / "home"))
    sae_dpath = save_sae(
        build_sae(SAEConfig(arch="topk", d_in=32, n_latents=64, k=8), seed=0),
        tmp_path / "sae",
        trained_on={"model": "tiny_llava", "layer": 2},
    )
    colours = ["red", "green", "blue", "yellow", "white", "black", "orange", "purple", "cyan", "pink", "gray", "brown"]
    img_dpath = tmp_path / "images"
    img_dpath.mkdir()
    paths = []
    for i, c in enumerate(colours):
        p = img_dpath / f"{i:02d}_{c}.png"
        Image.new("RGB", (32, 32), c).save(p)
        paths.append(str(p))
    image_idx = torch.full((64, 4), -1, dtype=torch.long)
    acts = torch.zeros(64, 4)
    for j in range(3):
        image_idx[j] = torch.arange(4) + 4 * j
        acts[j] = torch.tensor([4.0, 3.0, 2.0, 1.0])
    acts[2, 3] = 0.0  # a zero activation: never part of a concept
    labels = [i // 4 for i in range(12)]
    top_dpath = TopImages(image_idx, acts, keys=colours, paths=paths, labels=labels).save(tmp_path / "top_images")
    names_fpath = tmp_path / "names.txt"
    names_fpath.write_text("cat\ndog\ncar\n")
    return sae_dpath, top_dpath, img_dpath, names_fpath


def test_steer_eval_run(compose_cfg, eval_setup, tmp_path):
    from vlmsae.models.embedders import load_embedder
    from vlmsae.models.llava import load_llava_spec
    from vlmsae.sae import load_sae
    from vlmsae.steer_eval import run
    from vlmsae.steering import generate_answers, steer

    sae_dpath, top_dpath, img_dpath, names_fpath = eval_setup
    cfg = compose_cfg(
        "steer_eval",
        [
            f"sae_path={sae_dpath}",
            f"top_images={top_dpath}",
            f"images={img_dpath}",
            "n_images=3",
            "latents=[0,1,2]",
            "alpha=60",
            "embedder=tiny",
            f"class_names={names_fpath}",
            "batch_size=4",
            "max_new_tokens=3",
            "top_n=16",
            "compare_add=true",
        ],
    )
    out = run(cfg, out_dpath=tmp_path / "run")
    run_dpath = tmp_path / "run"
    saved = json.loads((run_dpath / "steer_eval.json").read_text())
    assert set(saved["summary"]) == {
        "steered",
        "not steered",
        "activation steering (add)",
        "upper bound (true class names)",
        "lower bound (shuffled names)",
    }
    assert saved["summary"]["steered"]["n"] == saved["summary"]["not steered"]["n"] == 9  # 3 latents x 3 images
    assert saved["settings"]["n_images"] == 3
    assert saved["summary"]["upper bound (true class names)"]["n"] == 11  # 4 + 4 + 3 nonzero top images
    for s in saved["summary"].values():
        assert -1.0 <= s["mean"] <= 1.0
    assert [p["n_top_images"] for p in saved["per_latent"]] == [4, 4, 3]
    assert "| steered |" in (run_dpath / "steer_eval.md").read_text()
    assert (run_dpath / "run_info.json").exists()
    rows = list(csv.DictReader((run_dpath / "answers.csv").open()))
    assert len(rows) == 9 and out["table"].startswith("| condition |")

    # Recompute one row by hand: the per-sample batched steering equals steering that image alone,
    # and the score is the cosine of the word's text embedding with the concept.
    model, processor = load_llava_spec(dict(cfg.model))
    sae = load_sae(sae_dpath)
    from PIL import Image

    row = rows[7]  # latent 2, third image (a batch that mixes latents 1 and 2)
    assert int(row["latent"]) == 2
    with steer(model, sae, {2: 60.0}):
        alone = generate_answers(model, processor, [Image.open(row["image"]).convert("RGB")], cfg.prompt, 3)[0]
    assert alone == row["steered_answer"]
    embedder = load_embedder(cfg.embedder)
    concept = concept_embeddings(
        [[Image.open(f"{img_dpath}/{n}") for n in ("08_cyan.png", "09_pink.png", "10_gray.png")]], embedder.embed
    )[0]
    if row["steered_word"]:
        text = embedder.embed_text([row["steered_word"]])[0]
        expected = torch.nn.functional.cosine_similarity(text, concept, dim=0).item()
        assert float(row["steered_score"]) == pytest.approx(expected, abs=1e-3)


def test_steer_eval_bad_inputs(compose_cfg, eval_setup, tmp_path):
    from vlmsae.steer_eval import run
    from vlmsae.steering.evaluate import latent_list

    sae_dpath, top_dpath, _, _ = eval_setup
    assert latent_list(3) == [0, 1, 2]
    cfg = compose_cfg("steer_eval", [f"sae_path={sae_dpath}", f"top_images={tmp_path}", "embedder=tiny"])
    with pytest.raises(FileNotFoundError, match="top.safetensors"):
        run(cfg, out_dpath=tmp_path / "bad")
    cfg.top_images = str(top_dpath)
    cfg.latents = [70]
    with pytest.raises(ValueError, match="Latent 70"):
        run(cfg, out_dpath=tmp_path / "bad")


# --- Concept images are decoded latent by latent (issue #12 item 9) -------------------------------------------


# --- A sweep in one run (issue 17 item 2) --------------------------------------------------------------------------
@pytest.mark.slow  # three steering runs on the tiny LLaVA: ~20 s
def test_steer_eval_sweep_tables_every_sae(compose_cfg, eval_setup, tmp_path, monkeypatch):
    """Two SAEs (topk, relu) with their indexes in an MS sweep's layout: steer_table.csv holds each SAE's scores as
    a single run computes them; LLaVA and the embedder load once; a missing index fails before LLaVA loads."""
    import shutil

    from vlmsae.models import llava
    from vlmsae.sae import SAEConfig, build_sae, save_sae
    from vlmsae.steer_eval import run

    sae_dpath, top_dpath, img_dpath, _ = eval_setup
    relu = build_sae(SAEConfig(arch="relu", d_in=32, n_latents=64), seed=1)
    relu_dpath = save_sae(relu, tmp_path / "sweep" / "1" / "sae", trained_on={"model": "tiny_llava", "layer": 2})
    shutil.copytree(sae_dpath, tmp_path / "sweep" / "0" / "sae")
    for name in ("topk_x2_L2", "relu_x2_L2"):
        shutil.copytree(top_dpath, tmp_path / "ms_sweep" / name / "top_images")
    over = [f"images={img_dpath}", "n_images=2", "latents=[0,1]", "alpha=60", "embedder=tiny", "max_new_tokens=3"]
    loads, real = [], llava.load_llava_spec
    monkeypatch.setattr("vlmsae.steering.setup.load_llava_spec", lambda *a: (loads.append(1), real(*a))[1])
    cfg = compose_cfg("steer_eval", [f"sae_path={tmp_path / 'sweep'}", f"top_images={tmp_path / 'ms_sweep'}", *over])
    out = run(cfg, out_dpath=tmp_path / "o")
    assert out["sweep"] == ["topk_x2_L2", "relu_x2_L2"] and len(loads) == 1
    rows = {r["sae"]: r for r in csv.DictReader((tmp_path / "o" / "steer_table.csv").open())}
    for name, dpath in (("topk_x2_L2", sae_dpath), ("relu_x2_L2", relu_dpath)):
        single = run(
            compose_cfg("steer_eval", [f"sae_path={dpath}", f"top_images={top_dpath}", *over]),
            out_dpath=tmp_path / name,
        )
        assert (tmp_path / "o" / name / "steer_eval.json").is_file()
        for cond, stats in single["summary"].items():
            assert float(rows[name][cond]) == pytest.approx(stats["mean"], abs=1e-4), (name, cond)
    assert (
        "| sae | architecture | expansion | layer | steered | not steered |"
        in (tmp_path / "o" / "steer_table.md").read_text()
    )
    shutil.rmtree(tmp_path / "ms_sweep" / "relu_x2_L2")
    with pytest.raises(FileNotFoundError, match="relu_x2_L2/top_images' is not a folder"):
        run(cfg, out_dpath=tmp_path / "bad")
    assert len(loads) == 3  # the sweep once, each single run once, the bad sweep never


@pytest.mark.slow
def test_logger_wandb_offline_run_holds_the_score_and_its_bounds(compose_cfg, eval_setup, tmp_path, wandb_offline):
    from vlmsae.steer_eval import run

    sae_dpath, top_dpath, img_dpath, names_fpath = eval_setup
    overrides = [f"sae_path={sae_dpath}", f"top_images={top_dpath}", f"images={img_dpath}", "n_images=1"]
    overrides += ["latents=[0]", "embedder=tiny", f"class_names={names_fpath}", "max_new_tokens=2", "logger=wandb"]
    out = run(compose_cfg("steer_eval", overrides), out_dpath=tmp_path / "run")
    s = wandb_offline(tmp_path / "run")["summary"]
    for key, condition in (
        ("steered", "steered"),
        ("upper_bound", "upper bound (true class names)"),
        ("lower_bound", "lower bound (shuffled names)"),
    ):
        expected = out["summary"][condition]["mean"]
        assert s[f"score/{key}"] == pytest.approx(expected, nan_ok=True), key

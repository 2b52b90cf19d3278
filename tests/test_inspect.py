"""``python -m vlmsae.inspect`` end to end: planted concepts with an MS run of the same SAE (names, query, the page,
the logger table, the browser's link), compare, the tiny default model, and the refusals of bad input."""

from __future__ import annotations

import json

import pytest
import torch

from vlmsae import formats


def _draw(fpath, boxes: dict, seed: int = 0):
    """A 64 px grey noisy PNG with a filled rectangle of each planted colour at (x0, y0, x1, y1)."""
    import numpy as np
    from PIL import Image, ImageDraw

    from vlmsae.data.concepts import COLOURS

    noise = np.clip(np.random.default_rng(seed).normal(128, 8, (64, 64, 3)), 0, 255).astype(np.uint8)
    image = Image.fromarray(noise, "RGB")
    for colour, box in boxes.items():
        ImageDraw.Draw(image).rectangle(box, fill=COLOURS[colour])
    fpath.parent.mkdir(parents=True, exist_ok=True)
    image.save(fpath)
    return fpath


class _ColourCLIP:
    """A test CLIP: an image embeds as the share of its pixels near each planted colour; a prompt naming a colour
    as that colour's axis (anything else: one more axis)."""

    def __init__(self, spec=None) -> None:
        from vlmsae.data.concepts import COLOURS

        self.spec, self.colours = spec, list(COLOURS)
        self.rgb_A3 = torch.tensor([COLOURS[c] for c in self.colours], dtype=torch.float32)

    def embed(self, images, progress=False):
        import numpy as np

        rows = []
        for im in images:
            px = torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32).reshape(-1, 3))
            rows.append(torch.cat([(torch.cdist(px, self.rgb_A3) < 60).float().mean(0), torch.zeros(1)]))
        return torch.stack(rows)

    def embed_text(self, prompts):
        out = torch.zeros(len(prompts), len(self.colours) + 1)
        for i, p in enumerate(prompts):
            hits = [c for c, name in enumerate(self.colours) if f" {name}." in p]
            out[i, hits[0] if hits else -1] = 1.0
        return out


@pytest.fixture
def planted_run(planted_sae, planted_tap, compose_cfg, tmp_path, monkeypatch):
    """An MS run of the planted SAE on 6 images per colour (a folder per colour), its latents named from the
    colour words by the test CLIP. Returns (sae folder, latent of each colour, MS run folder)."""
    from vlmsae.models import embedders
    from vlmsae.monosemanticity import run

    monkeypatch.setattr(embedders, "load_embedder", _ColourCLIP)
    for c, colour in enumerate(planted_tap.colours):
        for i in range(6):
            x, y = 8 * (i % 4), 8 * (i // 4)
            _draw(tmp_path / "data" / colour / f"{i}.png", {colour: (x, y, x + 24, y + 24)}, seed=10 * c + i)
    (tmp_path / "vocab.txt").write_text("dog\n" + "\n".join(planted_tap.colours) + "\ncar\n")
    sae_dpath, latent_of = planted_sae
    ms_dpath = tmp_path / "runs" / "monosemanticity"
    over = [f"sae_path={sae_dpath}", "data=folder", f"data.root={tmp_path / 'data'}", "data.num_workers=0"]
    over += ["embedder=tiny", f"names={tmp_path / 'vocab.txt'}", "progress=false", "top_k=4", "logger=none"]
    run(compose_cfg("monosemanticity", [*over, f"embed_cache={tmp_path / 'cache'}"]), out_dpath=ms_dpath)
    return sae_dpath, latent_of, ms_dpath


def test_inspect_names_the_planted_latent_draws_its_heatmap_and_answers_a_query(planted_run, compose_cfg, tmp_path):
    from vlmsae.inspect import run

    sae_dpath, latent_of, ms_dpath = planted_run
    colours = ["red", "green", "blue", "yellow"]
    red, blue = latent_of[colours.index("red")], latent_of[colours.index("blue")]
    image = _draw(tmp_path / "mine" / "photo.png", {"red": (40, 0, 63, 15), "blue": (0, 40, 15, 63)})
    out = tmp_path / "runs" / "inspect"
    over = [f"sae_path={sae_dpath}", f"images={image}", f"ms_run={ms_dpath}", "query='red'", "top_n=3"]
    summary = run(compose_cfg("inspect", over), out_dpath=out)

    result = formats.read_inspect(out)
    (im,) = result.images
    assert im["key"] == "photo.png" and im["grid"] == 8 and im["n_rows"] == 64 and im["fve"] > 0.8
    pooled = [h["latent"] for h in im["top_pooled"]]
    assert {red, blue} <= set(pooled) and {red, blue} <= {h["latent"] for h in im["top_peak"]}
    hit = next(h for h in im["top_pooled"] if h["latent"] == red)
    assert hit["peak_patch"] in {5, 6, 7, 13, 14, 15}  # rows 0-1, cols 5-7: where red was drawn
    assert (out / hit["heat_png"]).is_file() and (out / im["thumb"]).is_file()
    # what the MS run says of the latent: its planted name, its MS, frequency, group and top images
    info = result.latents[str(red)]
    assert info["name"] == "red" and 0 < info["ms"] <= 1 and 0 < info["freq"] <= 1 and info["group"] == 0
    assert info["top"] and all((out / t).is_file() for t in info["top"])
    # query: the latent named for the word comes first, with where it fires in the image
    (first, *_) = result.query["hits"]
    assert result.query["text"] == "red" and first["latent"] == red == summary["query_top"]
    assert first["per_image"][0]["peak_patch"] == hit["peak_patch"]
    assert result.settings["ms_run"] == str(ms_dpath) and result.settings["pool"] == "mean"

    page = (out / "inspect.html").read_text()
    assert f'id="latent-{red}"' in page and hit["heat_png"] in page and "query: red" in page
    assert page.count(f'id="latent-{red}"') == 1  # one anchor per latent, for the browser's link
    assert "<script" not in page  # a static page: nothing runs
    csv_text = (out / "inspect_latents.csv").read_text()
    assert csv_text.startswith("image,rank,latent,name") and f"photo.png,0,{pooled[0]}," in csv_text
    figures = json.loads((out / "csv" / "summary.json").read_text())
    assert figures["inspect/n_images"] == 1 and figures["inspect/mean_fve"] == pytest.approx(im["fve"])
    assert formats.read_run_info(out).extra["sae_trained_on"]["tokens"] == "patches"

    # the feature browser of the MS run links each card the inspect run shows to it
    from vlmsae.report.browser import build_browser, find_runs

    data = build_browser(find_runs(ms_dpath), tmp_path / "browser", heatmaps="off")
    card = next(c for c in data["cards"] if c["latent"] == red)
    assert card["inspect"] == f"../runs/inspect/inspect.html#latent-{red}"
    assert (tmp_path / "browser" / card["inspect"].split("#")[0]).resolve() == (out / "inspect.html").resolve()
    shown = {int(k) for k in result.latents}
    assert all(("inspect" in c) == (c["latent"] in shown) for c in data["cards"])
    assert f'"inspect":"../runs/inspect/inspect.html#latent-{red}"' in (tmp_path / "browser" / "index.html").read_text()


def test_compare_two_images(planted_sae, planted_tap, compose_cfg, tmp_path):
    from vlmsae.inspect import run

    sae_dpath, latent_of = planted_sae
    a = _draw(tmp_path / "a.png", {"green": (0, 0, 30, 30), "yellow": (40, 40, 63, 63)})
    b = _draw(tmp_path / "b.png", {"blue": (0, 0, 30, 30), "yellow": (40, 40, 63, 63)}, seed=1)
    over = [f"sae_path={sae_dpath}", f"images=[{a},{b}]", "compare=true", "logger=none"]
    run(compose_cfg("inspect", over), out_dpath=tmp_path / "out")
    result = formats.read_inspect(tmp_path / "out")
    assert result.compare["a"] == "a.png" and result.compare["b"] == "b.png"
    assert result.compare["a_over_b"][0]["latent"] == latent_of[planted_tap.colours.index("green")]
    assert result.compare["b_over_a"][0]["latent"] == latent_of[planted_tap.colours.index("blue")]
    green = str(latent_of[planted_tap.colours.index("green")])
    assert green in result.latents and all(v == {"group": 0, "top": []} for v in result.latents.values())  # no ms_run
    assert "compare a.png vs b.png" in (tmp_path / "out" / "inspect.html").read_text()
    with pytest.raises(ValueError, match="compare=true needs exactly two images"):
        run(compose_cfg("inspect", [*over[:1], f"images={a}", "compare=true"]), out_dpath=tmp_path / "o2")


def test_logger_wandb_logs_the_figures_and_the_heatmap_table(planted_sae, compose_cfg, tmp_path, wandb_offline):
    from vlmsae.inspect import run

    image = _draw(tmp_path / "a.png", {"red": (0, 0, 30, 30)})
    out = tmp_path / "out"
    summary = run(compose_cfg("inspect", [f"sae_path={planted_sae[0]}", f"images={image}", "logger=wandb"]), out)
    logged = wandb_offline(out)
    assert logged["job_type"] == "inspect" and "inspect" in logged["logged"]  # the table, heatmaps as images
    assert logged["summary"]["inspect/n_images"] == 1
    assert logged["summary"]["inspect/mean_fve"] == pytest.approx(summary["mean_fve"])


def test_the_tiny_default_model(compose_cfg, tmp_path, monkeypatch):
    """The real tiny open_clip ViT (random weights) and a random SAE on its block 2: the whole job on one image."""
    monkeypatch.setenv("VLMSAE_HOME", str(tmp_path / "home"))
    from vlmsae.data.concepts import make_concept_images
    from vlmsae.inspect import run
    from vlmsae.sae import SAEConfig, build_sae, save_sae

    root = make_concept_images(tmp_path / "concepts", n_per_class=1, size=48, seed=0)
    sae = build_sae(SAEConfig(arch="matryoshka", d_in=64, n_latents=32, k=4, group_fractions=[0.25, 0.75]), seed=0)
    sae_dpath = save_sae(sae, tmp_path / "sae", trained_on={"model": "tiny", "layer": 2, "tokens": "patches"})
    image = sorted(root.rglob("*.png"))[0]
    summary = run(compose_cfg("inspect", [f"sae_path={sae_dpath}", f"images={image}"]), out_dpath=tmp_path / "out")
    (im,) = formats.read_inspect(tmp_path / "out").images
    assert im["n_rows"] == im["grid"] ** 2 > 1 and len(im["top_pooled"]) == 8
    assert all(len(h["heat"]) == im["n_rows"] for h in im["top_pooled"])
    assert summary["n_images"] == 1 and (tmp_path / "out" / "inspect.html").is_file()
    groups = {k: v["group"] for k, v in formats.read_inspect(tmp_path / "out").latents.items()}
    assert groups and all(g == (0 if int(k) < 8 else 1) for k, g in groups.items())  # the SAE's Matryoshka groups


def test_bad_input_is_refused_with_the_path_and_the_fix(planted_run, compose_cfg, tmp_path):
    from vlmsae.inspect import run
    from vlmsae.sae import SAEConfig, build_sae, save_sae

    sae_dpath, _, ms_dpath = planted_run
    image = _draw(tmp_path / "ok.png", {"red": (0, 0, 20, 20)})
    notes = tmp_path / "notes.jpg"
    notes.write_text("meeting notes, not a picture")

    def refused(over, err, match):
        with pytest.raises(err, match=match):
            run(compose_cfg("inspect", over), out_dpath=tmp_path / "never")

    refused([f"sae_path={sae_dpath}", f"images={notes}"], ValueError, r"notes\.jpg is not an image.*Pass image files")
    refused([f"sae_path={sae_dpath}", f"images={tmp_path / 'gone.png'}"], FileNotFoundError, r"gone\.png.*images=")
    narrow = save_sae(build_sae(SAEConfig(arch="topk", d_in=32, n_latents=16, k=2), seed=0), tmp_path / "narrow",
                      trained_on={"model": "tiny", "layer": 2, "tokens": "patches"})  # fmt: skip
    refused([f"sae_path={narrow}", f"images={image}"], ValueError, rf"sae_path={narrow}.*32-d.*64-d.*Pass the model")
    other = save_sae(build_sae(SAEConfig(arch="topk", d_in=64, n_latents=8, k=2), seed=1), tmp_path / "other",
                     trained_on={"model": "tiny", "layer": 2, "tokens": "patches"})  # fmt: skip
    refused(
        [f"sae_path={other}", f"images={image}", f"ms_run={ms_dpath}"],
        ValueError,
        rf"ms_run={ms_dpath} is a monosemanticity run of sae_path={sae_dpath}.*Pass the MS run of this SAE",
    )
    refused([f"sae_path={sae_dpath}", f"images={image}", f"ms_run={tmp_path}"], FileNotFoundError, "no latents.csv")
    refused([f"sae_path={sae_dpath}", f"images={image}", "query=red"], ValueError, "pass ms_run=")
    assert not (tmp_path / "never").exists()  # nothing is written before the input is checked


def test_run_is_thin_and_imports_only_the_light_layers():
    import ast
    import inspect as std_inspect

    import vlmsae.inspect as job

    tree = ast.parse(std_inspect.getsource(job))
    top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    modules = [n.module if isinstance(n, ast.ImportFrom) else n.names[0].name for n in top]
    assert all(m.split(".")[0] in ("__future__", "json", "pathlib", "typing", "omegaconf") or m.startswith(
        ("vlmsae.config", "vlmsae.utils", "vlmsae.formats")) for m in modules), modules  # fmt: skip
    lines, _ = std_inspect.getsourcelines(job.run)
    assert len(lines) <= 60


@pytest.mark.slow  # a fresh interpreter loads torch and open_clip: ~15 s on a shared machine
def test_cli(tmp_path, repo_root):
    import os
    import subprocess
    import sys

    from vlmsae.sae import SAEConfig, build_sae, save_sae

    sae = build_sae(SAEConfig(arch="topk", d_in=64, n_latents=32, k=4), seed=0)
    sae_dpath = save_sae(sae, tmp_path / "sae", trained_on={"model": "tiny", "layer": 2, "tokens": "patches"})
    image = _draw(tmp_path / "photo.png", {"red": (0, 0, 30, 30)})
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "VLMSAE_HOME": str(tmp_path / "home")}
    cmd = [sys.executable, "-m", "vlmsae.inspect", f"sae_path={sae_dpath}", f"images={image}", "top_n=3"]
    proc = subprocess.run([*cmd, f"hydra.run.dir={tmp_path / 'cli'}"], cwd=repo_root, env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"open file://{(tmp_path / 'cli' / 'inspect.html').resolve()}" in proc.stdout
    (im,) = formats.read_inspect(tmp_path / "cli").images
    assert im["key"] == "photo.png" and len(im["top_pooled"]) == 3
    bad = subprocess.run([*cmd, "top_k=3"], cwd=repo_root, env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "top_k" in bad.stderr  # a misspelt key fails at compose time, named

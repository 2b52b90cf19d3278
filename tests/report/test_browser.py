"""The static feature browser: built from a fixture run folder, then driven in headless Chromium.

The fixture follows docs/ARCHITECTURE.md "Shared on-disk outputs" by hand (latents.csv, a
top_images/ index, latent_taxa.csv, steer.json), so these tests pin the documented formats rather
than whatever the other jobs happen to write today. The page is checked in a real browser through a
small Chrome DevTools Protocol driver over ``--remote-debugging-pipe`` (:mod:`vlmsae.report.cdp`,
stdlib only, the system ``chromium``): card count, sort order after clicks, search, escaping of a
hostile label, images and heatmaps, and a screenshot.
"""

from __future__ import annotations

import base64
import csv
import json
import os
import shutil
from pathlib import Path

import pytest

from vlmsae.formats import read_latents_csv
from vlmsae.report.browser import build_browser, find_runs, json_for_script, run_sae_trained_on
from vlmsae.report.cdp import Chrome

EVIL = "<script>alert(1)</script>"
EVIL_IMG = '<img src=x onerror="window.__pwned=1">'
# latent: (ms, freq, group); latent 5 is dead (no MS), latent 4 has the lowest live MS.
LATENTS = {
    0: (0.91, 0.02, 2),
    1: (0.55, 0.40, 0),
    2: (0.78, 0.10, 1),
    3: (0.62, 0.05, 0),
    4: (0.30, 0.25, 1),
    5: (None, 0.0, 3),
}
LABELS = {0: "Felidae", 1: EVIL, 2: "Canidae", 3: EVIL_IMG, 4: "Felidae </script> & co"}
N_IMAGES, T, GRID = 10, 4, 4


def _write_fixture(root: Path, with_patch_acts: bool = True) -> Path:
    """A monosemanticity run + hierarchy run + steering run under ``root`` (a demo-like layout)."""
    import torch
    from PIL import Image, ImageDraw
    from safetensors.torch import save_file

    ms_dpath, img_dpath = root / "ms", root / "images"
    (ms_dpath / "top_images").mkdir(parents=True)
    img_dpath.mkdir(parents=True)
    paths = []
    for i in range(N_IMAGES):
        img = Image.new("RGB", (48, 36), (30 + 20 * i, 90, 200 - 15 * i))
        ImageDraw.Draw(img).ellipse((8 + i, 6, 30 + i, 28), fill=(250, 220 - 20 * i, 40))
        fpath = img_dpath / f"img{i}.png"
        img.save(fpath)
        paths.append(str(fpath))
    with open(ms_dpath / "latents.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["latent", "ms", "freq", "max_act", "group", "top_keys"])
        for k, (ms, freq, group) in LATENTS.items():
            w.writerow([k, "nan" if ms is None else ms, freq, 2.0 + k, group, f"img{k};img{k + 1}"])
    # Latent k's top images: k, k+1, ... (k+T-1) mod N; latent 4 fires on only 2 images (-1 pads).
    image_idx = torch.tensor([[(k + t) % N_IMAGES for t in range(T)] for k in LATENTS], dtype=torch.int64)
    image_idx[4, 2:] = -1
    image_idx[5, :] = -1
    acts = torch.linspace(5, 1, T).repeat(len(LATENTS), 1).float() * (image_idx >= 0)
    tensors = {"image_idx": image_idx, "acts": acts}
    if with_patch_acts:
        patch = torch.zeros(len(LATENTS), T, GRID * GRID)
        patch[:, :, 5] = 3.0  # one hot patch per image: the heatmap must show a single blob
        tensors["patch_acts"] = patch
    save_file(tensors, str(ms_dpath / "top_images" / "top.safetensors"))
    (ms_dpath / "top_images" / "images.json").write_text(
        json.dumps(
            {
                "keys": [f"img{i}" for i in range(N_IMAGES)],
                "paths": paths,
                "labels": [f"a_rather_long_class_name_{i % 3}" for i in range(N_IMAGES)],
            }
        )
    )
    (ms_dpath / "ms_summary.json").write_text(
        json.dumps(
            {
                "mean": 0.63,
                "std": 0.2,
                "min": 0.3,
                "max": 0.91,
                "dead": 1,
                "n_latents": 6,
                "n_images": N_IMAGES,
                "baseline": {
                    "mean": 0.48,
                    "std": 0.1,
                    "min": 0.2,
                    "max": 0.7,
                    "dead": 0,
                    "n_latents": 4,
                    "n_images": N_IMAGES,
                },
            }
        )
    )

    hier_dpath = root / "hierarchy"
    hier_dpath.mkdir()
    with open(hier_dpath / "latent_taxa.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["latent", "group", "depth_mean", "depth_mode", "kingdom", "family", "label"])
        for k, label in LABELS.items():
            w.writerow([k, LATENTS[k][2], 2.5 + 0.1 * k, 3, "Animalia", label, label])
    (hier_dpath / "hierarchy.json").write_text(
        json.dumps(
            {
                "groups": [
                    {"group": g, "n_latents": 2, "depth_mean": 2.0 + g, "ms_mean": 0.6, "ms_max": 0.9, "ms_min": 0.3}
                    for g in range(3)
                ]
            }
        )
    )

    steer_dpath = root / "steer"
    steer_dpath.mkdir()
    (steer_dpath / "steer.json").write_text(
        json.dumps(
            {  # vlmsae.steer's format
                "steered": ["pencil", EVIL],
                "baseline": ["cat", "dog"],
                "activation_steering": ["pen", "dog"],
                "settings": {
                    "latents": {"4": 100.0},
                    "prompt": "What is shown in this image?",
                    "mode": "replace",
                    "images": ["white", "skimage:astronaut"],
                },
            }
        )
    )
    return root


@pytest.fixture
def fixture_root(tmp_path: Path) -> Path:
    return _write_fixture(tmp_path / "runs")


# ------------------------------------------------------------------------------------------
# Python side
# ------------------------------------------------------------------------------------------
def test_json_for_script_cannot_close_the_script_element():
    text = json_for_script({"label": EVIL, "x": "a&b\u2028"})
    assert "<" not in text and ">" not in text and "&" not in text and "\u2028" not in text
    assert json.loads(text) == {"label": EVIL, "x": "a&b\u2028"}


def test_find_runs_scans_a_parent_and_rejects_ambiguity(fixture_root: Path):
    sources = find_runs(fixture_root)
    assert sources.ms_dpath == fixture_root / "ms"
    assert sources.hierarchy_dpath == fixture_root / "hierarchy"
    assert sources.steer_fpaths == [fixture_root / "steer" / "steer.json"]
    shutil.copytree(fixture_root / "ms", fixture_root / "ms_copy")
    with pytest.raises(ValueError, match="ms_run="):
        find_runs(fixture_root)
    assert find_runs(fixture_root, ms_run=fixture_root / "ms_copy").ms_dpath == fixture_root / "ms_copy"
    with pytest.raises(FileNotFoundError, match="latents.csv"):
        find_runs(fixture_root / "images")


def test_build_browser_caps_cards_and_keeps_steered_latents(fixture_root: Path, tmp_path: Path):
    out = tmp_path / "browser"
    data = build_browser(find_runs(fixture_root), out, max_cards=3, thumb_px=32)
    # Top 3 by MS are 0, 2, 3; latent 4 (lowest MS) is added because a steering run used it.
    assert [c["latent"] for c in data["cards"]] == [0, 2, 3, 4]
    card4 = data["cards"][3]
    assert [t["image"] for t in card4["top"]] == [4, 5]  # the -1 pads are dropped
    assert card4["steering"] == [0]
    assert data["steering"][0]["rows"][0] == {
        "image": "white",
        "baseline": "cat",
        "steered": "pencil",
        "activation_steering": "pen",
    }
    assert data["steering"][0]["alpha"] == {"4": 100.0}
    assert card4["label"] == LABELS[4] and card4["ranks"]["kingdom"] == "Animalia"
    for c in data["cards"]:
        for t in c["top"]:
            assert (out / t["src"]).is_file()
            assert t["heat"] is not None and len(t["heat"]) == GRID * GRID
            assert t["heat"][5] == 255 and sum(t["heat"]) == 255
    html_text = (out / "index.html").read_text()
    assert EVIL not in html_text and EVIL_IMG not in html_text  # only the escaped JSON form is there
    assert "fetch(" not in html_text and "http://" not in html_text and "https://" not in html_text


def test_browse_run_through_the_real_config(fixture_root: Path, compose_cfg):
    from vlmsae.browse import run

    cfg = compose_cfg("browse", [f"run={fixture_root}", "heatmaps=off", "max_cards=2"])
    result = run(cfg)
    out = fixture_root / "browser"
    assert Path(result["index_html"]) == out / "index.html" and (out / "index.html").is_file()
    assert (out / "run_info.json").is_file()
    assert result["n_cards"] == 3 and result["n_heatmaps"] == 0 and result["n_labelled"] == 3
    # The browser folder it just wrote is not mistaken for another run on a second build.
    assert run(cfg)["n_cards"] == 3


def test_browse_hands_the_logger_node_to_wandb(fixture_root: Path, compose_cfg, monkeypatch):
    """logger=wandb reaches log_to_wandb as the typed logger node (its mode, project), with the resolved config."""
    from vlmsae import browse
    from vlmsae.report import browser

    calls = []
    monkeypatch.setattr(
        browser, "log_to_wandb", lambda data, out, logger, config: calls.append((logger, config)) or "w"
    )
    cfg = compose_cfg(
        "browse",
        [
            f"run={fixture_root}",
            "heatmaps=off",
            "max_cards=2",
            "logger=wandb",
            "logger.mode=offline",
            "logger.project=p13",
        ],
    )
    assert browse.run(cfg)["wandb_dir"] == "w"
    ((logger, config),) = calls
    assert (logger.kind, logger.mode, logger.project) == ("wandb", "offline", "p13")
    assert config["max_cards"] == 2 and config["logger"]["mode"] == "offline"
    assert "wandb_dir" not in browse.run(compose_cfg("browse", [f"run={fixture_root}", "heatmaps=off"]))


def test_bad_inputs_name_the_problem(tmp_path: Path, fixture_root: Path):
    bad = tmp_path / "bad.csv"
    bad.write_text("id,score\n1,0.5\n")
    with pytest.raises(ValueError, match="latent"):
        read_latents_csv(bad)
    with pytest.raises(ValueError, match="heatmaps"):
        build_browser(find_runs(fixture_root), tmp_path / "b", heatmaps="maybe")


def test_wandb_table_has_one_row_per_card_with_images(fixture_root: Path, tmp_path: Path):
    wandb = pytest.importorskip("wandb")
    from vlmsae.report.browser import wandb_table

    out = tmp_path / "browser"
    data = build_browser(find_runs(fixture_root), out, max_cards=6, thumb_px=32)
    table = wandb_table(data, out, images_per_row=4)
    assert table.columns[:5] == ["latent", "ms", "freq", "group", "label"]
    assert len(table.data) == len(data["cards"]) == 6
    row0 = table.data[0]
    assert row0[0] == 0 and row0[4] == "Felidae"
    assert all(isinstance(x, wandb.Image) for x in row0[-4:])
    dead_row = table.data[-1]  # latent 5 never fired: no images, empty cells
    assert dead_row[0] == 5 and all(x is None for x in dead_row[-4:])


# ------------------------------------------------------------------------------------------
# Headless Chromium
# ------------------------------------------------------------------------------------------
ORDER_JS = "Array.from(document.querySelectorAll('#cards .card:not([hidden])')).map(e => Number(e.dataset.latent))"


def _click(chrome: Chrome, element_id: str):
    chrome.eval(f"document.getElementById('{element_id}').click()")
    return chrome.eval(ORDER_JS)


def _search(chrome: Chrome, text: str):
    chrome.eval(
        "(() => { const s = document.getElementById('search'); s.value = "
        + json.dumps(text)
        + "; s.dispatchEvent(new Event('input')); })()"
    )
    return chrome.eval(ORDER_JS)


def test_page_in_headless_chromium(fixture_root: Path, tmp_path: Path, chrome: Chrome):
    out = tmp_path / "browser"
    data = build_browser(find_runs(fixture_root), out, max_cards=10, thumb_px=64)
    chrome.open((out / "index.html").resolve().as_uri())
    assert chrome.eval("document.body.dataset.ready") == "1", "the page script did not finish"

    # Cards: all six latents, in MS order (dead latent last).
    assert chrome.eval("document.querySelectorAll('#cards .card').length") == len(data["cards"]) == 6
    assert chrome.eval(ORDER_JS) == [0, 2, 3, 1, 4, 5]

    # Sorting: a click changes the order; a second click flips it.
    assert _click(chrome, "sort-freq") == [1, 4, 2, 3, 0, 5]
    assert _click(chrome, "sort-freq") == [5, 0, 3, 2, 4, 1]
    assert _click(chrome, "sort-group") == [1, 3, 2, 4, 0, 5]
    assert _click(chrome, "sort-latent") == [0, 1, 2, 3, 4, 5]
    assert _click(chrome, "sort-latent") == [5, 4, 3, 2, 1, 0]
    assert _click(chrome, "sort-ms") == [0, 2, 3, 1, 4, 5]
    assert chrome.eval("document.getElementById('sort-ms').classList.contains('active')") is True

    # Search: by taxonomy label (case-insensitive), by latent id, and nothing found.
    assert _search(chrome, "felidae") == [0, 4]
    assert _search(chrome, "3") == [3]
    assert _search(chrome, "#2") == [2]
    assert _search(chrome, "no such taxon") == []
    assert chrome.eval("document.getElementById('empty').hidden") is False
    assert _search(chrome, "") == [0, 2, 3, 1, 4, 5]

    # Hostile labels are text: the exact string shows, no element or script came from it.
    assert chrome.eval("document.querySelector('[data-latent=\"1\"] .label').textContent") == EVIL
    assert chrome.eval("document.querySelector('[data-latent=\"3\"] .label').textContent") == EVIL_IMG
    assert chrome.eval("document.querySelectorAll('script').length") == 2  # the data block and the page script
    assert chrome.eval("document.querySelectorAll('#cards img[src=\"x\"]').length") == 0
    assert chrome.eval("window.__pwned === undefined") is True
    assert not [e for e in chrome.events if e.get("method") == "Page.javascriptDialogOpening"]
    steer_text = chrome.eval("document.querySelector('[data-latent=\"4\"] details.steer').textContent")
    assert "pencil" in steer_text and EVIL in steer_text and "cat" in steer_text and "astronaut" in steer_text

    # Images load from relative file:// paths; every top image has its heatmap canvas.
    n_top = sum(len(c["top"]) for c in data["cards"])
    assert chrome.eval("document.querySelectorAll('#cards figure img').length") == n_top
    assert chrome.eval("document.querySelectorAll('#cards canvas.heat').length") == n_top
    chrome.eval("document.querySelectorAll('#cards img').forEach(i => i.loading = 'eager')")
    chrome.eval(
        "Promise.all(Array.from(document.images).map(i => i.complete ? 1 : "
        "new Promise(r => { i.onload = i.onerror = r; })))"
    )
    assert chrome.eval("Array.from(document.querySelectorAll('#cards img')).every(i => i.naturalWidth === 64)") is True
    # Layout: long captions never push thumbnails out of their card.
    assert (
        chrome.eval(
            "Array.from(document.querySelectorAll('.card')).every(c => { const r = c.getBoundingClientRect();"
            " return Array.from(c.querySelectorAll('figure')).every(f => f.getBoundingClientRect().right"
            " <= r.right + 0.5); })"
        )
        is True
    )
    chrome.eval("document.getElementById('toggle-heat').click()")
    assert chrome.eval("document.body.classList.contains('noheat')") is True
    chrome.eval("document.getElementById('toggle-heat').click()")

    # A screenshot: a real, non-blank rendering (look at it: tests keep it in tmp_path).
    from PIL import Image, ImageStat

    shot = tmp_path / "browser.png"
    shot.write_bytes(base64.b64decode(chrome.call("Page.captureScreenshot", {"format": "png"})["data"]))
    img = Image.open(shot)
    assert img.size == (1400, 900)
    assert max(ImageStat.Stat(img.convert("L")).stddev) > 20, "the screenshot is blank"
    if os.environ.get("VLMSAE_KEEP_SCREENSHOT"):
        shutil.copyfile(shot, os.environ["VLMSAE_KEEP_SCREENSHOT"])


def test_log_to_wandb_offline_writes_the_table(fixture_root: Path, tmp_path: Path, monkeypatch):
    pytest.importorskip("wandb")
    from vlmsae.report.browser import log_to_wandb

    monkeypatch.setenv("WANDB_MODE", "offline")  # conftest disables W&B; this one test writes a local run
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "browser"
    data = build_browser(find_runs(fixture_root), out, max_cards=6, thumb_px=32)
    log_to_wandb(data, out, {"project": "vlmsae-test", "mode": "offline"}, config={"test": True})
    tables = list((out / "wandb").glob("offline-run-*/files/media/table/feature_browser_*.table.json"))
    assert len(tables) == 1, f"no offline W&B table under {out / 'wandb'}"
    logged = json.loads(tables[0].read_text())
    assert logged["columns"][0] == "latent" and [r[0] for r in logged["data"]] == [0, 2, 3, 1, 4, 5]


def test_steering_of_another_sae_is_not_attached_to_cards(fixture_root: Path, tmp_path: Path):
    (fixture_root / "ms" / "run_info.json").write_text(json.dumps({"config": {"sae_path": str(tmp_path / "sae_a")}}))
    steer_fpath = fixture_root / "steer" / "steer.json"
    obj = json.loads(steer_fpath.read_text())
    obj["settings"]["sae_path"] = str(tmp_path / "sae_b")
    steer_fpath.write_text(json.dumps(obj))
    data = build_browser(find_runs(fixture_root), tmp_path / "browser", max_cards=3, heatmaps="off")
    assert [c["latent"] for c in data["cards"]] == [0, 2, 3]  # latent 4 is not pulled in
    assert all(not c["steering"] for c in data["cards"]) and data["steering"][0]["same_sae"] is False
    obj["settings"]["sae_path"] = str(tmp_path / "sae_a")
    steer_fpath.write_text(json.dumps(obj))
    data = build_browser(find_runs(fixture_root), tmp_path / "browser", max_cards=3, heatmaps="off")
    assert [c["latent"] for c in data["cards"]] == [0, 2, 3, 4] and data["cards"][3]["steering"] == [0]


def _tiny_sae_run(fixture_root: Path, compose_cfg, tokens: str) -> tuple[dict, Path]:
    """A random TopK SAE on the tiny CLIP's block 1, named by the MS run's run_info.json."""
    from omegaconf import OmegaConf

    from vlmsae.sae import SAEConfig, build_sae, save_sae

    model_cfg = OmegaConf.to_container(compose_cfg("extract", ["model=tiny"]).model, resolve=True)
    model_cfg.pop("defaults", None)
    sae = build_sae(SAEConfig(arch="topk", d_in=model_cfg["width"], n_latents=len(LATENTS), k=3), seed=0)
    sae_dpath = save_sae(
        sae, fixture_root / f"sae_{tokens}", trained_on={"model": "tiny", "layer": 1, "tokens": tokens}
    )
    (fixture_root / "ms" / "run_info.json").write_text(
        json.dumps({"config": {"sae_path": str(sae_dpath), "model": model_cfg, "layer": None}})
    )
    return model_cfg, Path(sae_dpath)


def test_heatmaps_are_recomputed_with_the_model_and_sae(tmp_path: Path, compose_cfg):
    import torch
    from PIL import Image

    from vlmsae.models import load_tap
    from vlmsae.report.browser import quantize_grid
    from vlmsae.sae import load_sae

    root = _write_fixture(tmp_path / "runs", with_patch_acts=False)
    model_cfg, sae_dpath = _tiny_sae_run(root, compose_cfg, tokens="patches")
    data = build_browser(find_runs(root), tmp_path / "browser", max_cards=6, heatmaps="auto")
    assert data["heatmap_note"] == "patch heatmaps recomputed with the model and SAE"

    # Latent 0's heatmaps equal a direct forward: tiny CLIP to block 1, patch tokens through the SAE.
    tap, sae = load_tap(model_cfg), load_sae(sae_dpath)
    card = next(c for c in data["cards"] if c["latent"] == 0)
    direct = []
    with torch.no_grad():
        for t in card["top"]:
            x = tap.preprocess(Image.open(root / "images" / f"img{t['image']}.png").convert("RGB"))
            acts_TD = tap.forward_to(x[None], layer=1)[0]
            direct.append(sae.encode(acts_TD[1:])[:, 0].tolist())
    scale = max(max(v) for v in direct)
    assert scale > 0, "pick a seed where latent 0 fires on some patch"
    assert [t["heat"] for t in card["top"]] == [quantize_grid(v, scale) for v in direct]
    assert len(card["top"][0]["heat"]) == (tap.image_size // 8) ** 2


def test_no_heatmaps_for_a_cls_only_sae(tmp_path: Path, compose_cfg):
    root = _write_fixture(tmp_path / "runs", with_patch_acts=False)
    _tiny_sae_run(root, compose_cfg, tokens="cls")
    data = build_browser(find_runs(root), tmp_path / "browser", max_cards=6, heatmaps="auto")
    assert "tokens='cls'" in data["heatmap_note"]
    assert all(t["heat"] is None for c in data["cards"] for t in c["top"])


def test_overlay_image_colours_only_the_active_patches(tmp_path: Path):
    from PIL import Image

    from vlmsae.report.browser import HEAT_RAMP, card_overlay_image

    fpath = tmp_path / "grey.jpg"
    Image.new("RGB", (64, 64), (128, 128, 128)).save(fpath, quality=100)
    heat = [0] * 15 + [255]  # 4 x 4 grid, only the bottom-right patch is active
    img = card_overlay_image(fpath, heat)
    cold, hot = img.getpixel((2, 2)), img.getpixel((62, 62))
    assert max(abs(c - 128) for c in cold) <= 2
    assert hot[0] > 180 and hot[1] > 180 and hot[2] < 100, hot  # blended towards the ramp's yellow
    assert HEAT_RAMP[-1] == (240, 249, 33)
    assert card_overlay_image(fpath, None).getpixel((62, 62)) == cold


def test_find_runs_takes_the_runs_of_the_same_sae_from_sibling_folders(tmp_path, monkeypatch):
    """Hydra puts each job in outputs/<job>/<time>/: browse run=<the MS run> still finds the hierarchy and
    steering runs of its SAE (matched by the sae_path each recorded), and not those of another SAE."""
    from vlmsae.utils.provenance import write_run_info

    monkeypatch.chdir(tmp_path)  # the folder the jobs were started from: sae_path is relative to it
    out = tmp_path / "outputs"
    for name in ("a", "b"):
        (out / "train" / name / "sae").mkdir(parents=True)
    ms = out / "monosemanticity" / "t1"
    (ms / "top_images").mkdir(parents=True)
    (ms / "latents.csv").write_text("latent,ms\n")
    write_run_info(ms, {"sae_path": "outputs/train/a/sae"})
    runs = {}
    for job, name, sae_path, fname in (
        ("hierarchy", "t2", "outputs/train/a", "latent_taxa.csv"),  # the train folder stands for its sae/
        ("hierarchy", "t3", "outputs/train/b/sae", "latent_taxa.csv"),  # another SAE
        ("steer", "t4", str(out / "train" / "a" / "sae"), "steer.json"),  # an absolute path
        ("steer", "t5", "outputs/train/b/sae", "steer.json"),
    ):
        runs[name] = out / job / name
        runs[name].mkdir(parents=True)
        (runs[name] / fname).write_text("{}")
        write_run_info(runs[name], {"sae_path": sae_path})
    sources = find_runs(ms)
    assert sources.hierarchy_dpath.resolve() == runs["t2"].resolve()
    assert [p.resolve() for p in sources.steer_fpaths] == [(runs["t4"] / "steer.json").resolve()]
    said = "\n".join(sources.found)
    assert "same sae_path" in said and "steering runs: 1" in said and str(runs["t4"]) in said
    # explicit runs win, and say so
    explicit = find_runs(ms, hierarchy_run=runs["t3"], steer_runs=[str(runs["t5"])])
    assert explicit.hierarchy_dpath == runs["t3"] and "hierarchy_run=" in "\n".join(explicit.found)


def test_a_run_from_before_the_trained_on_rename_still_says_what_its_sae_reads():
    """MS runs recorded the SAE's training record as ``sae_source`` before ``sae_trained_on``."""
    record = {"model": "tiny", "layer": 1, "tokens": "patches"}
    assert (
        run_sae_trained_on({}, {"sae_source": record}) == record == run_sae_trained_on({}, {"sae_trained_on": record})
    )
    assert run_sae_trained_on({}, {}) == {}

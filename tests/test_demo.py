"""``make demo`` end to end: every step runs on the tiny default and leaves its documented outputs.

Slow (about a minute on 2 cores): it runs the real jobs, one after the other, into a tmp folder.
"""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import pytest


@pytest.mark.slow
def test_demo_runs_every_step(tmp_path: Path, capsys):
    from vlmsae.demo import STEPS, run

    out = tmp_path / "demo"
    t0 = time.perf_counter()
    summary = run({"seed": 0}, out)
    wall = time.perf_counter() - t0
    printed = capsys.readouterr().out

    statuses = {name: s["status"] for name, s in summary["steps"].items()}
    assert statuses == {name: "ok" for name in STEPS}, {n: summary["steps"][n]["error"] for n in statuses}
    assert wall < 600, f"the demo took {wall:.0f} s; it must stay under 10 minutes on 2 cores"

    # Each step printed where its output is and what it shows.
    for name in STEPS:
        assert f"] {name} ==" in printed
    assert "FVE" in printed and "raw neurons" in printed and "steered" in printed and "file://" in printed
    assert "feature names" in printed and "fraction of loss recovered" in printed

    # The documented files, with plausible contents.
    manifest = json.loads((out / "extract" / "manifest.json").read_text())
    assert manifest["n_rows"] == 2 * manifest["n_images"] > 0  # 2 random tokens per image
    metrics = json.loads((out / "train" / "metrics.json").read_text())
    assert metrics["fve"] > 0.5
    ms = json.loads((out / "monosemanticity" / "ms_summary.json").read_text())
    assert 0 < ms["mean"] <= 1 and "baseline" in ms
    with open(out / "monosemanticity" / "latents.csv") as f:
        assert f.readline().startswith("# vlmsae latents.csv format_version=")
        rows = list(csv.DictReader(f))
        n_latents = len(rows)
    # Feature names from the planted vocabulary: every latent with top images is named from it.
    vocab = (out / "concept_names.txt").read_text().splitlines()
    assert {"circle", "red", "red circle", "yellow cross"} <= set(vocab) and len(vocab) == 4 + 4 + 16
    named = [r for r in rows if r["top_keys"]]
    assert named and all(r["name"] in vocab and -1 <= float(r["name_score"]) <= 1 for r in named)
    assert ms["names"]["n_names"] == 24 and ms["names"]["n_named"] == len(named)
    shows = json.loads((out / "demo_summary.json").read_text())["steps"]
    names_line = next(line for line in shows["monosemanticity"]["shows"] if line.startswith("feature names"))
    top3 = sorted((r for r in rows if r["ms"] != "nan"), key=lambda r: -float(r["ms"]))[:3]
    assert all(f"#{r['latent']} {r['name']!r}" in names_line for r in top3)
    # Splice fidelity of the same SAE inside the tiny LLaVA: 2 answers, the headline figures in the summary.
    splice = json.loads((out / "splice_eval" / "splice.json").read_text())
    assert splice["summary"]["n_answers"] == 2 and splice["summary"]["kl"] >= 0
    splice_shows = " ".join(shows["splice_eval"]["shows"])
    assert f"per answer token {splice['summary']['kl']:.2e};" in splice_shows
    assert f"{splice['summary']['frac_recovered_zero']:.3f} vs zero ablation" in splice_shows
    assert f"{splice['summary']['frac_recovered_mean']:.3f} vs mean" in splice_shows
    md = (out / "demo_summary.md").read_text()
    assert "## splice_eval: ok" in md and "feature names" in md
    hierarchy = json.loads((out / "hierarchy" / "hierarchy.json").read_text())
    assert len(hierarchy["groups"]) == 4  # the Matryoshka groups of the demo SAE
    steer = json.loads((out / "steer" / "steer.json").read_text())
    assert len(steer["steered"]) == len(steer["baseline"]) == 2
    gt = json.loads((out / "ground_truth" / "ground_truth.json").read_text())
    assert gt["sae"]["mean"] > gt["neurons"]["mean"]

    # The browser: one card per latent (fewer than the cap), steering attached, thumbnails copied.
    html_text = (out / "browser" / "index.html").read_text()
    data = json.loads(html_text.split('id="browser-data">', 1)[1].split("</script>", 1)[0])
    cards = [card for chunk in data["chunks"] for card in chunk["cards"]]  # a small browser: all inline
    assert data["n_cards"] == len(cards) == n_latents
    steered = [c for c in cards if c["steering"]]
    assert [c["latent"] for c in steered] == [int(k) for k in steer["settings"]["latents"]]
    srcs = [f"img/{image:07d}.jpg" for c in cards for image, _ in c["top"]]
    assert srcs and all((out / "browser" / s).is_file() for s in srcs)
    assert sum(1 for c in cards for heat in c.get("heat", []) if heat) > 0  # patch tokens -> heatmaps
    assert json.loads((out / "demo_summary.json").read_text())["steps"]["browse"]["status"] == "ok"
    # inspect: one image of the planted data, its top latents named from the MS run; the browser links to them
    inspected = json.loads((out / "inspect" / "inspect.json").read_text())
    assert len(inspected["images"]) == 1 and inspected["images"][0]["top_pooled"] and inspected["query"]["hits"]
    linked = [c for c in cards if c.get("inspect")]
    assert linked and {c["latent"] for c in linked} == {int(k) for k in inspected["latents"]}
    assert all(c["inspect"].startswith("../inspect/inspect.html#latent-") for c in linked)

    # The trained digits ViT: latents named after digits (names=labels) in their own browser.
    digit_ms = json.loads((out / "digits" / "monosemanticity" / "ms_summary.json").read_text())
    assert digit_ms["embedder"] == "digits_cnn" and digit_ms["names"]["vocabulary"] == "labels"
    assert digit_ms["mean"] > digit_ms["baseline"]["mean"]
    digit_names = {"zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"}
    assert {r["name"] for r in digit_ms["names"]["top_latents"]} <= digit_names
    digits_line = " ".join(shows["digits"]["shows"])
    assert "held-out accuracy" in digits_line and "digit latents" in digits_line
    assert (out / "digits" / "browser" / "index.html").is_file()
    assert "digits/browser/index.html" in printed

    # Running it again replaces the folder rather than resuming into stale outputs.
    (out / "stale.txt").write_text("x")
    assert run({"steps": ["data"]}, out)["steps"]["data"]["status"] == "ok"
    assert not (out / "stale.txt").exists()


def test_demo_refuses_a_folder_that_is_not_a_demo(tmp_path: Path):
    from vlmsae.demo import run

    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a demo folder"):
        run({"steps": ["data"]}, tmp_path)
    assert (tmp_path / "precious.txt").exists()
    with pytest.raises(ValueError, match="Unknown demo step"):
        run({"steps": ["extrakt"]}, tmp_path / "new")


def test_a_step_whose_input_is_missing_is_skipped_and_reported(tmp_path: Path, monkeypatch):
    from vlmsae.demo import main

    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # main() sets it; keep it from leaking
    out = tmp_path / "demo"
    assert main(["--out", str(out), "--steps", "extract,browse"]) == 1  # non-zero: not everything finished
    steps = json.loads((out / "demo_summary.json").read_text())["steps"]
    assert steps["extract"]["status"] == "skipped" and "data" in steps["extract"]["error"]
    assert steps["browse"]["status"] == "skipped" and "monosemanticity" in steps["browse"]["error"]
    assert "skipped" in (out / "demo_summary.md").read_text()

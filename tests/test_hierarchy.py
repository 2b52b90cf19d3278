"""The hierarchy entrypoint: outputs, a hand-computed run from an MS run's index, unmatched images."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vlmsae.config import to_typed
from vlmsae.data.taxonomy import TaxonomyError
from vlmsae.metrics.topimages import TopImages
from vlmsae.sae import SAEConfig, build_sae, save_sae, train_steps

FIX = Path(__file__).parent / "fixtures" / "taxonomy"


def _matryoshka(dpath: Path, d_in: int, n_latents: int, fractions, trained_on=None, train_x=None) -> Path:
    cfg = SAEConfig(
        arch="matryoshka", d_in=d_in, n_latents=n_latents, k=4, group_fractions=fractions, threshold_start_step=20
    )
    sae = build_sae(cfg, seed=0)
    if train_x is not None:
        g = torch.Generator().manual_seed(0)
        batches = (train_x[torch.randint(0, len(train_x), (64,), generator=g)] for _ in range(150))
        train_steps(sae, batches, lr=3e-3)
    return save_sae(sae, dpath, trained_on=trained_on or {})


def _tiny_embeddings() -> torch.Tensor:
    """The tiny CLIP's projected embeddings of the generated concept images (what data=tiny feeds)."""
    from vlmsae.data.images import iter_images
    from vlmsae.models import get_model_spec, load_tap

    tap = load_tap(get_model_spec("tiny"))
    images = [tap.preprocess(r.image) for r in iter_images("synthetic")]
    return tap.forward_to(torch.stack(images), layer="last")


def _ms_run(dpath: Path, rows, keys, ms) -> Path:
    """A monosemanticity run dir as vlmsae.monosemanticity writes it: top_images/ and latents.csv."""
    idx = torch.tensor([r[0] for r in rows], dtype=torch.long)
    acts = torch.tensor([r[1] for r in rows], dtype=torch.float32)
    TopImages(idx, acts, keys, paths=[f"/data/{k}" for k in keys], labels=None).save(dpath / "top_images")
    with open(dpath / "latents.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["latent", "ms", "freq", "max_act", "group", "top_keys"])
        for k, m in enumerate(ms):
            w.writerow([k, "" if m is None else m, 0.1, 1.0, 0, ""])
    return dpath


@pytest.fixture
def hand_case(tmp_path):
    # images: 16 ravens, 16 crows, 16 tits, 16 wolves (class folders named as in the CSV fixture)
    keys = [f"{c}/{i:02d}.jpg" for c in ("raven", "crow", "tit", "wolf") for i in range(16)]
    raven, crow, tit, wolf = (list(range(s, s + 16)) for s in (0, 16, 32, 48))
    pad = [-1] * 16, [0.0] * 16
    rows = [pad] * 8
    rows[0] = (raven[:8] + crow[:8], [9.0] * 16)  # 56 pairs share 7 ranks, 64 pairs share 6 (genus Corvus)
    rows[1] = (raven[:8] + wolf[:8], [9.0] * 16)  # 56 at 7, 64 at 2 (Animalia, Chordata)
    rows[4] = (raven[:10] + tit[:6], [5.0] * 16)  # 45+15 = 60 at 7, 60 at 4 (Passeriformes)
    rows[5] = ([*raven[:15], -1], [5.0] * 15 + [0.0])  # 15 firing images: excluded
    ms = [0.9, 0.7, None, None, 0.4, 0.6, None, None]
    sae_dpath = _matryoshka(tmp_path / "sae", d_in=8, n_latents=8, fractions=(0.25, 0.75))
    return sae_dpath, _ms_run(tmp_path / "ms", rows, keys, ms)


def test_ms_run_hand_computed(hand_case, tmp_path, compose_cfg):
    from vlmsae.hierarchy import run

    sae_dpath, ms_dpath = hand_case
    cfg = compose_cfg(
        "hierarchy",
        [
            f"sae_path={sae_dpath}",
            f"ms_run={ms_dpath}",
            "taxonomy=csv",
            f"taxonomy.path={FIX / 'taxonomy.csv'}",
            "data=folder",
            "data.root=/nonexistent",
        ],
    )
    out = run(cfg, out_dpath=tmp_path / "out")
    res = json.loads((tmp_path / "out" / "hierarchy.json").read_text())
    g0, g1 = res["groups"]
    assert (g0["group"], g0["n_latents"], g0["n_scored"]) == (0, 2, 2)
    assert (g1["group"], g1["n_latents"], g1["n_scored"]) == (1, 6, 1)
    assert g0["depth_mean"] == pytest.approx(((56 * 7 + 64 * 6) / 120 + (56 * 7 + 64 * 2) / 120) / 2)
    assert g1["depth_mean"] == pytest.approx((60 * 7 + 60 * 4) / 120)
    assert (g0["ms_mean"], g0["ms_max"], g0["ms_min"]) == pytest.approx((0.8, 0.9, 0.7))
    assert (g1["ms_mean"], g1["ms_max"], g1["ms_min"]) == pytest.approx((0.5, 0.6, 0.4))
    assert out["n_scored"] == 3

    with open(tmp_path / "out" / "latent_taxa.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == [
        "latent",
        "group",
        "depth_mean",
        "depth_mode",
        "kingdom",
        "phylum",
        "class",
        "order",
        "family",
        "genus",
        "species",
        "label",
    ]
    assert rows[0]["depth_mode"] == "6" and rows[0]["label"] == "Corvus (genus)"  # 8/8 split at species
    assert rows[1]["depth_mode"] == "2" and rows[1]["label"] == "Chordata (phylum)"
    assert rows[4]["depth_mode"] == "4" and rows[4]["label"] == "Corvus corax (species)"  # 10/16, tie -> 4
    assert rows[4]["species"] == "Corvus corax" and rows[4]["family"] == "Corvidae"
    assert rows[5]["depth_mean"] == "" and rows[5]["label"] == "Corvus corax (species)"  # excluded, still labelled
    assert rows[2]["label"] == "" and rows[2]["group"] == "1"
    md = (tmp_path / "out" / "hierarchy.md").read_text()
    assert "| LCA depth (mean) | 5.40 | 5.50 |" in md
    assert (tmp_path / "out" / "hierarchy.png").stat().st_size > 1000
    info = json.loads((tmp_path / "out" / "run_info.json").read_text())
    assert info["config"]["ms_run"] == str(ms_dpath)


def test_unmatched_images_name_examples(hand_case, tmp_path, compose_cfg):
    from vlmsae.hierarchy import run

    sae_dpath, ms_dpath = hand_case
    index = TopImages.load(ms_dpath / "top_images")
    index.keys[40:43] = ["zebra/a.jpg", "zebra/b.jpg", "okapi/c.jpg"]
    index.paths = None
    index.save(ms_dpath / "top_images")
    cfg = compose_cfg(
        "hierarchy",
        [f"sae_path={sae_dpath}", f"ms_run={ms_dpath}", "taxonomy=csv", f"taxonomy.path={FIX / 'taxonomy.csv'}"],
    )
    with pytest.raises(TaxonomyError) as e:
        run(cfg, out_dpath=tmp_path / "out")
    assert "3 of 64 images match no taxon" in str(e.value)
    assert "zebra/a.jpg" in str(e.value) and "okapi/c.jpg" in str(e.value)


def test_wrong_width_index_is_refused(hand_case, tmp_path, compose_cfg):
    from vlmsae.hierarchy import run

    _, ms_dpath = hand_case
    other = _matryoshka(tmp_path / "sae16", d_in=8, n_latents=16, fractions=(0.25, 0.75))
    cfg = compose_cfg(
        "hierarchy",
        [f"sae_path={other}", f"ms_run={ms_dpath}", "taxonomy=csv", f"taxonomy.path={FIX / 'taxonomy.csv'}"],
    )
    with pytest.raises(ValueError, match="ranks 8 latents but the SAE at sae_path has 16"):
        run(cfg, out_dpath=tmp_path / "out")


def test_tiny_model_end_to_end(tmp_path, compose_cfg):
    """data=tiny + taxonomy=tiny: the tiny CLIP and the SAE run over the generated concept images,
    with MS from the weight-free pixel embedder."""
    from vlmsae.hierarchy import run

    sae_dpath = _matryoshka(
        tmp_path / "sae",
        d_in=32,
        n_latents=32,
        fractions=(0.125, 0.875),
        trained_on={"model": "tiny", "layer": "last", "tokens": "cls"},
        train_x=_tiny_embeddings(),
    )
    cfg = compose_cfg("hierarchy", [f"sae_path={sae_dpath}", "embedder=pixels"])
    out = run(cfg, out_dpath=tmp_path / "out")
    out_dpath = tmp_path / "out"
    for name in (
        "hierarchy.json",
        "hierarchy.md",
        "hierarchy.png",
        "latent_taxa.csv",
        "run_info.json",
        "top_images/top.safetensors",
    ):
        assert (out_dpath / name).is_file(), name
    res = json.loads((out_dpath / "hierarchy.json").read_text())
    assert out["n_images"] == 128 and res["ranks"] == ["shape", "shape_colour"]
    assert [g["n_latents"] for g in res["groups"]] == [4, 28]
    for g in res["groups"]:
        assert g["n_ms"] > 0 and -1.0 <= g["ms_min"] <= g["ms_mean"] <= g["ms_max"] <= 1.0
    index = TopImages.load(out_dpath / "top_images")
    assert index.n_latents == 32 and index.top_k == 16
    # the per-group depth is the mean of the per-latent depths in latent_taxa.csv
    with open(out_dpath / "latent_taxa.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for g in res["groups"]:
        ds = [float(r["depth_mean"]) for r in rows if r["group"] == str(g["group"]) and r["depth_mean"]]
        assert g["n_scored"] == len(ds)
        if ds:
            assert g["depth_mean"] == pytest.approx(sum(ds) / len(ds), abs=1e-4)
            assert all(0 <= d <= 2 for d in ds)


@pytest.mark.slow
def test_cli(hand_case, tmp_path, repo_root):
    sae_dpath, ms_dpath = hand_case
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "vlmsae.hierarchy",
            f"sae_path={sae_dpath}",
            f"ms_run={ms_dpath}",
            "taxonomy=csv",
            f"taxonomy.path={FIX / 'taxonomy.csv'}",
            f"hydra.run.dir={tmp_path / 'cli'}",
        ],
        cwd=repo_root,
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads((tmp_path / "cli" / "hierarchy.json").read_text())
    assert res["groups"][1]["depth_mean"] == pytest.approx(5.5)


def test_inat_recipe_has_the_papers_settings(compose_cfg):
    """experiment=inat_hierarchy composes with the train entrypoint into METHOD §4's SAE: x2 on the
    768-d embedding, k=20, groups of 3/13/53/290/1177 latents."""

    cfg = compose_cfg("train", ["experiment=inat_hierarchy", "data.acts=/acts/inat"])
    assert cfg.layer == "last" and cfg.model.embed_dim == 768 and cfg.data.source == "acts"
    sae_cfg = to_typed(cfg.sae, SAEConfig).resolved(cfg.model.embed_dim)
    assert (sae_cfg.arch, sae_cfg.n_latents, sae_cfg.k) == ("matryoshka", 1536, 20)
    assert sae_cfg.group_sizes == [3, 13, 53, 290, 1177]


@pytest.mark.slow
def test_same_result_from_an_ms_run(tmp_path, compose_cfg):
    """Reusing a monosemanticity run (ms_run=) and computing here give the same top images, depths and MS."""
    from vlmsae import monosemanticity
    from vlmsae.hierarchy import run

    sae_dpath = _matryoshka(
        tmp_path / "sae",
        d_in=32,
        n_latents=32,
        fractions=(0.125, 0.875),
        trained_on={"model": "tiny", "layer": "last", "tokens": "cls"},
        train_x=_tiny_embeddings(),
    )
    ms_cfg = compose_cfg(
        "monosemanticity",
        [
            f"sae_path={sae_dpath}",
            "data=tiny",
            "embedder=pixels",
            "baseline=false",
            "progress=false",
            f"embed_cache={tmp_path / 'emb'}",
        ],
    )
    monosemanticity.run(ms_cfg, out_dpath=tmp_path / "ms")
    via_ms = run(
        compose_cfg("hierarchy", [f"sae_path={sae_dpath}", f"ms_run={tmp_path / 'ms'}"]), out_dpath=tmp_path / "h1"
    )
    direct = run(compose_cfg("hierarchy", [f"sae_path={sae_dpath}", "embedder=pixels"]), out_dpath=tmp_path / "h2")
    a, b = TopImages.load(tmp_path / "ms" / "top_images"), TopImages.load(tmp_path / "h2" / "top_images")
    assert torch.equal(a.image_idx, b.image_idx) and a.keys == b.keys
    assert via_ms["n_scored"] == direct["n_scored"] > 0
    for g1, g2 in zip(via_ms["groups"], direct["groups"]):
        assert g1["depth_mean"] == pytest.approx(g2["depth_mean"])
        assert g1["ms_mean"] == pytest.approx(g2["ms_mean"], abs=1e-5)  # latents.csv keeps 6 decimals


def test_unmatched_images_fail_before_encoding(tmp_path, compose_cfg):
    """An image folder with classes the taxonomy lacks: the error comes before the model runs."""
    from PIL import Image

    from vlmsae.hierarchy import run

    for cls in ("raven", "zebra"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (8, 8), (i * 90, 0, 0)).save(tmp_path / "imgs" / cls / f"{i}.png")
    sae_dpath = _matryoshka(
        tmp_path / "sae",
        d_in=32,
        n_latents=32,
        fractions=(0.125, 0.875),
        trained_on={"model": "tiny", "layer": "last", "tokens": "cls"},
    )
    cfg = compose_cfg(
        "hierarchy",
        [
            f"sae_path={sae_dpath}",
            "data=folder",
            f"data.root={tmp_path / 'imgs'}",
            "taxonomy=csv",
            f"taxonomy.path={FIX / 'taxonomy.csv'}",
        ],
    )
    with pytest.raises(TaxonomyError, match=r"2 of 4 images match no taxon.*zebra/0.png"):
        run(cfg, out_dpath=tmp_path / "out")
    assert not (tmp_path / "out" / "top_images").exists()


def _compose_user_yaml(tmp_path, text: str):
    """Compose a user's YAML that extends conf/hierarchy.yaml (as a recipe or a lab config would)."""
    from hydra import compose, initialize_config_dir

    from vlmsae.config import conf_dir, register_configs

    register_configs()
    (tmp_path / "mine.yaml").write_text(
        f"defaults:\n  - hierarchy\n  - _self_\nhydra:\n  searchpath: [file://{conf_dir()}]\n{text}"
    )
    with initialize_config_dir(config_dir=str(tmp_path), version_base="1.3"):
        return compose(config_name="mine", overrides=["sae_path=x"])


def test_misspelt_key_fails_at_compose_time_naming_it(compose_cfg, tmp_path):
    """The job schema (vlmsae.config.jobs.hierarchy) types every top-level key: a typo in a YAML that
    extends the job config, or a wrong type, fails at compose time and names the key."""
    assert _compose_user_yaml(tmp_path, "n_top: 8\n").n_top == 8
    with pytest.raises(Exception, match="Key 'ntop' not in 'HierarchyJob'"):
        _compose_user_yaml(tmp_path, "ntop: 8\n")
    with pytest.raises(Exception) as info:
        compose_cfg("hierarchy", ["sae_path=x", "min_majority=half"])
    assert "full_key: min_majority" in str(info.value.__cause__)
    with pytest.raises(Exception, match="ms_runn"):
        compose_cfg("hierarchy", ["sae_path=x", "ms_runn=/x"])
    # the defaults live in the schema: the composed job config holds every key with its default
    from vlmsae.config.jobs.hierarchy import HierarchyJob

    cfg = compose_cfg("hierarchy", ["sae_path=x"])
    assert cfg.n_top == HierarchyJob.n_top == 16 and cfg.min_majority == 0.5 and cfg.ms_run is None
    assert cfg.embedder is None and cfg.data.source == "synthetic" and cfg.taxonomy.kind == "concepts"


def test_run_is_thin():
    """run() only wires the config to library calls: about 40 lines, and no other job or private name imported."""
    import ast
    import inspect

    from vlmsae import hierarchy

    assert len(inspect.getsource(hierarchy.run).splitlines()) <= 45
    jobs = {"extract", "train", "monosemanticity", "hierarchy", "steer", "steer_eval", "browse", "demo"}
    for node in ast.walk(ast.parse(inspect.getsource(hierarchy))):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("vlmsae"):
            names = [a.name for a in node.names]
            assert node.module not in {f"vlmsae.{job}" for job in jobs}, node.module
            assert not any(n in jobs or n.startswith("_") for n in names), (node.module, names)


def test_synthetic_options_of_ms_runs_recorded_before_the_typed_data_fields():
    """An MS run's run_info.json written while data kept n_per_class/size under ``extra`` still names its images."""
    from vlmsae.data.images import synthetic_options_of as _synthetic_opts

    old = {"source": "synthetic", "seed": 1, "extra": {"n_per_class": 3, "size": 32}}
    assert _synthetic_opts(old) == {"n_per_class": 3, "size": 32, "seed": 1}
    new = {"source": "synthetic", "seed": 2, "n_per_class": 4, "size": 48}
    assert _synthetic_opts(new) == {"n_per_class": 4, "size": 48, "seed": 2}
    assert _synthetic_opts({"source": "folder", "root": "/x"}) is None


@pytest.mark.slow  # three hierarchy runs (the sweep, then each SAE alone): ~15 s
def test_sweep_tables_every_sae_once(tmp_path, compose_cfg, monkeypatch, count_embeddings):
    """Two Matryoshka SAEs (x1, x2) in one run: hierarchy_table.csv holds each SAE's Table 2 rows as a single run
    writes them, and the images are embedded once and run through the model once for both."""
    from vlmsae.hierarchy import run

    trained_on = {"model": "tiny", "layer": "last", "tokens": "cls"}
    for n, width in ((0, 32), (1, 64)):
        _matryoshka(
            tmp_path / "sweep" / str(n) / "sae", d_in=32, n_latents=width, fractions=(0.25, 0.75), trained_on=trained_on
        )
    embedded = count_embeddings("vlmsae.models.embedders.load_embedder")
    out = run(compose_cfg("hierarchy", [f"sae_path={tmp_path / 'sweep'}", "embedder=pixels"]), out_dpath=tmp_path / "o")
    assert out["sweep"] == ["matryoshka_x1_Llast", "matryoshka_x2_Llast"]
    assert sum(embedded) == out["images_embedded"] == 128 and out["model_batches"] == math.ceil(128 / 16)
    rows = list(csv.DictReader((tmp_path / "o" / "hierarchy_table.csv").open()))
    assert [(r["sae"], r["measure"]) for r in rows][:2] == [
        ("matryoshka_x1_Llast", "depth"),
        ("matryoshka_x1_Llast", "ms"),
    ]
    for n, name in enumerate(out["sweep"]):
        single = run(
            compose_cfg("hierarchy", [f"sae_path={tmp_path / 'sweep' / str(n) / 'sae'}", "embedder=pixels"]),
            out_dpath=tmp_path / f"single{n}",
        )
        assert (tmp_path / "o" / name / "hierarchy.json").is_file() and (
            tmp_path / "o" / name / "hierarchy.md"
        ).is_file()
        depth, ms = (r for r in rows if r["sae"] == name)
        for g, group in enumerate(single["groups"]):  # "" = no scored latent in the group (null in the json)
            assert float(depth[f"group_{g}"] or "nan") == pytest.approx(
                group["depth_mean"] or math.nan, abs=1e-4, nan_ok=True
            )
            assert float(ms[f"group_{g}"]) == pytest.approx(group["ms_mean"], abs=1e-4)
        assert any(depth.values()) and all(ms[f"group_{g}"] for g in range(2))
    assert (
        "| sae | architecture | expansion | layer | measure | group_0 | group_1 |"
        in (tmp_path / "o" / "hierarchy_table.md").read_text()
    )


@pytest.mark.slow
def test_logger_wandb_offline_run_holds_the_depth_per_group(tmp_path, compose_cfg, wandb_offline):
    from vlmsae.hierarchy import run

    sae_dpath = _matryoshka(
        tmp_path / "sae",
        d_in=32,
        n_latents=32,
        fractions=(0.125, 0.875),
        trained_on={"model": "tiny", "layer": "last", "tokens": "cls"},
        train_x=_tiny_embeddings(),
    )
    out = run(compose_cfg("hierarchy", [f"sae_path={sae_dpath}", "logger=wandb"]), out_dpath=tmp_path / "out")
    logged = wandb_offline(tmp_path / "out")
    scored = [g for g in out["groups"] if isinstance(g["depth_mean"], float)]
    assert scored, out["groups"]
    for g in scored:
        assert logged["summary"][f"group_{g['group']}/depth_mean"] == pytest.approx(g["depth_mean"])
    assert "plots/hierarchy" in logged["logged"] and logged["job_type"] == "hierarchy"

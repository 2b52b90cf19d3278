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
    return save_sae(
        sae, tmp_path / "sae", trained_on={"model": "tiny", "pretrained": None, "layer": 2, "tokens": "cls"}
    )


def _compose(compose_cfg, sae_dpath, tmp_path, *extra):
    return compose_cfg(
        "monosemanticity",
        [
            f"sae_path='{sae_dpath}'",  # quoted: a comma list of SAEs is one string, not a Hydra sweep
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
    assert lines[0] == "# vlmsae latents.csv format_version=3"  # the version line, then a plain CSV
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
    proc = subprocess.run(cmd, cwd=repo_root, env=env, capture_output=True, text=True)
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


# ------------------------------------------------------------------------------ sweeps (issue 17 item 2)
def _sweep_dpath(tmp_path, archs=("topk", "relu"), expansions=(2, 4), model="tiny") -> object:
    """A multirun-shaped folder <sweep>/<n>/sae/ of tiny-CLIP SAEs (block 2, 64-d), one per arch x expansion."""
    from vlmsae.sae import SAEConfig, build_sae, save_sae

    root = tmp_path / "multirun" / "2026-01-01" / "12-00-00"
    n = 0
    for arch in archs:
        for e in expansions:
            cfg = SAEConfig(arch=arch, d_in=64, n_latents=64 * e, k=6)
            trained_on = {"model": model, "pretrained": None, "layer": 2, "tokens": "cls"}
            save_sae(build_sae(cfg, seed=n), root / str(n) / "sae", trained_on=trained_on)
            n += 1
    (root / "multirun.yaml").write_text("hydra: {}\n")  # a multirun dir has files of its own
    return tmp_path / "multirun"


@pytest.mark.slow  # five MS runs (the sweep, then each SAE alone to compare): ~20 s
def test_sweep_scores_every_sae_once_and_tables_them(compose_cfg, tmp_path, monkeypatch, count_embeddings) -> None:
    """A 2 x 2 sweep in one run: each SAE's outputs equal a single run's, ms_table.csv holds their means, and the
    images are embedded once and run through the model once for all four SAEs."""
    from vlmsae.monosemanticity import run

    monkeypatch.setenv("VLMSAE_HOME", str(tmp_path / "home"))
    sweep = _sweep_dpath(tmp_path)
    embedded = count_embeddings("vlmsae.models.embedders.load_embedder")
    out = run(_compose(compose_cfg, sweep, tmp_path / "a"), out_dpath=tmp_path / "sweep_out")
    assert sum(embedded) == 64 and out["images_embedded"] == 64  # 64 images, embedded once for 4 SAEs
    assert out["model_batches"] == math.ceil(64 / 16)  # one model pass over the images (data.images_per_forward=16)
    names = ["relu_x2_L2", "relu_x4_L2", "topk_x2_L2", "topk_x4_L2"]
    assert sorted(out["sweep"]) == names
    for name in names:
        for f in ("latents.csv", "ms_summary.json", "ms_hist.png", "run_info.json", "top_images/top.safetensors"):
            assert (tmp_path / "sweep_out" / name / f).exists(), (name, f)
    rows = list(csv.DictReader((tmp_path / "sweep_out" / "ms_table.csv").open()))
    assert [(r["architecture"], r["layer"]) for r in rows] == [("relu", "2"), ("topk", "2"), ("raw neurons", "2")]
    by_arch = {r["architecture"]: r for r in rows}
    assert out["tables"]["ms_table"]["rows"][0][:2] == ["relu", 2]
    for i, (arch, e) in enumerate((a, e) for a in ("topk", "relu") for e in (2, 4)):
        single = run(_compose(compose_cfg, sweep / "2026-01-01" / "12-00-00" / str(i) / "sae", tmp_path / "b"),
                     out_dpath=tmp_path / f"single{i}")  # fmt: skip
        assert float(by_arch[arch][f"x{e}_mean"]) == pytest.approx(single["mean"], abs=1e-4)
        assert float(by_arch[arch][f"x{e}_std"]) == pytest.approx(single["std"], abs=1e-4)
        assert float(by_arch["raw neurons"][f"x{e}_mean"]) == pytest.approx(single["baseline"]["mean"], abs=1e-4)
        assert json.loads((tmp_path / "sweep_out" / f"{arch}_x{e}_L2" / "ms_summary.json").read_text())[
            "mean"
        ] == pytest.approx(single["mean"], abs=1e-9)
    md = (tmp_path / "sweep_out" / "ms_table.md").read_text()
    assert (
        "| architecture | layer | x2 | x4 |" in md and f"| topk | 2 | {float(by_arch['topk']['x2_mean']):.3f} ±" in md
    )


def test_sweep_as_a_comma_list_and_its_bad_inputs(compose_cfg, tmp_path, monkeypatch) -> None:
    from vlmsae.monosemanticity import run

    monkeypatch.setenv("VLMSAE_HOME", str(tmp_path / "home"))
    root = _sweep_dpath(tmp_path, archs=("topk",)) / "2026-01-01" / "12-00-00"
    out = run(_compose(compose_cfg, f"{root / '0' / 'sae'},{root / '1' / 'sae'}", tmp_path), out_dpath=tmp_path / "c")
    assert out["sweep"] == ["topk_x2_L2", "topk_x4_L2"] and (tmp_path / "c" / "ms_table.md").is_file()
    with pytest.raises(FileNotFoundError, match=r"nope/sae does not exist: fix or drop that entry"):
        run(_compose(compose_cfg, f"{root / '0' / 'sae'},{tmp_path / 'nope' / 'sae'}", tmp_path), out_dpath=tmp_path)
    (tmp_path / "empty" / "job_0").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"empty is a folder with no SAE in it: looked for sae/ folders"):
        run(_compose(compose_cfg, tmp_path / "empty", tmp_path), out_dpath=tmp_path / "e")
    mixed = _sweep_dpath(tmp_path / "m2", archs=("relu",), expansions=(2,), model="tiny_llava")
    both = f"{root / '0' / 'sae'},{mixed / '2026-01-01' / '12-00-00' / '0' / 'sae'}"
    with pytest.raises(ValueError, match=r"mixes SAEs of 2 source models \(tiny: .*; tiny_llava: .*Split the sweep"):
        run(_compose(compose_cfg, both, tmp_path), out_dpath=tmp_path / "m")


@pytest.mark.slow  # two MS runs on the tiny model: ~8 s on a shared machine
def test_sweep_of_seeds_aggregates_them_and_keeps_each_saes_outputs(compose_cfg, tmp_path, monkeypatch) -> None:
    """Two SAEs of one config trained with seeds 0 and 1 (the seed recorded in sae/run_info.json as training
    does): one ms_table cell, the mean of the two SAEs' means ± their 95% interval, the seeds listed; each SAE's
    outputs in its own folder (the run folder appended to the clashing name)."""
    from vlmsae.metrics.seed_matching import mean_ci
    from vlmsae.monosemanticity import run
    from vlmsae.sae import SAEConfig, build_sae, save_sae
    from vlmsae.studies.sweep import training_seed
    from vlmsae.utils.provenance import write_run_info

    monkeypatch.setenv("VLMSAE_HOME", str(tmp_path / "home"))
    root = tmp_path / "multirun" / "2026-01-01" / "12-00-00"
    for seed in (0, 1):
        sae_dpath = root / str(seed) / "sae"
        trained_on = {"model": "tiny", "pretrained": None, "layer": 2, "tokens": "cls"}
        save_sae(
            build_sae(SAEConfig(arch="topk", d_in=64, n_latents=128, k=6), seed=seed), sae_dpath, trained_on=trained_on
        )
        write_run_info(sae_dpath, {"seed": seed, "sae": {"arch": "topk"}})
    assert training_seed(str(root / "1" / "sae")) == 1 and training_seed(str(tmp_path)) is None
    out = run(_compose(compose_cfg, tmp_path / "multirun", tmp_path), out_dpath=tmp_path / "o")
    assert out["sweep"] == ["topk_x2_L2_0", "topk_x2_L2_1"]
    means = [json.loads((tmp_path / "o" / n / "ms_summary.json").read_text())["mean"] for n in out["sweep"]]
    assert means[0] != means[1]  # different seeds, different SAEs: both scored, neither overwritten
    rows = list(csv.DictReader((tmp_path / "o" / "ms_table.csv").open()))
    assert [r["architecture"] for r in rows] == ["topk", "raw neurons"]
    expected = mean_ci(means)
    assert float(rows[0]["x2_mean"]) == pytest.approx(expected["mean"], abs=1e-4)
    assert float(rows[0]["x2_ci95"]) == pytest.approx(expected["ci95"], abs=1e-4)
    assert (rows[0]["x2_n_seeds"], rows[0]["x2_seeds"]) == ("2", "0;1")
    assert "(2 seeds)" in (tmp_path / "o" / "ms_table.md").read_text()


@pytest.mark.slow  # a 2 x 2 training multirun on the tiny model, then one MS command over it: ~60 s
def test_cli_scores_a_training_multirun_in_one_command(tmp_path) -> None:
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "VLMSAE_HOME": str(tmp_path / "home")}
    train = [sys.executable, "-m", "vlmsae.train", "-m", "sae=topk,relu", "sae.expansion=2,4", "sae.k=8"]
    train += ["trainer.max_steps=20", "trainer.val_check_interval=20", "trainer.checkpoint_every_n_steps=20"]
    train += ["trainer.scale_batches=2", "data.n_per_class=2", "logger=none", f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    proc = subprocess.run(train, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    score = [sys.executable, "-m", "vlmsae.monosemanticity", f"sae_path={tmp_path / 'sweep'}", "data=tiny"]
    score += ["data.n_per_class=2", "embedder=tiny", f"embed_cache={tmp_path / 'c'}", "progress=false"]
    proc = subprocess.run(
        [*score, f"hydra.run.dir={tmp_path / 'ms'}"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = list(csv.DictReader((tmp_path / "ms" / "ms_table.csv").open()))
    assert [r["architecture"] for r in rows] == ["relu", "topk", "raw neurons"]
    for arch in ("relu", "topk"):
        for e in (2, 4):
            one = json.loads((tmp_path / "ms" / f"{arch}_x{e}_L2" / "ms_summary.json").read_text())
            assert one["n_images"] == 32
            cell = next(r for r in rows if r["architecture"] == arch)[f"x{e}_mean"]
            assert float(cell) == pytest.approx(one["mean"], abs=1e-4)
    assert "| raw neurons | 2 |" in proc.stdout  # the table is printed


class _ColourCLIP:
    """A test CLIP whose image and text sides agree on the planted colours: an image embeds as the share of its
    pixels near each planted colour, the prompt naming a colour as that colour's axis (other names: one more)."""

    def __init__(self, spec) -> None:
        from vlmsae.data.concepts import COLOURS

        self.spec, self.colours = spec, list(COLOURS)
        self.rgb_A3 = torch.tensor([COLOURS[c] for c in self.colours], dtype=torch.float32)
        self.dim = len(self.colours) + 1

    def embed(self, images, progress=False):
        import numpy as np

        rows = []
        for im in images:
            px = torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32).reshape(-1, 3))
            near_PC = torch.cdist(px, self.rgb_A3) < 60
            rows.append(torch.cat([near_PC.float().mean(0), torch.zeros(1)]))
        return torch.stack(rows)

    def embed_text(self, prompts):
        out = torch.zeros(len(prompts), self.dim)
        for i, p in enumerate(prompts):
            hits = [c for c, name in enumerate(self.colours) if f" {name}." in p]
            out[i, hits[0] if hits else -1] = 1.0
        return out


def test_names_name_each_latent_by_its_top_images_colour(compose_cfg, tiny_sae_dpath, tmp_path, monkeypatch) -> None:
    from vlmsae.formats import read_latents_csv
    from vlmsae.models import embedders
    from vlmsae.monosemanticity import run

    monkeypatch.setattr(embedders, "load_embedder", _ColourCLIP)  # images and names through the same test CLIP
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("dog\nred\ngreen\nblue\nyellow\ncar\n")
    out = tmp_path / "out"
    summary = run(_compose(compose_cfg, tiny_sae_dpath, tmp_path, f"names={vocab}", "names_top=2"), out_dpath=out)
    rows = read_latents_csv(out).rows
    assert (out / "latents.csv").read_text().splitlines()[1].endswith(",top_keys,name,name_score,names")
    _assert_named_by_majority_colour(rows)
    names = summary["names"]
    assert names["vocabulary"] == str(vocab) and names["n_names"] == 6
    assert names["n_named"] == sum(1 for r in rows if r.top_keys)
    best_ms = max((r for r in rows if not math.isnan(r.ms)), key=lambda r: r.ms)
    assert names["top_latents"][0]["latent"] == best_ms.latent and names["top_latents"][0]["name"] == best_ms.name


def test_names_need_a_text_side_and_a_vocabulary(compose_cfg, tiny_sae_dpath, tmp_path) -> None:
    from vlmsae.monosemanticity import run

    with pytest.raises(ValueError, match="embedder=pixels has no text side"):
        run(_compose(compose_cfg, tiny_sae_dpath, tmp_path, "names=imagenet"), out_dpath=tmp_path / "a")
    cfg = _compose(compose_cfg, tiny_sae_dpath, tmp_path, f"names={tmp_path / 'none.txt'}", "embedder=tiny")
    with pytest.raises(FileNotFoundError, match=r"none\.txt is not a file"):
        run(cfg, out_dpath=tmp_path / "b")


def _assert_named_by_majority_colour(rows) -> None:
    """Every live latent is named by the most common colour of its top images (cosine checked by hand)."""
    checked = 0
    for r in rows:
        if not r.top_keys:
            assert r.name == "" and r.names == () and math.isnan(r.name_score)
            continue
        share = {
            c: sum(k.split("/")[0].endswith("_" + c) for k in r.top_keys) for c in ("red", "green", "blue", "yellow")
        }
        best = max(share.values())
        assert len(r.names) == 2 and r.names[0] == r.name and share[r.name] == best
        if sorted(share.values())[-2] < best:  # a strict majority colour: the name and its cosine, by hand
            checked += 1
            assert r.name_score == pytest.approx(best / math.sqrt(sum(v * v for v in share.values())), abs=0.05)
    assert checked > 5


def test_names_job_names_a_finished_run(compose_cfg, tiny_sae_dpath, tmp_path, monkeypatch) -> None:
    from vlmsae import names as names_job
    from vlmsae.formats import read_latents_csv, read_ms_summary, read_run_info
    from vlmsae.models import embedders
    from vlmsae.monosemanticity import run

    ms_dpath = tmp_path / "ms"
    run(_compose(compose_cfg, tiny_sae_dpath, tmp_path), out_dpath=ms_dpath)  # no names
    before = read_latents_csv(ms_dpath).rows
    assert all(r.name is None for r in before)
    monkeypatch.setattr(embedders, "load_embedder", _ColourCLIP)
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("dog\nred\ngreen\nblue\nyellow\ncar\n")
    cfg = compose_cfg("names", [f"ms_run={ms_dpath}", f"names={vocab}", "names_top=2"])
    summary = names_job.run(cfg, out_dpath=tmp_path / "names_run")
    after = read_latents_csv(ms_dpath).rows
    assert [(r.latent, repr(r.ms), r.top_keys) for r in after] == [(r.latent, repr(r.ms), r.top_keys) for r in before]
    _assert_named_by_majority_colour(after)  # the same names the MS job gives (previous test)
    assert read_ms_summary(ms_dpath).extra["names"]["n_named"] == summary["n_named"] > 0
    info = read_run_info(tmp_path / "names_run")
    assert info.extra["ms_run"] == str(ms_dpath) and info.config["embedder"] is None  # the run's own embedder
    with pytest.raises(ValueError, match="Pass ms_run="):
        names_job.run(compose_cfg("names", [f"names={vocab}"]), out_dpath=tmp_path / "x")


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

"""python -m vlmsae.stability: matching the latents of SAEs trained with different seeds, the outputs and their
formats, mean ± 95% CI of the seeds' metrics and MS / hierarchy summaries, refusals of bad input; the documented
recipe (a seed sweep through the train CLI, then stability over its sae/ folders) end to end (slow)."""

from __future__ import annotations

import inspect
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vlmsae import formats
from vlmsae.sae import SAEConfig, build_sae, save_sae
from vlmsae.stability import run
from vlmsae.utils.provenance import write_run_info

D, F = 8, 16


def _seed_run(root: Path, seed: int, perm: torch.Tensor | None, fve: float, n_latents: int = F, d_in: int = D) -> Path:
    """A training-run folder <root>/job_<seed>/ with sae/ (decoder = rows of a fixed matrix, permuted) and metrics."""
    sae = build_sae(SAEConfig(arch="topk", d_in=d_in, n_latents=n_latents, k=2), seed=seed)
    base = torch.randn(n_latents, d_in, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        sae.W_dec.copy_(torch.nn.functional.normalize(base[perm] if perm is not None else base, dim=1))
    run_dpath = root / f"job_{seed}"
    save_sae(sae, run_dpath / "sae", trained_on={"model": "tiny", "layer": 2})
    metrics = {"fve": fve, "l0": 2.0 + seed, "dead_fraction": 0.1 * seed, "step": 10}
    write_run_info(run_dpath / "sae", {"seed": seed}, metrics=metrics)
    return run_dpath


@pytest.fixture
def seeds(tmp_path) -> list[Path]:
    perm = torch.randperm(F, generator=torch.Generator().manual_seed(3))
    return [_seed_run(tmp_path, 0, None, 0.8), _seed_run(tmp_path, 1, perm, 0.9), _seed_run(tmp_path, 2, None, 0.7)]


def _ms_run(dpath: Path, mean: float) -> Path:
    summary = formats.MsSummary(mean=mean, std=0.1, min=0.0, max=1.0, dead=1, n_latents=F, n_images=10)
    summary.baseline = {"mean": mean / 2}
    formats.write_ms_summary(dpath, summary)
    return dpath


def test_stability_matches_permuted_seeds_and_writes_every_output(compose_cfg, seeds, tmp_path):
    ms = [_ms_run(tmp_path / f"ms{i}", m) for i, m in enumerate((0.5, 0.6, 0.7))]
    runs = f"runs=[{seeds[0]},{seeds[1] / 'sae'},{seeds[2]}]"  # a run folder or its sae/ folder
    out = run(compose_cfg("stability", [runs, f"ms_runs=[{','.join(map(str, ms))}]", "pairs=all"]), tmp_path / "o")
    assert out["mean_matched_cos"] == pytest.approx(1.0) and out["frac_found_in_all"] == 1.0
    assert out["n_seeds"] == 3 and out["n_latents"] == F
    assert out["fve_mean"] == pytest.approx(0.8) and out["fve_ci95"] == pytest.approx(4.302652730 * 0.1 / math.sqrt(3))
    assert out["ms_mean"] == pytest.approx(0.6) and out["ms_ci95"] > 0
    summary = formats.read_stability(tmp_path / "o")
    assert summary.runs == [str(s / "sae") for s in seeds] and (summary.n_latents, summary.d_in) == (F, D)
    assert summary.matching["found_in_counts"] == {"1": 0, "2": 0, "3": F}
    assert [(p["a"], p["b"]) for p in summary.matching["pairs"]] == [(0, 1), (0, 2), (1, 2)]
    assert summary.metrics["l0"]["mean"] == 3.0 and summary.metrics["l0"]["per_seed"] == [2.0, 3.0, 4.0]
    assert summary.ms["baseline"]["mean"]["mean"] == pytest.approx(0.3) and summary.hierarchy is None
    # Per latent: the partner in seed 1 is where the permutation put it; seed 2 is the reference itself.
    latents = formats.read_stability_latents(tmp_path / "o")
    perm = torch.randperm(F, generator=torch.Generator().manual_seed(3))
    assert latents.matches[0] == torch.argsort(perm).tolist() and latents.matches[1] == list(range(F))
    assert latents.found_in == [3] * F and latents.mean_cos == pytest.approx([1.0] * F, abs=1e-5)
    md = (tmp_path / "o" / "stability.md").read_text()
    assert f"| 3 of 3 | {F} | 1.000 |" in md and "| fve | 0.8 ± 0.25 |" in md and "| mean | 0.6 ± 0.25 |" in md
    assert (tmp_path / "o" / "stability_cos.png").stat().st_size > 1000
    info = formats.read_run_info(tmp_path / "o")
    assert info.config["pairs"] == "all" and "stability.json" in info.extra["outputs"]


def test_hierarchy_runs_add_a_hierarchy_section(compose_cfg, seeds, tmp_path):
    hier = []
    for i, depth in enumerate((2.0, 4.0, 3.0)):
        groups = [{"group": 0, "n_latents": F, "depth_mean": depth, "ms_mean": 0.5}]
        formats.write_hierarchy(tmp_path / f"h{i}", formats.HierarchySummary(groups=groups, taxonomy="csv"))
        hier.append(tmp_path / f"h{i}")
    runs = f"runs=[{','.join(map(str, seeds))}]"
    run(compose_cfg("stability", [runs, f"hierarchy_runs=[{','.join(map(str, hier))}]"]), tmp_path / "o")
    section = formats.read_stability(tmp_path / "o").hierarchy
    assert section["groups"][0]["depth_mean"]["mean"] == 3.0 and section["groups"][0]["depth_mean"]["ci95"] > 0
    assert "taxonomy" not in section and section["runs"] == [str(h) for h in hier]
    assert "groups[0].depth_mean | 3 ±" in (tmp_path / "o" / "stability.md").read_text()


def test_a_random_seed_is_not_found(compose_cfg, tmp_path):
    a = _seed_run(tmp_path, 0, None, 0.8)
    b_dpath = tmp_path / "rand"
    sae = build_sae(SAEConfig(arch="topk", d_in=D, n_latents=F, k=2), seed=9)  # untouched random decoder
    save_sae(sae, b_dpath / "sae")
    out = run(compose_cfg("stability", [f"runs=[{a},{b_dpath}]", "threshold=0.95"]), tmp_path / "o")
    assert out["frac_found_in_all"] < 0.2 and out["mean_matched_cos"] < 0.9
    assert out["fve_mean"] == 0.8 and math.isnan(out["fve_ci95"])  # only one seed records metrics: no interval


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda t: [_seed_run(t, 0, None, 0.8)], r"runs= lists 1 SAE\(s\).*at least two.*seed=0,1,2"),
        (
            lambda t: [_seed_run(t, 0, None, 0.8), _seed_run(t, 1, None, 0.8, n_latents=32)],
            r"differ in n_latents \(.*job_0/sae: 16, .*job_1/sae: 32\).*same sae\.\* settings",
        ),
        (
            lambda t: [_seed_run(t, 0, None, 0.8), _seed_run(t, 1, None, 0.8, d_in=4)],
            r"differ in d_in \(.*job_0/sae: 8, .*job_1/sae: 4\)",
        ),
        (lambda t: [_seed_run(t, 0, None, 0.8), t / "nowhere"], r"nowhere.*is not an SAE folder.*<run>/sae/"),
    ],
)
def test_bad_runs_are_refused_naming_the_values_and_the_fix(compose_cfg, tmp_path, make, match):
    runs = make(tmp_path)
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        run(compose_cfg("stability", [f"runs=[{','.join(map(str, runs))}]"]), tmp_path / "o")
    assert not (tmp_path / "o" / "stability.json").exists()


def test_bad_options_are_refused(compose_cfg, seeds, tmp_path):
    runs = f"runs=[{','.join(map(str, seeds))}]"
    with pytest.raises(ValueError, match=r"ms_runs= lists 1 run\(s\) but runs= lists 3"):
        run(compose_cfg("stability", [runs, f"ms_runs=[{_ms_run(tmp_path / 'ms', 0.5)}]"]), tmp_path / "o")
    with pytest.raises(ValueError, match="pairs='some'"):
        run(compose_cfg("stability", [runs, "pairs=some"]), tmp_path / "o")
    with pytest.raises(ValueError, match=r"threshold=1.5: a cosine in \(0, 1\]"):
        run(compose_cfg("stability", [runs, "threshold=1.5"]), tmp_path / "o")
    with pytest.raises(ValueError, match=r"Pass runs=\["):
        run(compose_cfg("stability", []), tmp_path / "o")


def test_stability_formats_round_trip_and_refuse_a_newer_version(tmp_path):
    summary = formats.StabilitySummary(
        runs=["a", "b"], n_latents=2, d_in=3, matching={"threshold": 0.7}, metrics={"fve": {"mean": 0.5}}
    )
    formats.write_stability(tmp_path, summary)
    assert formats.read_stability(tmp_path) == summary
    raw = json.loads((tmp_path / "stability.json").read_text())
    assert raw["format_version"] == 1 and "ms" not in raw
    (tmp_path / "stability.json").write_text(json.dumps({**raw, "format_version": 2}))
    with pytest.raises(formats.FormatVersionError, match="format_version=2.*vlmsae.stability"):
        formats.read_stability(tmp_path)
    table = formats.StabilityLatents([0, 1], [2, 1], [0.9, math.nan], [[1, -1]])
    fpath = formats.write_stability_latents(tmp_path, table)
    assert fpath.read_text().splitlines()[:3] == [
        "# vlmsae stability_latents.csv format_version=1",
        "latent,found_in,mean_cos,match_1",
        "0,2,0.900000,1",
    ]
    back = formats.read_stability_latents(tmp_path)
    assert back.matches == [[1, -1]] and back.found_in == [2, 1] and math.isnan(back.mean_cos[1])
    fpath.write_text("latent,found_in\n0,1\n")
    with pytest.raises(ValueError, match="format_version=<n>"):
        formats.read_stability_latents(tmp_path)


def test_run_is_thin():
    import vlmsae.stability

    assert len(inspect.getsource(vlmsae.stability.run).splitlines()) <= 45


# --------------------------------------------------------------------- the documented recipe, through the CLIs
@pytest.mark.slow
def test_seed_sweep_then_stability_through_the_clis(tmp_path):
    from vlmsae.data.store import write_acts_store
    from vlmsae.data.synthetic import PlantedDictionary

    planted = PlantedDictionary.random(d_in=64, n_atoms=64, k=3, scale=5.0, seed=0)
    write_acts_store(tmp_path / "acts", planted.sample(2000, seed=1).x.half(), 500, 2, meta={"model": "tiny"})
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    sweep = tmp_path / "sweep"
    train = [sys.executable, "-m", "vlmsae.train", "-m", "seed=0,1", "data=acts", f"data.acts={tmp_path / 'acts'}"]
    train += ["data.batch_size=128", "data.num_workers=0", "trainer.max_steps=20", "sae.expansion=1"]
    train += ["logger=csv", f"hydra.sweep.dir={sweep}"]
    proc = subprocess.run(train, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stab = [sys.executable, "-m", "vlmsae.stability", f"runs=[{sweep}/job_0/sae,{sweep}/job_1]"]
    stab.append(f"hydra.run.dir={tmp_path / 'stab'}")
    proc = subprocess.run(stab, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = formats.read_stability(tmp_path / "stab")
    assert summary.matching["n_seeds"] == 2 and summary.n_latents == 64
    assert summary.metrics["fve"]["n"] == 2 and math.isfinite(summary.metrics["fve"]["ci95"])
    assert '"n_seeds": 2' in proc.stdout  # the headline figures, printed as JSON
    assert len(formats.read_stability_latents(tmp_path / "stab").matches) == 1

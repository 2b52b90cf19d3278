"""vlmsae.report.job_log: the logger of every job but train (none | csv | W&B offline), and its failure mode."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vlmsae.report.job_log import JobLog, JobLogError, log_job, training_run


@pytest.fixture
def wandb_env(wandb_offline):
    return wandb_offline


def _training_run(tmp_path: Path) -> Path:
    """A training run dir as train leaves it: sae/ (config.json), run_info.json, wandb_id.txt."""
    from vlmsae.sae import SAEConfig, build_sae, save_sae
    from vlmsae.utils.provenance import write_run_info

    run_dpath = tmp_path / "train_run"
    sae_dpath = save_sae(build_sae(SAEConfig(arch="topk", d_in=8, n_latents=16, k=2), seed=0), run_dpath / "sae")
    write_run_info(run_dpath, {"logger": {"kind": "wandb", "project": "p17", "group": None}, "seed": 3})
    (run_dpath / "wandb_id.txt").write_text("abc12345\n")
    return sae_dpath


def _png(fpath: Path) -> Path:
    from PIL import Image

    Image.new("RGB", (200, 100), (255, 0, 0)).save(fpath)
    return fpath


def test_csv_writes_the_flat_summary_and_row_tables(tmp_path):
    with JobLog.open({"kind": "csv"}, job="x", out_dpath=tmp_path, config={"a": 1}) as jl:
        jl.summary({"ms": {"mean": 0.5, "dead": 3}, "fve": 0.9})
        jl.summary({"fve": 0.8})  # a later value wins, the rest stays
        jl.table("answers", [{"image": "a", "steered": "red"}, {"image": "b", "steered": "x", "extra": 1}])
        jl.image("p", _png(tmp_path / "p.png"))  # the file is already the log
    assert json.loads((tmp_path / "csv" / "summary.json").read_text()) == {"ms/mean": 0.5, "ms/dead": 3, "fve": 0.8}
    assert (tmp_path / "csv" / "answers.csv").read_text().splitlines() == [
        "image,steered,extra",
        "a,red,",
        "b,x,1",
    ]
    assert jl.run is None


def test_none_writes_nothing(tmp_path):
    with JobLog.open({"kind": "none"}, job="x", out_dpath=tmp_path) as jl:
        jl.summary({"a": 1})
        jl.table("t", [{"a": 1}])
    assert list(tmp_path.iterdir()) == []


def test_a_bad_kind_names_the_choices(tmp_path):
    with pytest.raises(ValueError, match="logger.kind='wandbb'.*logger=none, logger=csv or logger=wandb"):
        JobLog.open({"kind": "wandbb"}, job="x", out_dpath=tmp_path)


def test_wandb_disabled_starts_no_run_but_keeps_the_csv(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    import wandb

    monkeypatch.setattr(wandb, "init", lambda **kw: pytest.fail("WANDB_MODE=disabled must not start W&B"))
    with JobLog.open({"kind": "wandb", "mode": "online"}, job="x", out_dpath=tmp_path) as jl:
        jl.summary({"a": 1})
    assert json.loads((tmp_path / "csv" / "summary.json").read_text()) == {"a": 1}


def test_training_run_links_the_sae_to_its_run(tmp_path):
    sae_dpath = _training_run(tmp_path)
    trained = training_run(sae_dpath)
    assert trained["wandb_id"] == "abc12345" and trained["name"] == "train_run"
    assert trained["train"]["seed"] == 3 and trained["sae"]["n_latents"] == 16
    assert training_run("hf://org/repo") == {} and training_run(tmp_path / "nope") == {}


def test_wandb_offline_run_holds_summary_plots_table_and_training_link(tmp_path, wandb_env):
    sae_dpath = _training_run(tmp_path)
    out = tmp_path / "eval"
    out.mkdir()
    thumb = _png(out / "img.png")
    node = {"kind": "wandb", "mode": "online"}  # WANDB_MODE=offline wins
    with JobLog.open(node, job="monosemanticity", out_dpath=out, config={"top_k": 5}, sae_path=sae_dpath) as jl:
        jl.summary({"ms": {"mean": 0.25}})
        jl.image("hist", thumb)
        jl.table("latents", [{"latent": i, "top_0": str(thumb) if i == 0 else None} for i in range(5)], ["top_0"], 3)
    run = wandb_env(out)
    assert run["summary"]["ms/mean"] == 0.25
    assert {"plots/hist", "latents"} <= run["logged"]
    assert (run["project"], run["group"], run["job_type"]) == ("p17", "train_run", "monosemanticity")
    cfg = run["config"]
    assert cfg["top_k"] == 5 and cfg["train_wandb_id"] == "abc12345" and cfg["sae"]["n_latents"] == 16
    assert cfg["train"]["seed"] == 3
    tables = list(out.glob("wandb/offline-run-*/files/media/table/latents_*.table.json"))
    table = json.loads(tables[0].read_text())
    assert len(table["data"]) == 3  # max_rows
    assert table["data"][0][1] is not None and table["data"][1][1] is None  # the row with an image has it
    from PIL import Image

    sizes = [Image.open(p).size for p in out.glob("wandb/offline-run-*/files/media/images/**/*.png")]
    assert (200, 100) in sizes  # the plot as it is
    from vlmsae.report.job_log import _thumb

    assert _thumb(str(thumb)).image.size == (96, 48) and _thumb(None) is None  # table cells: thumbnails


def test_an_explicit_project_and_group_win_over_the_training_runs(tmp_path, wandb_env):
    sae_dpath = _training_run(tmp_path)
    node = {"kind": "wandb", "project": "mine", "group": "g"}
    with JobLog.open(node, job="hierarchy", out_dpath=tmp_path / "h", sae_path=sae_dpath) as jl:
        jl.summary({"a": 1})
    run = wandb_env(tmp_path / "h")
    assert (run["project"], run["group"]) == ("mine", "g")


def test_wandb_unreachable_says_how_to_run_offline_and_keeps_the_outputs(tmp_path, monkeypatch, compose_cfg):
    import wandb
    from wandb.errors import CommError

    monkeypatch.setenv("WANDB_MODE", "online")

    def unreachable(**kwargs):
        raise CommError("Network error (ConnectionError), entering retry loop.")

    monkeypatch.setattr(wandb, "init", unreachable)
    out = tmp_path / "run"
    out.mkdir()
    (out / "result.json").write_text("{}")  # what the job wrote before logging
    cfg = compose_cfg("hierarchy", ["sae_path=x", "logger=wandb"])
    with pytest.raises(JobLogError) as info:
        log_job(cfg, "hierarchy", out, {"groups": [{"group": 0, "depth_mean": 2.0}]})
    msg = str(info.value)
    assert "logger.mode=offline" in msg and "WANDB_MODE=offline" in msg and "CommError" in msg and str(out) in msg
    assert isinstance(info.value.__cause__, CommError)
    assert (out / "result.json").is_file()
    assert json.loads((out / "csv" / "summary.json").read_text()) == {"group_0/depth_mean": 2.0}  # csv mirror too


def test_every_job_has_the_logger_group_defaulting_to_csv(compose_cfg):
    jobs = ("extract", "monosemanticity", "hierarchy", "steer", "steer_eval", "splice_eval", "stability", "names")
    for job in jobs:
        cfg = compose_cfg(job)
        assert cfg.logger.kind == "csv", job
        assert compose_cfg(job, ["logger=wandb", "logger.mode=offline"]).logger.mode == "offline"


def test_figures_of_each_job():
    from vlmsae.report.job_log import FIGURES

    ms = FIGURES["monosemanticity"](
        {"mean": 0.3, "std": 0.1, "dead": 4, "baseline": {"mean": 0.1}, "reconstruction": {"fve": 0.9, "l0": 6.0}}
    )
    assert ms == {"ms/mean": 0.3, "ms/std": 0.1, "ms/dead": 4, "neurons/mean": 0.1, "recon/fve": 0.9, "recon/l0": 6.0}
    groups = [{"group": 0, "depth_mean": 1.5}, {"group": 1, "depth_mean": 3.0, "ms_mean": 0.2}]
    assert FIGURES["hierarchy"]({"groups": groups}) == {
        "group_0/depth_mean": 1.5,
        "group_1/depth_mean": 3.0,
        "group_1/ms_mean": 0.2,
    }
    summary = {
        "steered": {"mean": 0.2, "std": 0.1, "n": 9},
        "upper bound (true class names)": {"mean": 0.3, "std": 0.0, "n": 4},
        "lower bound (shuffled names)": {"mean": 0.1, "std": 0.0, "n": 4},
    }
    se = FIGURES["steer_eval"]({"summary": summary})
    assert se["score/steered"] == 0.2 and se["score/steered_std"] == 0.1 and se["score/steered_n"] == 9
    assert se["score/upper_bound"] == 0.3 and se["score/lower_bound"] == 0.1
    steer = FIGURES["steer"]({"steered": ["a", "b"], "baseline": ["a", "c"], "settings": {"latents": {"5": 60}}})
    assert steer == {"steer/n_images": 2, "steer/changed": 1, "steer/changed_fraction": 0.5, "steer/n_latents": 1}
    ex = FIGURES["extract"]({"images_per_s": 12.5, "n_rows": 100, "n_shards": 2, "layer": "last"})
    assert ex == {"extract/images_per_s": 12.5, "extract/n_rows": 100, "extract/n_shards": 2}


def test_figures_of_the_jobs_that_return_only_figures():
    from vlmsae.report.job_log import FIGURES

    result = {"kl": 0.5, "frac_recovered_zero": 0.9, "table": "| a |", "out_dpath": "/x", "n_tokens": 12}
    assert FIGURES["splice_eval"](result) == {
        "splice/kl": 0.5,
        "splice/frac_recovered_zero": 0.9,
        "splice/n_tokens": 12,
    }
    assert FIGURES["stability"]({"mean_matched_cos": 0.93, "ok": True}) == {"stability/mean_matched_cos": 0.93}


def test_a_sweep_table_and_named_latents_reach_wandb(tmp_path, wandb_env):
    """A sweep's ms_table becomes one W&B table of a sweep-level run; named latents carry their names."""
    from omegaconf import OmegaConf

    from vlmsae.formats import LatentRow, LatentsTable, write_latents_csv
    from vlmsae.report.job_log import latents_table_rows

    out = tmp_path / "sweep"
    out.mkdir()
    (out / "ms_table.csv").write_text("architecture,layer,x2_mean,x2_std\ntopk,2,0.9,0.1\nrelu,2,0.8,0.1\n")
    cfg = OmegaConf.create({"logger": {"kind": "wandb", "mode": "offline"}})
    result = {"out_dpath": str(out), "sweep": ["a", "b"], "tables": {"ms_table": {"csv": str(out / "ms_table.csv")}}}
    log_job(cfg, "monosemanticity", out, result)
    run = wandb_env(out)
    assert "ms_table" in run["logged"] and run["job_type"] == "monosemanticity"
    table = json.loads(next(out.glob("wandb/offline-run-*/files/media/table/ms_table_*.table.json")).read_text())
    assert table["columns"][:3] == ["architecture", "layer", "x2_mean"] and len(table["data"]) == 2

    row = LatentRow(latent=0, ms=0.5, freq=0.1, max_act=1.0, group=0, top_keys=("k",))
    named = LatentRow(latent=1, ms=0.7, freq=0.1, max_act=1.0, group=0, top_keys=("k",), name="dog", name_score=0.3,
                      names=("dog", "cat"))  # fmt: skip
    write_latents_csv(tmp_path / "ms", LatentsTable([row, named]))
    rows = latents_table_rows(tmp_path / "ms", 10)
    assert rows[0]["latent"] == 1 and rows[0]["name"] == "dog" and rows[0]["names"] == "dog|cat"

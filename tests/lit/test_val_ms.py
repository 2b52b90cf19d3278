"""MS while training (vlmsae.lit.val_ms): with val_ms.images set a training run logs val/ms_mean in [0, 1] (at each
validation, or every val_ms.every_n_steps); off by default, nothing extra is logged; bad settings are refused."""

from __future__ import annotations

import csv
import math

import pytest

from vlmsae.train import run

_BASE = ["trainer.max_steps=12", "trainer.val_check_interval=6", "logger=csv", "data.n_per_class=2"]
_VAL_MS = ["val_ms.images={source:synthetic,n_per_class:1}", "val_ms.embedder=pixels"]


def _rows(run_dpath) -> list[dict]:
    with open(run_dpath / "csv" / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_val_ms_logs_the_mean_ms_at_each_validation(compose_cfg, tmp_path):
    run(compose_cfg("train", [*_BASE, *_VAL_MS]), out_dpath=tmp_path / "run")
    rows = _rows(tmp_path / "run")
    ms = [(int(r["step"]), float(r["val/ms_mean"])) for r in rows if r.get("val/ms_mean")]
    # Validations at steps 6 and 12, and the final validate() after fit (step 12 again).
    assert [s for s, _ in ms] == [6, 12, 12], rows
    assert all(0.0 <= v <= 1.0 for _, v in ms), ms


def test_val_ms_every_n_steps(compose_cfg, tmp_path):
    run(compose_cfg("train", [*_BASE, *_VAL_MS, "val_ms.every_n_steps=4"]), out_dpath=tmp_path / "run")
    ms = [(int(r["step"]), float(r["val/ms_mean"])) for r in _rows(tmp_path / "run") if r.get("val/ms_mean")]
    assert [s for s, _ in ms] == [4, 8, 12] and all(0.0 <= v <= 1.0 and math.isfinite(v) for _, v in ms), ms


def test_val_ms_is_off_by_default(compose_cfg, tmp_path):
    cfg = compose_cfg("train", _BASE)
    assert cfg.val_ms.images is None
    run(cfg, out_dpath=tmp_path / "run")
    assert "val/ms_mean" not in _rows(tmp_path / "run")[0]


def test_val_ms_bad_settings_are_refused(compose_cfg, tmp_path):
    with pytest.raises(ValueError, match=r"val_ms.embedder='clip_xx' is not one of \[.*'pixels'"):
        run(compose_cfg("train", [*_BASE, _VAL_MS[0], "val_ms.embedder=clip_xx"]), out_dpath=tmp_path / "a")
    with pytest.raises(ValueError, match="val_ms.images is set with sae_grid"):
        run(compose_cfg("train", [*_BASE, *_VAL_MS, "sae_grid=[{k:4},{k:8}]"]), out_dpath=tmp_path / "b")

"""The sweep tables (vlmsae.report.tables) from hand-built rows: one SAE per cell, and several seeds per cell."""

from __future__ import annotations

import csv
import math

import pytest

from vlmsae.report.tables import RAW_ROW, SweepRow, hierarchy_table, ms_table

T_975_1DOF = 12.706  # the 97.5% quantile of Student's t with 1 degree of freedom (n = 2 seeds)


def _ms(mean: float, std: float, base: float = 0.2) -> dict:
    return {"mean": mean, "std": std, "baseline": {"mean": base, "std": 0.05}}


def _rows(csv_fpath) -> list[dict[str, str]]:
    return list(csv.DictReader(csv_fpath.open()))


def test_ms_table_one_sae_per_cell_is_unchanged(tmp_path) -> None:
    sweep = [
        SweepRow("topk_x2_L2", "topk", 2.0, 2, _ms(0.5, 0.1)),
        SweepRow("relu_x4_L2", "relu", 4.0, 2, _ms(0.4, 0.2)),
    ]
    out = ms_table(tmp_path, sweep)
    assert out["columns"] == ["architecture", "layer", "x2_mean", "x2_std", "x4_mean", "x4_std"]
    assert out["rows"] == [
        ["relu", 2, "", "", "0.4000", "0.2000"],
        ["topk", 2, "0.5000", "0.1000", "", ""],
        [RAW_ROW, 2, "0.2000", "0.0500", "0.2000", "0.0500"],
    ]
    md = (tmp_path / "ms_table.md").read_text()
    assert "| topk | 2 | 0.500 ± 0.100 | - |" in md and "Mean MS ± std over the live latents" in md


def test_ms_table_aggregates_seeds_of_one_config(tmp_path) -> None:
    """Two seeds of topk x2: the cell is the mean of their means ± t(0.975, 1) * s / sqrt(2); a one-SAE cell of
    the same (seeded) table has no interval; the seeds are listed when recorded, else only counted."""
    sweep = [
        SweepRow("topk_x2_L2_0", "topk", 2.0, 2, _ms(0.50, 0.10), seed=0),
        SweepRow("topk_x2_L2_1", "topk", 2.0, 2, _ms(0.60, 0.30), seed=1),
        SweepRow("topk_x4_L2", "topk", 4.0, 2, _ms(0.70, 0.20)),
        SweepRow("relu_x2_L2_a", "relu", 2.0, 2, _ms(0.30, 0.10), seed=3),
        SweepRow("relu_x2_L2_b", "relu", 2.0, 2, _ms(0.40, 0.10)),  # no recorded seed
    ]
    out = ms_table(tmp_path, sweep)
    stats = ("mean", "std", "ci95", "n_seeds", "seeds")
    assert out["columns"] == ["architecture", "layer"] + [f"x{e}_{s}" for e in (2, 4) for s in stats]
    rows = {r["architecture"]: r for r in _rows(tmp_path / "ms_table.csv")}
    assert list(rows) == ["relu", "topk", RAW_ROW]
    topk = rows["topk"]
    ci = T_975_1DOF * math.sqrt((0.05**2 + 0.05**2) / 1) / math.sqrt(2)  # s = |0.6 - 0.5| / sqrt(2)
    assert float(topk["x2_mean"]) == pytest.approx(0.55)
    assert float(topk["x2_ci95"]) == pytest.approx(ci, abs=1e-4)  # 0.6353
    assert float(topk["x2_std"]) == pytest.approx(0.20)  # the mean over seeds of the std over latents
    assert (topk["x2_n_seeds"], topk["x2_seeds"]) == ("2", "0;1")
    assert (topk["x4_mean"], topk["x4_std"], topk["x4_ci95"], topk["x4_n_seeds"]) == ("0.7000", "0.2000", "", "1")
    assert (rows["relu"]["x2_n_seeds"], rows["relu"]["x2_seeds"]) == ("2", "")  # one seed unknown: counted only
    assert (rows["relu"]["x4_mean"], rows["relu"]["x4_n_seeds"]) == ("", "")  # no relu x4 SAE
    # the raw neurons: every SAE of the layer scored the same baseline, so its interval is 0
    raw = rows[RAW_ROW]
    assert (raw["x2_mean"], raw["x2_ci95"], raw["x2_n_seeds"]) == ("0.2000", "0.0000", "5")
    md = (tmp_path / "ms_table.md").read_text()
    assert f"| topk | 2 | 0.550 ± {ci:.3f} (2 seeds) | 0.700 (1 seed) |" in md
    assert "Mean over the seeds of each SAE's mean MS ± the half-width of its 95% t-interval" in md


def _hier(depths: list[float], mss: list[float]) -> dict:
    return {"groups": [{"depth_mean": d, "ms_mean": m} for d, m in zip(depths, mss)]}


def test_hierarchy_table_one_sae_per_config_is_unchanged(tmp_path) -> None:
    out = hierarchy_table(tmp_path, [SweepRow("m_x2_L2", "matryoshka", 2.0, 2, _hier([1.0, 2.0], [0.5, 0.6]))])
    assert out["columns"] == ["sae", "architecture", "expansion", "layer", "measure", "group_0", "group_1"]
    assert out["rows"] == [
        ["m_x2_L2", "matryoshka", "2", 2, "depth", "1.0000", "2.0000"],
        ["m_x2_L2", "matryoshka", "2", 2, "ms", "0.5000", "0.6000"],
    ]


def test_hierarchy_table_aggregates_seeds_per_config(tmp_path) -> None:
    """Two seeds of one Matryoshka config become one (depth, ms) pair of rows, each group mean ± ci95 over the
    seeds; the paper's rows still line up under the group columns."""
    sweep = [
        SweepRow("matryoshka_x2_L2_0", "matryoshka", 2.0, 2, _hier([1.0, 3.0], [0.4, 0.8]), seed=0),
        SweepRow("matryoshka_x2_L2_1", "matryoshka", 2.0, 2, _hier([2.0, 3.0], [0.6, 0.8]), seed=1),
    ]
    out = hierarchy_table(tmp_path, sweep, paper={"depth": [1.5, 2.5], "ms_mean": [0.5, 0.7]})
    header = ["sae", "architecture", "expansion", "layer", "measure", "n_seeds", "seeds"]
    assert out["columns"] == [*header, "group_0", "group_0_ci95", "group_1", "group_1_ci95"]
    rows = _rows(tmp_path / "hierarchy_table.csv")
    assert [(r["sae"], r["measure"], r["n_seeds"], r["seeds"]) for r in rows] == [
        ("matryoshka_x2_L2", "depth", "2", "0;1"),
        ("matryoshka_x2_L2", "ms", "2", "0;1"),
    ]
    depth, ms = rows
    half = T_975_1DOF * (1.0 / math.sqrt(2)) / math.sqrt(2)  # two values 1 apart: s = 1/sqrt(2)
    assert float(depth["group_0"]) == pytest.approx(1.5) and float(depth["group_0_ci95"]) == pytest.approx(half, 1e-4)
    assert float(depth["group_1"]) == pytest.approx(3.0) and float(depth["group_1_ci95"]) == pytest.approx(0.0)
    assert float(ms["group_0"]) == pytest.approx(0.5) and float(ms["group_0_ci95"]) == pytest.approx(half * 0.2, 1e-4)
    md = (tmp_path / "hierarchy_table.md").read_text()
    assert f"| matryoshka_x2_L2 | matryoshka | 2 | 2 | depth | 0;1 | 1.500 ± {half:.3f} (2 seeds) | 3.000 ±" in md
    assert "| paper (Table 2) | matryoshka | 2 | last | depth |  | 1.50 | 2.50 |" in md

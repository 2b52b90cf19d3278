"""The sweep-level tables of the evaluation jobs, in the paper's layouts (``.md`` to read, ``.csv`` to load).

- ``ms_table``: rows architecture x layer, columns expansion factor, cells mean MS ± std (SPEC §3's figure as
  a table), plus one ``raw neurons`` row per layer (the baseline, the same in every column: it has no
  expansion). The csv has one ``x{e}_mean`` and one ``x{e}_std`` column per expansion.
- ``hierarchy_table``: the paper's Table 2 per SAE: rows (SAE, depth) and (SAE, MS), one column per
  Matryoshka group.
- ``steer_table``: one row per SAE, the mean steering score of every condition (steered, not steered, the
  bounds).

Each writer takes one ``(SAE name, arch, expansion, layer, result)`` row per SAE and returns the paths
and rows it wrote, so a caller can log the same rows elsewhere.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlmsae.utils.io import atomic_write_text

RAW_ROW = "raw neurons"


@dataclass
class SweepRow:
    """One SAE of a sweep and the result of a job on it (``ms_summary``, ``hierarchy.json`` or the steer
    summary, as a dict)."""

    name: str
    arch: str
    expansion: float
    layer: Any
    result: dict[str, Any]


def _num(v: Any, nd: int = 4) -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{float(v):.{nd}f}"


def _pm(mean: Any, std: Any) -> str:
    return "-" if mean is None else f"{float(mean):.3f} ± {float(std or 0.0):.3f}"


def _markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _csv(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


def _write(out_dpath: Path, stem: str, md: str, header: list[str], rows: list[list[Any]]) -> dict[str, Any]:
    md_fpath, csv_fpath = Path(out_dpath) / f"{stem}.md", Path(out_dpath) / f"{stem}.csv"
    atomic_write_text(md_fpath, md)
    atomic_write_text(csv_fpath, _csv(header, rows))
    return {"md": str(md_fpath), "csv": str(csv_fpath), "columns": header, "rows": rows}


def _x(e: float) -> str:
    return f"x{e:g}"


def _layer_key(layer: Any) -> tuple[int, Any]:
    return (0, layer) if isinstance(layer, int) else (1, str(layer))


def ms_table(out_dpath: Path, sweep: Sequence[SweepRow], source: str = "") -> dict[str, Any]:
    """``ms_table.md`` / ``ms_table.csv``: mean MS ± std per (architecture, layer) and expansion factor."""
    expansions = sorted({r.expansion for r in sweep})
    layers = sorted({r.layer for r in sweep}, key=_layer_key)
    archs = sorted({r.arch for r in sweep})
    cell = {(r.arch, r.layer, r.expansion): r.result for r in sweep}
    header = ["architecture", "layer"] + [f"{_x(e)}_{s}" for e in expansions for s in ("mean", "std")]
    md_rows, csv_rows = [], []
    for layer in layers:
        for arch in archs:
            found = [cell.get((arch, layer, e)) for e in expansions]
            if not any(found):
                continue
            md_rows.append([arch, layer] + [_pm(c["mean"], c["std"]) if c else "-" for c in found])
            csv_rows.append([arch, layer] + [_num(c[k]) if c else "" for c in found for k in ("mean", "std")])
        base = next((r.result["baseline"] for r in sweep if r.layer == layer and "baseline" in r.result), None)
        if base is not None:  # the raw neurons have no expansion factor: the same baseline in every column
            md_rows.append([RAW_ROW, layer] + [_pm(base["mean"], base["std"])] * len(expansions))
            csv_rows.append([RAW_ROW, layer] + [_num(base[k]) for _ in expansions for k in ("mean", "std")])
    md = (
        f"# Monosemanticity of the sweep{f' ({source})' if source else ''}\n\n"
        "Mean MS ± std over the live latents of each SAE (rows: architecture and layer, columns: expansion "
        f"factor); `{RAW_ROW}`: the layer's raw neurons (the baseline).\n\n"
        + _markdown(["architecture", "layer"] + [_x(e) for e in expansions], md_rows)
    )
    return _write(out_dpath, "ms_table", md, header, csv_rows)


def hierarchy_table(out_dpath: Path, sweep: Sequence[SweepRow], paper: dict[str, list[float]] | None = None):
    """``hierarchy_table.md`` / ``.csv``: the paper's Table 2 per SAE, rows depth and MS, one column per group."""
    n_groups = max((len(r.result["groups"]) for r in sweep), default=0)
    header = ["sae", "architecture", "expansion", "layer", "measure"] + [f"group_{g}" for g in range(n_groups)]
    rows = []
    for r in sweep:
        groups = r.result["groups"]
        for measure, key in (("depth", "depth_mean"), ("ms", "ms_mean")):
            vals = [_num(g.get(key)) for g in groups] + [""] * (n_groups - len(groups))
            rows.append([r.name, r.arch, f"{r.expansion:g}", r.layer, measure, *vals])
    md_rows = [[c or "-" for c in row] for row in rows]
    if paper and n_groups == len(paper["depth"]):
        md_rows.append(["paper (Table 2)", "matryoshka", "2", "last", "depth", *[f"{v:.2f}" for v in paper["depth"]]])
        md_rows.append(["paper (Table 2)", "matryoshka", "2", "last", "ms", *[f"{v:.2f}" for v in paper["ms_mean"]]])
    md = (
        "# Taxonomy alignment of the sweep (Table 2 per SAE)\n\n"
        "depth: mean LCA depth of the top images' taxon paths over a group's scored latents; ms: the group's "
        "mean MS.\n\n" + _markdown(header, md_rows)
    )
    return _write(out_dpath, "hierarchy_table", md, header, rows)


def steer_table(out_dpath: Path, sweep: Sequence[SweepRow]) -> dict[str, Any]:
    """``steer_table.md`` / ``.csv``: per SAE the mean steering score (± std in the md) of every condition."""
    conditions: list[str] = []
    for r in sweep:
        conditions += [c for c in r.result if c not in conditions]
    header = ["sae", "architecture", "expansion", "layer", *conditions]
    rows, md_rows = [], []
    for r in sweep:
        stats = [r.result.get(c) for c in conditions]
        rows.append([r.name, r.arch, f"{r.expansion:g}", r.layer, *[_num(s["mean"]) if s else "" for s in stats]])
        md_rows.append(
            [r.name, r.arch, f"{r.expansion:g}", r.layer, *[_pm(s["mean"], s.get("std")) if s else "-" for s in stats]]
        )
    md = (
        "# Steering score of the sweep\n\nMean cosine of the answer's text embedding with the latent's concept "
        "(± std): steered vs not steered, and the bounds (true class names, shuffled names).\n\n"
        + _markdown(header, md_rows)
    )
    return _write(out_dpath, "steer_table", md, header, rows)

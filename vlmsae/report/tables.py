"""The sweep-level tables of the evaluation jobs, in the paper's layouts (``.md`` to read, ``.csv`` to load).

- ``ms_table``: rows architecture x layer, columns expansion factor, cells mean MS ± std (METHOD §3), plus
  one ``raw neurons`` row per layer (the baseline, the same in every column: it has no expansion);
- ``hierarchy_table``: the paper's Table 2 per SAE: rows (SAE, depth) and (SAE, MS), one column per group;
- ``steer_table``: one row per SAE, the mean steering score of every condition.

Seeds (issue 16; docs/sweeps.md): when some (architecture, layer, expansion) has several SAEs, ms_table and
hierarchy_table give per cell the mean over the seeds ± the half-width of its 95% t-interval
(:func:`vlmsae.metrics.seed_matching.mean_ci`), and the csv gains ``_ci95``, ``n_seeds`` and ``seeds`` columns
(in a seeded ms_table ``x{e}_std`` is the mean of each SAE's std). One SAE per cell: no extra columns.

Each writer takes one ``(SAE name, arch, expansion, layer, result)`` row per SAE and returns the paths
and rows it wrote, so a caller can log the same rows elsewhere.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vlmsae.metrics.seed_matching import mean_ci
from vlmsae.studies.sweep import SweepRow
from vlmsae.utils.io import atomic_write_text

RAW_ROW = "raw neurons"


def _num(v: Any, nd: int = 4) -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{float(v):.{nd}f}"


def _pm(mean: Any, std: Any) -> str:
    return "-" if mean is None else f"{float(mean):.3f} ± {float(std or 0.0):.3f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table: the header row, the separator, one line per row."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _write(out_dpath: Path, stem: str, md: str, header: list[str], rows: list[list[Any]]) -> dict[str, Any]:
    md_fpath, csv_fpath = Path(out_dpath) / f"{stem}.md", Path(out_dpath) / f"{stem}.csv"
    atomic_write_text(md_fpath, md)
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows([header, *rows])
    atomic_write_text(csv_fpath, buf.getvalue())
    return {"md": str(md_fpath), "csv": str(csv_fpath), "columns": header, "rows": rows}


def _x(e: float) -> str:
    return f"x{e:g}"


def _layer_key(layer: Any) -> tuple[int, Any]:
    return (0, layer) if isinstance(layer, int) else (1, str(layer))


def _by_config(sweep: Sequence[SweepRow]) -> dict[tuple[Any, Any, float], list[SweepRow]]:
    """The sweep's SAEs grouped by (architecture, layer, expansion), in sweep order."""
    groups: dict[tuple[Any, Any, float], list[SweepRow]] = {}
    for r in sweep:
        groups.setdefault((r.arch, r.layer, r.expansion), []).append(r)
    return groups


def _seeds(rows: Sequence[SweepRow]) -> str:
    """The rows' training seeds, ";"-joined (sorted); empty unless every row records its seed."""
    seeds = [r.seed for r in rows]
    return "" if any(s is None for s in seeds) else ";".join(str(s) for s in sorted(seeds))


def _over_seeds(values: Sequence[Any]) -> dict[str, Any]:
    return mean_ci([v for v in values if v is not None])


def _pm_seeds(stat: dict[str, Any]) -> str:
    """``mean ± ci95 (n seeds)``; one seed has no interval: ``mean (1 seed)``."""
    if not stat["n"]:
        return "-"
    if stat["n"] == 1:
        return f"{stat['mean']:.3f} (1 seed)"
    return f"{stat['mean']:.3f} ± {stat['ci95']:.3f} ({stat['n']} seeds)"


def _ms_cells(found: list[list[dict[str, Any]]], seeds: list[str], seeded: bool) -> tuple[list[str], list[str]]:
    """An ms_table row's md cells and csv values from each expansion's results (one per seed; unseeded: the
    first result's mean ± std)."""
    md, csv_vals = [], []
    for results, seed_list in zip(found, seeds):
        if not seeded:
            c = results[0] if results else None
            md.append(_pm(c["mean"], c["std"]) if c else "-")
            csv_vals += [_num(c[k]) if c else "" for k in ("mean", "std")]
            continue
        stat = _over_seeds([r["mean"] for r in results])
        std = _over_seeds([r.get("std") for r in results])["mean"] if results else None
        md.append(_pm_seeds(stat) if results else "-")
        csv_vals += [_num(stat["mean"]), _num(std), _num(stat["ci95"]), str(len(results)) if results else "", seed_list]
    return md, csv_vals


def ms_table(out_dpath: Path, sweep: Sequence[SweepRow], model_name: str | None = None) -> dict[str, Any]:
    """``ms_table.md`` / ``ms_table.csv``: mean MS ± std per (architecture, layer) and expansion factor; with
    several SAEs per cell (seeds), their mean ± 95% interval over the seeds (module docstring). ``model_name``:
    the model named in the title (None: the first row's ``model``)."""
    model_name = (sweep[0].result.get("model", "") if sweep else "") if model_name is None else model_name
    expansions = sorted({r.expansion for r in sweep})
    layers = sorted({r.layer for r in sweep}, key=_layer_key)
    archs = sorted({r.arch for r in sweep})
    groups = _by_config(sweep)
    seeded = any(len(g) > 1 for g in groups.values())
    stats = ("mean", "std", "ci95", "n_seeds", "seeds") if seeded else ("mean", "std")
    header = ["architecture", "layer"] + [f"{_x(e)}_{s}" for e in expansions for s in stats]
    md_rows, csv_rows = [], []
    for layer in layers:
        for arch in archs:
            members = [groups.get((arch, layer, e), []) for e in expansions]
            if not any(members):
                continue
            md, vals = _ms_cells([[r.result for r in g] for g in members], [_seeds(g) for g in members], seeded)
            md_rows.append([arch, layer, *md])
            csv_rows.append([arch, layer, *vals])
        # the raw neurons have no expansion factor: the same baseline in every column; seeded, over every SAE of
        # the layer (the same images give the same baseline: interval 0)
        with_base = [r for r in sweep if r.layer == layer and "baseline" in r.result]
        if with_base:
            md, vals = _ms_cells([[r.result["baseline"] for r in with_base]], [_seeds(with_base)], seeded)
            md_rows.append([RAW_ROW, layer] + md * len(expansions))
            csv_rows.append([RAW_ROW, layer] + vals * len(expansions))
    what = (
        "Mean over the seeds of each SAE's mean MS ± the half-width of its 95% t-interval over the seeds (n seeds)"
        if seeded
        else "Mean MS ± std over the live latents of each SAE"
    )
    md = (
        f"# Monosemanticity of the sweep{f' ({model_name})' if model_name else ''}\n\n"
        f"{what} (rows: architecture and layer, columns: expansion "
        f"factor); `{RAW_ROW}`: the layer's raw neurons (the baseline).\n\n"
        + markdown_table(["architecture", "layer"] + [_x(e) for e in expansions], md_rows)
    )
    return _write(out_dpath, "ms_table", md, header, csv_rows)


def _hierarchy_seeded(groups: dict[tuple[Any, Any, float], list[SweepRow]], n_groups: int):
    """Rows per (architecture, layer, expansion) config: depth and MS per group as mean ± ci95 over its seeds."""
    header = ["sae", "architecture", "expansion", "layer", "measure", "n_seeds", "seeds"]
    header += [f"group_{g}{s}" for g in range(n_groups) for s in ("", "_ci95")]
    rows, md_rows = [], []
    for (arch, layer, e), members in groups.items():
        name = f"{arch}_x{e:g}_L{layer}"
        for measure, key in (("depth", "depth_mean"), ("ms", "ms_mean")):
            cells = [
                _over_seeds([r.result["groups"][g].get(key) for r in members if g < len(r.result["groups"])])
                for g in range(n_groups)
            ]
            seeds = _seeds(members)
            rows.append([name, arch, f"{e:g}", layer, measure, len(members), seeds])
            rows[-1] += [_num(c[k]) for c in cells for k in ("mean", "ci95")]
            md_rows.append([name, arch, f"{e:g}", layer, measure, seeds or f"{len(members)} SAEs"])
            md_rows[-1] += [_pm_seeds(c) for c in cells]
    md_header = [*header[:5], "seeds", *(f"group_{g}" for g in range(n_groups))]
    return header, rows, md_header, md_rows


def hierarchy_table(out_dpath: Path, sweep: Sequence[SweepRow], paper: dict[str, list[float]] | None = None):
    """``hierarchy_table.md`` / ``.csv``: the paper's Table 2 per SAE, rows depth and MS, one column per group;
    with several SAEs of one config (seeds), per config: mean ± 95% interval over the seeds (module docstring)."""
    n_groups = max((len(r.result["groups"]) for r in sweep), default=0)
    groups = _by_config(sweep)
    if any(len(g) > 1 for g in groups.values()):
        header, rows, md_header, md_rows = _hierarchy_seeded(groups, n_groups)
        what = "per configuration, mean over the seeds ± the half-width of the 95% t-interval over the seeds"
    else:
        header = ["sae", "architecture", "expansion", "layer", "measure"] + [f"group_{g}" for g in range(n_groups)]
        rows = []
        for r in sweep:
            groups_r = r.result["groups"]
            for measure, key in (("depth", "depth_mean"), ("ms", "ms_mean")):
                vals = [_num(g.get(key)) for g in groups_r] + [""] * (n_groups - len(groups_r))
                rows.append([r.name, r.arch, f"{r.expansion:g}", r.layer, measure, *vals])
        md_header, md_rows, what = header, [[c or "-" for c in row] for row in rows], ""
    if paper and n_groups == len(paper["depth"]):
        pad = [""] * (len(md_header) - 5 - n_groups)  # a seeded table's seeds column
        for measure, key in (("depth", "depth"), ("ms", "ms_mean")):
            md_rows.append(
                ["paper (Table 2)", "matryoshka", "2", "last", measure, *pad, *[f"{v:.2f}" for v in paper[key]]]
            )
    md = (
        "# Taxonomy alignment of the sweep (Table 2 per SAE)\n\n"
        "depth: mean LCA depth of the top images' taxon paths over a group's scored latents; ms: the group's "
        f"mean MS{f'; {what}' if what else ''}.\n\n" + markdown_table(md_header, md_rows)
    )
    return _write(out_dpath, "hierarchy_table", md, header, rows)


def steer_table(out_dpath: Path, sweep: Sequence[SweepRow]) -> dict[str, Any]:
    """``steer_table.md`` / ``.csv``: per SAE the mean steering score (± std in the md) of every condition
    (``result``: a ``steer_eval.json`` as a dict)."""
    conditions: list[str] = []
    for r in sweep:
        conditions += [c for c in r.result["summary"] if c not in conditions]
    header = ["sae", "architecture", "expansion", "layer", *conditions]
    rows, md_rows = [], []
    for r in sweep:
        stats, sae = [r.result["summary"].get(c) for c in conditions], [r.name, r.arch, f"{r.expansion:g}", r.layer]
        rows.append([*sae, *[_num(s["mean"]) if s else "" for s in stats]])
        md_rows.append([*sae, *[_pm(s["mean"], s.get("std")) if s else "-" for s in stats]])
    md = (
        "# Steering score of the sweep\n\nMean cosine of the answer's text embedding with the latent's concept "
        "(± std): steered vs not steered, and the bounds (true class names, shuffled names).\n\n"
        + markdown_table(header, md_rows)
    )
    return _write(out_dpath, "steer_table", md, header, rows)

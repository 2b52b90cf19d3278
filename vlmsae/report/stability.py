"""The output folder of ``python -m vlmsae.stability``: stability.json, stability_latents.csv, stability.md
and the histogram of matched cosines (stability_cos.png), in one call."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from vlmsae import formats
from vlmsae.report.plots import plot_matched_cos_hist
from vlmsae.studies.stability_study import StabilityStudy
from vlmsae.utils.io import atomic_write_text

STABILITY_OUTPUTS = [formats.STABILITY_JSON, formats.STABILITY_LATENTS_CSV, "stability.md", "stability_cos.png"]


def _pm(stats: Any) -> str:
    """``mean ± ci95`` (4 significant digits; no interval with one seed)."""
    if not isinstance(stats, dict) or not isinstance(stats.get("mean"), float | int):
        return ""
    mean, ci = float(stats["mean"]), stats.get("ci95")
    if math.isnan(mean):
        return "nan"
    return f"{mean:.4g} ± {ci:.2g}" if isinstance(ci, float | int) and math.isfinite(ci) else f"{mean:.4g}"


def _stats_rows(section: dict[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    """(field, mean ± ci) for every aggregated number of a summaries_mean_ci section, nested keys dotted."""
    rows = []
    for key, value in section.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and "ci95" in value:
            rows.append((name, _pm(value)))
        elif isinstance(value, dict):
            rows += _stats_rows(value, name + ".")
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if isinstance(item, dict):
                    rows += _stats_rows(item, f"{name}[{i}].")
    return rows


def stability_markdown(summary: formats.StabilitySummary) -> str:
    m = summary.matching
    n = m["n_seeds"]
    lines = [
        f"# Seed stability: {n} SAEs of {summary.n_latents} latents (d_in {summary.d_in})",
        "",
        f"Reference: `{summary.runs[0]}`. A latent is found in a seed when its one-to-one (Hungarian) partner there "
        f"has decoder cosine >= {m['threshold']:g}. Intervals: 95% t-interval over seeds.",
        "",
        "| found in m of n seeds | latents | fraction |",
        "|---|---|---|",
    ]
    for k, count in sorted(m["found_in_counts"].items(), key=lambda kv: int(kv[0])):
        lines.append(f"| {k} of {n} | {count} | {count / max(summary.n_latents, 1):.3f} |")
    lines += [
        "",
        f"Mean matched cosine (reference vs other seeds): {m['mean_matched_cos']:.4f}; "
        f"found in all seeds: {m['frac_found_in_all']:.3f} of the latents.",
        "",
        "| pair | mean matched cos | median | mean max cos | found (>= threshold) |",
        "|---|---|---|---|---|",
    ]
    for p in m["pairs"]:
        lines.append(
            f"| {p['a']} vs {p['b']} | {p['mean_matched_cos']:.4f} | {p['median_matched_cos']:.4f} | "
            f"{p['mean_max_cos']:.4f} | {p['frac_matched']:.3f} |"
        )
    sections = [("training metrics", summary.metrics), ("monosemanticity (ms_runs)", summary.ms)]
    sections.append(("hierarchy (hierarchy_runs)", summary.hierarchy))
    for title, section in sections:
        rows = _stats_rows({k: v for k, v in (section or {}).items() if k != "runs"})
        if rows:
            lines += ["", f"| {title} | mean ± 95% CI over seeds |", "|---|---|"]
            lines += [f"| {name} | {value} |" for name, value in rows]
    lines += ["", "Runs: " + ", ".join(f"{i}: `{r}`" for i, r in enumerate(summary.runs))]
    return "\n".join(lines) + "\n"


def write_stability_outputs(out_dpath: Path, study: StabilityStudy) -> list[str]:
    """The four files; returns their names."""
    formats.write_stability(out_dpath, study.summary)
    formats.write_stability_latents(out_dpath, study.latents)
    atomic_write_text(out_dpath / "stability.md", stability_markdown(study.summary))
    pairs = {f"{p.a} vs {p.b}": p.cos_F for p in study.result.pairs}
    plot_matched_cos_hist(out_dpath / "stability_cos.png", pairs, study.result.threshold)
    return STABILITY_OUTPUTS

"""The output folders of the monosemanticity and hierarchy studies: every file each job writes, in one call.

Both take the study object their metrics module returns (:class:`vlmsae.studies.ms_study.MSStudy`,
:class:`vlmsae.studies.hierarchy_study.HierarchyStudy`) and write through :mod:`vlmsae.formats` where a
format exists.
"""

from __future__ import annotations

from pathlib import Path

from vlmsae import formats
from vlmsae.report.plots import plot_depth, plot_ms_hist, plot_ms_vs_freq
from vlmsae.studies import hierarchy_study
from vlmsae.studies.hierarchy_study import HierarchyStudy
from vlmsae.studies.ms_study import MSStudy
from vlmsae.utils.io import atomic_write_text

MS_OUTPUTS = [formats.TOP_IMAGES_DIR, formats.LATENTS_CSV, formats.MS_SUMMARY_JSON, "ms_hist.png", "ms_vs_freq.png"]
HIERARCHY_OUTPUTS = [formats.HIERARCHY_JSON, "hierarchy.md", "hierarchy.png", "latent_taxa.csv"]


def write_ms_outputs(out_dpath: Path, study: MSStudy) -> list[str]:
    """``top_images/``, ``latents.csv``, ``ms_summary.json`` and the two plots; returns their names."""
    study.top.save(out_dpath / formats.TOP_IMAGES_DIR)
    formats.write_latents_csv(out_dpath, study.latents_table())
    formats.write_ms_summary(out_dpath, study.summary_format())
    plot_ms_hist(out_dpath / "ms_hist.png", study.ms_K, study.ms_raw_D)
    plot_ms_vs_freq(out_dpath / "ms_vs_freq.png", study.ms_K, study.freq_K)
    return MS_OUTPUTS


def write_hierarchy_outputs(out_dpath: Path, result: HierarchyStudy, sae_name: str) -> list[str]:
    """``latent_taxa.csv``, ``hierarchy.json``, ``hierarchy.md`` and the depth plot; returns their names."""
    hierarchy_study.write_latent_taxa_csv(out_dpath / "latent_taxa.csv", result.latent_rows, result.summary.ranks)
    formats.write_hierarchy(out_dpath, result.summary)
    atomic_write_text(out_dpath / "hierarchy.md", hierarchy_study.hierarchy_markdown(result.summary))
    title = f"{sae_name}: {result.summary.taxonomy}"[:90]
    plot_depth(out_dpath / "hierarchy.png", result.summary.groups, title, hierarchy_study.PAPER_TABLE2["depth"])
    return HIERARCHY_OUTPUTS

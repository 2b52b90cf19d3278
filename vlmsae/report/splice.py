"""``splice.md``: the splice-fidelity table of ``splice_eval`` (one row per condition) and its notes."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from vlmsae.report.tables import markdown_table
from vlmsae.utils.io import atomic_write_text

SPLICE_MD = "splice.md"
COLUMNS = (
    ("condition", "condition"),
    ("nll", "NLL / answer token"),
    ("kl", "KL(clean ‖ condition) / token"),
    ("top1_agreement", "top-1 agreement"),
    ("frac_recovered_zero", "loss recovered vs zero-abl."),
    ("frac_recovered_mean", "loss recovered vs mean-abl."),
)


def _cell(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return "NaN" if math.isnan(value) else f"{value:.4f}"
    return str(value)


def write_splice_report(out_dpath: str | Path, rows: list[dict[str, Any]], notes: list[str], title: str) -> str:
    """Write ``splice.md`` (title, the table of ``rows`` (:meth:`vlmsae.steering.splice.SpliceScores.rows`; – = not
    applicable), notes) into ``out_dpath``; returns the table."""
    table = markdown_table([h for _, h in COLUMNS], [[_cell(r.get(k)) for k, _ in COLUMNS] for r in rows])
    body = f"# {title}\n\n{table}\n" + "".join(f"- {n}\n" for n in notes)
    atomic_write_text(Path(out_dpath) / SPLICE_MD, body)
    return table

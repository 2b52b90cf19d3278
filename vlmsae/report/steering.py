"""Human-readable views of steering runs: the answers side by side (``steer``), the score table and the
per-answer CSV (``steer_eval``)."""

from __future__ import annotations

import csv
import io
import itertools
import textwrap
from pathlib import Path

from vlmsae.steering.evaluate import PAPER, SteeringScores, paper_setting
from vlmsae.steering.score import markdown_table
from vlmsae.utils.io import atomic_write_text

STEER_EVAL_MD = "steer_eval.md"
ANSWERS_CSV = "answers.csv"
ANSWERS_COLUMNS = [
    "latent",
    "image",
    "steered_answer",
    "steered_word",
    "steered_score",
    "plain_answer",
    "plain_word",
    "plain_score",
]


def side_by_side(
    names: list[str], rows: dict[str, list[str]], sweep: dict[str, list[str]] | None = None, width: int = 40
) -> str:
    """The answers in columns (one per condition), wrapped to ``width``, one block per image; then the sweep."""
    lines = [" | ".join(f"{k:<{width}}" for k in rows), "-+-".join("-" * width for _ in rows)]
    for i, name in enumerate(names):
        lines.append(f"[image: {name}]")
        cols = [textwrap.wrap(v[i].replace("\n", " / "), width) or [""] for v in rows.values()]
        for parts in itertools.zip_longest(*cols, fillvalue=""):
            lines.append(" | ".join(f"{p:<{width}}" for p in parts))
    lines += [f"alpha={a}: {v}" for a, v in (sweep or {}).items()]
    return "\n".join(lines)


def answers_csv(scores: SteeringScores) -> str:
    """Every latent x image answer with its first word and score, steered and not (``answers.csv``)."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(ANSWERS_COLUMNS)
    latents, s = scores.request.latents, scores.scores
    for k, (li, ii) in enumerate(scores.pairs):
        writer.writerow(
            [
                latents[li],
                scores.image_names[ii],
                scores.steered[k],
                scores.steered_words[k],
                f"{s['steered'][k]:.4f}",
                scores.plain[ii],
                scores.plain_words[k],
                f"{s['not steered'][k]:.4f}",
            ]
        )
    return buf.getvalue()


def write_score_report(out_dpath: str | Path, scores: SteeringScores, images: str) -> str:
    """Write ``answers.csv`` and ``steer_eval.md`` (title, table beside the paper's numbers) into ``out_dpath``;
    returns the markdown table. ``images``: the evaluation-image spec (it picks the paper's setting)."""
    r, out_dpath, setting = scores.request, Path(out_dpath), paper_setting(images)
    table = markdown_table(scores.summary, PAPER[setting])
    atomic_write_text(out_dpath / ANSWERS_CSV, answers_csv(scores))
    title = (
        f"# Steering score: {len(r.latents)} latents x {len(scores.image_names)} images ({images}), "
        f"alpha={r.alpha}, {r.mode}\n\n"
    )
    note = f"The paper column is METHOD §5's {'white-image' if setting == 'white' else 'ImageNet-image'} setting.\n"
    atomic_write_text(out_dpath / STEER_EVAL_MD, title + table + "\n" + note)
    return table

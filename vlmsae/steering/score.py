"""The maths of METHOD §5's steering score: concept vectors, word-to-concept cosines, their summary.

The embedding functions come in as callables (``embed_images(pil_list) -> [N, E]``,
``embed_texts(str_list) -> [N, E]``), so the score does not care which CLIP computes them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

EmbedFn = Callable[[list[Any]], torch.Tensor]


def unit(x_NE: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit L2 norm (float32; a zero row stays zero)."""
    x_NE = torch.as_tensor(x_NE).float()
    return x_NE / x_NE.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def _concept(emb_NE: torch.Tensor) -> torch.Tensor:
    """[E]: the unit mean of unit image embeddings."""
    return unit(unit(emb_NE).mean(dim=0, keepdim=True))[0]


def concept_embeddings(top_images_per_latent: Sequence[Sequence[Any]], embed_images: EmbedFn) -> torch.Tensor:
    """[L, E] unit concept vectors: the mean of the unit image embeddings of each latent's top images.

    A latent with no top images gets a NaN row (its scores are NaN and left out of means). Takes
    images already in memory; :func:`streamed_concept_embeddings` decodes them latent by latent.
    """
    return streamed_concept_embeddings(top_images_per_latent, _as_is, embed_images)


def _as_is(image: Any) -> Any:
    return image


def streamed_concept_embeddings(
    top_paths_per_latent: Iterable[Sequence[Any]], open_image: Callable[[Any], Any], embed_images: EmbedFn
) -> torch.Tensor:
    """:func:`concept_embeddings` of images opened with ``open_image(path)`` one latent at a time.

    Each latent's images are decoded, embedded and released before the next latent's are opened, so
    at most ``top_n`` decoded images are held at once whatever the number of latents (the paper's
    1000 latents x 16 top images would otherwise be 16k ImageNet images in memory). Same values as
    :func:`concept_embeddings` on the same images: each latent is embedded as one call either way.
    """
    rows = [
        _concept(embed_images([open_image(p) for p in paths])) if len(paths) else None for paths in top_paths_per_latent
    ]
    dim = next((r.shape[0] for r in rows if r is not None), None)
    if dim is None:
        raise ValueError("No latent has any top image: the top-images index is empty for every steered latent.")
    return torch.stack([r if r is not None else torch.full((dim,), float("nan")) for r in rows])


def word_scores(
    words: Sequence[str], concept_idx: Sequence[int], concepts_LE: torch.Tensor, embed_texts: EmbedFn
) -> torch.Tensor:
    """cos(text embedding of ``words[i]``, ``concepts_LE[concept_idx[i]]``) for every i; empty word -> NaN."""
    out = torch.full((len(words),), float("nan"))
    keep = [i for i, w in enumerate(words) if w]
    if not keep:
        return out
    unique = sorted({words[i] for i in keep})
    emb_UE = unit(embed_texts(unique))
    row_of = {w: r for r, w in enumerate(unique)}
    text_KE = emb_UE[[row_of[words[i]] for i in keep]]
    conc_KE = concepts_LE[[concept_idx[i] for i in keep]].to(text_KE)
    out[keep] = (text_KE * conc_KE).sum(dim=-1)
    return out


@dataclass
class ScoreSummary:
    mean: float
    std: float
    n: int

    @classmethod
    def of(cls, scores: torch.Tensor) -> ScoreSummary:
        valid = scores[~scores.isnan()]
        if valid.numel() == 0:
            return cls(float("nan"), float("nan"), 0)
        std = valid.std().item() if valid.numel() > 1 else 0.0
        return cls(valid.mean().item(), std, int(valid.numel()))


def shuffled(items: Sequence[Any], seed: int = 0) -> list[Any]:
    """A seeded permutation of ``items`` with as few fixed points as a random derangement attempt gives."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(items), generator=g).tolist()
    return [items[p] for p in perm]


def markdown_table(rows: dict[str, ScoreSummary], paper: dict[str, float] | None = None) -> str:
    """The steering-score table: one row per condition, the paper's number beside ours when known."""
    paper = paper or {}
    lines = ["| condition | steering score (mean +- std) | n | paper |", "|---|---|---|---|"]
    for name, s in rows.items():
        ref = f"{paper[name]:.3f}" if name in paper else ""
        lines.append(f"| {name} | {s.mean:.3f} +- {s.std:.3f} | {s.n} | {ref} |")
    return "\n".join(lines) + "\n"

"""The optional second naming pass (``autointerp=llava``): LLaVA names a grid of each latent's top images.

For the ``autointerp_max_latents`` latents of highest MS, LLaVA is asked :data:`AUTOINTERP_PROMPT` (greedy)
about a :data:`GRID_SIDE` x :data:`GRID_SIDE` grid of the latent's top images; the first word of its answer is
``autointerp``, and ``autointerp_score`` its cosine with the latent's concept, embedded as the names pass
embeds a vocabulary name (so it compares with ``name_score``). ``autointerp_model``: a ``conf/model/`` choice
with ``backend: hf_llava`` (``llava15_7b``, or ``tiny_llava``: random and offline, for tests and the demo).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from vlmsae.data.images import load_image
from vlmsae.models.llava import load_llava_spec
from vlmsae.models.spec import ModelSpec, get_model_spec
from vlmsae.steering.generate import first_word, generate_answers
from vlmsae.steering.score import word_scores

AUTOINTERP_CHOICES = ("llava",)
AUTOINTERP_PROMPT = "These images share one visual concept. Answer with one word: what is it?"
GRID_SIDE = 3  # a 3 x 3 grid of the first 9 top images
CELL_PX = 112  # each cell's side: the grid is 336 px, LLaVA-1.5's input side (the processor resizes anyway)
EMPTY_CELL = (128, 128, 128)  # a cell without an image: flat grey, no concept of its own


def grid_image(images: Sequence[Any], side: int = GRID_SIDE, cell_px: int = CELL_PX) -> Any:
    """A ``side*cell_px`` square RGB image: the first ``side*side`` of ``images`` (PIL images), each resized to
    one cell, row by row; cells without an image stay :data:`EMPTY_CELL`."""
    from PIL import Image

    grid = Image.new("RGB", (side * cell_px, side * cell_px), EMPTY_CELL)
    for i, img in enumerate(list(images)[: side * side]):
        cell = img.convert("RGB").resize((cell_px, cell_px), Image.Resampling.BICUBIC)
        grid.paste(cell, ((i % side) * cell_px, (i // side) * cell_px))
    return grid


def pick_latents(has_images_K: Sequence[bool], ms_K: torch.Tensor | None, cap: int) -> list[int]:
    """The latents to ask about: those with top images, highest MS first (NaN MS last, ties by id), at most
    ``cap``."""
    ms = [float("nan")] * len(has_images_K) if ms_K is None else [float(x) for x in ms_K]
    live = [k for k, ok in enumerate(has_images_K) if ok]
    return sorted(live, key=lambda k: (ms[k] != ms[k], -ms[k] if ms[k] == ms[k] else 0.0, k))[: max(cap, 0)]


@dataclass
class AutoInterp:
    """LLaVA (loaded on first use, then kept: a sweep's SAEs share it) and the settings of the pass."""

    spec: ModelSpec
    max_latents: int = 200
    batch_size: int = 4
    _loaded: tuple[Any, Any] | None = field(default=None, repr=False)

    def ask(self, grids: Sequence[Any]) -> list[str]:
        """LLaVA's greedy answer to :data:`AUTOINTERP_PROMPT` about each grid image (8 new tokens: room for a word)."""
        if self._loaded is None:
            self._loaded = load_llava_spec(self.spec)
        model, processor = self._loaded
        return generate_answers(model, processor, grids, AUTOINTERP_PROMPT, 8, self.batch_size)

    def interpret(
        self,
        paths_K: Sequence[Sequence[Any]],
        concepts_KE: torch.Tensor,
        ms_K: torch.Tensor | None,
        embed_words: Callable[[list[str]], torch.Tensor],
    ) -> tuple[list[str], list[float]]:
        """``(word, score)`` per latent: ``paths_K[k]`` its top images (best first), ``concepts_KE[k]`` its concept,
        ``embed_words`` the unit text embedding of words. Latents not asked get ``""`` and NaN."""
        picked = pick_latents([len(p) > 0 for p in paths_K], ms_K, self.max_latents)
        words, scores = [""] * len(paths_K), [float("nan")] * len(paths_K)
        from tqdm.auto import tqdm

        starts = tqdm(range(0, len(picked), self.batch_size), desc="autointerp: ask LLaVA", unit="batch")
        for start in starts:  # a batch of grids decoded at a time, not all
            batch = picked[start : start + self.batch_size]
            grids = [grid_image([load_image(p) for p in paths_K[k][: GRID_SIDE * GRID_SIDE]]) for k in batch]
            for k, answer in zip(batch, self.ask(grids), strict=True):
                words[k] = first_word(answer)
        if picked:
            got = word_scores([words[k] for k in picked], picked, concepts_KE.float(), embed_words)
            for k, s in zip(picked, got.tolist(), strict=True):
                scores[k] = s
        return words, scores


def build_autointerp(autointerp: str | None, model: str, max_latents: int, names: str | None) -> AutoInterp | None:
    """The pass of a job's ``autointerp`` / ``autointerp_model`` / ``autointerp_max_latents`` keys (None when
    ``autointerp`` is null), checked before anything loads: the choice, the model (a LLaVA), the cap, and
    ``names`` (the pass scores in the names pass's space, so it needs one)."""
    if autointerp is None:
        return None
    if autointerp not in AUTOINTERP_CHOICES:
        raise ValueError(
            f"autointerp={autointerp!r} is not a choice: use one of {list(AUTOINTERP_CHOICES)}, or autointerp=null "
            "(off)."
        )
    spec = get_model_spec(str(model))  # an unknown name lists the conf/model choices
    if spec.backend != "hf_llava":
        raise ValueError(
            f"autointerp_model={model} is a {spec.backend} model, not a LLaVA: autointerp=llava asks LLaVA about "
            "the top images, so pass autointerp_model=llava15_7b (or autointerp_model=tiny_llava offline)."
        )
    if max_latents < 1:
        raise ValueError(f"autointerp_max_latents={max_latents}: ask about at least 1 latent (or autointerp=null).")
    if names is None:
        raise ValueError(
            "autointerp=llava scores LLaVA's word against the names pass's concepts and text embeddings: "
            "pass names=imagenet (or wordnet, or a file) too."
        )
    return AutoInterp(spec, max_latents)

"""The steering score run of METHOD §5 (the ``steer_eval`` job): inputs, the batched steered generation, the bounds
(the class names of a latent's top images: upper; the same names shuffled across latents: lower). The maths is
:mod:`vlmsae.steering.score`.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vlmsae.data.images import load_image
from vlmsae.formats import SteerEvalResult
from vlmsae.steering.generate import ONE_WORD_PROMPT, first_word, generate_answers, white_image
from vlmsae.steering.hooks import steer
from vlmsae.steering.score import ScoreSummary, shuffled, streamed_concept_embeddings, word_scores
from vlmsae.steering.setup import SteeringSetup

_PAPER_BOUNDS = {"upper bound (true class names)": 0.283, "lower bound (shuffled names)": 0.185}
PAPER = {  # METHOD §5, alpha = 100 (ImageNet images / white image)
    "imagenet": {"steered": 0.263, "not steered": 0.211, **_PAPER_BOUNDS},
    "white": {"steered": 0.259, "not steered": 0.212, **_PAPER_BOUNDS},
}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".JPEG", ".JPG", ".PNG")
BOUNDS_NOTE = "class names of top images (upper), shuffled across latents (lower)"


def latent_list(spec: int | Sequence[int]) -> list[int]:
    """``10`` -> latents 0..9 (the paper's 0-9 / 0-999); a list -> those latents."""
    if isinstance(spec, int):
        return list(range(spec))
    if isinstance(spec, Sequence) and not isinstance(spec, str):
        return [int(j) for j in spec]
    raise ValueError(f"latents={spec!r}: give a count (10 = latents 0..9) or a list of latent indices.")


open_image = load_image  # one image file -> 8-bit RGB as extraction decodes it (tests count its calls)


def paper_setting(images: str) -> str:
    """Which of the paper's two settings an ``images`` spec matches: ``white`` or ``imagenet`` (any images)."""
    return "white" if images == "white" else "imagenet"


def eval_images(spec: str, n_images: int | None, size: int, seed: int) -> tuple[list[Any], list[str]]:
    """``white`` (one white image) | a folder of images | a text file listing image paths."""
    if spec == "white":
        return [white_image(size)], ["white"]
    src = Path(spec).expanduser()
    if src.is_dir():
        fpaths = sorted(p for p in src.rglob("*") if p.suffix in IMAGE_SUFFIXES)
    elif src.is_file():
        fpaths = [Path(line.strip()) for line in src.read_text().splitlines() if line.strip()]
    else:
        raise FileNotFoundError(f"images={spec!r}: pass `white`, a folder of images, or a file listing image paths.")
    if not fpaths:
        raise FileNotFoundError(f"images={spec!r} holds no images ({', '.join(IMAGE_SUFFIXES)}).")
    if n_images is not None and len(fpaths) > n_images:
        fpaths = sorted(random.Random(seed).sample(fpaths, n_images))  # a fixed random subset
    return [open_image(p) for p in fpaths], [str(p) for p in fpaths]


def load_class_names(fpath: str | Path | None) -> dict[int, str] | None:
    """Label id -> class name from a .txt (one name per line, line i = label i) or .json (list or dict)."""
    if fpath is None:
        return None
    path = Path(fpath).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"class_names={fpath!r} is not a file (a .txt with one name per line, or a .json).")
    if path.suffix == ".json":
        data = json.loads(path.read_text())
        return {int(k): str(v) for k, v in (data.items() if isinstance(data, dict) else enumerate(data))}
    return {i: line.strip() for i, line in enumerate(path.read_text().splitlines())}


def latent_concepts(top: Any, latents: Sequence[int], top_n: int, embed_images: Any) -> tuple[Any, list, list]:
    """``(concepts_LE, top_paths, top_labels)``: each latent's concept from its top-``top_n`` images (slots with
    -1 or a zero activation dropped) of ``top``, a :class:`vlmsae.metrics.topimages.TopImages`.

    The images are decoded latent by latent (:func:`~vlmsae.steering.score.streamed_concept_embeddings`),
    so memory does not grow with the number of latents.
    """
    image_idx, acts = top.image_idx, top.acts
    paths, labels = top.paths, top.labels
    n_latents = image_idx.shape[0]
    if paths is None:
        raise ValueError(
            "The top-images index has no image paths (images.json paths is null): the concept embedding needs the "
            "images; rerun the monosemanticity job on an image source with files."
        )
    out_paths, out_labels = [], []
    for j in latents:
        if not 0 <= j < n_latents:
            raise ValueError(f"Latent {j} is not in the top-images index ({n_latents} latents).")
        rows = [int(i) for i, a in zip(image_idx[j, :top_n].tolist(), acts[j, :top_n].tolist()) if i >= 0 and a > 0]
        out_paths.append([paths[i] for i in rows])
        out_labels.append([int(labels[i]) if labels is not None and labels[i] is not None else -1 for i in rows])
    return streamed_concept_embeddings(out_paths, open_image, embed_images), out_paths, out_labels


@dataclass
class ScoreRequest:
    """What the steering score steers and asks (the ``steer_eval`` job's keys, typed)."""

    latents: list[int]
    alpha: float = 100.0
    mode: str = "replace"
    prompt: str = ONE_WORD_PROMPT
    max_new_tokens: int = 5
    batch_size: int = 16  # samples per generate call
    top_n: int = 16  # top images per latent that define its concept
    compare_add: bool = False  # also score plain activation steering at the same alpha
    class_names: dict[int, str] | None = None  # label id -> name, for the bounds (None: no bounds)
    seed: int = 0  # the shuffled lower bound


@dataclass
class SteeringScores:
    """Every answer and score of one steering-score run; ``pairs[k] = (latent row, image row)``."""

    request: ScoreRequest
    image_names: list[str]
    pairs: list[tuple[int, int]]
    plain: list[str]  # one answer per image, not steered
    steered: list[str]  # one answer per pair
    steered_words: list[str]
    plain_words: list[str]  # the first word of plain[image of pair k]
    scores: dict[str, torch.Tensor]  # condition -> one score per pair (the bounds: per top image)
    top_paths: list[list[str]]
    layer: int | None
    bound_note: str | None = None  # why the bounds were skipped
    summary: dict[str, ScoreSummary] = field(init=False)

    def __post_init__(self) -> None:
        self.summary = {k: ScoreSummary.of(v) for k, v in self.scores.items()}

    def per_latent(self) -> list[dict[str, Any]]:
        n_img = len(self.image_names)
        rows = []
        for li, j in enumerate(self.request.latents):
            sl = slice(li * n_img, (li + 1) * n_img)
            rows.append(
                {
                    "latent": j,
                    "n_top_images": len(self.top_paths[li]),
                    "steered": ScoreSummary.of(self.scores["steered"][sl]).mean,
                    "not_steered": ScoreSummary.of(self.scores["not steered"][sl]).mean,
                    "steered_words": sorted(set(self.steered_words[sl])),
                }
            )
        return rows

    def result(self, setting: str, settings: dict[str, Any]) -> SteerEvalResult:
        """``steer_eval.json``'s content; ``settings`` (what the job knows: model, paths, ...) come first."""
        r = self.request
        return SteerEvalResult(
            summary={k: vars(v) for k, v in self.summary.items()},
            paper=PAPER[setting],
            per_latent=self.per_latent(),
            settings={
                **settings,
                "layer": self.layer,
                "latents": r.latents,
                "alpha": float(r.alpha),
                "mode": r.mode,
                "n_images": len(self.image_names),
                "top_n": r.top_n,
                "prompt": r.prompt,
                "max_new_tokens": r.max_new_tokens,
                "bounds": self.bound_note or BOUNDS_NOTE,
            },
        )


def steered_answers(
    setup: SteeringSetup, images: Sequence[Any], pairs: Sequence[tuple[int, int]], request: ScoreRequest, mode: str
) -> list[str]:
    """One answer per (latent row, image row) pair, ``request.batch_size`` pairs per generate call."""
    from tqdm import tqdm

    r, bs = request, request.batch_size
    answers: list[str] = []
    for s in tqdm(range(0, len(pairs), bs), desc=f"steered ({mode})"):
        batch = pairs[s : s + bs]
        # One generate call steers a different latent per sample: NaN alpha = leave that latent as encoded.
        alphas = {}
        for li in sorted({li for li, _ in batch}):
            a_B1 = torch.full((len(batch), 1), float("nan"))
            a_B1[[b for b, (lj, _) in enumerate(batch) if lj == li]] = float(r.alpha)
            alphas[r.latents[li]] = a_B1
        with steer(setup.model, setup.sae, alphas, mode=mode, layer=setup.layer):
            batch_images = [images[ii] for _, ii in batch]
            answers += generate_answers(
                setup.model, setup.processor, batch_images, r.prompt, r.max_new_tokens, len(batch_images)
            )
    return answers


def score_steering(
    setup: SteeringSetup, embedder: Any, top: Any, images: Sequence[Any], image_names: list[str], request: ScoreRequest
) -> SteeringScores:
    """The steering score of ``request.latents`` on ``images`` (see the module docstring).

    ``embedder``: an image embedder with a text tower (``embed``, ``embed_text``); ``top``: the
    :class:`~vlmsae.metrics.topimages.TopImages` of a monosemanticity run with ``setup.sae``.
    """
    r = request
    embed_texts = getattr(embedder, "embed_text", None)
    if not callable(embed_texts):
        raise TypeError(
            f"The embedder {type(embedder).__name__} has no text tower (embed_text): the steering score needs a CLIP "
            "embedder (embedder=clip_b32, or the tiny CLIP in tests)."
        )
    # Concepts: mean image embedding of each latent's top images, decoded latent by latent.
    concepts_LE, top_paths, top_labels = latent_concepts(top, r.latents, r.top_n, embedder.embed)
    # Answers, not steered (once per image) and steered (once per latent x image).
    plain = generate_answers(
        setup.model, setup.processor, images, r.prompt, r.max_new_tokens, r.batch_size, True, "not steered"
    )
    pairs = [(li, ii) for li in range(len(r.latents)) for ii in range(len(images))]
    steered = steered_answers(setup, images, pairs, r, r.mode)
    steered_words = [first_word(a) for a in steered]
    plain_words = [first_word(plain[ii]) for _, ii in pairs]
    owner = [li for li, _ in pairs]
    scores = {
        "steered": word_scores(steered_words, owner, concepts_LE, embed_texts),
        "not steered": word_scores(plain_words, owner, concepts_LE, embed_texts),
    }
    if r.compare_add and r.mode != "add":  # plain activation steering along the same decoder directions
        add_words = [first_word(a) for a in steered_answers(setup, images, pairs, r, "add")]
        scores["activation steering (add)"] = word_scores(add_words, owner, concepts_LE, embed_texts)
    bound_note = None
    if r.class_names is not None and any(lbl >= 0 for lbls in top_labels for lbl in lbls):
        scores.update(bound_scores(top_labels, r.class_names, concepts_LE, embed_texts, r.seed))
    else:
        bound_note = "bounds need labels in the top-images index and class_names=<file>; skipped"
    return SteeringScores(
        r,
        list(image_names),
        pairs,
        plain,
        steered,
        steered_words,
        plain_words,
        scores,
        top_paths,
        setup.layer,
        bound_note,
    )


def bound_scores(
    top_labels: list[list[int]], class_names: dict[int, str], concepts_LE: torch.Tensor, embed_texts: Any, seed: int
) -> dict[str, torch.Tensor]:
    """The bounds: the class names of each latent's top images (upper), the same names shuffled across latents."""
    pairs = [(li, class_names.get(lbl, "")) for li, lbls in enumerate(top_labels) for lbl in lbls if lbl >= 0]
    true_words = [w.lower() for _, w in pairs]
    owner = [li for li, _ in pairs]
    return {
        "upper bound (true class names)": word_scores(true_words, owner, concepts_LE, embed_texts),
        "lower bound (shuffled names)": word_scores(shuffled(true_words, seed), owner, concepts_LE, embed_texts),
    }

"""Answers with and without steering, side by side (the ``steer`` job, METHOD §5's qualitative examples)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlmsae.data.images import load_image
from vlmsae.formats import SteerResult
from vlmsae.steering.generate import ONE_WORD_PROMPT, generate_answers, white_image
from vlmsae.steering.hooks import alpha_sweep, steer
from vlmsae.steering.setup import SteeringSetup


def load_images(spec: str | Sequence[str], size: int) -> tuple[list[Any], list[str]]:
    """``white`` | ``skimage:<name>`` | a path | a list of those -> (RGB PIL images, their names)."""
    from PIL import Image

    items = [spec] if isinstance(spec, (str, Path)) else list(spec)
    images, names = [], []
    for item in items:
        item = str(item)
        if item == "white":
            images.append(white_image(size))
        elif item.startswith("skimage:"):
            import skimage.data

            loader = getattr(skimage.data, item.split(":", 1)[1], None)
            if loader is None:
                raise ValueError(f"image={item!r}: skimage.data has no image of that name (try skimage:astronaut).")
            images.append(Image.fromarray(loader()).convert("RGB"))
        else:
            fpath = Path(item).expanduser()
            if not fpath.is_file():
                raise FileNotFoundError(
                    f"image={item!r} is not a file: pass an image path, `white` or `skimage:<name>`."
                )
            images.append(load_image(fpath))  # EXIF, 16-bit, alpha: as extraction decodes
        names.append(item)
    return images, names


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, Sequence) and not isinstance(value, str) else [value]


def latent_alphas(latent: int | Sequence[int], alpha: float | Sequence[float]) -> dict[int, float]:
    """``latent=3 alpha=100`` or ``latent=[3,7] alpha=[100,50]`` (or one alpha for all) -> {3: 100.0, ...}."""
    latents, alphas = [int(j) for j in _as_list(latent)], [float(a) for a in _as_list(alpha)]
    if len(alphas) == 1:
        alphas = alphas * len(latents)
    if len(alphas) != len(latents):
        raise ValueError(f"latent={latents} and alpha={alphas}: give one alpha, or one per latent.")
    return dict(zip(latents, alphas))


@dataclass
class SteerRequest:
    """What to steer and how (the ``steer`` job's keys, typed)."""

    latents: dict[int, float]  # {latent: alpha}, clamped together
    mode: str = "replace"  # replace | error_preserving | add (vlmsae.steering.MODES)
    patches: Any = None  # which tokens (vlmsae.steering.token_mask)
    prompt: str = ONE_WORD_PROMPT
    max_new_tokens: int = 30
    batch_size: int = 8
    compare_add: bool = True  # also the plain activation-steering baseline (mode add)
    sweep: Sequence[float] | None = None  # alphas for a single latent


def compare_answers(
    setup: SteeringSetup, images: Sequence[Any], names: Sequence[str], request: SteerRequest
) -> tuple[SteerResult, dict[str, list[str]]]:
    """``(steer.json's content, rows)``: the answers about ``images`` (called ``names``), not steered,
    steered, and the optional add baseline and alpha sweep; ``rows`` = {condition: answers}, to print.

    ``settings`` holds what was run (the block actually hooked, the latents, ...); the job adds the model.
    """
    r = request
    if r.sweep and len(r.latents) != 1:
        raise ValueError(f"sweep needs a single latent, got latent={list(r.latents)}.")
    hook = {"mode": r.mode, "patches": r.patches, "layer": setup.layer}

    def answers() -> list[str]:
        return generate_answers(
            setup.model, setup.processor, images, r.prompt, r.max_new_tokens, r.batch_size, progress=True
        )  # generation is the slow part of steering: a bar, never a silent wait

    baseline = answers()
    with steer(setup.model, setup.sae, r.latents, **hook) as handle:
        steered = answers()
    rows = {"baseline": baseline, f"steered ({r.mode})": steered}
    result = SteerResult(steered=steered, baseline=baseline)
    if r.compare_add and r.mode != "add":
        with steer(setup.model, setup.sae, r.latents, **{**hook, "mode": "add"}):
            result.activation_steering = rows["activation steering (add)"] = answers()
    if r.sweep:
        (j,) = r.latents
        sweep = alpha_sweep(answers, setup.model, setup.sae, j, [float(a) for a in r.sweep], **hook)
        result.sweep = {str(a): v for a, v in sweep.items()}
    result.settings = {
        "layer": handle.layer,
        "latents": {str(j): a for j, a in r.latents.items()},
        "mode": r.mode,
        "patches": r.patches,
        "prompt": r.prompt,
        "images": list(names),
        "max_new_tokens": r.max_new_tokens,
        "greedy": True,
    }
    return result, rows

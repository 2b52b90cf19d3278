"""What every steering job loads first: the LLaVA, its processor, the SAE on the tower's device, the block."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlmsae.models.llava import load_llava_spec, vision_blocks, vision_tower
from vlmsae.models.open_sae import check_fit, load_job_sae, model_reads
from vlmsae.models.spec import ModelSpec
from vlmsae.steering.hooks import steer_block


@dataclass
class SteeringSetup:
    """A loaded LLaVA and the SAE that steers it."""

    model: nn.Module
    processor: Any
    sae: nn.Module
    layer: int  # the vision block to hook (the job's layer, else the SAE's trained_on.layer), checked against the tower
    image_size: int  # the vision tower's input side (the white image is made this size)


def llava_spec(spec: ModelSpec, device_map: str | None) -> ModelSpec:
    """``spec`` with the job-level ``device_map`` (``device_map=auto`` on the command line) as its
    ``device_map``, where :func:`vlmsae.models.llava.load_llava_spec` reads it; ``None`` keeps ``spec``'s."""
    if device_map is None:
        return spec
    return dataclasses.replace(spec, device_map=device_map)


def require_folder(key: str, value: str | Path | None, what: str = "") -> Path:
    """``Path(value)`` if it is a folder, else a FileNotFoundError naming ``key=value``."""
    if value is None or not Path(str(value)).is_dir():
        raise FileNotFoundError(f"{key}={value!r} is not a folder{what}.")
    return Path(str(value))


def load_steering(
    spec: ModelSpec,
    sae_path: str | Path,
    layer: int | None = None,
    device_map: str | None = None,
    sae_format: str | None = None,
    check_fit: bool = True,
) -> SteeringSetup:
    """Load the SAE of ``sae_path`` (any format :func:`vlmsae.sae.load` reads, via
    :func:`vlmsae.models.open_sae.load_job_sae`; ``sae_format`` None = detect),
    then the LLaVA of ``spec``, and move the SAE onto its vision tower's device.

    ``layer`` overrides the block the SAE was trained on (its ``trained_on.layer``). The SAE loads first, so a
    bad path fails before the (large) model loads; its block and width are checked against the tower
    (:func:`vlmsae.steering.hooks.steer_block`) before any image is read. ``check_fit``: the first images the tower
    sees are checked against the SAE (:func:`vlmsae.models.open_sae.check_fit`, see :func:`check_fit_once`).
    """
    sae = load_job_sae(str(sae_path), sae_format)
    model, processor = load_llava_spec(llava_spec(spec, device_map))
    device = next(vision_tower(model).parameters()).device  # with device_map=auto the tower may not be on cuda:0
    layer = steer_block(model, sae, layer)
    sae = sae.to(device).eval()
    if check_fit:
        check_fit_once(model, sae, layer, model_reads(spec), str(sae_path))
    return SteeringSetup(model, processor, sae, layer, int(model.config.vision_config.image_size))


def check_fit_once(model: nn.Module, sae: nn.Module, layer: int, reads: dict[str, Any], sae_path: str) -> None:
    """Check the SAE against the block's output on the first vision forward, then remove the check.

    A pre-hook runs the block itself (``forward``, which skips every hook) on the block's input, so it sees the
    unsteered output whatever steering hooks are installed later; the rows are the tokens the SAE was trained on.
    """
    block = vision_blocks(model)[layer]
    tokens = (getattr(sae, "trained_on", None) or {}).get("tokens")
    records = dict(getattr(sae, "trained_on", None) or {})

    def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        handle.remove()
        with torch.no_grad():
            out = module.forward(*args, **kwargs)
        h_BTD = out[0] if isinstance(out, tuple) else out
        rows = h_BTD[:, :1] if tokens == "cls" else h_BTD[:, 1:] if tokens == "patches" else h_BTD
        check_fit(sae, rows, records, {**reads, "layer": layer, "tokens": tokens or "all"}, sae_path)

    handle = block.register_forward_pre_hook(pre_hook, with_kwargs=True)

"""What every steering job loads first: the LLaVA, its processor, the SAE on the tower's device, the block."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from vlmsae.models.llava import load_llava_spec, vision_tower
from vlmsae.models.open_sae import load_job_sae
from vlmsae.models.spec import ModelSpec
from vlmsae.steering.hooks import steer_block


@dataclass
class SteeringSetup:
    """A loaded LLaVA and the SAE that steers it."""

    model: nn.Module
    processor: Any
    sae: nn.Module
    layer: int  # the vision block to hook (the job's layer, else the SAE's source.layer), checked against the tower
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
) -> SteeringSetup:
    """Load the SAE of ``sae_path`` (any format :func:`vlmsae.sae.load` reads, via
    :func:`vlmsae.models.open_sae.load_job_sae`; ``sae_format`` None = detect),
    then the LLaVA of ``spec``, and move the SAE onto its vision tower's device.

    ``layer`` overrides the block the SAE was trained on (its ``source.layer``). The SAE loads first, so a
    bad path fails before the (large) model loads; its block and width are checked against the tower
    (:func:`vlmsae.steering.hooks.steer_block`) before any image is read.
    """
    sae = load_job_sae(str(sae_path), sae_format)
    model, processor = load_llava_spec(llava_spec(spec, device_map))
    device = next(vision_tower(model).parameters()).device  # with device_map=auto the tower may not be on cuda:0
    layer = steer_block(model, sae, layer)
    return SteeringSetup(model, processor, sae.to(device).eval(), layer, int(model.config.vision_config.image_size))

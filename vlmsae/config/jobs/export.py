"""Schema of ``python -m vlmsae.export`` (``conf/export.yaml``): every top-level key, its default and meaning."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from omegaconf import MISSING


@dataclass
class ExportJob:
    """Write an SAE of any supported format in another library's layout (vlmsae.sae.interop)."""

    sae_path: str = MISSING  # any supported SAE: a folder, a checkpoint file, or hf://<org>/<repo>[/<sub>][@<rev>]
    sae_format: Optional[str] = None  # format of sae_path (vlmsae.sae.interop.FORMAT_NAMES); null = detect it
    format: str = MISSING  # the layout to write: saelens | dictionary_learning | vlmsae
    out: str = MISSING  # folder to write the exported SAE into
    overwrite: bool = False  # replace the files of an existing export in out (otherwise a non-empty out is refused)
    # format=dictionary_learning of a Matryoshka SAE: the class name config.json gives it. null = the library's
    # MatryoshkaBatchTopKSAE; MatroyshkaBatchTopKSAE (sic) is the only one the paper's code (sae-for-vlm) loads.
    matryoshka_class: Optional[str] = None

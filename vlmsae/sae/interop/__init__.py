"""Published SAEs in other libraries' layouts, loaded as vlmsae :class:`~vlmsae.sae.base.SAE` modules.

    from vlmsae.sae import load                       # = load_any
    sae = load("hf://org/repo/folder")                # fetched into the HF cache, format detected
    sae = load("/ckpts/trainer_0", sae_format="dictionary_learning")
    sae.trained_on                                        # model, pretrained, layer (vlmsae block index), tokens, ...

One module per format (``vlmsae/sae/interop/<name>.py``) with ``NAME``, ``EXPECTS`` (one line: the files and
keys it needs), ``detect(dpath)`` (file names and JSON keys only, no tensors), ``load(dpath, device)`` and, for
export targets, ``save(sae, out_dpath)``. Detection tries ``FORMAT_NAMES`` in order. A foreign SAE becomes a
vlmsae SAE only where its forward is exactly representable (z = (x - b_dec) W_enc^T + b_enc, x_hat = f W_dec +
b_dec; other bias and scaling conventions are folded in); loaded decoder rows need not be unit norm (inference
only). ``sae.trained_on`` always has the keys of :data:`TRAINED_ON_KEYS` (None = unknown). Checkpoints are read with
safetensors or torch's ``weights_only`` reader (:mod:`vlmsae.sae.interop.torchfile`), never unpickled.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

from vlmsae.sae.base import SAE
from vlmsae.sae.checkpoint import refuse_interop_only
from vlmsae.sae.interop.hub import folder_listing, is_hf_uri, resolve_hf

FORMAT_NAMES = ("vlmsae", "dictionary_learning", "saelens", "sparsify", "saev", "prisma", "msae")
EXPORT_FORMATS = ("vlmsae", "dictionary_learning", "saelens")
TRAINED_ON_KEYS = ("model", "pretrained", "layer", "tokens", "input_normalisation", "format", "original_path")


def format_module(name: str) -> ModuleType | None:
    """The module of format ``name``, or None when this install does not have it (that module alone missing)."""
    if name not in FORMAT_NAMES:
        raise ValueError(f"Unknown SAE format {name!r}; the formats are {', '.join(FORMAT_NAMES)}.")
    module_name = f"{__name__}.{name}"
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name == module_name:
            return None
        raise


def available_formats() -> dict[str, ModuleType]:
    """{name: module} of the formats this install can read, in detection order."""
    return {name: module for name in FORMAT_NAMES if (module := format_module(name)) is not None}


def _local_path(path: str | Path) -> Path:
    local = resolve_hf(str(path)) if is_hf_uri(path) else Path(path).expanduser()
    if not local.exists():  # (resolve_hf refuses a missing Hub path itself)
        raise FileNotFoundError(
            f"SAE path {str(path)!r} does not exist; expected a folder of a supported format "
            f"({', '.join(FORMAT_NAMES)}) or an hf://<org>/<repo>[/<subfolder>][@<revision>] path."
        )
    return local


def detect_format(dpath: str | Path) -> str:
    """The first format in ``FORMAT_NAMES`` whose ``detect`` accepts ``dpath``; else an error listing them all."""
    dpath = Path(dpath)
    modules = available_formats()
    for name, module in modules.items():
        if module.detect(dpath):
            return name
    tried = "\n".join(f"  - {name}: {module.EXPECTS}" for name, module in modules.items())
    absent = [name for name in FORMAT_NAMES if name not in modules]
    missing = f"\n(not available in this install: {', '.join(absent)})" if absent else ""
    present = folder_listing(dpath)[:20]
    raise ValueError(
        f"{str(dpath)!r} is not an SAE checkpoint vlmsae recognises (it holds {present or 'a single file'}). "
        f"Formats tried, and what each expects:\n{tried}{missing}\n"
        "Point sae_path at the folder that holds those files, or name the format with sae_format=<name>."
    )


def load_any(path: str | Path, sae_format: str | None = None, device: str = "cpu") -> SAE:
    """Load an SAE of any supported format (``hf://`` paths resolved first) as a vlmsae SAE in eval mode.

    ``sae_format`` names the format (one of ``FORMAT_NAMES``); None detects it. ``sae.trained_on`` gets every key
    of ``TRAINED_ON_KEYS``; ``original_path`` is ``path`` as given (the hf:// path, not the cache folder).
    """
    if sae_format is not None and sae_format not in FORMAT_NAMES:
        raise ValueError(f"sae_format={sae_format!r} is not a known SAE format; use one of {', '.join(FORMAT_NAMES)}.")
    local = _local_path(path)
    name = sae_format if sae_format is not None else detect_format(local)
    module = format_module(name)
    if module is None:
        raise ValueError(
            f"sae_format={name!r}: this install has no reader for it (module {__name__}.{name} is missing); "
            f"available: {', '.join(available_formats())}."
        )
    sae = module.load(local, device=device)
    trained_on = {key: None for key in TRAINED_ON_KEYS} | dict(sae.trained_on)
    trained_on.update(format=module.NAME, original_path=str(path))
    if is_hf_uri(path):
        trained_on["local_path"] = str(local)
    sae.trained_on = trained_on
    return sae.eval()


def export_sae(
    sae: SAE,
    sae_format: str,
    out_dpath: str | Path,
    overwrite: bool = False,
    matryoshka_class: str | None = None,
) -> Path:
    """Write ``sae`` in ``sae_format``'s layout (one of ``EXPORT_FORMATS``) under ``out_dpath``; returns the folder.

    A non-empty ``out_dpath`` is refused unless ``overwrite`` (files of the same names are then replaced).
    ``matryoshka_class`` (dictionary_learning, Matryoshka SAEs only; None = the library's spelling): the class name
    written to config.json, e.g. ``MatroyshkaBatchTopKSAE`` (sic) for the paper's code.
    """
    if sae_format not in EXPORT_FORMATS:
        raise ValueError(f"format={sae_format!r} cannot be exported; export targets: {', '.join(EXPORT_FORMATS)}.")
    refuse_interop_only(sae, f"export to {sae_format}")
    module = format_module(sae_format)
    if module is None or not hasattr(module, "save"):
        writers = [name for name, mod in available_formats().items() if hasattr(mod, "save")]
        raise ValueError(
            f"format={sae_format!r}: this install has no writer for it (vlmsae.sae.interop.{sae_format}.save is "
            f"missing); writers available: {', '.join(writers)}."
        )
    options = {}
    if matryoshka_class is not None:
        if sae_format != "dictionary_learning" or sae.arch != "matryoshka":
            raise ValueError(
                f"matryoshka_class={matryoshka_class!r} names the class of a Matryoshka SAE written as "
                f"dictionary_learning; this is a {sae.arch} SAE exported as {sae_format}: drop matryoshka_class."
            )
        options["matryoshka_class"] = matryoshka_class
    out_dpath = Path(out_dpath).expanduser()
    if out_dpath.exists() and not out_dpath.is_dir():
        raise FileExistsError(f"Export folder {str(out_dpath)!r} is a file; out= must be a folder.")
    if out_dpath.is_dir() and any(out_dpath.iterdir()) and not overwrite:
        raise FileExistsError(
            f"Export folder {str(out_dpath)!r} is not empty; choose a new out= folder or pass overwrite=true."
        )
    return Path(module.save(sae, out_dpath, **options))


__all__ = [
    "EXPORT_FORMATS",
    "FORMAT_NAMES",
    "TRAINED_ON_KEYS",
    "available_formats",
    "detect_format",
    "export_sae",
    "format_module",
    "load_any",
]

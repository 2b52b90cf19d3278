"""Read ``torch.save`` files without running any code from them.

Published SAEs often ship as ``.pt``/``.pth`` files (dictionary_learning's ``ae.pt``, saev, MSAE). A plain
``torch.load`` unpickles, and unpickling can run arbitrary code, so vlmsae reads them only with
``weights_only=True``: torch's restricted unpickler, which builds tensors, containers and primitive values and
refuses every other global. A file that needs more (a pickled config class, a custom module) is refused with a
message saying so; nothing in it is executed. The only extra globals ever allowed are numpy's scalar and dtype
reconstructors (``allow_numpy_scalars=True``: MSAE stores ``target_norm`` as an ``np.float64``), never a class.
"""

from __future__ import annotations

import io
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any


def _numpy_scalar_globals() -> list[Any]:
    """numpy's scalar reconstructor and dtype classes: what ``np.float64(x)`` pickles to, nothing else."""
    import numpy as np

    scalar = np._core.multiarray.scalar if hasattr(np, "_core") else np.core.multiarray.scalar
    dtype_classes = [type(np.dtype(name)) for name in ("float16", "float32", "float64", "int32", "int64", "bool")]
    return [scalar, np.dtype, *dtype_classes]


def read_torch_file(fpath: str | Path | io.BytesIO, allow_numpy_scalars: bool = False, name: str | None = None) -> Any:
    """The object in a ``torch.save`` file, read with ``weights_only=True`` on the CPU.

    ``fpath`` may be an in-memory buffer (then ``name`` says what it came from, for messages).
    A file that needs unpickling code is refused (ValueError naming the file and the global it asked for);
    a missing file raises FileNotFoundError; a file that is not a torch archive raises ValueError.
    """
    import torch

    if not isinstance(fpath, io.BytesIO):  # a payload cut out of a larger file (saev) comes as bytes
        fpath = Path(fpath)
        if not fpath.is_file():
            raise FileNotFoundError(f"{str(fpath)!r} does not exist (expected a torch.save file).")
    label = name or str(fpath)
    try:
        with torch.serialization.safe_globals(_numpy_scalar_globals() if allow_numpy_scalars else []):
            return torch.load(fpath, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if isinstance(fpath, io.BytesIO):
            fpath.seek(0)
        if not zipfile.is_zipfile(fpath):  # torch.save writes zip archives (since torch 1.6): this is something else
            raise ValueError(
                f"{label!r} is not a readable torch.save file (not a zip archive; nothing in it was executed)."
            ) from err
        lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(err).splitlines() if line.strip()]
        named = [line for line in lines if "global" in line.lower() and "GLOBAL" in line] or lines[:1]
        first = named[0].split(". Please use")[0] if named else type(err).__name__
        raise ValueError(
            f"{label!r} needs code to unpickle (torch's weights_only reader refused it: {first}); vlmsae never "
            "unpickles checkpoints, so it was not loaded and nothing in it was executed. Re-save its tensors as a "
            "plain state_dict (torch.save({name: tensor})) or as safetensors, in an environment you trust."
        ) from err
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as err:
        raise ValueError(f"{label!r} is not a readable torch.save file ({type(err).__name__}: {err}).") from err

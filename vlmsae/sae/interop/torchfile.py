"""Safe reading of torch ``.pt`` files: tensors and plain containers only, nothing in the file is executed.

``read_state_dict`` is ``torch.load(map_location="cpu", weights_only=True)``: torch's restricted unpickler,
which builds tensors, numbers, strings and plain containers and refuses every other global. A file that
needs code to unpickle (a pickled class, a function reference) is refused with a message naming the file.
``allowed_globals`` admits a few extra *data* globals a library is known to store (MSAE's numpy scalars),
never arbitrary classes.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

# The only extra globals a caller may allow: numpy scalars/dtypes are plain data (MSAE stores np.float64).
SAFE_EXTRA_GLOBALS = ("numpy._core.multiarray.scalar", "numpy.core.multiarray.scalar", "numpy.dtype")


def _resolve_allowed(names: tuple[str, ...]) -> list[Any]:
    import numpy as np

    objs: list[Any] = []
    for name in names:
        if name not in SAFE_EXTRA_GLOBALS:
            raise ValueError(
                f"read_state_dict: allowed_globals may only name {', '.join(SAFE_EXTRA_GLOBALS)} (plain data); "
                f"got {name!r}."
            )
        if name == "numpy.dtype":
            # numpy 2 pickles a dtype as numpy.dtype plus its concrete class (e.g. numpy.dtypes.Float64DType).
            objs.append(np.dtype)
            objs.extend(type(np.dtype(code)) for code in "?bhilqBHILQefdgFDG")
        else:
            try:
                from numpy._core.multiarray import scalar  # numpy >= 2
            except ImportError:  # pragma: no cover - numpy 1.x
                from numpy.core.multiarray import scalar
            objs.append((scalar, name))
    return objs


def read_state_dict(fpath: str | Path | io.BytesIO, allowed_globals: tuple[str, ...] = ()) -> Any:
    """The object in a torch ``.pt`` file, loaded with ``weights_only=True`` on the CPU.

    ``fpath`` may also be an in-memory ``BytesIO`` (saev files: the torch payload after a JSON header line).
    Raises ValueError when the file needs unpickling code (nothing in it was executed) or is not a torch file.
    """
    import pickle

    import torch

    where = "<in-memory torch payload>" if isinstance(fpath, io.BytesIO) else repr(str(fpath))
    extra = _resolve_allowed(tuple(allowed_globals))
    try:
        with torch.serialization.safe_globals(extra):
            return torch.load(fpath, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"{where} needs code to unpickle (it stores a Python object other than tensors and plain containers): "
            f"vlmsae refuses it and executed nothing from it. Re-save only the tensors, e.g. "
            f"torch.save(state_dict, path) or safetensors, in an environment where you trust the file. ({err})"
        ) from err
    except (RuntimeError, EOFError, OSError) as err:
        raise ValueError(f"{where} is not a readable torch file ({err}).") from err

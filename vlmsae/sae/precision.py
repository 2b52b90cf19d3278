"""The SAE precision policy: float32 everywhere inside the SAE, whatever the trainer's precision.

Master weights and Adam state are float32 and ``trainer.precision`` must be ``32-true`` (half settings would
cast the weights; mixed ones only add an autocast the SAE turns off, and Lightning's mixed plugins refuse
clipping with the fused Adam). Every SAE forward and backward runs with autocast off and float32 matmuls at
"highest" precision, except the one selecting encoder matmul of the fast policies (``sae.precision``:
:data:`vlmsae.sae.select.POLICIES`, ``auto`` = ``fast_exact`` on CUDA, ``fp32`` elsewhere), whose exact
selection :mod:`vlmsae.sae.select` guarantees. Why nothing else in bf16: the sparse path is memory-bound, and a
bf16 dense path would train a different model than the sparse one. The policy is in docs/training.md and
METHOD §2 "Precision"; each checkpoint records it under ``"precision"``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from vlmsae.sae.config import K_ARCHS
from vlmsae.sae.select import fast_matmul_kind, resolve_policy

MASTER_DTYPE = torch.float32
"""The dtype of the SAE parameters (and so of Adam's state) during training."""


def sae_policy(sae: nn.Module) -> str:
    """The precision policy an SAE's selection runs under on its device: ``sae.cfg.precision`` resolved
    (fp32 | fast_exact | bf16); fp32 for the archs without a top-k selection and for foreign forwards."""
    cfg = sae.cfg
    if cfg.arch not in K_ARCHS or getattr(sae, "interop_only", None):
        return "fp32"
    return resolve_policy(getattr(cfg, "precision", "auto"), sae.W_enc.device)


@contextlib.contextmanager
def fp32_region(device: torch.device | str) -> Iterator[None]:
    """Autocast off and float32 matmuls at "highest" precision for the enclosed SAE compute.

    The matmul precision is a process-wide setting (``torch.set_float32_matmul_precision``; Lightning
    suggests "high" = TF32 on tensor-core GPUs); it is restored on exit.
    """
    device_type = torch.device(device).type
    autocast = (
        torch.autocast(device_type=device_type, enabled=False)
        if torch.amp.is_autocast_available(device_type)
        else contextlib.nullcontext()
    )
    previous = torch.get_float32_matmul_precision()
    with autocast:
        torch.set_float32_matmul_precision("highest")
        try:
            yield
        finally:
            torch.set_float32_matmul_precision(previous)


def precision_record(sae: nn.Module, trainer_precision: str | None = None) -> dict[str, Any]:
    """What ``config.json`` says about the SAE's precision (see the module docstring). ``sae``: a
    :class:`vlmsae.sae.base.SAE` (typed as a module: base.py uses this module's :func:`fp32_region`)."""
    dtype = str(sae.W_dec.dtype).removeprefix("torch.")
    policy = sae_policy(sae)
    return {
        "policy": policy,
        "master": dtype,
        "selection": "bfloat16" if policy == "bf16" else dtype,  # what decides the selected latents
        "matmul": dtype if policy == "fp32" else fast_matmul_kind(sae.W_enc.device),  # the selecting matmul's
        "autocast": "off inside the SAE",
        "float32_matmul_precision": "highest",
        "trainer_precision": None if trainer_precision is None else str(trainer_precision),
    }


TRAINER_PRECISIONS = ("32-true", "32")
"""The ``trainer.precision`` values SAE training accepts (Lightning's spellings of plain float32)."""


def check_trainer_precision(precision: Any) -> str:
    """``trainer.precision`` as a string, or a ValueError naming the value and the fix."""
    value = str(precision)
    if value not in TRAINER_PRECISIONS:
        raise ValueError(
            f"trainer.precision={value!r} is not supported for SAE training: the SAE keeps float32 weights and "
            "computes in float32 whatever the trainer asks (so the selected latents never depend on precision, "
            "see vlmsae.sae.precision); a mixed setting would change nothing but the label, a half one would cast "
            "the weights. Use trainer.precision=32-true."
        )
    return value


def check_master_weights(sae: nn.Module, trainer_precision: Any = None) -> None:
    """Refuse training when the SAE's parameters are not float32 (e.g. ``trainer.precision=bf16-true``)."""
    bad = {name: p.dtype for name, p in sae.named_parameters() if p.dtype != MASTER_DTYPE}
    if bad:
        name, dtype = next(iter(bad.items()))
        raise ValueError(
            f"the SAE parameter {name} is {dtype} (trainer.precision={trainer_precision!r}), but SAEs train with "
            "float32 master weights and optimizer state (vlmsae.sae.precision); use trainer.precision=32-true and "
            "keep the SAE in float32 (no .half() / .bfloat16())."
        )

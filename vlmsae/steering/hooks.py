"""Steer LLaVA by editing one vision-tower block's output through SAE latents (METHOD §5).

The edit is a forward hook on the block that matches the SAE's layer, registered with ``prepend=True``
so that it runs before transformers 5.x's hidden-state recorder, which is what LLaVA's projector reads
(METHOD §5, "Hook ordering"). The modes (``replace``, ``error_preserving``, ``add``) are METHOD §5's
interventions; ``h`` = block output, ``f = encode(h)``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from vlmsae.models.llava import tapped_block_index, vision_blocks

MODES = ("replace", "error_preserving", "add")

Alpha = float | int | torch.Tensor
"""A latent's new value: a number, or a tensor broadcastable to [B, T] (one value per token; NaN
leaves that token's latent as encoded, so one batch can steer a different latent per sample)."""


def sae_layer(sae: nn.Module) -> int | None:
    """The vision block the SAE was trained on (``sae.trained_on["layer"]``, from its ``config.json``), if known."""
    layer = getattr(sae, "trained_on", {}).get("layer")
    if layer is None:
        return None
    try:
        return int(layer)
    except (TypeError, ValueError):
        raise ValueError(
            f"The SAE was trained on layer {layer!r}, not on a vision block: steering edits a block's output "
            "(LLaVA-1.5 reads block 22); train the steering SAE with layer=22 (or -2)."
        ) from None


def token_mask(
    patches: Any, n_tokens: int, batch_size: int, has_cls: bool = True, device: torch.device | None = None
) -> torch.Tensor | None:
    """Which token positions an edit touches, as a bool mask [B, T] (None = every token).

    ``patches``: None / ``"all"``; ``"cls"`` (token 0 in CLIP); ``"patches"`` (every non-CLS token);
    a sequence of patch indices, 0-based in row-major order over the patch grid (patch p is token
    p + 1 when the tower has a CLS token); or a bool tensor [T] or [B, T] over tokens.
    """
    if patches is None or (isinstance(patches, str) and patches == "all"):
        return None
    mask = torch.zeros(batch_size, n_tokens, dtype=torch.bool, device=device)
    offset = 1 if has_cls else 0
    if isinstance(patches, str):
        if patches == "cls":
            if not has_cls:
                raise ValueError("patches='cls' but this vision tower has no CLS token.")
            mask[:, 0] = True
        elif patches == "patches":
            mask[:, offset:] = True
        else:
            raise ValueError(f"Unknown patches={patches!r}: use all, cls, patches, a list of patch indices or a mask.")
        return mask
    if isinstance(patches, torch.Tensor) and patches.dtype == torch.bool:
        if patches.shape[-1] != n_tokens:
            raise ValueError(f"Patch mask covers {patches.shape[-1]} tokens but the layer has {n_tokens}.")
        return patches.to(device).expand(batch_size, n_tokens).clone()
    idx = torch.as_tensor(list(patches) if not isinstance(patches, torch.Tensor) else patches, dtype=torch.long)
    n_patches = n_tokens - offset
    if idx.numel() and (idx.min() < 0 or idx.max() >= n_patches):
        raise ValueError(
            f"Patch indices must lie in [0, {n_patches}) (the grid has {n_patches} patches), got {idx.tolist()}."
        )
    mask[:, idx.to(mask.device) + offset] = True
    return mask


def grid_patches(grid_size: int, rows: Sequence[int] | range, cols: Sequence[int] | range) -> list[int]:
    """Patch indices of a rectangle of the ``grid_size x grid_size`` patch grid (row-major), for ``patches=``.

    LLaVA-1.5: 336 px / 14 px = a 24 x 24 grid; ``grid_patches(24, range(0, 12), range(0, 12))`` is the top-left
    quarter.
    """
    return [r * grid_size + c for r in rows for c in cols]


def _unit_rows(W_dec_FD: torch.Tensor, latents: Sequence[int]) -> torch.Tensor:
    rows_LD = W_dec_FD[list(latents)].float()
    return rows_LD / rows_LD.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def _alpha_BT(alpha: Alpha, B: int, T: int, device: torch.device) -> torch.Tensor:
    a = torch.as_tensor(alpha, dtype=torch.float32, device=device)
    try:
        return a.expand(B, T) if a.dim() <= 2 else a.reshape(B, T)
    except RuntimeError as err:
        raise ValueError(f"A tensor alpha must broadcast to [B, T] = [{B}, {T}], got shape {tuple(a.shape)}.") from err


@torch.no_grad()
def edit_activations(
    h_BTD: torch.Tensor,
    sae: nn.Module,
    latents: Mapping[int, Alpha],
    mode: str = "replace",
    mask_BT: torch.Tensor | None = None,
    chunk_rows: int = 1024,
) -> torch.Tensor:
    """The steered version of one block output ``h_BTD`` (same shape and dtype); the hook's maths.

    Runs the SAE in its own dtype/device, ``chunk_rows`` tokens at a time so a 65k-latent SAE on
    576 tokens x a batch does not hold a dense [B*T, F] code matrix at once.
    """
    if mode not in MODES:
        raise ValueError(f"Unknown steering mode {mode!r}: use one of {', '.join(MODES)}.")
    B, T, D = h_BTD.shape
    W_dec = sae.W_dec
    n_latents = W_dec.shape[0]
    if W_dec.shape[1] != D:
        raise ValueError(
            f"The SAE reads {W_dec.shape[1]}-d activations but this block outputs {D}-d ones: use an SAE trained "
            "on this model's vision tower (e.g. model=tiny_llava for the tiny LLaVA, clip_l14_336 for LLaVA-1.5)."
        )
    for j in latents:
        if not 0 <= int(j) < n_latents:
            raise ValueError(f"Latent {j} is out of range: this SAE has {n_latents} latents (0..{n_latents - 1}).")
    sae_device, sae_dtype = W_dec.device, W_dec.dtype
    h_ND = h_BTD.reshape(B * T, D).to(sae_device, sae_dtype)
    alphas = {int(j): _alpha_BT(a, B, T, sae_device).reshape(B * T) for j, a in latents.items()}
    out_ND = torch.empty_like(h_ND)
    if mode == "add":
        dirs_LD = _unit_rows(W_dec, list(alphas)).to(sae_dtype)
        alpha_NL = torch.stack(list(alphas.values()), dim=1).nan_to_num(nan=0.0).to(sae_dtype)
        out_ND = h_ND + alpha_NL @ dirs_LD
    else:
        idx = torch.tensor(list(alphas), device=sae_device)
        for start in range(0, B * T, chunk_rows):
            sl = slice(start, start + chunk_rows)
            codes_NF = sae.encode(h_ND[sl])
            if codes_NF.is_sparse:
                codes_NF = codes_NF.to_dense()
            edited_NF = codes_NF.clone()
            new_NL = torch.stack([a[sl] for a in alphas.values()], dim=1).to(edited_NF.dtype)
            # NaN = "keep the encoded value": lets one batch steer a different latent per sample.
            edited_NF[:, idx] = torch.where(new_NL.isnan(), codes_NF[:, idx], new_NL)
            if mode == "replace":
                out_ND[sl] = sae.decode(edited_NF)
            else:  # error_preserving: only the clamped latents' contribution changes
                out_ND[sl] = h_ND[sl] + (sae.decode(edited_NF) - sae.decode(codes_NF))
    out_BTD = out_ND.reshape(B, T, D).to(h_BTD.device, h_BTD.dtype)
    if mask_BT is not None:
        out_BTD = torch.where(mask_BT.to(h_BTD.device).unsqueeze(-1), out_BTD, h_BTD)
    return out_BTD


@dataclass
class SteeringHandle:
    """What ``steer`` yields: the settings, and how many times the hook fired (one per vision forward)."""

    layer: int
    mode: str
    latents: dict[int, Any]
    patches: Any = None
    n_calls: int = 0
    shapes: list[tuple[int, ...]] = field(default_factory=list)


def steer_block(model: nn.Module, sae: nn.Module, layer: int | None = None) -> int:
    """The vision block of ``model`` to edit with ``sae`` (``layer``, else the SAE's ``trained_on.layer``), checked:
    in range, not after the block LLaVA projects, and as wide as the SAE. Cheap: no forward pass."""
    if layer is None:
        layer = sae_layer(sae)
    if layer is None:
        raise ValueError(
            "The SAE does not say which vision block it was trained on (trained_on.layer is None): pass layer=<block>."
        )
    blocks = vision_blocks(model)
    if -len(blocks) <= layer < 0:  # counted from the end, as train's layer=-2
        layer += len(blocks)
    if not 0 <= layer < len(blocks):
        raise ValueError(
            f"layer={layer} is out of range: the vision tower has {len(blocks)} blocks (0..{len(blocks) - 1}, or "
            f"-1..-{len(blocks)} from the end): pass layer=<block> or the SAE trained on this model's tower."
        )
    try:
        tapped = tapped_block_index(model)
    except ValueError:
        tapped = None  # a bare vision tower: no projector to reach
    if tapped is not None and layer > tapped:
        raise ValueError(
            f"The SAE's layer {layer} comes after block {tapped}, whose output LLaVA projects "
            f"(vision_feature_layer={model.config.vision_feature_layer}): "
            "the edit would never reach the language model: pass layer=<block> <= "
            f"{tapped} or an SAE trained on an earlier block."
        )
    width = getattr(getattr(getattr(model, "config", None), "vision_config", None), "hidden_size", None)
    if width is not None and sae.W_dec.shape[1] != width:
        raise ValueError(
            f"The SAE reads {sae.W_dec.shape[1]}-d activations but {type(model).__name__}'s vision tower is "
            f"{width}-d: use an SAE trained on this model's vision tower "
            f"(trained_on: {getattr(sae, 'trained_on', 'unknown')})."
        )
    return layer


@contextlib.contextmanager
def block_output(model: nn.Module, layer: int, fn: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Within the block, vision block ``layer`` outputs ``fn(h_BTD)``; ``prepend=True`` so LLaVA's
    hidden-state recorder (and so the projector) sees the new output (see the module docstring)."""

    def hook(module: nn.Module, args: tuple, output: Any) -> Any:
        h_BTD = output[0] if isinstance(output, tuple) else output
        new_BTD = fn(h_BTD).to(h_BTD.device, h_BTD.dtype)
        return (new_BTD, *output[1:]) if isinstance(output, tuple) else new_BTD

    handle = vision_blocks(model)[layer].register_forward_hook(hook, prepend=True)
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def steer(
    model: nn.Module,
    sae: nn.Module,
    latents: Mapping[int, Alpha],
    mode: str = "replace",
    patches: Any = None,
    layer: int | None = None,
    has_cls: bool | None = None,
) -> Iterator[SteeringHandle]:
    """Within the block, LLaVA's vision block ``layer`` outputs the steered activation.

    ``latents``: {latent index: alpha} (several at once are clamped together). ``layer``: defaults
    to the SAE's ``trained_on.layer``. It must not lie after the block LLaVA projects
    (:func:`tapped_block_index`), which LLaVA would never read. ``patches``: see :func:`token_mask`.
    The hook is removed when the block exits, also on an exception.

        with steer(model, sae, {123: 100.0}):
            out = model.generate(**inputs, max_new_tokens=5)
    """
    if mode not in MODES:
        raise ValueError(f"Unknown steering mode {mode!r}: use one of {', '.join(MODES)}.")
    if not latents:
        raise ValueError("No latents to steer: pass {latent index: alpha, ...}.")
    layer = steer_block(model, sae, layer)
    if has_cls is None:
        has_cls = "siglip" not in type(vision_blocks(model)[0]).__name__.lower()
    handle = SteeringHandle(layer=layer, mode=mode, latents=dict(latents), patches=patches)

    def edit(h_BTD: torch.Tensor) -> torch.Tensor:
        B, T, _ = h_BTD.shape
        mask_BT = token_mask(patches, T, B, has_cls=has_cls, device=h_BTD.device)
        handle.n_calls += 1
        handle.shapes.append(tuple(h_BTD.shape))
        return edit_activations(h_BTD, sae, latents, mode=mode, mask_BT=mask_BT)

    with block_output(model, layer, edit):
        yield handle


def alpha_sweep(
    generate_fn,
    model: nn.Module,
    sae: nn.Module,
    latent: int,
    alphas: Sequence[float],
    mode: str = "replace",
    patches: Any = None,
    layer: int | None = None,
) -> dict[float, Any]:
    """``{alpha: generate_fn()}`` with latent ``latent`` clamped to each alpha (alpha=None: no steering).

    ``generate_fn`` takes no arguments and returns what to keep (e.g. decoded answers), so one
    sweep serves generation, logits, or any probe. The paper's qualitative sweep is {0, 30, 40, 50}.
    """
    results: dict[float, Any] = {}
    for alpha in alphas:
        steered = alpha is not None
        with steer(model, sae, {latent: float(alpha)}, mode, patches, layer) if steered else contextlib.nullcontext():
            results[alpha] = generate_fn()
    return results

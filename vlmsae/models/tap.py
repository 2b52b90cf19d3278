"""The tap: a vision encoder that returns the residual stream after block L and stops there.

One index convention for every backend (METHOD §1): ``layer=L`` is the output of transformer block L
(0-indexed), i.e. open_clip ``visual.transformer.resblocks[L]`` output == transformers
``hidden_states[L+1]``. Negative L counts blocks from the end (-1 = the last block, -2 = the block
LLaVA-1.5 feeds its projector, ``vision_feature_layer=-2``). ``layer="last"`` is the projected
image embedding (what CLIP compares with text). Blocks after L never run: extracting block 11 of
24 costs about half a full forward.
"""

from __future__ import annotations

import re
from typing import Any, Union

import torch
from torch import nn

Layer = Union[int, str]
TOKEN_CHOICES = ("cls", "patches", "all", "random_k", "mean")

_DTYPES = {
    **dict.fromkeys(("float32", "fp32", "float"), torch.float32),
    **dict.fromkeys(("float16", "fp16", "half"), torch.float16),
    **dict.fromkeys(("bfloat16", "bf16"), torch.bfloat16),
}


def torch_dtype(name: str | torch.dtype) -> torch.dtype:
    """``"bf16"`` / ``"bfloat16"`` -> ``torch.bfloat16``; unknown names list the valid ones."""
    if isinstance(name, torch.dtype):
        return name
    if name not in _DTYPES:
        raise ValueError(f"Unknown dtype {name!r}: use one of {sorted(_DTYPES)}.")
    return _DTYPES[name]


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``auto`` (or None) = the first GPU if there is one, else CPU."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_layer(layer: Layer, n_layers: int, model_name: str = "model") -> Layer:
    """Normalise ``layer`` to a block index in ``[0, n_layers)`` or ``"last"``; bad values list the choices."""
    if isinstance(layer, str):
        text = layer.strip().lower()
        if text == "last":
            return "last"
        try:
            layer = int(text)
        except ValueError:
            raise ValueError(
                f"Unknown layer {layer!r} for {model_name}: use a block index 0..{n_layers - 1} "
                f"(negative counts from the end, -1..-{n_layers}) or 'last' (the projected image embedding)."
            ) from None
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise ValueError(f"Unknown layer {layer!r} for {model_name}: use an int block index or 'last'.")
    if not -n_layers <= layer < n_layers:
        raise ValueError(
            f"Layer {layer} is out of range for {model_name}, which has {n_layers} blocks: valid choices are "
            f"0..{n_layers - 1}, -1..-{n_layers} (from the end) or 'last' (the projected image embedding)."
        )
    return layer % n_layers


class Tap(nn.Module):
    """Common interface of the backends (open_clip, transformers CLIP, LLaVA's vision tower).

    Subclasses set the attributes below and implement ``_blocks_forward`` and ``_embed_forward``.
    Tensors go in as the float images ``preprocess`` makes; activations come out float32 with the
    token axis in the model's order (CLS first where there is one).
    """

    name: str
    n_layers: int
    width: int
    embed_dim: int | None
    has_cls: bool
    image_size: int
    device: torch.device
    dtype: torch.dtype

    def preprocess(self, image: Any) -> torch.Tensor:  # pragma: no cover - implemented by backends
        raise NotImplementedError

    def resolve_layer(self, layer: Layer) -> Layer:
        return resolve_layer(layer, self.n_layers, self.name)

    @property
    def n_tokens(self) -> int:
        """Tokens per image in the residual stream (CLS + patches)."""
        raise NotImplementedError  # pragma: no cover

    @torch.no_grad()  # not inference_mode: its tensors cannot enter autograd later (SAE training on the fly)
    def forward_to(self, images_BCHW: torch.Tensor, layer: Layer) -> torch.Tensor:
        """Residual stream after block ``layer`` ([B, T, D]) or the projected embedding ([B, E]) for ``"last"``."""
        layer = self.resolve_layer(layer)
        images_BCHW = images_BCHW.to(device=self.device, dtype=self.dtype)
        if layer == "last":
            return self._embed_forward(images_BCHW).float()
        return self._blocks_forward(images_BCHW, layer).float()

    def forward(self, images_BCHW: torch.Tensor, layer: Layer = "last") -> torch.Tensor:
        return self.forward_to(images_BCHW, layer)

    def _blocks_forward(self, images_BCHW: torch.Tensor, layer: int) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def _embed_forward(self, images_BCHW: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError


def select_tokens(
    acts_BTD: torch.Tensor,
    tokens: str,
    k: int = 2,
    generator: torch.Generator | None = None,
    has_cls: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pick the activation rows to keep from a batch of residual streams.

    Returns ``rows_ND``, ``token_idx_N`` (position in the T axis; -1 for a mean or an embedding) and
    ``image_idx_N`` (row of the batch), rows grouped by image in batch order.
    - ``cls``: token 0 (METHOD §1: the monosemanticity study); refused when the model has no CLS token.
    - ``patches``: every token but CLS; ``all``: every token; ``mean``: the mean over patch tokens.
    - ``random_k``: k distinct tokens per image drawn with ``generator`` (METHOD §1: the steering SAE
      trains on 2 random tokens per image, any token including CLS, since steering edits them all).
    A 2-D input (``layer="last"``: one embedding per image) gives one row per image, token_idx -1.
    """
    if tokens not in TOKEN_CHOICES:
        raise ValueError(f"Unknown token selection {tokens!r}: use one of {list(TOKEN_CHOICES)}.")
    if acts_BTD.ndim == 2:  # projected embeddings: one vector per image whatever the selection
        B = acts_BTD.shape[0]
        return acts_BTD, torch.full((B,), -1, dtype=torch.long), torch.arange(B)
    if acts_BTD.ndim != 3:
        raise ValueError(f"select_tokens expects [B, T, D] (or [B, E]) activations, got shape {tuple(acts_BTD.shape)}.")
    B, T, _D = acts_BTD.shape
    first_patch = 1 if has_cls else 0
    device = acts_BTD.device
    if tokens == "cls":
        if not has_cls:
            raise ValueError(
                "tokens=cls: this model has no CLS token (e.g. SigLIP). Use tokens=mean (mean-pooled patches) "
                "or tokens=patches instead."
            )
        token_idx_BT = torch.zeros(B, 1, dtype=torch.long)
    elif tokens == "mean":
        rows_ND = acts_BTD[:, first_patch:].mean(dim=1)
        return rows_ND, torch.full((B,), -1, dtype=torch.long), torch.arange(B)
    elif tokens == "patches":
        token_idx_BT = torch.arange(first_patch, T).expand(B, -1)
    elif tokens == "all":
        token_idx_BT = torch.arange(T).expand(B, -1)
    else:  # random_k
        if not 1 <= k <= T:
            raise ValueError(f"tokens=random_k with k={k}: k must be in 1..{T} (tokens per image).")
        scores_BT = torch.rand(B, T, generator=generator)
        token_idx_BT = scores_BT.argsort(dim=1)[:, :k].sort(dim=1).values
    # T here counts the kept tokens of each image (all, the patches, one CLS or k random ones)
    image_idx_BT = torch.arange(B).unsqueeze(1).expand(B, token_idx_BT.shape[1])
    rows_ND = acts_BTD[image_idx_BT.reshape(-1).to(device), token_idx_BT.reshape(-1).to(device)]
    return rows_ND, token_idx_BT.reshape(-1).clone(), image_idx_BT.reshape(-1).clone()


def looks_offline(err: BaseException) -> bool:
    """Whether a loading error reads like missing network access or an uncached download (not a bad file)."""
    hints = (
        "download|connect|offline|resolve|hub|not found|404|internet|local_files_only|couldn't|max retries|no such file"
    )
    return re.search(hints, f"{type(err).__name__} {err}".lower()) is not None

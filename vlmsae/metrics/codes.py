"""Images -> one sparse SAE code row per image: the pass the monosemanticity and hierarchy jobs share.

An SAE checkpoint records what it reads (``config.json`` ``source``: model, pretrained, layer,
tokens). :func:`open_sae_source` resolves that, plus the caller's overrides, to a loaded tap, a
layer and a token pooling, and checks the SAE's width against them. :func:`encode_images` then
runs batches of images through the tap and the SAE (inference encoder, sparse codes) and pools
the token codes to one row per image, so both jobs rank the same top images for the same SAE and
images.

Pooling (``POOLS``): ``cls`` reads the CLS token (or the projected embedding at ``layer="last"``);
``mean`` / ``max`` encode every patch token and pool its codes per image (the mean counts zeros).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vlmsae.data.images import ImageRecord
from vlmsae.formats import read_sae_config
from vlmsae.metrics.reconstruction import ReconstructionAccumulator
from vlmsae.metrics.topimages import TopImages, top_images
from vlmsae.models.spec import ModelSpec
from vlmsae.sae import load_sae

POOLS = ("cls", "mean", "max")
# SAE input rows encoded at once when pooling over tokens: bounds the dense [rows, F] code block.
TOKEN_ROWS = 1024


def source_model_spec(
    source: dict[str, Any], model: ModelSpec | None = None, sae_dpath: str | Path | None = None
) -> ModelSpec:
    """The model an SAE reads: ``model`` if given, else the registered model its ``source`` names."""
    from vlmsae.models import get_model_spec

    if model is not None:
        return model
    name = source.get("model")
    if not name:
        raise ValueError(
            f"The SAE at {sae_dpath} does not record its source model (config.json 'source.model'); "
            "pass model=<name> (one of conf/model/*.yaml) and layer=<L>."
        )
    if isinstance(name, dict):
        return ModelSpec.from_cfg(name)
    spec = get_model_spec(str(name))
    if source.get("pretrained") and source["pretrained"] != spec.pretrained:
        spec.pretrained = source["pretrained"]
    return spec


def default_pool(source: dict[str, Any]) -> str:
    """``cls`` for an SAE trained on CLS tokens, else ``mean`` over the patch tokens."""
    return "cls" if source.get("tokens", "cls") == "cls" else "mean"


@dataclass
class SAESource:
    """Where an SAE reads: the loaded tap, its spec, the resolved layer and the token pooling."""

    sae: Any  # vlmsae.sae.base.SAE, on the tap's device, in eval mode
    tap: Any  # vlmsae.models Tap
    spec: ModelSpec
    layer: int | str
    pool: str
    source: dict[str, Any] = field(default_factory=dict)  # what the SAE's config.json records it reads


def open_sae_source(
    sae,
    source: dict[str, Any],
    model: ModelSpec | None = None,
    layer: int | str | None = None,
    pool: str | None = None,
    device: str | None = None,
    sae_dpath: str | Path | None = None,
) -> SAESource:
    """Load the tap the SAE reads (``model`` / ``layer`` / ``pool`` override its ``source``; ``device``
    overrides the model's unless None or "auto") and move the SAE to it. Errors name the fix."""
    from vlmsae.models import load_tap

    spec = source_model_spec(source, model, sae_dpath)
    if device not in (None, "auto"):
        spec.device = str(device)
    layer = layer if layer is not None else source.get("layer")
    if layer is None:
        raise ValueError(f"The SAE at {sae_dpath} does not record its layer (source.layer); pass layer=<L|last>.")
    pool = pool or default_pool(source)
    if pool not in POOLS:
        raise ValueError(f"Unknown pool={pool!r}: use one of {list(POOLS)}.")
    tap = load_tap(spec)
    layer = tap.resolve_layer(layer)
    width = tap.embed_dim if layer == "last" else tap.width
    if sae.d_in != width:
        raise ValueError(
            f"The SAE reads {sae.d_in}-d activations but {spec.name} layer {layer} is {width}-d: "
            f"wrong model/layer for this SAE (its source says {source})."
        )
    return SAESource(sae=sae.to(tap.device).eval(), tap=tap, spec=spec, layer=layer, pool=pool, source=dict(source))


def open_sae_checkpoint(
    sae_dpath: str | Path,
    model: ModelSpec | None = None,
    layer: int | str | None = None,
    pool: str | None = None,
    device: str | None = None,
) -> SAESource:
    """Load the SAE saved at ``sae_dpath`` and open what its ``config.json`` ``source`` says it reads
    (overrides as :func:`open_sae_source`)."""
    source = read_sae_config(sae_dpath).source
    return open_sae_source(
        load_sae(sae_dpath), source, model=model, layer=layer, pool=pool, device=device, sae_dpath=sae_dpath
    )


def pool_rows(acts_BTD: torch.Tensor, pool: str, has_cls: bool) -> tuple[torch.Tensor, int]:
    """The rows the SAE reads for a batch: [B, D] for cls / projected embeddings, else [B*T', D]
    of the patch tokens (T' per image) for mean / max pooling."""
    if acts_BTD.dim() == 2:
        return acts_BTD, 1
    if pool == "cls":
        if not has_cls:
            raise ValueError("pool=cls: this model has no CLS token (e.g. SigLIP); use pool=mean or pool=max.")
        return acts_BTD[:, 0], 1
    patches = acts_BTD[:, 1:] if has_cls else acts_BTD
    B, T, D = patches.shape
    return patches.reshape(B * T, D), T


def pool_sparse(codes_RF: torch.Tensor, per_image: int, pool: str, n_images: int) -> torch.Tensor:
    """Pool sparse token codes [B*T, F] to per-image codes [B, F] (mean counts zeros; max of nonzeros)."""
    codes_RF = codes_RF.coalesce()
    rows, cols = codes_RF.indices()
    vals = codes_RF.values()
    n_latents = codes_RF.shape[1]
    if per_image == 1:
        return codes_RF
    image = rows // per_image
    keys, inverse = torch.unique(image * n_latents + cols, return_inverse=True)
    if pool == "mean":
        pooled = torch.zeros(keys.numel(), dtype=vals.dtype).index_add_(0, inverse, vals) / per_image
    else:
        pooled = torch.full((keys.numel(),), -math.inf, dtype=vals.dtype).scatter_reduce(0, inverse, vals, "amax")
        # a latent that is positive on one token and negative (or 0) elsewhere: max is the positive value;
        # an all-negative latent on some tokens and 0 on others has max 0, which we keep as an implicit zero.
        pooled = torch.where(pooled < 0, torch.zeros_like(pooled), pooled)
    idx = torch.stack([keys // n_latents, keys % n_latents])
    return torch.sparse_coo_tensor(idx, pooled, (n_images, n_latents), check_invariants=False).coalesce()


def _sparse(parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], shape: tuple[int, int]) -> torch.Tensor:
    """One sparse COO tensor from (row, col, value) pieces."""
    if not parts:
        return torch.sparse_coo_tensor(torch.zeros((2, 0), dtype=torch.long), torch.zeros(0), shape).coalesce()
    rows, cols, vals = (torch.cat([p[i] for p in parts]) for i in range(3))
    return torch.sparse_coo_tensor(torch.stack([rows, cols]), vals.float(), shape, check_invariants=False).coalesce()


@dataclass
class ImageCodes:
    """Per-image SAE codes and the images they belong to (row i = ``keys[i]``)."""

    codes_NF: torch.Tensor  # sparse COO [N, F] float32, coalesced
    keys: list[str]
    paths: list[str | None]
    labels: list[int]
    raw_ND: torch.Tensor | None = None  # the pooled raw activations (``keep_raw=True``), float32 CPU

    @property
    def n_images(self) -> int:
        return len(self.keys)

    def top_images(self, top_k: int, meta: dict[str, Any]) -> TopImages:
        """The top-``top_k`` images of every latent as a :class:`TopImages` index (paths kept if all known)."""
        idx_KT, acts_KT = top_images(self.codes_NF, top_k=top_k)
        paths = self.paths if all(p is not None for p in self.paths) else None
        return TopImages(idx_KT, acts_KT, self.keys, paths=paths, labels=self.labels, meta=meta)


@torch.no_grad()
def _encode_batch(
    src: SAESource, batch: list[ImageRecord], recon: ReconstructionAccumulator | None, keep_raw: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(per-image sparse codes [B, F], pooled raw activations [B, D] or None) of one batch of images."""
    sae, tap = src.sae, src.tap
    acts = tap.forward_to(torch.stack([tap.preprocess(r.image) for r in batch]), src.layer)
    rows_RD, per_image = pool_rows(acts, src.pool, tap.has_cls)
    parts = []
    for r0 in range(0, rows_RD.shape[0], TOKEN_ROWS):
        x_rd = rows_RD[r0 : r0 + TOKEN_ROWS].to(sae.W_dec.device, torch.float32)
        codes = sae.encode(x_rd, sparse=True)
        if recon is not None:
            recon.update(x_rd, sae.decode(codes), codes)
        c = codes.cpu().coalesce()
        parts.append((c.indices()[0] + r0, c.indices()[1], c.values()))
    pooled = pool_sparse(_sparse(parts, (rows_RD.shape[0], sae.n_latents)), per_image, src.pool, len(batch))
    if not keep_raw:
        return pooled, None
    raw = rows_RD.float().cpu()
    if per_image > 1:
        tok = raw.reshape(len(batch), per_image, -1)
        raw = tok.mean(1) if src.pool == "mean" else tok.amax(1)
    return pooled, raw


def encode_images(
    src: SAESource,
    records: Iterable[ImageRecord],
    batch_size: int,
    recon: ReconstructionAccumulator | None = None,
    keep_raw: bool = False,
    on_batch: Callable[[list[ImageRecord]], None] | None = None,
    progress: bool = True,
    total: int | None = None,
    desc: str = "images",
) -> ImageCodes:
    """Run ``records`` (readable images) through ``src``'s tap and SAE, ``batch_size`` at a time.

    recon: also fed every encoded token row (reconstruction metrics of the same pass).
    keep_raw: also return the layer's raw activations pooled like the codes (the MS baseline).
    on_batch: called with each batch's records after it is encoded (e.g. to embed the images
        while they are in memory). total: the expected number of images, for the progress bar.
    """
    from tqdm.auto import tqdm

    keys: list[str] = []
    paths: list[str | None] = []
    labels: list[int] = []
    code_parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    raw_rows: list[torch.Tensor] = []
    bar = tqdm(total=total, desc=desc, unit="img", disable=not progress)

    def flush(batch: list[ImageRecord]) -> None:
        pooled, raw = _encode_batch(src, batch, recon, keep_raw)
        code_parts.append((pooled.indices()[0] + len(keys), pooled.indices()[1], pooled.values()))
        if raw is not None:
            raw_rows.append(raw)
        if on_batch is not None:
            on_batch(batch)
        keys.extend(r.key for r in batch)
        paths.extend(r.path for r in batch)
        labels.extend(int(r.label) for r in batch)
        bar.update(len(batch))

    batch: list[ImageRecord] = []
    for record in records:
        batch.append(record)
        if len(batch) == batch_size:
            flush(batch)
            batch = []
    if batch:
        flush(batch)
    bar.close()
    codes_NF = _sparse(code_parts, (len(keys), src.sae.n_latents))
    return ImageCodes(codes_NF, keys, paths, labels, torch.cat(raw_rows) if raw_rows else None)

"""Images -> one sparse SAE code row per image: the pass the monosemanticity and hierarchy jobs share.

A loaded SAE records what it reads (``sae.source``: model, pretrained, layer, tokens; set by
:func:`vlmsae.sae.load` from vlmsae's ``config.json`` or a foreign format's own files).
:func:`open_sae_source` resolves that, plus the caller's overrides, to a loaded tap, a layer and a
token pooling, and checks the SAE's width against them before any image is encoded. :func:`encode_images` then
runs batches of images through the tap and the SAE (inference encoder, sparse codes) and pools
the token codes to one row per image, so both jobs rank the same top images for the same SAE and
images.

Pooling (``POOLS``): ``cls`` reads the CLS token (or the projected embedding at ``layer="last"``);
``mean`` / ``max`` encode every patch token and pool its codes per image (the mean counts zeros).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vlmsae.data.images import ImageRecord
from vlmsae.metrics.reconstruction import ReconstructionAccumulator
from vlmsae.metrics.topimages import TopImages, top_images
from vlmsae.models.spec import ModelSpec

log = logging.getLogger(__name__)

POOLS = ("cls", "mean", "max")
# SAE input rows encoded at once when pooling over tokens: bounds the dense [rows, F] code block.
TOKEN_ROWS = 1024


def _model_for_pretrained(pretrained: Any) -> str | None:
    """The one registered model whose ``pretrained`` is exactly ``pretrained`` (e.g. an HF id), else None."""
    from vlmsae.models import get_model_spec, list_models

    if not pretrained:
        return None
    names = [n for n in list_models() if get_model_spec(n).pretrained == pretrained]
    return names[0] if len(names) == 1 else None  # a bare tag like "openai" fits several: no guess


def source_model_spec(
    source: dict[str, Any], model: ModelSpec | None = None, sae_dpath: str | Path | None = None
) -> ModelSpec:
    """The model an SAE reads: ``model`` if given, else the registered model its ``source`` names (or the one
    registered model whose ``pretrained`` equals the source's); an error naming ``model=`` when neither."""
    from vlmsae.models import get_model_spec, list_models

    if model is not None:
        return ModelSpec.from_cfg(model)
    name = source.get("model") or _model_for_pretrained(source.get("pretrained"))
    if not name:
        known = f" (pretrained={source['pretrained']!r} matches no single model)" if source.get("pretrained") else ""
        raise ValueError(
            f"The SAE at {sae_dpath} does not say which model it reads (source.model is None{known}): "
            f"pass model=<name> (one of: {', '.join(list_models())})."
        )
    if isinstance(name, dict):
        return ModelSpec.from_cfg(name)
    try:
        spec = get_model_spec(str(name))
    except ValueError as err:
        raise ValueError(f"The SAE at {sae_dpath} says it reads model {name!r}. {err} Pass model=<name>.") from None
    # A vlmsae SAE may have been trained with other weights of the same architecture (model.pretrained=...);
    # a foreign format's `pretrained` is in that library's own naming, so the registered model's is kept.
    native = source.get("format") in (None, "vlmsae")
    if native and source.get("pretrained") and source["pretrained"] != spec.pretrained:
        spec.pretrained = source["pretrained"]
    return spec


def default_pool(source: dict[str, Any], has_cls: bool = True) -> str:
    """``cls`` for an SAE trained on CLS tokens, else ``mean`` over the patch tokens. Unknown tokens
    (``source.tokens`` None): ``cls`` (``mean`` on a model without one), with a logged note."""
    tokens = source.get("tokens")
    if tokens is None:
        pool = "cls" if has_cls else "mean"
        log.warning(
            "The SAE does not say which tokens it was trained on (source.tokens is None): using pool=%s; "
            "pass pool=cls|mean|max to choose.",
            pool,
        )
        return pool
    return "cls" if tokens == "cls" else "mean"


def _width_error(sae, spec_name: str, layer: int | str, width: int | None, source: dict[str, Any]) -> ValueError:
    where = "the projected image embedding (layer=last)" if layer == "last" else f"layer {layer}'s residual stream"
    said = {k: source.get(k) for k in ("model", "layer", "tokens")}
    return ValueError(
        f"The SAE reads {sae.d_in}-d activations (d_in={sae.d_in}) but {spec_name}'s {where} is {width}-d: "
        f"this SAE was not trained on this model/layer. Pass the model and layer it reads (model=<name> "
        f"layer=<L|last>); its source says {said}."
    )


def resolve_sae_inputs(
    sae,
    source: dict[str, Any],
    model: ModelSpec | None = None,
    layer: int | str | None = None,
    pool: str | None = None,
    sae_dpath: str | Path | None = None,
) -> tuple[ModelSpec, int | str, str]:
    """(model spec, layer, pool) an SAE is run on, checked against the model's registered shape (blocks,
    width, embedding) before any weights or images are loaded. Overrides win over ``source``; what is
    neither given nor recorded is an error naming the one option still needed."""
    from vlmsae.models.tap import resolve_layer

    spec = source_model_spec(source, model, sae_dpath)
    from_source = layer is None
    layer = source.get("layer") if from_source else layer
    if layer is None:
        raise ValueError(
            f"The SAE at {sae_dpath} does not say which layer it reads (source.layer is None): pass layer=<L> "
            f"(a block index 0..{spec.n_layers - 1} of {spec.name}, or last for the projected embedding)."
        )
    try:
        layer = resolve_layer(layer, spec.n_layers, spec.name)
    except ValueError as err:
        said = "the SAE's source.layer" if from_source else "layer="
        raise ValueError(f"{err} (the layer came from {said}; pass layer=<L> or the SAE's model=<name>)") from None
    width = spec.embed_dim if layer == "last" else spec.width
    if width is None:
        raise ValueError(f"{spec.name} has no projected image embedding (layer=last): pass layer=<L>, a block index.")
    if sae.d_in != width:
        raise _width_error(sae, spec.name, layer, width, source)
    pool = pool or default_pool(source, spec.has_cls)
    if pool not in POOLS:
        raise ValueError(f"Unknown pool={pool!r}: use one of {list(POOLS)}.")
    if pool == "cls" and layer != "last" and not spec.has_cls:
        raise ValueError(f"pool=cls: {spec.name} has no CLS token (e.g. SigLIP); use pool=mean or pool=max.")
    return spec, layer, pool


@dataclass
class SAESource:
    """Where an SAE reads: the loaded tap, its spec, the resolved layer and the token pooling."""

    sae: Any  # vlmsae.sae.base.SAE, on the tap's device, in eval mode
    tap: Any  # vlmsae.models Tap
    spec: ModelSpec
    layer: int | str
    pool: str
    source: dict[str, Any] = field(default_factory=dict)  # what the loaded SAE records it reads (sae.source)


def open_sae_source(
    sae,
    source: dict[str, Any] | None = None,
    model: ModelSpec | None = None,
    layer: int | str | None = None,
    pool: str | None = None,
    device: str | None = None,
    sae_dpath: str | Path | None = None,
) -> SAESource:
    """Load the tap the SAE reads (``source`` defaults to ``sae.source``; ``model`` / ``layer`` / ``pool``
    override it; ``device`` overrides the model's unless None or "auto") and move the SAE to it.
    Bad combinations are refused by :func:`resolve_sae_inputs` before the model loads; errors name the fix."""
    from vlmsae.models import load_tap

    # JSON-safe (a loader may record a Path): jobs write it to run_info.json for the browser
    source = json.loads(json.dumps(dict(sae.source if source is None else source), default=str))
    spec, layer, pool = resolve_sae_inputs(sae, source, model, layer, pool, sae_dpath)
    if device not in (None, "auto"):
        spec.device = str(device)
    tap = load_tap(spec)
    layer = tap.resolve_layer(layer)
    width = tap.embed_dim if layer == "last" else tap.width
    if sae.d_in != width:  # the loaded weights disagree with the registered shape (e.g. an overridden model)
        raise _width_error(sae, spec.name, layer, width, source)
    return SAESource(sae=sae.to(tap.device).eval(), tap=tap, spec=spec, layer=layer, pool=pool, source=source)


def load_job_sae(sae_path: str | Path, sae_format: str | None = None, device: str = "cpu"):
    """The SAE a job's ``sae_path=`` names, loaded by :func:`vlmsae.sae.load` (every job loads its SAE here);
    a missing or unreadable SAE is refused with the job key named."""
    from vlmsae import sae as sae_lib

    try:
        return sae_lib.load(sae_path, sae_format=sae_format, device=device)
    except (FileNotFoundError, ValueError) as err:
        if type(err) not in (FileNotFoundError, ValueError):  # e.g. JSONDecodeError: its own constructor
            raise
        raise type(err)(f"sae_path={str(sae_path)!r} (sae_format={sae_format}): {err}") from err


def open_sae_checkpoint(
    sae_path: str | Path,
    model: ModelSpec | None = None,
    layer: int | str | None = None,
    pool: str | None = None,
    device: str | None = None,
    sae_format: str | None = None,
) -> SAESource:
    """Load the SAE at ``sae_path`` (any format :func:`vlmsae.sae.load` reads; ``sae_format`` None =
    detect) and open what its ``source`` says it reads (overrides as :func:`open_sae_source`)."""
    sae = load_job_sae(sae_path, sae_format)
    return open_sae_source(sae, sae.source, model=model, layer=layer, pool=pool, device=device, sae_dpath=sae_path)


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
        """The top-``top_k`` images of every latent as a :class:`TopImages` index (paths kept if all known).
        ``meta`` (see :func:`top_images_meta`) says what was ranked."""
        idx_KT, acts_KT = top_images(self.codes_NF, top_k=top_k)
        paths = self.paths if all(p is not None for p in self.paths) else None
        return TopImages(idx_KT, acts_KT, self.keys, paths=paths, labels=self.labels, meta=meta)


def top_images_meta(src: SAESource, images: Any, sae_path: str | Path, **extra: Any) -> dict[str, Any]:
    """What a top-images index ranked: the SAE, its model and tap, and the images (``meta.json``)."""
    return {
        "what": "top-activating images of SAE latents",
        "sae_path": str(sae_path),
        "model": src.spec.name,
        "layer": src.layer,
        "pool": src.pool,
        "data_source": images.source,
        "data_root": str(images.root),
        **extra,
    }


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

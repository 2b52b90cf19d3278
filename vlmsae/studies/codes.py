"""Images -> one sparse SAE code row per image (:func:`encode_images`): the pass the monosemanticity and
hierarchy studies share, so both rank the same top images for the same SAE and images.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import torch

from vlmsae.data.images import ImageRecord
from vlmsae.metrics.pooling import encode_rows, pool_rows, pool_sparse, sparse_rows
from vlmsae.metrics.reconstruction import ReconstructionAccumulator
from vlmsae.metrics.topimages import TopImages, top_images
from vlmsae.models.open_sae import TappedSAE

# SAE input rows encoded at once when pooling over tokens: bounds the dense [rows, F] code block.
TOKEN_ROWS = 1024


@dataclass
class ImageCodes:
    """Per-image SAE codes and the images they belong to (row i = ``keys[i]``)."""

    codes_NF: torch.Tensor  # sparse COO [N, F] float32, coalesced
    keys: list[str]
    paths: list[str | None]
    labels: list[int]
    raw_ND: torch.Tensor | None = None  # the pooled raw activations (``keep_raw=True``), float32 CPU

    def top_images(self, top_k: int, meta: dict[str, Any]) -> TopImages:
        """The top-``top_k`` images of every latent as a :class:`TopImages` index (paths kept if all known).
        ``meta`` (see :func:`top_images_meta`) says what was ranked."""
        idx_KX, acts_KX = top_images(self.codes_NF, top_k=top_k)
        paths = self.paths if all(p is not None for p in self.paths) else None
        return TopImages(idx_KX, acts_KX, self.keys, paths=paths, labels=self.labels, meta=meta)


def top_images_meta(src: TappedSAE, images: Any, sae_path: str | Path, **extra: Any) -> dict[str, Any]:
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
def encode_images(
    src: TappedSAE,
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

    sae, tap = src.sae, src.tap
    seen: list[tuple[str, str | None, int]] = []  # (key, path, label) of every encoded image
    code_parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    raw_rows: list[torch.Tensor] = []
    bar = tqdm(total=total, desc=desc, unit="img", disable=not progress)
    on_codes = None if recon is None else (lambda x_rd, codes: recon.update(x_rd, sae.decode(codes), codes))
    it = iter(records)
    for batch in iter(lambda: list(islice(it, batch_size)), []):  # batch_size records at a time, the last fewer
        acts = tap.forward_to(torch.stack([tap.preprocess(r.image) for r in batch]), src.layer)
        rows_RD, per_image = pool_rows(acts, src.pool, tap.has_cls)
        src.check_first_batch(rows_RD)  # an SAE that does not fit these activations stops here (check_fit)
        pooled = pool_sparse(encode_rows(sae, rows_RD, TOKEN_ROWS, on_codes), per_image, src.pool, len(batch))
        code_parts.append((pooled.indices()[0] + len(seen), pooled.indices()[1], pooled.values()))
        if keep_raw:
            raw = rows_RD.float().cpu()
            if per_image > 1:
                tok = raw.reshape(len(batch), per_image, -1)
                raw = tok.mean(1) if src.pool == "mean" else tok.amax(1)
            raw_rows.append(raw)
        if on_batch is not None:
            on_batch(batch)
        seen.extend((r.key, r.path, int(r.label)) for r in batch)
        bar.update(len(batch))
    bar.close()
    keys, paths, labels = (list(column) for column in zip(*seen)) if seen else ([], [], [])
    codes_NF = sparse_rows(code_parts, (len(seen), sae.n_latents))
    return ImageCodes(codes_NF, keys, paths, labels, torch.cat(raw_rows) if raw_rows else None)

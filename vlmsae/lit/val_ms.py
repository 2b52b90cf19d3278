"""MS while training (optional, ``val_ms.images=...``): the mean monosemanticity of the SAE's latents, logged
as ``val/ms_mean`` at every validation (or every ``val_ms.every_n_steps`` steps).

At fit start the callback embeds a fixed set of images once and keeps the rows the SAE reads at the training
layer (CLS, or patches pooled like the monosemanticity job's ``pool=mean``); each evaluation only encodes those
rows and scores every latent with the exact linear-time MS. Cost per evaluation (N images, T rows each, D inputs,
F latents, k active per image, E embedding width): N*T*D*F multiply-adds plus O(N*k*E + F*E); memory N*T*D
floats. Eval mode under no_grad: training is untouched. Apart from :mod:`vlmsae.lit.callbacks`, which must stay
importable without Lightning.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import lightning as L
import torch

from vlmsae.config import conf_dir, to_typed
from vlmsae.config.nodes import DataSchema, EmbedderSpec
from vlmsae.data.image_set import ImageSet
from vlmsae.metrics.monosemanticity import monosemanticity_scores
from vlmsae.metrics.pooling import encode_rows, pool_rows, pool_sparse
from vlmsae.models import embedders, load_tap

log = logging.getLogger(__name__)

_ROWS = 4096  # rows per encoder call


def val_ms_images(images: Any, max_images: int, batch_size: int) -> ImageSet:
    """``val_ms.images``: a folder of images, or a data node (source folder | list | wds | synthetic, root, ...)."""
    node = {"source": "folder", "max_images": max_images, "images_per_forward": batch_size}
    if isinstance(images, str):
        node["root"] = images
    elif isinstance(images, dict):
        node.update(images)
    else:
        raise ValueError(f"val_ms.images={images!r}: give an image folder or a data node such as {{source: folder}}.")
    return ImageSet.from_data(to_typed(node, DataSchema), job="train val_ms", hint=" (val_ms.images)")


def val_ms_embedder(embedder: Any) -> EmbedderSpec:
    """``val_ms.embedder``: a name of ``conf/embedder/<name>.yaml`` (clip_b32, pixels, ...) or an embedder node."""
    if isinstance(embedder, str):
        from omegaconf import OmegaConf

        fpath = conf_dir() / "embedder" / f"{embedder}.yaml"
        if not fpath.is_file():
            known = sorted(p.stem for p in fpath.parent.glob("*.yaml"))
            raise ValueError(f"val_ms.embedder={embedder!r} is not one of {known}; or give an embedder node.")
        embedder = OmegaConf.load(fpath)
    return to_typed(embedder, EmbedderSpec)


class ValMS(L.Callback):
    """Logs ``val/ms_mean`` (mean MS over the live latents, in [0, 1]; NaN if none scores) and keeps the seconds
    each evaluation took in ``seconds``."""

    def __init__(self, model_spec, layer, tokens: str | None, images: ImageSet, embedder: EmbedderSpec, every=None):
        self.model_spec, self.layer, self.images, self.embedder = model_spec, layer, images, embedder
        self.pool = "cls" if tokens in (None, "cls") else "mean"
        self.every = int(every) if every else None
        self.rows_RD: torch.Tensor | None = None
        self.emb_NE: torch.Tensor | None = None
        self.per_image = 1
        self.seconds: list[float] = []

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.rows_RD is None:
            self._prepare()

    @torch.no_grad()
    def _prepare(self) -> None:
        t0 = time.perf_counter()
        tap, embed = load_tap(self.model_spec), embedders.load_embedder(self.embedder)  # patchable in tests
        layer = tap.resolve_layer(self.layer)
        records = list(self.images.records())
        if len(records) < 2:
            raise ValueError(f"val_ms.images holds {len(records)} readable image(s) ({self.images.root}); MS needs 2+.")
        rows, embs = [], []
        for i in range(0, len(records), self.images.batch_size):
            batch = records[i : i + self.images.batch_size]
            acts = tap.forward_to(torch.stack([tap.preprocess(r.image) for r in batch]), layer)
            rows_rd, self.per_image = pool_rows(acts, self.pool, tap.has_cls)
            rows.append(rows_rd.float().cpu())
            embs.append(embed.embed([r.image for r in batch]))
        self.rows_RD, self.emb_NE = torch.cat(rows), torch.cat(embs)
        log.info("val_ms: %d images ready in %.1f s", len(records), time.perf_counter() - t0)

    @torch.no_grad()
    def score(self, sae) -> float:
        """Mean MS of ``sae``'s latents on the prepared images (eval mode, restored after)."""
        was_training = sae.training
        sae.eval()
        try:
            codes_RF = encode_rows(sae, self.rows_RD, _ROWS)
        finally:
            sae.train(was_training)
        codes_NF = pool_sparse(codes_RF, self.per_image, self.pool, self.emb_NE.shape[0])
        ms_K = monosemanticity_scores(codes_NF, self.emb_NE)
        live = ms_K[~torch.isnan(ms_K)]
        return float(live.mean()) if live.numel() else math.nan

    def _log(self, trainer, pl_module) -> None:
        t0 = time.perf_counter()
        value = self.score(pl_module.sae)
        self.seconds.append(time.perf_counter() - t0)
        for logger in trainer.loggers:  # straight to the loggers: this hook may run outside a logging context
            logger.log_metrics({"val/ms_mean": value}, step=trainer.global_step)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if self.every is None and not trainer.sanity_checking:
            self._log(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.every is not None and trainer.global_step % self.every == 0:
            self._log(trainer, pl_module)


def val_ms_callbacks(val_ms: Any, model_spec, rows, many: bool = False, batch_size: int = 32) -> list:
    """``[ValMS]`` when ``val_ms.images`` is set, else ``[]`` (the default: nothing extra is computed or logged).
    ``val_ms``: the train job's ``val_ms`` node (images, embedder, every_n_steps, max_images).
    ``rows``: what the run trains on (a TrainInput: its layer and tokens); ``many``: a sae_grid run (not supported)."""
    if val_ms.images is None:
        return []
    if many:
        raise ValueError("val_ms.images is set with sae_grid: MS while training scores one SAE; drop one of the two.")
    images = val_ms_images(val_ms.images, val_ms.max_images, batch_size)
    return [ValMS(model_spec, rows.layer, rows.tokens, images, val_ms_embedder(val_ms.embedder), val_ms.every_n_steps)]

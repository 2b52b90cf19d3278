"""Activation rows computed from images on the fly (``data=images``), for users without disk for a store.

:class:`ImageChunkMaker` is the ``make_chunks`` of :class:`vlmsae.data.stream.ImageRowsStream`: it
needs both the images (data) and the encoder (models), so it lives here, above both.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from typing import Any

import torch

from vlmsae.data.stream import epoch_order_seed, iter_epoch_images
from vlmsae.models import load_tap
from vlmsae.models.spec import ModelSpec
from vlmsae.models.tap import select_tokens


@dataclasses.dataclass(eq=False)
class ImageChunkMaker:
    """Picklable callable: the images of one (rank, worker) part -> activation row chunks.

    The encoder is loaded lazily in the process that iterates (a DataLoader worker or the main
    process), at the layer and token selection the training config asks for.
    """

    model_spec: ModelSpec
    image_kwargs: dict
    layer: Any
    tokens: str
    k_tokens: int
    images_per_forward: int
    seed: int
    holdout_every: int
    split: str
    _tap: Any = dataclasses.field(default=None, init=False, repr=False)

    def _keep(self, index: int) -> bool:
        is_val = index % self.holdout_every == 0
        return is_val if self.split == "val" else not is_val

    def __call__(self, epoch: int, part: int, n_parts: int) -> Iterator[torch.Tensor]:
        if self._tap is None:
            spec = self.model_spec
            if spec.device == "auto" and torch.cuda.is_available():
                # DDP: each rank's encoder on its own GPU (a spawned worker does not inherit the device)
                spec = dataclasses.replace(spec, device=f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
            self._tap = load_tap(spec).eval()
        tap = self._tap
        device = next(tap.parameters()).device
        generator = torch.Generator().manual_seed(self.seed * 1000003 + epoch * 7919 + part)
        pixels: list[torch.Tensor] = []

        def flush() -> torch.Tensor:
            with torch.no_grad():  # layer="last": select_tokens keeps the one embedding per image
                acts = tap.forward_to(torch.stack(pixels).to(device), layer=self.layer)
                rows = select_tokens(
                    acts.cpu(), tokens=self.tokens, k=self.k_tokens, generator=generator, has_cls=tap.has_cls
                )[0]
            pixels.clear()
            return rows.detach().to("cpu", torch.float16)

        order_seed = epoch_order_seed(self.seed, epoch) if self.split == "train" else None
        for record in iter_epoch_images(self.image_kwargs, order_seed, part, n_parts):
            if not self._keep(record.index):  # the listing index: a held-out image stays held out every epoch
                continue
            pixels.append(tap.preprocess(record.image))
            if len(pixels) == self.images_per_forward:
                yield flush()
        if pixels:
            yield flush()

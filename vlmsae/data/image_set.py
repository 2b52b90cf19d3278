"""The images a metric job reads (monosemanticity, hierarchy): a typed view of a ``data`` node.

:class:`ImageSet` says where the images come from (``folder`` / ``list`` / ``wds`` / ``synthetic``),
how many to read and how many per forward; it lists them up front where the source allows it and
iterates them as :class:`vlmsae.data.images.ImageRecord`. ``where()`` names the images' origin for
caches keyed by relative image keys.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlmsae.config.nodes import DataSchema
from vlmsae.data.images import SOURCES, ImageList, ImageRecord, SkipLog, iter_images, list_source, synthetic_options_of


@dataclass(frozen=True)
class ImageSet:
    """Images to encode: ``source`` and ``root`` as in :func:`vlmsae.data.images.iter_images`."""

    source: str  # folder | list | wds | synthetic
    root: str | None  # image folder, list file or WebDataset pattern; synthetic: the cache folder (None = default)
    max_images: int | None  # the first N images of the listing; None = all
    batch_size: int  # images per forward
    synthetic: dict[str, Any] | None = None  # generated-image options (synthetic_options); None for other sources

    @classmethod
    def from_data(cls, data: DataSchema | Mapping[str, Any], job: str, hint: str = "") -> ImageSet:
        """From a job's ``data`` node, or one an earlier run recorded in its run_info.json (a mapping); ``job``
        and ``hint`` word the error for other sources."""
        data = data if isinstance(data, Mapping) else dataclasses.asdict(data)
        source = data["source"]
        if source not in SOURCES:
            raise ValueError(
                f"{job} reads images: data.source={source!r} must be folder, list, wds or synthetic{hint}."
            )
        return cls(
            source=str(source),
            root=None if data["root"] is None else str(data["root"]),
            max_images=None if data["max_images"] is None else int(data["max_images"]),
            # a node recorded before images_per_forward existed said images per forward with batch_size
            batch_size=int(data["images_per_forward"] if "images_per_forward" in data else data["batch_size"]),
            synthetic=synthetic_options_of(data),
        )

    @property
    def listable(self) -> bool:
        """Whether the images can be listed before they are read (a WebDataset streams)."""
        return self.source != "wds"

    def listing(self) -> ImageList:
        """Every image of a listable source (undecoded), in reading order, with the class names."""
        return list_source(self.source, self.root, synthetic=self.synthetic)

    def items(self, listing: ImageList) -> list[tuple[str, str, int]]:
        """The ``(key, path, label)`` of the images read: the first ``max_images`` of ``listing``."""
        return listing.items if self.max_images is None else listing.items[: self.max_images]

    def where(self) -> str:
        """The images' origin (source, absolute root, generation options): keys are relative, so a cache
        keyed by them must also be keyed by this."""
        root_id = str(Path(self.root).expanduser().resolve()) if self.root is not None else None
        return json.dumps({"source": self.source, "root": root_id, "synthetic": self.synthetic}, sort_keys=True)

    def records(self, skip_log: SkipLog | None = None, max_images: int | None = None) -> Iterator[ImageRecord]:
        """The readable images, decoded; ``max_images`` lowers the cap further."""
        cap = self.max_images
        if max_images is not None:
            cap = max_images if cap is None else min(cap, max_images)
        return iter_images(self.source, self.root, max_images=cap, skip_log=skip_log, synthetic=self.synthetic)

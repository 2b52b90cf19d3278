"""Image embeddings E(x) cached on disk, so a second MS run over the same images needs no embedder.

A cache file (safetensors: ``embeddings`` [N, E], the keys in its metadata) holds one image list's embeddings
by one embedder from one image origin (:meth:`vlmsae.data.image_set.ImageSet.where`: keys are relative
paths); the file name hashes all three. An unreadable file is recomputed, never fatal.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch

from vlmsae.data.images import ImageRecord
from vlmsae.data.shards import image_list_digest
from vlmsae.models import embedders
from vlmsae.models.embedders import EmbedderSpec
from vlmsae.utils.io import atomic_write

log = logging.getLogger(__name__)


def cache_fpath(cache_dpath: Path, embedder_spec: EmbedderSpec, digest: str, where: str) -> Path:
    """The cache file of one embedder, one image list (``digest`` of its keys) and one image origin (``where``)."""
    key = hashlib.sha256(f"{embedder_spec.cache_id()}|{digest}|{where}".encode()).hexdigest()[:20]
    return cache_dpath / f"{embedder_spec.name}-{key}.safetensors"


def load_cache(fpath: Path) -> dict[str, torch.Tensor]:
    """{image key: embedding} from ``fpath``; empty when it does not exist or cannot be read."""
    from safetensors import safe_open

    if not fpath.exists():
        return {}
    try:
        with safe_open(str(fpath), framework="pt") as f:
            keys = json.loads(f.metadata()["keys"])
            emb = f.get_tensor("embeddings")
    except Exception as err:
        log.warning("ignoring unreadable embedding cache %s (%s); recomputing", fpath, err)
        return {}
    return {k: emb[i] for i, k in enumerate(keys)}


def save_cache(fpath: Path, keys: list[str], emb_NE: torch.Tensor, embedder_id: str) -> None:
    """Write the embeddings of ``keys`` (row i = ``keys[i]``) atomically."""
    from safetensors.torch import save_file

    meta = {"keys": json.dumps(keys), "embedder": embedder_id}
    atomic_write(fpath, lambda tmp: save_file({"embeddings": emb_NE.contiguous()}, str(tmp), metadata=meta))


class CachedEmbedder:
    """Embeds batches of images in order (call it with each batch), reusing ``cache_dpath``'s rows.

    ``cache_dpath``: None keeps nothing on disk (the hierarchy study). ``listing_digest``: the digest of the
    image list when it is known before reading (a listed source), so the cache is read up front; None for a
    stream, whose list is known only at the end. ``memo``: an in-memory {image key: embedding} of the same
    images shared by several runs (the SAEs of a sweep): its rows are used like cached ones and every row
    embedded here is added to it.
    """

    def __init__(
        self,
        spec: EmbedderSpec,
        cache_dpath: Path | None,
        where: str,
        listing_digest: str | None = None,
        memo: dict[str, torch.Tensor] | None = None,
    ):
        self.spec, self.cache_dpath, self.where, self.listing_digest = spec, cache_dpath, where, listing_digest
        on_disk = listing_digest and cache_dpath is not None
        self.cached = load_cache(cache_fpath(cache_dpath, spec, listing_digest, where)) if on_disk else {}
        self.memo = memo
        self.cached.update(memo or {})
        self.rows: list[torch.Tensor] = []
        self.n_embedded = 0  # images the embedder ran on (0: every row came from the cache)
        self._embedder = None  # loaded on first use: a fully cached run needs no embedder weights

    def __call__(self, batch: list[ImageRecord]) -> None:
        keys = [r.key for r in batch]
        if all(k in self.cached for k in keys):
            self.rows.append(torch.stack([self.cached[k] for k in keys]).float())
            return
        if self._embedder is None:
            self._embedder = embedders.load_embedder(self.spec)  # looked up at call time (tests replace it)
        emb_BE = self._embedder.embed([r.image for r in batch])
        self.rows.append(emb_BE)
        self.n_embedded += len(batch)
        if self.memo is not None:
            self.memo.update(zip(keys, emb_BE.float().cpu()))

    def finish(self, keys: list[str]) -> tuple[torch.Tensor, str]:
        """(embeddings [N, E] of every batch so far, the image-list digest); saves the cache if anything was
        embedded. ``keys``: the keys of the rows, in order."""
        emb_NE = torch.cat(self.rows)
        digest = self.listing_digest if self.listing_digest is not None else image_list_digest(keys)
        if self.n_embedded and self.cache_dpath is not None:
            save_cache(cache_fpath(self.cache_dpath, self.spec, digest, self.where), keys, emb_NE, self.spec.cache_id())
        return emb_NE, digest

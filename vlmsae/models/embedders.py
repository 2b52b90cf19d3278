"""Image embedders E for the monosemanticity score (METHOD §3) and the steering score (METHOD §5).

``load_embedder(spec)`` -> an object with ``embed(pil_images) -> [N, E]`` float32 on CPU, and, for
CLIP, ``embed_text(strings) -> [N, E]`` in the same space. Backends:
- ``open_clip``: CLIP's projected ``image_embeds`` (default E = ViT-B-32 ``openai``, 512-d);
  ``tiny: true`` builds the tiny random open_clip CLIP once into ``$VLMSAE_HOME/models/<name>`` and
  loads it back through the same ``create_model_and_transforms`` call real weights take.
- ``hf``: a transformers vision model's ``pooler_output`` (DINOv2-base: the layer-normed CLS token, 768-d).
- ``cnn``: the small CNN trained offline on the real digits (:mod:`vlmsae.models.digits`, ``embedder=digits_cnn``):
  its penultimate features (64-d). Trained once into ``$VLMSAE_HOME/models/embedder_<name>``, checked by digest.
- ``pixels``: no weights; a fixed random projection of the downsampled, centred RGB pixels. Meaningful
  for the generated concept images (same colour -> similar embedding), instant, for tests and demos.
Weights are never downloaded silently into odd places: ``cache_dir`` and ``local_path`` say where
they are, and a failed download raises an error that says how to fetch them on a connected machine.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from vlmsae.config import to_typed
from vlmsae.config.nodes import EMBEDDER_BACKENDS, EmbedderSpec, open_clip_overrides
from vlmsae.models.tap import looks_offline, resolve_device

__all__ = ["EMBEDDER_BACKENDS", "Embedder", "EmbedderSpec", "load_embedder"]


def _offline_error(spec: EmbedderSpec, err: BaseException) -> RuntimeError:
    if spec.backend == "hf":
        how = (
            f"`huggingface-cli download {spec.arch} --local-dir <dir>` and pass embedder.local_path=<dir> "
            "(or set HF_HOME / embedder.cache_dir to a cache that holds it)"
        )
    else:
        how = (
            f"`python -c \"import open_clip; open_clip.create_model('{spec.arch}', pretrained='{spec.pretrained}', "
            "cache_dir='<dir>')\"` and pass embedder.cache_dir=<dir>, or embedder.local_path=<checkpoint file> "
            "(keep embedder.pretrained=<tag>: it decides the preprocessing and activation)"
        )
    return RuntimeError(
        f"Could not load the weights of embedder {spec.name!r} ({spec.backend} {spec.arch!r}, pretrained="
        f"{spec.pretrained!r}, local_path={spec.local_path!r}): {err}\nThis machine may be offline and the weights "
        f"not cached. On a machine with internet run {how}. For tests use embedder=tiny (no download)."
    )


class Embedder:
    """Base: batching and the CPU float32 contract; backends implement ``_embed_batch``."""

    spec: EmbedderSpec
    dim: int

    def _embed_batch(self, images: list) -> torch.Tensor:  # pragma: no cover - backends implement it
        raise NotImplementedError

    @torch.inference_mode()
    def embed(self, images: Sequence, progress: bool = False) -> torch.Tensor:
        """[N, E] float32 CPU embeddings of PIL images (converted to RGB), ``spec.batch_size`` at a time."""
        images = list(images)
        if not images:
            return torch.zeros(0, self.dim)
        starts = range(0, len(images), self.spec.batch_size)
        if progress:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc=f"embed ({self.spec.name})", unit="batch")
        out = [self._embed_batch([im.convert("RGB") for im in images[i : i + self.spec.batch_size]]) for i in starts]
        return torch.cat(out).float().cpu()

    __call__ = embed


class OpenClipEmbedder(Embedder):
    """CLIP image (and text) embeddings: ``encode_image`` = the projected ``image_embeds``."""

    def __init__(self, spec: EmbedderSpec):
        import open_clip

        from vlmsae.models.open_clip_backend import create_open_clip, resolve_open_clip_weights

        self.spec = spec
        local_path = spec.local_path
        if spec.tiny:
            from vlmsae.models.tiny import build_tiny_open_clip, tiny_model_dpath

            dpath = tiny_model_dpath(f"embedder_{spec.name}", spec.seed, spec.local_path)
            local_path = str(build_tiny_open_clip(dpath, seed=spec.seed))
        # The same resolution as the taps': a checkpoint file gets its registered tag's preprocessing/activation.
        weights = resolve_open_clip_weights(
            spec.name,
            spec.arch,
            spec.pretrained,
            local_path,
            spec.pretrained_tag,
            open_clip_overrides(spec),
            where="embedder",
        )
        model, preprocess = create_open_clip(weights, spec.cache_dir, on_missing=lambda err: _offline_error(spec, err))
        self.device = resolve_device(spec.device)
        self.model = model.to(self.device).eval()
        self.preprocess = preprocess
        try:
            self.tokenizer = open_clip.get_tokenizer(weights.model_name)
        except Exception:
            context = getattr(model, "context_length", 77)
            self.tokenizer = lambda texts: open_clip.tokenize(texts, context_length=context)
        self.dim = int(getattr(model.visual, "output_dim", 0) or self._probe_dim())

    def _probe_dim(self) -> int:
        from PIL import Image

        return int(self._embed_batch([Image.new("RGB", (32, 32))]).shape[1])

    def _embed_batch(self, images: list) -> torch.Tensor:
        x = torch.stack([self.preprocess(im) for im in images]).to(self.device)
        return self.model.encode_image(x).float()

    @torch.inference_mode()
    def embed_text(self, texts: Sequence[str]) -> torch.Tensor:
        """[N, E] CLIP text embeddings (unnormalised), in the image embeddings' space."""
        tokens = self.tokenizer(list(texts)).to(self.device)
        return self.model.encode_text(tokens).float().cpu()


class HFEmbedder(Embedder):
    """A transformers vision backbone's ``pooler_output`` (DINOv2: layer-normed CLS token)."""

    def __init__(self, spec: EmbedderSpec):
        from transformers import AutoImageProcessor, AutoModel

        self.spec = spec
        repo_or_dir = spec.local_path or spec.arch
        if spec.local_path and not Path(spec.local_path).expanduser().exists():
            raise FileNotFoundError(f"embedder.local_path={spec.local_path} does not exist (embedder {spec.name!r}).")
        try:
            self.processor = AutoImageProcessor.from_pretrained(repo_or_dir, cache_dir=spec.cache_dir)
            model = AutoModel.from_pretrained(repo_or_dir, cache_dir=spec.cache_dir)
        except (OSError, ValueError, RuntimeError) as err:
            if looks_offline(err) or isinstance(err, OSError):
                raise _offline_error(spec, err) from err
            raise
        self.device = resolve_device(spec.device)
        self.model = model.to(self.device).eval()
        self.dim = int(getattr(model.config, "hidden_size", 0))

    def _embed_batch(self, images: list) -> torch.Tensor:
        inputs = self.processor(images=images, return_tensors="pt").to(self.device)
        out = self.model(**inputs)
        pooled = getattr(out, "pooler_output", None)
        if pooled is None:  # backbones without a pooler: the CLS token
            pooled = out.last_hidden_state[:, 0]
        return pooled.float()


class PixelEmbedder(Embedder):
    """Fixed random projection of centred, downsampled RGB pixels (no weights to load)."""

    def __init__(self, spec: EmbedderSpec):
        self.spec = spec
        self.dim = spec.embed_dim
        g = torch.Generator().manual_seed(spec.seed)
        n_in = 3 * spec.image_size * spec.image_size
        self.proj = torch.randn(n_in, spec.embed_dim, generator=g) / n_in**0.5

    def _embed_batch(self, images: list) -> torch.Tensor:
        import numpy as np

        size = (self.spec.image_size, self.spec.image_size)
        arr = np.stack([np.asarray(im.resize(size), dtype=np.float32) / 255.0 for im in images])
        x = torch.from_numpy(arr).reshape(len(images), -1)
        return (x - 0.5) @ self.proj


class DigitsCNNEmbedder(Embedder):
    """The digits CNN's penultimate features (no text side: name its latents with ``names=labels``)."""

    def __init__(self, spec: EmbedderSpec):
        from vlmsae.models.digits import TRAINED_VERSION, load_digits_cnn
        from vlmsae.models.tiny import tiny_model_dpath

        if spec.pretrained not in (None, TRAINED_VERSION):
            raise ValueError(
                f"embedder {spec.name!r}: pretrained={spec.pretrained!r} but this vlmsae trains the digits CNN as "
                f"{TRAINED_VERSION!r}: set embedder.pretrained={TRAINED_VERSION} (it keys the embedding cache)."
            )
        self.spec = spec
        dpath = tiny_model_dpath(f"embedder_{spec.name}", spec.seed, spec.local_path)
        self.device = resolve_device(spec.device)
        self.model = load_digits_cnn(dpath, seed=spec.seed).to(self.device)
        self.dim = self.model.embed_dim

    def _embed_batch(self, images: list) -> torch.Tensor:
        from vlmsae.models.digits import cnn_inputs

        return self.model.embed(cnn_inputs(images).to(self.device))


def load_embedder(spec: EmbedderSpec | dict | Any) -> Embedder:
    """An embedder for ``spec``: an :class:`EmbedderSpec`, a dict, or a composed ``cfg.embedder`` node."""
    spec = to_typed(spec, EmbedderSpec)
    backends = {"open_clip": OpenClipEmbedder, "hf": HFEmbedder, "cnn": DigitsCNNEmbedder}
    return backends.get(spec.backend, PixelEmbedder)(spec)

"""vlmsae.studies.embedding_cache: cached image embeddings, keyed by embedder, image list and origin."""

from __future__ import annotations

import torch

from vlmsae.data.images import ImageRecord
from vlmsae.models.embedders import EmbedderSpec
from vlmsae.studies import embedding_cache as ec

PIXELS = EmbedderSpec(name="pixels", backend="pixels", arch="pixels")


def test_file_name_depends_on_embedder_list_and_origin(tmp_path):
    base = ec.cache_fpath(tmp_path, PIXELS, "d1", "w1")
    assert base.parent == tmp_path and base.name.startswith("pixels-") and base.suffix == ".safetensors"
    assert base == ec.cache_fpath(tmp_path, PIXELS, "d1", "w1")
    other_seed = EmbedderSpec(name="pixels", backend="pixels", arch="pixels", seed=1)
    assert (
        len(
            {
                base,
                ec.cache_fpath(tmp_path, PIXELS, "d2", "w1"),
                ec.cache_fpath(tmp_path, PIXELS, "d1", "w2"),
                ec.cache_fpath(tmp_path, other_seed, "d1", "w1"),
            }
        )
        == 4
    )


def test_roundtrip_and_a_damaged_file_is_recomputed(tmp_path):
    fpath = tmp_path / "c.safetensors"
    assert ec.load_cache(fpath) == {}
    emb = torch.arange(6.0).reshape(3, 2)
    ec.save_cache(fpath, ["a", "b", "c"], emb, PIXELS.cache_id())
    got = ec.load_cache(fpath)
    assert list(got) == ["a", "b", "c"] and torch.equal(got["b"], emb[1])
    fpath.write_bytes(b"not a safetensors file")
    assert ec.load_cache(fpath) == {}


def test_cached_embedder_embeds_once_then_reads_the_cache(tmp_path, monkeypatch):
    from PIL import Image

    batch = [
        ImageRecord(key=f"k{i}", path=None, label=0, image=Image.new("RGB", (8, 8), (30 * i, 0, 0))) for i in range(3)
    ]
    first = ec.CachedEmbedder(PIXELS, tmp_path, where="w", listing_digest="d")
    first(batch)
    emb, digest = first.finish([r.key for r in batch])
    assert first.n_embedded == 3 and digest == "d" and emb.shape[0] == 3

    def no_embedder(_spec):
        raise AssertionError("the embedder was loaded although every embedding is cached")

    monkeypatch.setattr("vlmsae.models.embedders.load_embedder", no_embedder)
    again = ec.CachedEmbedder(PIXELS, tmp_path, where="w", listing_digest="d")
    again(batch)
    emb2, _ = again.finish([r.key for r in batch])
    assert again.n_embedded == 0 and torch.allclose(emb2, emb)
    # a stream (no listing digest): nothing is read up front, the digest comes from the keys at the end
    stream = ec.CachedEmbedder(PIXELS, tmp_path, where="w")
    assert stream.cached == {}

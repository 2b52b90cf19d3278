"""names=labels: latents named after the labelled class whose mean image embedding is nearest their concept."""

from __future__ import annotations

import pytest
import torch

from vlmsae.studies.naming import LABELS, build_namer, label_namer


def _clustered(n_per: int = 20, dim: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(3, dim, generator=g) * 3
    labels = torch.arange(3).repeat_interleave(n_per)
    emb = centres[labels] + torch.randn(len(labels), dim, generator=g)
    return emb, labels.tolist()


def test_latents_are_named_after_the_class_of_their_top_images():
    emb, labels = _clustered()
    namer = label_namer(emb, labels, ["cat", "dog", "eel", "fox"], top=2)  # fox has no images: not a name
    assert namer.vocab == ["cat", "dog", "eel"] and namer.vocabulary == LABELS
    # latent 0: dog images; latent 1: eel images; latent 2: mostly cat with one dog; latent 3: no top images
    idx = torch.tensor([[20, 21, 22, 23], [40, 41, 42, -1], [0, 1, 2, 25], [-1, -1, -1, -1]])
    names = namer.name_from_embeddings(emb, idx)
    assert names.name[:3] == ["dog", "eel", "cat"]
    assert all(0.5 < s <= 1.0 for s in names.score[:3])
    assert names.names[0][0] == "dog" and len(names.names[0]) == 2
    assert names.name[3] == "" and names.score[3] != names.score[3]


def test_labels_namer_needs_labelled_images_and_is_filled_by_the_study():
    emb, _ = _clustered()
    with pytest.raises(ValueError, match="names=labels needs labelled images"):
        label_namer(emb, [-1] * len(emb), ["cat"])
    placeholder = build_namer("labels", ["{}"], 3, embedder_cfg=None)  # no embedder loaded, no text side asked
    assert placeholder.vocabulary == LABELS and placeholder.vocab == [] and placeholder.top == 3

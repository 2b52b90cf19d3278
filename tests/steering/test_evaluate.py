"""The steering score run's inputs (vlmsae.steering.evaluate): concept images are decoded one latent at a time."""

from __future__ import annotations

import pytest
import torch

from vlmsae.steering.score import concept_embeddings, word_scores


@pytest.fixture
def eight_latent_index(tmp_path):
    """12 colour images and a top-images index whose latents 0..7 each have 4 top images (latent 5 none)."""
    from PIL import Image

    from vlmsae.metrics.topimages import TopImages

    colours = ["red", "green", "blue", "yellow", "white", "black", "orange", "purple", "cyan", "pink", "gray", "brown"]
    paths = []
    for i, c in enumerate(colours):
        p = tmp_path / f"{i:02d}_{c}.png"
        Image.new("RGB", (32, 32), c).save(p)
        paths.append(str(p))
    image_idx = torch.full((8, 4), -1, dtype=torch.long)
    acts = torch.zeros(8, 4)
    for j in range(8):
        image_idx[j] = (torch.arange(4) + 3 * j) % 12
        acts[j] = torch.tensor([4.0, 3.0, 2.0, 1.0])
    acts[5] = 0.0  # no active top image: a NaN concept
    return TopImages(image_idx, acts, keys=colours, paths=paths, labels=[0] * 12)


class CountingOpen:
    """Wraps evaluate.open_image; counts the decoded images still alive (weakref) and their maximum."""

    def __init__(self, real):
        import weakref

        self.real, self.weakref = real, weakref
        self.alive = self.max_alive = self.opened = 0

    def _release(self):
        self.alive -= 1

    def __call__(self, path):
        image = self.real(path)
        self.weakref.finalize(image, self._release)
        self.opened += 1
        self.alive += 1
        self.max_alive = max(self.max_alive, self.alive)
        return image


def mean_colour(images):
    """A cheap image embedder: the mean RGB of each image (the scores' maths does not care which embedder)."""
    import numpy as np

    return torch.stack([torch.from_numpy(np.asarray(im, dtype=np.float32)).mean(dim=(0, 1)) for im in images])


def colour_words(words):
    table = {"red": [1.0, 0.0, 0.0], "blue": [0.0, 0.0, 1.0], "cat": [0.3, 0.3, 0.3]}
    return torch.tensor([table[w] for w in words])


def test_concept_images_are_streamed_per_latent(eight_latent_index, monkeypatch):
    import gc

    from PIL import Image

    from vlmsae.steering import evaluate

    real_open = evaluate.open_image
    peaks = {}
    for n_latents in (2, 8):
        counter = CountingOpen(real_open)
        monkeypatch.setattr(evaluate, "open_image", counter)
        latents = list(range(n_latents))
        concepts_LE, top_paths, _ = evaluate.latent_concepts(eight_latent_index, latents, 16, mean_colour)
        monkeypatch.setattr(evaluate, "open_image", real_open)
        gc.collect()
        assert counter.opened == sum(len(p) for p in top_paths) and counter.alive == 0
        peaks[n_latents] = counter.max_alive

        # The old behaviour: every latent's images decoded up front, then embedded latent by latent.
        reference_LE = concept_embeddings(
            [[Image.open(p).convert("RGB") for p in paths] for paths in top_paths], mean_colour
        )
        torch.testing.assert_close(concepts_LE, reference_LE, rtol=0, atol=0, equal_nan=True)
        words = ["red", "cat", "", "blue"] * n_latents
        owner = [li for li in latents for _ in range(4)]
        scores = word_scores(words, owner, concepts_LE, colour_words)
        torch.testing.assert_close(scores, word_scores(words, owner, reference_LE, colour_words), equal_nan=True)
        assert scores[~scores.isnan()].numel() > 0
    assert concepts_LE[5].isnan().all()
    assert peaks[2] == peaks[8] == 4  # one latent's top images at a time, whatever the number of latents

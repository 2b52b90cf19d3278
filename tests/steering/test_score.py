"""The steering score's maths (vlmsae.steering.score, METHOD §5) on known embeddings."""

from __future__ import annotations

import math

import pytest
import torch

from vlmsae.steering.score import ScoreSummary, concept_embeddings, markdown_table, shuffled, word_scores

WORDS = ["cat", "dog", "car"]


def onehot_texts(words):
    return torch.stack([torch.eye(3)[WORDS.index(w)] * 5.0 for w in words])  # unnormalised on purpose


def test_concepts_are_mean_unit_embeddings():
    emb = {"a": torch.tensor([2.0, 0.0, 0.0]), "b": torch.tensor([0.0, 0.5, 0.0])}
    concepts = concept_embeddings([["a", "b"], ["a"], []], lambda ims: torch.stack([emb[i] for i in ims]))
    s = 1 / math.sqrt(2)
    torch.testing.assert_close(concepts[0], torch.tensor([s, s, 0.0]))  # unit vectors averaged, then unit
    torch.testing.assert_close(concepts[1], torch.tensor([1.0, 0.0, 0.0]))
    assert concepts[2].isnan().all()  # no top images: NaN, left out of means


def test_word_scores_are_cosines():
    concepts = torch.tensor([[1.0, 0.0, 0.0], [0.6, 0.8, 0.0]])
    scores = word_scores(["cat", "dog", "", "cat"], [0, 1, 0, 1], concepts, onehot_texts)
    torch.testing.assert_close(scores[[0, 1, 3]], torch.tensor([1.0, 0.8, 0.6]))
    assert scores[2].isnan()  # an empty answer scores nothing
    summary = ScoreSummary.of(scores)
    assert summary.n == 3 and summary.mean == pytest.approx(0.8)
    assert shuffled(list(range(10)), seed=3) == shuffled(list(range(10)), seed=3) != list(range(10))
    table = markdown_table({"steered": summary}, {"steered": 0.263})
    assert "| steered | 0.800 +- 0.200 | 3 | 0.263 |" in table

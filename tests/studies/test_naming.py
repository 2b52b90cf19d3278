"""Automatic feature names (vlmsae.studies.naming): the scoring by hand, planted names on the concept images,
the vocabularies and the refusals."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from vlmsae.formats import LatentRow, LatentsTable
from vlmsae.studies import naming as nm

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "taxonomy"


def test_concept_is_the_steering_concept_and_the_unit_mean_by_hand():
    from vlmsae.steering.score import concept_embeddings

    emb_NE = torch.tensor([[3.0, 0.0], [0.0, 2.0], [1.0, 1.0], [-5.0, 0.0]])
    idx_KX = torch.tensor([[0, 1], [2, -1], [-1, -1], [3, 0]])
    concepts_KE = nm.concepts_from_embeddings(emb_NE, idx_KX, chunk=2)  # two chunks
    # latent 0: unit rows (1,0) and (0,1) -> mean (.5,.5) -> unit (1/sqrt2, 1/sqrt2)
    assert torch.allclose(concepts_KE[0], torch.tensor([1.0, 1.0]) / math.sqrt(2))
    assert torch.allclose(concepts_KE[1], torch.tensor([1.0, 1.0]) / math.sqrt(2))  # padding ignored
    assert torch.isnan(concepts_KE[2]).all()  # no top images
    # latent 3: (-1,0) and (1,0) cancel: a zero mean stays a (finite) zero vector, as the steering score's does
    rows = [[emb_NE[i] for i in r if i >= 0] for r in idx_KX.tolist()]
    expect = concept_embeddings(rows, lambda images: torch.stack(images))
    assert torch.allclose(concepts_KE, expect, equal_nan=True)
    gen = torch.Generator().manual_seed(0)
    emb_NE, idx_KX = torch.randn(20, 5, generator=gen), torch.randint(-1, 20, (7, 4), generator=gen)
    expect = concept_embeddings([[emb_NE[i] for i in r if i >= 0] for r in idx_KX.tolist()], torch.stack)
    assert torch.allclose(nm.concepts_from_embeddings(emb_NE, idx_KX, chunk=3), expect, equal_nan=True, atol=1e-6)


def test_template_averaging_by_hand():
    table = {
        "a photo of a cat.": [2.0, 0.0, 0.0],
        "a drawing of a cat.": [0.0, 0.0, 5.0],
        "a photo of a dog.": [0.0, 1.0, 0.0],
        "a drawing of a dog.": [0.0, 3.0, 0.0],
    }
    calls = []

    def embed_text(prompts):
        calls.append(list(prompts))
        return torch.tensor([table[p] for p in prompts])

    names_VE = nm.name_embeddings(["cat", "dog"], ["a photo of a {}.", "a drawing of a {}."], embed_text, batch_size=1)
    # cat: unit (1,0,0) + unit (0,0,1), halved, renormalised -> (1,0,1)/sqrt2 (the scale of each prompt drops out)
    assert torch.allclose(names_VE[0], torch.tensor([1.0, 0.0, 1.0]) / math.sqrt(2))
    assert torch.allclose(names_VE[1], torch.tensor([0.0, 1.0, 0.0]))
    assert len(calls) == 4 and all(len(c) == 1 for c in calls)  # batched


def test_top_names_order_cosine_and_empty_latents():
    vocab = ["red", "green", "blue", "car"]
    names_VE = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [1.0, 1.0, 0]])  # unnormalised on purpose
    concepts_KE = torch.tensor([[0.8, 0.6, 0.0], [0.0, 0.0, 1.0], [float("nan")] * 3])
    out = nm.top_names(concepts_KE, names_VE, vocab, top=3)
    # latent 0: cos red .8, green .6, blue 0, car (.8+.6)/sqrt2 = .98995 -> car, red, green
    assert out.name[0] == "car" and out.names[0] == ("car", "red", "green")
    assert out.score[0] == pytest.approx(1.4 / math.sqrt(2), abs=1e-6)
    # latent 1: blue 1, then red / green / car all 0 -> ties keep vocabulary order
    assert out.names[1] == ("blue", "red", "green") and out.score[1] == pytest.approx(1.0)
    assert out.name[2] == "" and math.isnan(out.score[2]) and out.names[2] == ()
    assert nm.top_names(concepts_KE, names_VE, vocab, top=10).names[0] == ("car", "red", "green", "blue")
    table = nm.with_names(LatentsTable([LatentRow(1, 0.5), LatentRow(2, 0.1)]), out)
    assert table.rows[0].name == "blue" and table.rows[0].names == ("blue", "red", "green")
    assert table.rows[1].name == "" and table.rows[1].ms == 0.1


class _ClassEmbedder:
    """Text side of a test CLIP: a prompt naming planted class c -> e_c; any other name -> its own axis."""

    def __init__(self, vocab: list[str]):
        self.axis = {n: i for i, n in enumerate(vocab)}

    def embed_text(self, prompts):
        out = torch.zeros(len(prompts), len(self.axis))
        for row, prompt in enumerate(prompts):
            (name,) = [n for n in self.axis if f" {n}." in prompt]
            out[row, self.axis[name]] = 1.0
        return out


def test_planted_class_names_come_out_on_top_on_the_concept_images(tmp_path):
    from vlmsae.data.concepts import concept_classes, make_concept_images

    root = make_concept_images(tmp_path / "concepts", n_per_class=3, size=16, seed=0)
    classes = concept_classes()
    keys = sorted(str(p.relative_to(root)) for p in root.rglob("*.png"))
    label_N = torch.tensor([classes.index(k.split("/")[0]) for k in keys])
    vocab = [c.replace("_", " ") for c in classes] + ["dog", "car"]  # planted names, then distractors
    # image embedding: one-hot-ish of the planted class (the direction its name's text embedding points to)
    gen = torch.Generator().manual_seed(0)
    emb_NE = torch.nn.functional.one_hot(label_N, len(vocab)).float() + 0.05 * torch.rand(
        len(keys), len(vocab), generator=gen
    )
    # latent c fires on class c's images (plus, for latent 0, one image of class 1: still mostly class 0); last: dead
    idx_KX = torch.full((len(classes) + 1, 4), -1)
    for c in range(len(classes)):
        idx_KX[c, :3] = (label_N == c).nonzero()[:, 0]
    idx_KX[0, 3] = int((label_N == 1).nonzero()[0, 0])
    (tmp_path / "vocab.txt").write_text("\n".join(vocab))
    templates = ["a photo of a {}.", "a close-up photo of a {}."]
    namer = nm.LatentNamer.build(str(tmp_path / "vocab.txt"), templates, 3, _ClassEmbedder(vocab), "test")
    out = namer.name_from_embeddings(emb_NE, idx_KX)
    assert out.name[: len(classes)] == vocab[: len(classes)]  # every single-class latent: its planted name
    assert out.names[0][:2] == (vocab[0], vocab[1])  # the mixed-in class comes second
    assert all(s > 0.9 for s in out.score[1 : len(classes)]) and out.score[0] < out.score[1]
    assert out.name[-1] == "" and math.isnan(out.score[-1])
    summary = namer.study_summary(out)
    assert summary["n_named"] == len(classes) and summary["n_names"] == len(vocab)


def test_vocabulary_file_and_its_refusals(tmp_path):
    fpath = tmp_path / "names.txt"
    fpath.write_text("# colours\nred\n\ngolden_retriever\nred\n  blue  \n")
    assert nm.load_vocabulary(str(fpath)) == ["red", "golden retriever", "blue"]
    with pytest.raises(FileNotFoundError, match=r"nowhere\.txt is not a file.*names=imagenet, names=wordnet"):
        nm.load_vocabulary(str(tmp_path / "nowhere.txt"))
    (tmp_path / "empty.txt").write_text("\n# nothing\n")
    with pytest.raises(ValueError, match=r"empty\.txt holds no names.*one name per line"):
        nm.load_vocabulary(str(tmp_path / "empty.txt"))
    (tmp_path / "pipe.txt").write_text("a|b\n")
    with pytest.raises(ValueError, match=r"'a\|b'.*remove it"):
        nm.load_vocabulary(str(tmp_path / "pipe.txt"))
    with pytest.raises(ValueError, match="exactly one"):
        nm.name_embeddings(["a"], ["a photo"], lambda p: torch.ones(len(p), 2))
    with pytest.raises(ValueError, match="names_top=0"):
        nm.top_names(torch.ones(1, 2), torch.ones(1, 2), ["a"], top=0)


def test_builtin_vocabularies():
    imagenet = nm.load_vocabulary("imagenet")
    assert len(imagenet) == 1000 and imagenet[0] == "tench"
    assert nm.wordnet_nouns(FIX / "wordnet") == [
        "animal",
        "canine",
        "cyprinid",
        "dog",
        "domestic animal",
        "fish",
        "golden retriever",
        "goldfish",
        "living thing",
        "object",
        "organism",
        "physical entity",
        "tench",
        "vertebrate",
        "whole",
    ]  # below "physical entity", lowercase: no "entity" (above it), no Chihuahua / Sirius (proper nouns)


def test_an_embedder_without_a_text_side_is_refused(tmp_path):
    spec = {"name": "pixels", "backend": "pixels", "arch": "pixels"}
    with pytest.raises(ValueError, match=r"embedder=pixels has no text side.*embedder=clip_b32.*names=null"):
        nm.build_namer("imagenet", ["a photo of a {}."], 3, spec)
    assert nm.build_namer(None, [], 3, spec) is None  # names=null: nothing loaded

"""The steering score (SPEC 5): the maths on known embeddings, and ``vlmsae.steer_eval.run`` end to end on
the tiny LLaVA, the tiny CLIP embedder and a top-images index of generated images."""

from __future__ import annotations

import csv
import json
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


@pytest.fixture
def eval_setup(tmp_path, monkeypatch):
    """A tiny SAE at block 2, 12 generated colour images, and a top-images index for latents 0..2."""
    from PIL import Image

    from vlmsae.metrics.topimages import TopImages
    from vlmsae.sae import SAEConfig, build_sae, save_sae

    monkeypatch.setenv("VLMSAE_HOME", str(tmp_path / "home"))
    sae_dpath = save_sae(build_sae(SAEConfig(arch="topk", d_in=32, n_latents=64, k=8), seed=0), tmp_path / "sae",
                         source={"model": "tiny_llava", "layer": 2})
    colours = ["red", "green", "blue", "yellow", "white", "black", "orange", "purple", "cyan", "pink", "gray", "brown"]
    img_dpath = tmp_path / "images"
    img_dpath.mkdir()
    paths = []
    for i, c in enumerate(colours):
        p = img_dpath / f"{i:02d}_{c}.png"
        Image.new("RGB", (32, 32), c).save(p)
        paths.append(str(p))
    image_idx = torch.full((64, 4), -1, dtype=torch.long)
    acts = torch.zeros(64, 4)
    for j in range(3):
        image_idx[j] = torch.arange(4) + 4 * j
        acts[j] = torch.tensor([4.0, 3.0, 2.0, 1.0])
    acts[2, 3] = 0.0  # a zero activation: never part of a concept
    labels = [i // 4 for i in range(12)]
    top_dpath = TopImages(image_idx, acts, keys=colours, paths=paths, labels=labels).save(tmp_path / "top_images")
    names_fpath = tmp_path / "names.txt"
    names_fpath.write_text("cat\ndog\ncar\n")
    return sae_dpath, top_dpath, img_dpath, names_fpath


def test_steer_eval_run(compose_cfg, eval_setup, tmp_path):
    from vlmsae.models.embedders import load_embedder
    from vlmsae.models.llava import load_llava_spec
    from vlmsae.steer_eval import run
    from vlmsae.sae import load_sae
    from vlmsae.steering import generate_answers, steer

    sae_dpath, top_dpath, img_dpath, names_fpath = eval_setup
    cfg = compose_cfg("steer_eval", [
        f"sae_path={sae_dpath}", f"top_images={top_dpath}", f"images={img_dpath}", "n_images=3",
        "latents=[0,1,2]", "alpha=60", "embedder=tiny", f"class_names={names_fpath}", "batch_size=4",
        "max_new_tokens=3", "top_n=16", "compare_add=true",
    ])
    out = run(cfg, out_dpath=tmp_path / "run")
    run_dpath = tmp_path / "run"
    saved = json.loads((run_dpath / "steer_eval.json").read_text())
    assert set(saved["summary"]) == {"steered", "not steered", "activation steering (add)",
                                     "upper bound (true class names)", "lower bound (shuffled names)"}
    assert saved["summary"]["steered"]["n"] == saved["summary"]["not steered"]["n"] == 9  # 3 latents x 3 images
    assert saved["settings"]["n_images"] == 3
    assert saved["summary"]["upper bound (true class names)"]["n"] == 11  # 4 + 4 + 3 nonzero top images
    for s in saved["summary"].values():
        assert -1.0 <= s["mean"] <= 1.0
    assert [p["n_top_images"] for p in saved["per_latent"]] == [4, 4, 3]
    assert "| steered |" in (run_dpath / "steer_eval.md").read_text()
    assert (run_dpath / "run_info.json").exists()
    rows = list(csv.DictReader((run_dpath / "answers.csv").open()))
    assert len(rows) == 9 and out["table"].startswith("| condition |")

    # Recompute one row by hand: the per-sample batched steering equals steering that image alone,
    # and the score is the cosine of the word's text embedding with the concept.
    model, processor = load_llava_spec(dict(cfg.model))
    sae = load_sae(sae_dpath)
    from PIL import Image

    row = rows[7]  # latent 2, third image (a batch that mixes latents 1 and 2)
    assert int(row["latent"]) == 2
    with steer(model, sae, {2: 60.0}):
        alone = generate_answers(model, processor, [Image.open(row["image"]).convert("RGB")], cfg.prompt, 3)[0]
    assert alone == row["steered_answer"]
    embedder = load_embedder(cfg.embedder)
    concept = concept_embeddings([[Image.open(f"{img_dpath}/{n}") for n in ("08_cyan.png", "09_pink.png", "10_gray.png")]],
                                 embedder.embed)[0]
    if row["steered_word"]:
        text = embedder.embed_text([row["steered_word"]])[0]
        expected = torch.nn.functional.cosine_similarity(text, concept, dim=0).item()
        assert float(row["steered_score"]) == pytest.approx(expected, abs=1e-3)


def test_steer_eval_bad_inputs(compose_cfg, eval_setup, tmp_path):
    from vlmsae.steer_eval import run
    from vlmsae.steering.evaluate import latent_list

    sae_dpath, top_dpath, _, _ = eval_setup
    assert latent_list(3) == [0, 1, 2]
    cfg = compose_cfg("steer_eval", [f"sae_path={sae_dpath}", f"top_images={tmp_path}", "embedder=tiny"])
    with pytest.raises(FileNotFoundError, match="top.safetensors"):
        run(cfg, out_dpath=tmp_path / "bad")
    cfg.top_images = str(top_dpath)
    cfg.latents = [70]
    with pytest.raises(ValueError, match="Latent 70"):
        run(cfg, out_dpath=tmp_path / "bad")


# --- Concept images are decoded latent by latent (issue #12 item 9) -------------------------------------------


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

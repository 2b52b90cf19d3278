"""Inspecting images (vlmsae.studies.inspection) on planted concepts: the SAE latent matched to a planted colour is
among an image's top latents and its heatmap peaks where the colour was drawn; compare, query and the refusals."""

from __future__ import annotations

import math

import pytest
import torch

from vlmsae.studies import inspection as ins

GRID, PATCH = 8, 8  # the planted tap's 8 x 8 grid of 8 px patches (tests/conftest.py)
GREY = (128, 128, 128)


def _draw(boxes: dict[str, tuple[int, int, int, int]], seed: int = 0):
    """A 64 px grey noisy image with a filled rectangle of each planted colour at (x0, y0, x1, y1) pixels."""
    import numpy as np
    from PIL import Image, ImageDraw

    from vlmsae.data.concepts import COLOURS

    rng = np.random.default_rng(seed)
    noise = np.clip(rng.normal(GREY, 8, (64, 64, 3)), 0, 255).astype(np.uint8)
    image = Image.fromarray(noise, "RGB")
    draw = ImageDraw.Draw(image)
    for colour, box in boxes.items():
        draw.rectangle(box, fill=COLOURS[colour])
    return image


def _patches_of(box: tuple[int, int, int, int]) -> set[int]:
    """Row-major indices of the patches a pixel box covers (wholly or in part)."""
    x0, y0, x1, y1 = box
    return {r * GRID + c for r in range(y0 // PATCH, y1 // PATCH + 1) for c in range(x0 // PATCH, x1 // PATCH + 1)}


def _open(sae_dpath, pool=None):
    """The SAE at ``sae_dpath`` on the model its source names (the planted tap, by the fixture), as the job opens it."""
    from vlmsae.models.open_sae import load_job_sae, open_tapped_sae

    return open_tapped_sae(load_job_sae(sae_dpath), pool=pool, sae_dpath=sae_dpath)


def _source(planted_sae):
    sae_dpath, latent_of = planted_sae
    return _open(sae_dpath), latent_of


def test_the_matched_latent_is_a_top_latent_and_peaks_where_its_colour_was_drawn(planted_sae, planted_tap):
    src, latent_of = _source(planted_sae)
    assert src.pool == "mean" and src.layer == 2  # a patch SAE: mean over the patch tokens, its recorded layer
    red_box, blue_box = (40, 0, 63, 15), (0, 40, 15, 63)  # top right (rows 0-1, cols 5-7) and bottom left
    image = _draw({"red": red_box, "blue": blue_box})
    found = ins.inspect_image(src, image, top_n=3, key="two")
    red, blue = latent_of[planted_tap.colours.index("red")], latent_of[planted_tap.colours.index("blue")]
    assert found.grid == GRID and found.n_rows == GRID * GRID
    assert {red, blue} <= {h.latent for h in found.top_pooled}
    assert {red, blue} <= {h.latent for h in found.top_peak}
    assert found.top_pooled[0].pooled >= found.top_pooled[-1].pooled  # best first
    for latent, box in ((red, red_box), (blue, blue_box)):
        hit = found.hit(latent)
        assert hit.heat_P.shape == (GRID * GRID,)
        assert hit.peak_patch in _patches_of(box) and hit.peak == pytest.approx(float(hit.heat_P.max()))
        # the heatmap is zero away from the drawn colour: a transposed or shifted grid would not be
        outside = [p for p in range(GRID * GRID) if p not in _patches_of(box)]
        assert float(hit.heat_P[outside].max()) < 0.05 * hit.peak
        assert hit.pooled == pytest.approx(float(hit.heat_P.mean()), rel=1e-5)  # mean pooling counts the zeros
    # the planted dictionary reconstructs the image's tokens well (not exactly: the random atoms are not orthogonal)
    assert 0.8 < found.fve < 1 and found.nmse < 0.1
    # a colour not in the image is no hit at all
    yellow = latent_of[planted_tap.colours.index("yellow")]
    assert yellow not in {h.latent for h in found.top_pooled} and found.hit(yellow).peak == 0


def test_compare_names_the_latent_of_the_colour_only_one_image_holds(planted_sae, planted_tap):
    src, latent_of = _source(planted_sae)
    a = ins.inspect_image(src, _draw({"red": (8, 8, 40, 40), "green": (48, 48, 63, 63)}), key="a")
    b = ins.inspect_image(src, _draw({"blue": (8, 8, 40, 40), "green": (48, 48, 63, 63)}, seed=1), key="b")
    out = ins.compare_images(a, b, top_n=2)
    colour = planted_tap.colours.index
    assert out["a_over_b"][0]["latent"] == latent_of[colour("red")]
    assert out["b_over_a"][0]["latent"] == latent_of[colour("blue")]
    green = latent_of[colour("green")]
    assert green not in [r["latent"] for r in out["a_over_b"] + out["b_over_a"]][:1]
    row = out["a_over_b"][0]
    assert row["diff"] == pytest.approx(row["a"] - row["b"]) and row["diff"] > 0


def test_an_sae_without_patch_rows_has_no_heatmap(planted_sae, planted_tap):
    src = _open(planted_sae[0], pool="cls")
    found = ins.inspect_image(src, _draw({"red": (0, 0, 31, 31)}), top_n=2)
    assert found.grid is None and found.n_rows == 1 and math.isnan(found.fve)
    assert all(h.peak_patch == -1 and h.heat_P.numel() == 0 and h.peak == h.pooled for h in found.top_pooled)


class _ColourCLIP:
    """Image side: the share of pixels near each planted colour; text side: the colour a prompt names."""

    def __init__(self, colours, rgb_A3):
        self.colours, self.rgb_A3 = colours, rgb_A3
        self.n_embedded = 0

    def embed(self, images):
        import numpy as np

        self.n_embedded += len(images)
        px = [torch.from_numpy(np.asarray(im, dtype=np.float32).reshape(-1, 3)) for im in images]
        return torch.stack([(torch.cdist(p, self.rgb_A3) < 60).float().mean(0) for p in px])

    def embed_text(self, prompts):
        return torch.stack([torch.tensor([float(f" {c}." in p) for c in self.colours]) + 0.01 for p in prompts])


def test_query_returns_the_latent_named_for_the_word_first(planted_tap, tmp_path):
    from vlmsae.metrics.topimages import TopImages
    from vlmsae.studies.naming import LatentNamer

    # latent k's top images: images of colour k % 4 (latents 0-3 and 4-7 alike, the second set with a distractor)
    paths, idx = [], []
    for k in range(8):
        colour = planted_tap.colours[k % 4]
        row = []
        for i in range(3):
            fpath = tmp_path / f"{k}_{i}.png"
            other = {"green": (0, 0, 20, 20)} if k >= 4 and colour != "green" else {}
            _draw({colour: (24, 24, 63, 63), **other}, seed=10 * k + i).save(fpath)
            row.append(len(paths))
            paths.append(str(fpath))
        idx.append(row)
    top = TopImages(torch.tensor(idx), torch.ones(8, 3), [str(p) for p in paths], paths=paths)
    clip = _ColourCLIP(planted_tap.colours, planted_tap.rgb_A3)
    concepts_KE = ins.latent_concepts(top, clip.embed, batch_size=5)
    assert clip.n_embedded == len(paths)  # each distinct top image embedded once
    (tmp_path / "vocab.txt").write_text("\n".join(planted_tap.colours))
    namer = LatentNamer.build(str(tmp_path / "vocab.txt"), ["a photo of a {}."], 1, clip, "test")
    names = namer.name(concepts_KE)
    for word in planted_tap.colours:
        hits = ins.query_latents(concepts_KE, ins.query_text_embedding(word, clip.embed_text), top_n=3)
        assert names.name[hits[0][0]] == word, (word, hits, names.name)
        assert hits[0][1] >= hits[1][1] >= hits[2][1]
        assert hits[0][0] < 4  # the pure latent beats its copy with a distractor
    with pytest.raises(ValueError, match="query= is empty"):
        ins.query_text_embedding("  ", clip.embed_text)


def test_images_as_file_folder_list_and_the_refusals(tmp_path):
    for i in range(2):
        _draw({"red": (0, 0, 9, 9)}, seed=i).save(tmp_path / f"im{i}.png")
    listing = tmp_path / "list.txt"
    listing.write_text("im1.png\n")
    assert [k for k, _ in ins.list_images(str(tmp_path / "im0.png"))] == ["im0.png"]
    assert [k for k, _ in ins.list_images(str(tmp_path))] == ["im0.png", "im1.png"]
    assert [p for _, p in ins.list_images([str(listing)])] == [str(tmp_path / "im1.png")]
    notes = tmp_path / "notes.pdf"
    notes.write_text("not an image")
    (fpath,) = [p for _, p in ins.list_images(str(notes))]
    with pytest.raises(ValueError, match=r"notes\.pdf is not an image vlmsae can read.*Pass image files"):
        ins.open_image(fpath)
    with pytest.raises(FileNotFoundError, match=r"nowhere.*neither a file nor a folder.*images="):
        ins.list_images(str(tmp_path / "nowhere"))

"""The LLaVA naming pass (vlmsae.studies.autointerp): the grid, which latents are asked, the score by hand, the
plumbing on the tiny random LLaVA (its words are gibberish), the refusals, and both jobs' ``autointerp=llava``."""

from __future__ import annotations

import math

import pytest
import torch

from vlmsae.formats import LatentRow, LatentsTable, read_latents_csv, write_latents_csv
from vlmsae.models.spec import get_model_spec
from vlmsae.studies import autointerp as ai
from vlmsae.studies import naming as nm

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


def _solid(colour, size=(40, 30)):
    from PIL import Image

    return Image.new("RGB", size, colour)


def _cell_centre(grid, i, cell):
    return grid.getpixel(((i % 3) * cell + cell // 2, (i // 3) * cell + cell // 2))


def test_grid_image_size_and_cells():
    colours = [RED, GREEN, BLUE, RED, GREEN, BLUE, RED, GREEN, BLUE, WHITE]  # 10 images: the 10th is left out
    grid = ai.grid_image([_solid(c) for c in colours], cell_px=20)
    assert grid.size == (60, 60) and grid.mode == "RGB"
    assert [_cell_centre(grid, i, 20) for i in range(9)] == colours[:9]  # row by row, each resized to its cell
    assert grid.getpixel((0, 0)) == RED and grid.getpixel((59, 59)) == BLUE  # a cell fills its square (resized)
    part = ai.grid_image([_solid(GREEN), _solid(BLUE)], cell_px=20)
    assert [_cell_centre(part, i, 20) for i in range(9)] == [GREEN, BLUE] + [ai.EMPTY_CELL] * 7
    empty = ai.grid_image([])  # a latent without top images: every cell empty
    assert empty.size == (3 * ai.CELL_PX,) * 2
    assert set(empty.getdata()) == {ai.EMPTY_CELL}


def test_pick_latents_highest_ms_first_with_images_only_up_to_the_cap():
    ms_K = torch.tensor([0.2, float("nan"), 0.9, 0.5, 0.7])
    has = [True, True, True, True, False]  # latent 4 (MS .7) has no top images
    assert ai.pick_latents(has, ms_K, 10) == [2, 3, 0, 1]  # NaN MS last
    assert ai.pick_latents(has, ms_K, 2) == [2, 3]
    assert ai.pick_latents(has, None, 3) == [0, 1, 2]


def _image_files(tmp_path, colours):
    paths = []
    for i, c in enumerate(colours):
        fpath = tmp_path / f"img{i}.png"
        _solid(c).save(fpath)
        paths.append(str(fpath))
    return paths


def _stub_embed_text(prompts):
    """Text side of a test CLIP: 'a photo of a red.' -> (2,0,0), 'a red.' -> (0,0,3); anything else -> (0,1,0)."""
    table = {"a photo of a red.": [2.0, 0.0, 0.0], "a red.": [0.0, 0.0, 3.0]}
    return torch.tensor([table.get(p, [0.0, 1.0, 0.0]) for p in prompts])


def test_interpret_scores_the_first_word_by_hand(tmp_path, monkeypatch):
    files = _image_files(tmp_path, [RED, GREEN, BLUE])
    paths_K = [[files[0], files[1]], [], [files[2]], [files[0]]]
    concepts_KE = torch.tensor([[0.6, 0.8, 0.0], [float("nan")] * 3, [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    ms_K = torch.tensor([0.9, 0.95, 0.1, 0.5])
    seen = []

    def ask(grids):
        seen.extend(grids)
        return ["Red, obviously.", "  ...!"][: len(grids)]

    pass_ = ai.AutoInterp(get_model_spec("tiny_llava"), max_latents=2, batch_size=4)
    monkeypatch.setattr(pass_, "ask", ask)
    templates = ("a photo of a {}.", "a {}.")
    words, scores = pass_.interpret(
        paths_K, concepts_KE, ms_K, lambda w: nm.name_embeddings(w, templates, _stub_embed_text)
    )
    # asked: latents 0 (MS .9) and 3 (MS .5); latent 1 has no images, latent 2 is past the cap
    assert len(seen) == 2 and all(g.size == (3 * ai.CELL_PX,) * 2 for g in seen)
    assert _cell_centre(seen[0], 0, ai.CELL_PX) == RED and _cell_centre(seen[0], 1, ai.CELL_PX) == GREEN
    assert _cell_centre(seen[0], 2, ai.CELL_PX) == ai.EMPTY_CELL
    assert words == ["red", "", "", ""]  # latent 3's answer has no word
    # "red": unit (1,0,0) + unit (0,0,1), averaged and renormalised -> (1,0,1)/sqrt2; concept (.6,.8,0) -> .6/sqrt2
    assert scores[0] == pytest.approx(0.6 / math.sqrt(2), abs=1e-6)
    assert all(math.isnan(s) for s in scores[1:])


def test_namer_fills_the_columns_and_latents_csv_keeps_them(tmp_path, monkeypatch):
    files = _image_files(tmp_path, [RED, GREEN])
    embedder = type("Stub", (), {"embed_text": staticmethod(_stub_embed_text)})()
    autointerp = ai.AutoInterp(get_model_spec("tiny_llava"), max_latents=5)
    monkeypatch.setattr(autointerp, "ask", lambda grids: ["Red."] * len(grids))
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("red\nblue\n")
    namer = nm.LatentNamer.build(str(vocab), ["a photo of a {}.", "a {}."], 1, embedder, "stub", autointerp=autointerp)
    with pytest.raises(ValueError, match="records no paths"):
        namer.name_from_embeddings(torch.eye(2, 3), torch.tensor([[0, 1]]))
    emb_NE = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    names = namer.name_from_embeddings(emb_NE, torch.tensor([[0, 1], [-1, -1]]), files, torch.tensor([0.3, 0.1]))
    assert names.autointerp == ["red", ""] and names.autointerp_score[0] == pytest.approx(1.0)  # concept (1,0,1)/sqrt2
    summary = names.summary(torch.tensor([0.3, 0.1]))
    assert summary["n_autointerp"] == 1 and summary["top_latents"][0]["autointerp"] == "red"
    write_latents_csv(tmp_path, nm.with_names(LatentsTable([LatentRow(0, 0.3), LatentRow(1, 0.1)]), names))
    assert (tmp_path / "latents.csv").read_text().splitlines()[1].endswith(",names,autointerp,autointerp_score")
    rows = read_latents_csv(tmp_path).rows
    assert rows[0].autointerp == "red" and rows[0].autointerp_score == pytest.approx(1.0)
    assert rows[1].autointerp == "" and math.isnan(rows[1].autointerp_score)


def test_on_the_tiny_llava_every_asked_latent_gets_an_answer_and_a_score(tmp_path, monkeypatch):
    monkeypatch.setenv("VLMSAE_HOME", str(tmp_path / "home"))
    files = _image_files(tmp_path, [RED, GREEN, BLUE])
    paths_K = [files, [files[1]], [], [files[2], files[0]]]
    concepts_KE = torch.nn.functional.normalize(torch.rand(4, 3), dim=1)
    pass_ = ai.build_autointerp("llava", "tiny_llava", 2, "imagenet")
    answers = []
    real_ask = pass_.ask

    def ask(grids):
        answers.extend(real_ask(grids))
        return answers[-len(grids) :]

    monkeypatch.setattr(pass_, "ask", ask)
    embed = lambda w: torch.nn.functional.normalize(torch.rand(len(w), 3), dim=1)  # noqa: E731
    words, scores = pass_.interpret(paths_K, concepts_KE, torch.tensor([0.1, 0.9, 0.95, 0.5]), embed)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)  # latents 1 and 3; 2 has no images
    assert words[0] == words[2] == "" and math.isnan(scores[0]) and math.isnan(scores[2])
    for k, answer in ((1, answers[0]), (3, answers[1])):
        assert words[k] == ai.first_word(answer)
        assert math.isfinite(scores[k]) == bool(words[k])  # a word is scored; gibberish without letters is not


def test_bad_choices_are_refused_with_the_fix():
    assert ai.build_autointerp(None, "tiny", 0, None) is None  # off: nothing checked
    with pytest.raises(ValueError, match=r"autointerp='gpt' is not a choice: use one of \['llava'\]"):
        ai.build_autointerp("gpt", "tiny_llava", 5, "imagenet")
    with pytest.raises(ValueError, match=r"autointerp_model=tiny is a open_clip model, not a LLaVA.*llava15_7b"):
        ai.build_autointerp("llava", "tiny", 5, "imagenet")
    with pytest.raises(ValueError, match="Unknown model 'lava'"):
        ai.build_autointerp("llava", "lava", 5, "imagenet")
    with pytest.raises(ValueError, match="autointerp_max_latents=0"):
        ai.build_autointerp("llava", "tiny_llava", 0, "imagenet")
    with pytest.raises(ValueError, match="pass names=imagenet"):
        ai.build_autointerp("llava", "tiny_llava", 5, None)


def _tiny_sae(tmp_path):
    from vlmsae.sae import SAEConfig, build_sae, save_sae

    sae = build_sae(SAEConfig(arch="topk", d_in=64, n_latents=32, k=4), seed=0)
    return save_sae(
        sae, tmp_path / "sae", trained_on={"model": "tiny", "pretrained": None, "layer": 2, "tokens": "cls"}
    )


def test_both_jobs_write_the_columns(compose_cfg, tmp_path, monkeypatch):
    from vlmsae import monosemanticity, names

    monkeypatch.setenv("VLMSAE_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(ai.AutoInterp, "ask", lambda self, grids: ["Circle!"] * len(grids))  # no LLaVA loads
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("circle\nsquare\nred\n")
    base = [
        f"sae_path={_tiny_sae(tmp_path)}", "data=tiny", "data.n_per_class=2", "embedder=tiny", "progress=false",
        f"embed_cache={tmp_path / 'cache'}", "top_k=4", "baseline=false",
    ]  # fmt: skip
    ai_keys = ["autointerp=llava", "autointerp_model=tiny_llava", "autointerp_max_latents=3"]
    with pytest.raises(ValueError, match="pass names=imagenet"):
        monosemanticity.run(compose_cfg("monosemanticity", [*base, *ai_keys]), out_dpath=tmp_path / "x")
    ms = tmp_path / "ms"
    summary = monosemanticity.run(compose_cfg("monosemanticity", [*base, f"names={vocab}", *ai_keys]), out_dpath=ms)
    rows = read_latents_csv(ms).rows
    asked = [r for r in rows if r.autointerp]
    assert len(asked) == 3 == summary["names"]["n_autointerp"] and {r.autointerp for r in asked} == {"circle"}
    live = sorted((r for r in rows if r.top_keys), key=lambda r: (math.isnan(r.ms), -r.ms if r.ms == r.ms else 0))
    assert [r.latent for r in asked] == sorted(r.latent for r in live[:3])  # the three highest MS
    assert all(r.autointerp_score == pytest.approx(r.name_score, abs=1e-5) for r in asked if r.name == "circle")

    with pytest.raises(ValueError, match="autointerp='x' is not a choice"):
        names.run(compose_cfg("names", [f"ms_run={ms}", f"names={vocab}", "autointerp=x"]), out_dpath=tmp_path / "y")
    cfg = compose_cfg("names", [f"ms_run={ms}", f"names={vocab}", *ai_keys[:2], "autointerp_max_latents=1"])
    monkeypatch.setattr(ai.AutoInterp, "ask", lambda self, grids: ["Square"] * len(grids))
    assert names.run(cfg, out_dpath=tmp_path / "names_run")["n_autointerp"] == 1
    again = read_latents_csv(ms).rows
    assert [r.autointerp for r in again if r.autointerp] == ["square"] and again[live[0].latent].autointerp == "square"

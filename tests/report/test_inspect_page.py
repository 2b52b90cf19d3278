"""The inspect page (vlmsae.report.inspect_page): heatmaps drawn where the activations are, labels escaped."""

from __future__ import annotations

from vlmsae.formats import InspectResult
from vlmsae.report import inspect_page


def _result(image_fpath, key: str = "a.png", name: str = "zebra") -> InspectResult:
    heat = [0.0] * 16
    heat[3] = 2.0  # row 0, col 3: the top-right patch of a 4 x 4 grid
    hit = {"latent": 5, "pooled": 0.125, "peak": 2.0, "peak_patch": 3, "heat": heat}
    image = {"key": key, "path": str(image_fpath), "fve": 0.5, "nmse": 0.1, "n_rows": 16, "grid": 4}
    latents = {"5": {"name": name, "names": [name, "horse"], "ms": 0.8, "freq": 0.01, "group": 1,
                     "top_paths": [str(image_fpath)]}}  # fmt: skip
    return InspectResult([{**image, "top_pooled": [hit], "top_peak": [dict(hit)]}], latents, settings={"layer": 2})


def test_heatmap_is_drawn_on_the_patch_that_fired(tmp_path):
    from PIL import Image

    Image.new("RGB", (64, 64), (128, 128, 128)).save(tmp_path / "a.png")
    result = inspect_page.draw_images(_result(tmp_path / "a.png"), tmp_path / "out", thumb_px=64)
    hit = result.images[0]["top_pooled"][0]
    overlay = Image.open(tmp_path / "out" / hit["heat_png"]).convert("RGB")
    assert overlay.size == (64, 64)
    assert overlay.getpixel((56, 8)) != overlay.getpixel((8, 56))  # top right coloured, bottom left still grey
    assert max(abs(a - 128) for a in overlay.getpixel((8, 56))) < 8
    assert result.latents["5"]["top"] and "top_paths" not in result.latents["5"]
    page = inspect_page.write_page(result, tmp_path / "out").read_text()
    assert hit["heat_png"] in page and 'id="latent-5"' in page and "also: horse" in page


def test_labels_reach_the_page_as_text(tmp_path):
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    result = _result(tmp_path / "a.png", key="<script>alert(1)</script>.png", name='"><img src=x onerror=alert(2)>')
    page = inspect_page.write_page(inspect_page.draw_images(result, tmp_path / "out"), tmp_path / "out").read_text()
    assert "<script" not in page and "<img src=x" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;.png" in page


def test_table_rows_for_the_logger(tmp_path):
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    result = inspect_page.draw_images(_result(tmp_path / "a.png"), tmp_path / "out")
    fpath = inspect_page.write_table(result, tmp_path / "out")
    header, row = fpath.read_text().splitlines()
    assert header == "image,rank,latent,name,pooled,peak,ms,freq,group,fve,heatmap"
    assert row.startswith("a.png,0,5,zebra,0.125,2.0,0.8,0.01,1,0.5,") and row.endswith(".png")

"""The feature browser at scale: 3,000 latents in three chunk files (1,024 cards each), thumbnails shared by
the cards, latent names, and in headless Chromium the last latent reached by scrolling and by search.

The run is the bench's synthetic MS run (:func:`vlmsae.bench.browser.write_synthetic_run`) at a small size.
Names come from latents.csv's ``name`` / ``names`` columns when the formats module has them; until then the
reader is wrapped to hand rows with those attributes to the browser, which reads them defensively.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from vlmsae import formats
from vlmsae.bench.browser import latent_name, write_synthetic_run
from vlmsae.report import browser
from vlmsae.report.browser import build_browser, find_runs, latent_rows
from vlmsae.report.cdp import Chrome

N_LATENTS, N_IMAGES, TOP_K, CHUNK = 3000, 300, 4, 1024
LAST = N_LATENTS - 1  # dead: it sorts last by MS


_READ_LATENTS = formats.read_latents_csv


def _read_with_names(path):
    table = _READ_LATENTS(path)
    rows = [
        SimpleNamespace(
            **{**dataclasses.asdict(r), "name": latent_name(r.latent), "names": [latent_name(r.latent), "alt"]}
        )
        for r in table.rows
    ]
    return SimpleNamespace(rows=rows)


@pytest.fixture(scope="module")
def big(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("scale")
    ms_dpath = write_synthetic_run(root / "run", N_LATENTS, N_IMAGES, top_k=TOP_K)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(browser.formats, "read_latents_csv", _read_with_names)
        data = build_browser(find_runs(ms_dpath), root / "browser", chunk_size=CHUNK, thumb_px=32, heatmaps="off")
    return root / "browser", data


def _chunk(fpath: Path) -> dict:
    text = fpath.read_text()
    assert text.startswith("vlmsaeChunk(") and text.endswith(");\n"), fpath
    return json.loads(text[len("vlmsaeChunk(") : -len(");\n")])


def _page_data(out: Path) -> dict:
    text = (out / "index.html").read_text()
    return json.loads(re.search(r'<script type="application/json" id="browser-data">(.*?)</script>', text, re.S)[1])


def test_chunks_hold_every_latent_once_and_thumbnails_are_shared(big):
    out, data = big
    fpaths = sorted((out / "chunks").glob("*.js"))
    assert [f.name for f in fpaths] == ["c00000.js", "c00001.js", "c00002.js"]
    chunks = [_chunk(f) for f in fpaths]
    assert [c["chunk"] for c in chunks] == [0, 1, 2]
    assert [len(c["cards"]) for c in chunks] == [CHUNK, CHUNK, N_LATENTS - 2 * CHUNK]
    latents = [card["latent"] for c in chunks for card in c["cards"]]
    assert sorted(latents) == list(range(N_LATENTS))  # every latent, exactly once
    assert latents == [c["latent"] for c in data["cards"]] and latents[-1] == LAST  # chunk order = MS order

    # Each image's thumbnail is written once and named by its index; cards refer to images by index.
    shown = {image for c in chunks for card in c["cards"] for image, _ in card["top"]}
    thumbs = sorted(p.name for p in (out / "img").iterdir())
    assert thumbs == [f"{i:07d}.jpg" for i in sorted(shown)]
    n_slots = sum(len(card["top"]) for c in chunks for card in c["cards"])
    assert n_slots == (N_LATENTS - 1) * TOP_K and len(thumbs) <= N_IMAGES < n_slots
    for c in chunks:  # each chunk describes each of its images once, with its key, caption and thumbnail flag
        used = {str(image) for card in c["cards"] for image, _ in card["top"]}
        assert set(c["images"]) == used and all(v[2] == 1 for v in c["images"].values())

    # index.html holds the search index of all cards, not their images.
    page = _page_data(out)
    assert "chunks" not in page and page["inline"] is False and page["n_chunks"] == 3
    assert page["index"]["latent"] == latents
    assert page["index"]["name"][-1] == latent_name(LAST) and latent_name(LAST) in page["index"]["text"][-1]
    assert (out / "index.html").stat().st_size < sum(f.stat().st_size for f in fpaths) / 2
    assert chunks[2]["cards"][-1]["names"] == [latent_name(LAST), "alt"]


def test_a_small_browser_stays_one_inline_file(big, tmp_path: Path):
    _, data = big
    sources, out = find_runs(Path(data["sources"]["ms"])), tmp_path / "b"
    chunked = build_browser(sources, out, max_cards=40, max_inline=0, chunk_size=16, heatmaps="off", thumb_px=32)
    assert chunked["inline"] is False and len(list((out / "chunks").iterdir())) == 3
    small = build_browser(sources, out, max_cards=40, heatmaps="off", thumb_px=32)
    assert small["inline"] is True and not (out / "chunks").exists()  # the earlier build's chunks are gone
    page = _page_data(out)
    assert [card["latent"] for c in page["chunks"] for card in c["cards"]] == [c["latent"] for c in small["cards"]]
    with pytest.raises(ValueError, match="chunk_size=0"):
        build_browser(sources, tmp_path / "c", chunk_size=0)
    with pytest.raises(ValueError, match="max_cards=0"):
        build_browser(sources, tmp_path / "c", max_cards=0)


def test_thumbnails_through_the_process_pool_match_in_process(big, tmp_path: Path, monkeypatch):
    _, data = big
    run_dpath = Path(data["sources"]["ms"]).parent
    sources = [(i, str(run_dpath / "images" / f"{i:06d}.jpg")) for i in range(20)] + [(99, str(tmp_path / "none.jpg"))]
    (tmp_path / "serial").mkdir(), (tmp_path / "pool").mkdir()
    serial = browser.write_thumbnails(sources, tmp_path / "serial", 16, workers=1)
    monkeypatch.setattr(browser, "POOL_MIN_IMAGES", 1)
    pooled = browser.write_thumbnails(sources, tmp_path / "pool", 16, workers=2)
    assert serial == pooled == set(range(20))  # the unreadable image is left out, not an error
    assert sorted(p.name for p in (tmp_path / "pool").iterdir()) == [f"{i:07d}.jpg" for i in range(20)]
    assert all((tmp_path / "pool" / n).read_bytes() == (tmp_path / "serial" / n).read_bytes() for n in ["0000003.jpg"])


def test_latent_rows_read_names_when_present():
    base = {"latent": 1, "ms": 0.5, "freq": 0.1, "max_act": 2.0, "group": 0, "top_keys": ("a",)}
    without, with_tuple, with_text = (
        SimpleNamespace(**base),
        SimpleNamespace(**base, name=" tabby cat ", names=("tabby cat", "cat")),
        SimpleNamespace(**base, name=None, names="dog|puppy"),
    )
    rows = latent_rows(SimpleNamespace(rows=[without, with_tuple, with_text]))
    assert [(r["name"], r["names"]) for r in rows] == [
        ("", []),
        ("tabby cat", ["tabby cat", "cat"]),
        ("", ["dog", "puppy"]),
    ]


def test_wandb_table_keeps_the_top_cards(big):
    pytest.importorskip("wandb")
    from vlmsae.report.browser import wandb_table

    out, data = big
    table = wandb_table(data, out, images_per_row=2, max_rows=5)
    assert [row[0] for row in table.data] == [c["latent"] for c in data["cards"][:5]]
    assert table.data[0][table.columns.index("name")] == latent_name(data["cards"][0]["latent"])


def _wait(chrome: Chrome, expression: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not chrome.eval(expression):
        if time.monotonic() > deadline:
            raise AssertionError(f"the page never made {expression!r} true")
        time.sleep(0.05)


def _card_js(latent: int) -> str:
    return f"!!document.querySelector('#cards .card[data-latent=\"{latent}\"][data-loaded]')"


def _search(chrome: Chrome, text: str) -> None:
    chrome.eval(
        "(() => { const s = document.getElementById('search'); s.value = "
        + json.dumps(text)
        + "; s.dispatchEvent(new Event('input')); })()"
    )


FIRST_JS = "Number(document.querySelector('#cards .card').dataset.latent)"
N_DOM_JS = "document.querySelectorAll('#cards .card').length"


def test_last_latent_reachable_by_scrolling_and_search(big, chrome: Chrome):
    out, data = big
    url = (out / "index.html").resolve().as_uri()
    chrome.open(url)
    _wait(chrome, "document.body.dataset.ready === '1' && !!document.querySelector('#cards .card[data-loaded]')")
    assert chrome.eval("document.getElementById('count').textContent") == f"{N_LATENTS} / {N_LATENTS} cards"
    assert chrome.eval(FIRST_JS) == data["cards"][0]["latent"]
    assert 0 < chrome.eval(N_DOM_JS) < 100, "only the cards near the viewport are in the DOM"
    assert chrome.eval("document.querySelectorAll('script[src]').length") == 1  # chunk 0 only, so far
    assert not chrome.eval(_card_js(LAST))

    # Scrolling to the bottom renders the last card and loads its chunk.
    chrome.eval("window.scrollTo(0, document.documentElement.scrollHeight)")
    _wait(chrome, _card_js(LAST))
    assert chrome.eval(N_DOM_JS) < 100
    assert chrome.eval("document.querySelector('script[src=\"chunks/c00002.js\"]') !== null") is True
    label = f"document.querySelector('#cards .card[data-latent=\"{LAST}\"] .name').textContent"
    assert chrome.eval(label) == latent_name(LAST)

    # A fresh page: search by id, then by name, finds the last latent (its chunk loads on demand).
    chrome.open(url)
    _wait(chrome, "document.body.dataset.ready === '1'")
    _search(chrome, str(LAST))
    _wait(chrome, _card_js(LAST))
    assert chrome.eval(N_DOM_JS) == 1
    _search(chrome, "")
    _search(chrome, latent_name(LAST).upper())
    _wait(chrome, _card_js(LAST))
    assert chrome.eval(N_DOM_JS) == 1
    _search(chrome, "zebra")
    n_zebra = sum("zebra" in latent_name(k) for k in range(N_LATENTS))
    assert chrome.eval("document.getElementById('count').textContent") == f"{n_zebra} / {N_LATENTS} cards"

    # Sorting still works over all cards (not just the loaded chunks).
    _search(chrome, "")
    chrome.eval("window.scrollTo(0, 0)")
    chrome.eval("document.getElementById('sort-latent').click()")
    assert chrome.eval(FIRST_JS) == 0
    chrome.eval("document.getElementById('sort-latent').click()")
    assert chrome.eval(FIRST_JS) == LAST
    _wait(chrome, _card_js(LAST))

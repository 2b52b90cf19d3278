"""Benchmark of the feature browser at the paper's size: 65,536 live latents x 16 top images over 50,000 images.

A synthetic monosemanticity run (``latents.csv`` and ``top_images/`` through the :mod:`vlmsae.formats`
writers, 50,000 small generated JPEGs) is browsed with the job's defaults (every latent, 96 px thumbnails).
Recorded: the build time, the output size, and in headless Chromium (the system ``chromium``, driven by
:mod:`vlmsae.report.cdp`) the time until the first cards with their data are in the DOM after navigation
(``first_paint_s``, from the page's own ``performance.now()``) and the time a search takes to update the
list (``search_ms``: the median over a few queries, an id, a name, a substring of many names, clearing).
Without Chromium those two are null and ``<prefix>_chromium`` says why.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from vlmsae import formats
from vlmsae.report.browser import build_browser, find_runs
from vlmsae.report.cdp import Chrome, find_chromium

FULL = {"n_latents": 65_536, "n_images": 50_000, "top_k": 16}
QUICK = {"n_latents": 3_000, "n_images": 2_000, "top_k": 16}


def latent_name(latent: int) -> str:
    """The synthetic run's name of a latent: a word pair, so searches for a word match many latents."""
    words = ("zebra", "stripe", "wheel", "feather", "tower", "leaf", "wave", "fur", "window", "cloud", "sand")
    return f"{words[latent % len(words)]} {words[(latent // len(words)) % len(words)]} {latent}"


def write_synthetic_run(root: str | Path, n_latents: int, n_images: int, top_k: int = 16, seed: int = 0) -> Path:
    """An MS run folder ``root/ms`` (latents.csv + top_images/) over ``n_images`` generated 32 x 32 JPEGs
    in ``root/images``; the last latent is dead (it sorts last by MS)."""
    import torch
    from PIL import Image, ImageDraw

    root = Path(root)
    img_dpath, ms_dpath = root / "images", root / "ms"
    img_dpath.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    colours = torch.randint(0, 256, (n_images, 6), generator=g).tolist()
    paths, keys = [], []
    for i, c in enumerate(colours):
        img = Image.new("RGB", (32, 32), tuple(c[:3]))
        ImageDraw.Draw(img).rectangle((4 + i % 12, 6, 20 + i % 12, 24), fill=tuple(c[3:]))
        fpath = img_dpath / f"{i:06d}.jpg"
        img.save(fpath, quality=80)
        paths.append(str(fpath))
        keys.append(f"class_{i % 1000:04d}/{i:06d}.jpg")

    image_idx_KX = torch.randint(0, n_images, (n_latents, top_k), generator=g)
    acts_KX = torch.sort(torch.rand(n_latents, top_k, generator=g) * 5, dim=1, descending=True).values
    ms_K = torch.rand(n_latents, generator=g).tolist()
    freq_K = (torch.rand(n_latents, generator=g) * 0.05).tolist()
    rows = []
    for k in range(n_latents):
        dead = k == n_latents - 1
        rows.append(
            formats.LatentRow(
                latent=k,
                ms=math.nan if dead else ms_K[k],
                freq=0.0 if dead else freq_K[k],
                max_act=float(acts_KX[k, 0]),
                group=k % 4,
                top_keys=tuple(keys[i] for i in image_idx_KX[k, :3].tolist()),
                name=latent_name(k),
                names=(latent_name(k),),
            )
        )
    image_idx_KX[-1] = -1  # the dead latent fired on no image
    formats.write_latents_csv(ms_dpath, formats.LatentsTable(rows))
    formats.write_top_images(
        ms_dpath / formats.TOP_IMAGES_DIR,
        formats.TopImagesIndex(image_idx=image_idx_KX, acts=acts_KX, keys=keys, paths=paths, labels=None),
    )
    return ms_dpath


def folder_bytes(dpath: Path) -> tuple[int, int]:
    """(total bytes, number of files) under ``dpath``."""
    sizes = [f.stat().st_size for f in dpath.rglob("*") if f.is_file()]
    return sum(sizes), len(sizes)


def wait_for(chrome: Chrome, expression: str, timeout_s: float = 60.0) -> Any:
    """Poll ``expression`` in the page until it is truthy; its value, or TimeoutError naming it."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = chrome.eval(expression)
        if value:
            return value
        time.sleep(0.02)
    raise TimeoutError(f"the page never made {expression!r} true within {timeout_s:.0f} s")


# Type a query and return the milliseconds until the list is updated and laid out (the search is synchronous).
SEARCH_JS = """(() => {{ const s = document.getElementById('search'); const t0 = performance.now();
  s.value = {query}; s.dispatchEvent(new Event('input')); void document.body.offsetHeight;
  return performance.now() - t0; }})()"""


def measure_page(index_fpath: Path, last_latent: int, profile_dpath: Path) -> dict[str, Any]:
    """First paint and search times of a built browser in headless Chromium (null + reason without one)."""
    binary = find_chromium()
    if binary is None:
        return {"first_paint_s": None, "search_ms": None, "chromium": "no chromium on PATH (apt-get install chromium)"}
    chrome = Chrome(binary, profile_dpath)
    try:
        chrome.open(index_fpath.resolve().as_uri())
        first_paint_ms = wait_for(chrome, "window.__vlmsaeFirstCards")
        queries = [str(last_latent), latent_name(last_latent), "zebra", "#12", ""]
        times = [chrome.eval(SEARCH_JS.format(query=json.dumps(q))) for q in queries]
        # The last latent's chunk loads on demand after a search finds it: time until its card is complete.
        chrome.eval(SEARCH_JS.format(query=json.dumps(str(last_latent))))
        t0 = time.perf_counter()
        wait_for(chrome, f"!!document.querySelector('#cards .card[data-latent=\"{last_latent}\"][data-loaded]')")
        loaded_ms = 1000 * (time.perf_counter() - t0)
        return {
            "first_paint_s": first_paint_ms / 1000,
            "search_ms": statistics.median(times),
            "search_ms_max": max(times),
            "search_card_loaded_ms": loaded_ms,
            "dom_cards": chrome.eval("document.querySelectorAll('#cards .card').length"),
            "chromium": binary,
        }
    finally:
        chrome.close()


def run(quick: bool = False) -> dict[str, Any]:
    """Build and time the browser of a synthetic run (``quick``: 3,000 latents over 2,000 images)."""
    size = QUICK if quick else FULL
    prefix = f"browser_{size['n_latents'] // 1000}k"  # browser_65k, browser_3k
    with tempfile.TemporaryDirectory(prefix="vlmsae-bench-browser-", ignore_cleanup_errors=True) as tmp_name:
        tmp_dpath = Path(tmp_name)
        t0 = time.perf_counter()
        ms_dpath = write_synthetic_run(tmp_dpath / "run", **size)
        synth_s = time.perf_counter() - t0
        out_dpath = tmp_dpath / "browser"
        t0 = time.perf_counter()
        data = build_browser(find_runs(ms_dpath), out_dpath)
        build_s = time.perf_counter() - t0
        n_bytes, n_files = folder_bytes(out_dpath)
        page = measure_page(out_dpath / "index.html", data["cards"][-1]["latent"], tmp_dpath / "chrome-profile")
        return {
            prefix: {
                **size,
                "synth_s": synth_s,
                "build_s": build_s,
                "bytes": n_bytes,
                "files": n_files,
                "index_html_bytes": (out_dpath / "index.html").stat().st_size,
                "chunks_bytes": folder_bytes(out_dpath / "chunks")[0],
                "img_bytes": folder_bytes(out_dpath / "img")[0],
                "n_chunks": data["n_chunks"],
                "cpu_count": os.cpu_count(),
                **page,
            }
        }

"""The feature-browser bench: build time, output size and (with Chromium) first paint and search time, or nulls
with a reason when Chromium is missing; registered with the harness."""

from __future__ import annotations

import json

import pytest

from vlmsae.bench import MODULES
from vlmsae.bench import browser as bench

TINY = {"n_latents": 1200, "n_images": 60, "top_k": 4}  # 1,200 latents: two chunks of 1,024


def test_browser_bench_is_registered():
    assert "browser" in MODULES


@pytest.mark.slow
def test_browser_bench_measures_build_size_and_page(monkeypatch):
    monkeypatch.setattr(bench, "QUICK", TINY)
    out = bench.run(quick=True)
    assert list(out) == ["browser_1k"]
    r = out["browser_1k"]
    assert r["n_latents"] == 1200 and r["n_chunks"] == 2
    assert r["build_s"] > 0 and r["bytes"] > r["index_html_bytes"] > 0
    assert r["bytes"] > r["chunks_bytes"] + r["img_bytes"] and r["chunks_bytes"] > 0 and r["img_bytes"] > 0
    assert r["files"] >= TINY["n_images"] // 2  # thumbnails, shared: at most one per image
    if bench.find_chromium() is None:
        assert r["first_paint_s"] is None and r["search_ms"] is None and "chromium" in r["chromium"]
    else:
        assert 0 < r["first_paint_s"] < 30 and 0 <= r["search_ms"] < 5000
        assert r["search_card_loaded_ms"] > 0 and 0 < r["dom_cards"] < 100
    json.dumps(out, allow_nan=False)  # strict JSON for results.json


def test_browser_bench_without_chromium_records_null_and_why(monkeypatch, tmp_path):
    monkeypatch.setattr(bench, "find_chromium", lambda: None)
    page = bench.measure_page(tmp_path / "index.html", 0, tmp_path / "profile")
    assert page["first_paint_s"] is None and page["search_ms"] is None
    assert "no chromium" in page["chromium"]

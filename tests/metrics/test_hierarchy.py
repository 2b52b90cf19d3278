"""The SPEC 4 metric on hand-made cases whose answers are computed by hand (and by a plain loop)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from vlmsae.data.taxonomy import encode_paths
from vlmsae.metrics import hierarchy as H

# Images 0..: taxon paths over 3 ranks. "C" under B and "C" under E are different taxa.
ABC, ABD, AEC, XYZ = ("A", "B", "C"), ("A", "B", "D"), ("A", "E", "C"), ("X", "Y", "Z")
IMAGE_PATHS = [ABC] * 16 + [ABD] * 16 + [AEC] * 16 + [XYZ] * 16
IMG = {p: [i for i, q in enumerate(IMAGE_PATHS) if q == p] for p in (ABC, ABD, AEC, XYZ)}


def _latent(images, acts=None, pad_to=20, decoys=()):
    """One row of a top-images index, deliberately unsorted, with low-activation decoys after the top 16."""
    acts = list(acts) if acts is not None else [10.0 + i for i in range(len(images))]
    idx, a = list(images) + list(decoys), acts + [0.5] * len(decoys)
    idx += [-1] * (pad_to - len(idx))
    a += [0.0] * (pad_to - len(a))
    return idx[::-1], a[::-1]  # reversed: the metric must sort by activation itself


def _index(rows):
    idx = torch.tensor([r[0] for r in rows], dtype=torch.long)
    acts = torch.tensor([r[1] for r in rows], dtype=torch.float32)
    return idx, acts


@pytest.fixture
def case():
    rows = [
        _latent(IMG[ABC][:16], decoys=IMG[XYZ][:4]),  # 0: all 120 pairs at depth 3
        _latent(IMG[ABC][:8] + IMG[ABD][:8]),  # 1: 56 pairs at 3, 64 at 2
        _latent(IMG[ABC][:15], acts=[5.0] * 15),  # 2: 15 firing images: excluded
        _latent(IMG[ABC][:8] + IMG[XYZ][:8]),  # 3: 56 at 3, 64 at 0
        _latent(IMG[ABC][:10] + IMG[ABD][:6]),  # 4: 45+15=60 at 3, 60 at 2: tie, mode = 2
        _latent(IMG[ABC][:8] + IMG[AEC][:8]),  # 5: 56 at 3, 64 at 1 (same leaf name, other parent)
        _latent(IMG[ABC][:15] + IMG[XYZ][:1], acts=[9.0] * 15 + [0.0]),  # 6: 16th activation is 0: excluded
    ]
    codes, names = encode_paths(IMAGE_PATHS, 3)
    return (*_index(rows), codes, names)


def test_hand_computed_depths(case):
    idx, acts, codes, _ = case
    d = H.lca_depths(idx, acts, codes)
    assert d.valid_K.tolist() == [True, True, False, True, True, True, False]
    expected_mean = [3.0, (56 * 3 + 64 * 2) / 120, math.nan, 56 * 3 / 120, (60 * 3 + 60 * 2) / 120, (56 * 3 + 64) / 120,
                     math.nan]
    for got, want in zip(d.depth_mean_K.tolist(), expected_mean):
        assert (math.isnan(got) and math.isnan(want)) or got == pytest.approx(want, abs=1e-12)
    assert d.depth_mode_K.tolist() == [3, 2, -1, 0, 2, 1, -1]


def test_matches_plain_pair_loop_on_random_index():
    g = torch.Generator().manual_seed(0)
    # 40 random paths of 2..4 ranks over a binary tree: many shared prefixes, some short paths
    paths = []
    for _ in range(40):
        full = tuple(f"r{r}_{int(torch.randint(0, 2, (1,), generator=g))}" for r in range(4))
        paths.append(full[: int(torch.randint(2, 5, (1,), generator=g))])
    codes, _ = encode_paths(paths, 4)
    K, T = 50, 24
    idx = torch.randint(-1, 40, (K, T), generator=g)
    acts = torch.rand(K, T, generator=g) * (torch.rand(K, T, generator=g) > 0.15)
    d = H.lca_depths(idx, acts, codes, chunk=7)  # odd chunk size: chunk edges must not matter
    for k in range(K):
        firing = [(float(a), int(i)) for i, a in zip(idx[k], acts[k]) if i >= 0 and a > 0]
        firing.sort(key=lambda t: -t[0])
        if len(firing) < 16:
            assert not d.valid_K[k] and math.isnan(d.depth_mean_K[k])
            continue
        top = [paths[i] for _, i in firing[:16]]
        depths = []
        for p, q in itertools.combinations(top, 2):
            n = 0
            while n < min(len(p), len(q)) and p[: n + 1] == q[: n + 1]:
                n += 1
            depths.append(n)
        assert len(depths) == 120
        assert d.depth_mean_K[k] == pytest.approx(sum(depths) / 120)
        counts = [depths.count(v) for v in range(5)]
        assert d.depth_mode_K[k] == counts.index(max(counts))


def test_group_table_hand_computed(case):
    idx, acts, codes, _ = case
    d = H.lca_depths(idx, acts, codes)
    group = torch.tensor([0, 0, 0, 1, 1, 1, 1])
    ms = torch.tensor([0.9, 0.5, float("nan"), 0.2, 0.4, 0.6, 0.8])
    rows = H.group_table(d, group, ms)
    assert [r["n_latents"] for r in rows] == [4 - 1, 4]
    assert [r["n_scored"] for r in rows] == [2, 3]
    assert rows[0]["depth_mean"] == pytest.approx((3.0 + 296 / 120) / 2)
    assert rows[1]["depth_mean"] == pytest.approx((1.4 + 2.5 + 232 / 120) / 3)
    assert rows[0]["depth_mode_mean"] == pytest.approx(2.5) and rows[1]["depth_mode_mean"] == pytest.approx(1.0)
    assert rows[0]["ms_mean"] == pytest.approx(0.7) and rows[0]["ms_max"] == pytest.approx(0.9)
    assert rows[0]["ms_min"] == pytest.approx(0.5) and rows[0]["n_ms"] == 2  # NaN MS (dead) left out
    assert rows[1]["ms_mean"] == pytest.approx(0.5)
    md = H.table_markdown(rows, reference={"paper depth": [3.33, 2.92]})
    assert "| LCA depth (mean) | 2.73 | 1.94 |" in md and "| paper depth | 3.33 | 2.92 |" in md


def test_majority_taxa_and_label(case):
    idx, acts, codes, names = case
    code, frac, n = H.majority_taxa(idx, acts, codes)
    assert n.tolist() == [16, 16, 15, 16, 16, 16, 15]
    # latent 4: 10 ABC vs 6 ABD -> C holds 10/16 at rank 2
    assert names[2][int(code[4, 2])] == "C" and frac[4, 2] == pytest.approx(10 / 16)
    # latent 1: an 8/8 split at rank 2 is no clear majority; rank 1 (B) is unanimous
    assert frac[1, 2] == pytest.approx(0.5) and frac[1, 1] == pytest.approx(1.0)
    deepest = H.deepest_majority_rank(code, frac)
    assert deepest.tolist() == [2, 1, 2, -1, 2, 0, 2]
    # latent 6: its zero-activation 16th image does not count
    assert frac[6, 2] == pytest.approx(1.0)


def test_too_short_index_is_refused():
    idx = torch.zeros(3, 8, dtype=torch.long)
    with pytest.raises(ValueError, match="needs 16"):
        H.lca_depths(idx, torch.ones(3, 8), torch.ones(1, 3, dtype=torch.long))


def test_vectorised_at_scale():
    """65k latents x 16 images over 7 ranks: a single pass, no per-latent Python loop (seconds, not minutes)."""
    import time

    g = torch.Generator().manual_seed(1)
    codes = torch.randint(1, 3, (5000, 7), generator=g).cumsum(dim=1)
    idx = torch.randint(0, 5000, (65536, 16), generator=g)
    acts = torch.rand(65536, 16, generator=g) + 0.1
    t0 = time.perf_counter()
    d = H.lca_depths(idx, acts, codes)
    assert time.perf_counter() - t0 < 20
    assert d.valid_K.all() and 0 <= float(d.depth_mean_K.min()) and float(d.depth_mean_K.max()) <= 7

"""The METHOD §4 metric on hand-made cases whose answers are computed by hand (and by a plain loop), and on a
Matryoshka SAE trained on planted hierarchical features (LCA depth rises with the group index)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from vlmsae.data.taxonomy import encode_paths
from vlmsae.metrics import hierarchy as H
from vlmsae.metrics.topimages import top_images
from vlmsae.sae import SAEConfig, build_sae, train_steps

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
    expected_mean = [
        3.0,
        (56 * 3 + 64 * 2) / 120,
        math.nan,
        56 * 3 / 120,
        (60 * 3 + 60 * 2) / 120,
        (56 * 3 + 64) / 120,
        math.nan,
    ]
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
    assert d.valid_K.all() and float(d.depth_mean_K.min()) >= 0 and float(d.depth_mean_K.max()) <= 7


# ------------------------------------------------------------------------------ planted hierarchy
# A Matryoshka SAE on planted hierarchical features: LCA depth rises with the group index (METHOD §4).
#
# The planted world: a 3-level tree (3 coarse nodes, 9 middle, 27 leaves). An image of leaf class c
# has activation x = sum over c's ancestors (and c) of a_level * u_node * atom_node + noise, with
# magnitudes falling with depth, so coarse concepts are big and fire on a third of all images and
# leaf concepts are small and fire on 1/27. The Matryoshka prefix of 3 latents must reconstruct
# alone, so it learns the coarse atoms, whose top images agree only at rank 1; later groups learn
# finer atoms whose top images share deeper prefixes. Expected depths: about 1 + 1/3 + 1/9 for a
# coarse latent (its top images are the most intense third of the tree, spread over the children),
# 2 + 1/3 for a middle one, 3 for a leaf one; observed over seeds 0-2: 1.5-1.9, 2.2-2.5, 2.8-3.0.
BRANCH, D = 3, 48
MAGNITUDE = {0: 4.0, 1: 2.0, 2: 1.0}  # per level: coarse concepts dominate the variance


def planted_world(n_per_leaf: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    leaves = [(a, b, c) for a in range(BRANCH) for b in range(BRANCH) for c in range(BRANCH)]
    nodes = sorted({leaf[: lvl + 1] for leaf in leaves for lvl in range(3)}, key=lambda n: (len(n), n))
    # orthonormal atoms (39 nodes in 48 dims), the same for every call: no cross-talk between concepts
    atoms = torch.linalg.qr(torch.randn(D, D, generator=torch.Generator().manual_seed(123)))[0][:, : len(nodes)].T
    node_id = {n: i for i, n in enumerate(nodes)}
    label_N = torch.arange(len(leaves)).repeat_interleave(n_per_leaf)
    x = torch.zeros(len(label_N), D)
    for lvl in range(3):
        ids = torch.tensor([node_id[leaves[int(c)][: lvl + 1]] for c in label_N])
        u = 0.5 + torch.rand(len(label_N), 1, generator=g)  # intensity varies per image
        x += MAGNITUDE[lvl] * u * atoms[ids]
    x += 0.05 * torch.randn(x.shape, generator=g)
    paths = [tuple(f"L{lvl}:{'.'.join(map(str, leaves[int(c)][: lvl + 1]))}" for lvl in range(3)) for c in label_N]
    return x, paths


def test_matryoshka_depth_rises_with_group():
    torch.manual_seed(0)
    x_train, _ = planted_world(n_per_leaf=150, seed=1)
    x_eval, paths = planted_world(n_per_leaf=40, seed=2)
    # groups of 3 / 9 / 36 latents: room for the coarse, middle and leaf concepts
    cfg = SAEConfig(
        arch="matryoshka",
        d_in=D,
        n_latents=48,
        k=3,
        group_fractions=(3 / 48, 9 / 48, 36 / 48),
        threshold_start_step=100,
        dead_after_samples=20_000,
        aux_k_coeff=1 / 32,
    )
    sae = build_sae(cfg, seed=0)
    g = torch.Generator().manual_seed(3)
    batches = (x_train[torch.randint(0, len(x_train), (256,), generator=g)] for _ in range(600))
    train_steps(sae, batches, lr=3e-3, warmup_steps=50)

    with torch.no_grad():
        codes_NK = sae.encode(x_eval)
    idx_KX, acts_KX = top_images(codes_NK, top_k=16)  # the evaluation's index: zeros never count
    image_codes, _ = encode_paths(paths, 3)
    depths = H.lca_depths(idx_KX, acts_KX, image_codes)
    rows = H.group_table(depths, sae.group_of_latent)
    means = [r["depth_mean"] for r in rows]
    assert all(r["n_scored"] >= 2 for r in rows), rows
    # coarse latents agree at rank 1, leaf latents nearly reach the leaves
    assert means[0] < means[1] < means[2], means
    assert means[0] < 2.0 and means[2] > 2.5, means

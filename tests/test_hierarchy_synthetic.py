"""A Matryoshka SAE on planted hierarchical features: LCA depth rises with the group index (SPEC 4).

The planted world: a 3-level tree (3 coarse nodes, 9 middle, 27 leaves). An image of leaf class c
has activation x = sum over c's ancestors (and c) of a_level * u_node * atom_node + noise, with
magnitudes falling with depth, so coarse concepts are big and fire on a third of all images and
leaf concepts are small and fire on 1/27. The Matryoshka prefix of 3 latents must reconstruct
alone, so it learns the coarse atoms, whose top images agree only at rank 1; later groups learn
finer atoms whose top images share deeper prefixes. Expected depths: about 1 + 1/3 + 1/9 for a
coarse latent (its top images are the most intense third of the tree, spread over the children),
2 + 1/3 for a middle one, 3 for a leaf one; observed over seeds 0-2: 1.5-1.9, 2.2-2.5, 2.8-3.0.
"""

from __future__ import annotations

import torch

from vlmsae.data.taxonomy import encode_paths
from vlmsae.metrics import hierarchy as H
from vlmsae.metrics.topimages import top_images
from vlmsae.sae import SAEConfig, build_sae, train_steps

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
    cfg = SAEConfig(arch="matryoshka", d_in=D, n_latents=48, k=3, group_fractions=(3 / 48, 9 / 48, 36 / 48),
                    threshold_start_step=100, dead_after_samples=20_000, aux_k_coeff=1 / 32)
    sae = build_sae(cfg, seed=0)
    g = torch.Generator().manual_seed(3)
    batches = (x_train[torch.randint(0, len(x_train), (256,), generator=g)] for _ in range(600))
    train_steps(sae, batches, lr=3e-3, warmup_steps=50)

    with torch.no_grad():
        codes_NK = sae.encode(x_eval)
    idx_KT, acts_KT = top_images(codes_NK, top_k=16)  # the evaluation's index: zeros never count
    image_codes, _ = encode_paths(paths, 3)
    depths = H.lca_depths(idx_KT, acts_KT, image_codes)
    rows = H.group_table(depths, sae.group_of_latent)
    means = [r["depth_mean"] for r in rows]
    assert all(r["n_scored"] >= 2 for r in rows), rows
    # coarse latents agree at rank 1, leaf latents nearly reach the leaves
    assert means[0] < means[1] < means[2], means
    assert means[0] < 2.0 and means[2] > 2.5, means

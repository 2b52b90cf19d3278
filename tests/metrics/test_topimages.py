"""Top-activating images: streamed merge equals a brute-force sort; the index round-trips; Jaccard."""

from __future__ import annotations

import itertools

import pytest
import torch

from vlmsae.metrics.topimages import TopImages, TopImagesAccumulator, top_images, top_set_jaccard


def brute_top(acts_NK: torch.Tensor, top_k: int) -> list[list[int]]:
    out = []
    for k in range(acts_NK.shape[1]):
        nz = [(float(acts_NK[n, k]), n) for n in range(acts_NK.shape[0]) if acts_NK[n, k] != 0]
        nz.sort(key=lambda t: (-t[0], t[1]))
        out.append([n for _, n in nz[:top_k]])
    return out


def make_acts(seed: int = 0, n: int = 57, k: int = 9) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    acts = torch.relu(torch.randn(n, k, generator=g) - 0.8)
    acts[:, 0] = 0.0  # never fires: all -1
    acts[:, 1] = 0.0
    acts[[3, 40], 1] = torch.tensor([0.5, 2.0])  # fires on 2 images only: 2 entries then padding
    acts[:, 2] = torch.randn(n, generator=g)  # signed: negatives count, zeros never
    return acts


@pytest.mark.parametrize("chunk", [5, 16, 1000])
@pytest.mark.parametrize("sparse", [False, True])
def test_streamed_topk_matches_brute_force(chunk: int, sparse: bool) -> None:
    acts = make_acts()
    acc = TopImagesAccumulator(acts.shape[1], top_k=6)
    for i0 in range(0, acts.shape[0], chunk):
        block = acts[i0 : i0 + chunk]
        acc.update(block.to_sparse() if sparse else block)
    idx, vals = acc.result()
    ref = brute_top(acts, 6)
    for k in range(acts.shape[1]):
        got = [i for i in idx[k].tolist() if i != -1]
        assert got == ref[k], (k, got, ref[k])
        assert torch.equal(vals[k, : len(got)], acts[got, k])
        assert (vals[k, len(got) :] == 0).all() and (idx[k, len(got) :] == -1).all()
    assert idx[0].eq(-1).all() and idx[1].tolist()[:3] == [40, 3, -1]


def test_ties_keep_earlier_image_and_whole_matrix_helper() -> None:
    acts = torch.zeros(10, 2)
    acts[[2, 5, 7, 9], 0] = 1.0
    acts[[1, 4], 1] = torch.tensor([3.0, 3.0])
    for sparse in (False, True):
        idx, _ = top_images(acts.to_sparse() if sparse else acts, top_k=3, chunk_size=4)
        assert idx[0].tolist() == [2, 5, 7] and idx[1].tolist() == [1, 4, -1]


def test_index_save_load_roundtrip(tmp_path) -> None:
    acts = make_acts(1)
    idx, vals = top_images(acts, top_k=4)
    keys = [f"img{i:03d}" for i in range(acts.shape[0])]
    top = TopImages(
        idx, vals, keys, paths=[f"/x/{k}.png" for k in keys], labels=list(range(len(keys))), meta={"what": "test"}
    )
    top.save(tmp_path / "top_images")
    assert (tmp_path / "top_images" / "run_info.json").exists()
    back = TopImages.load(tmp_path / "top_images")
    assert torch.equal(back.image_idx, idx) and torch.equal(back.acts, vals)
    assert back.keys == keys and back.labels == top.labels and back.meta["what"] == "test"
    assert back.keys_of(1) == ["img040", "img003"]
    assert back.count()[0] == 0
    with pytest.raises(ValueError, match="keys"):
        TopImages(idx, vals, keys[:3])
    with pytest.raises(FileNotFoundError, match="top_images"):
        TopImages.load(tmp_path / "nowhere")


def test_jaccard_matches_python_sets() -> None:
    g = torch.Generator().manual_seed(5)
    idx = torch.randint(0, 12, (8, 4), generator=g)
    idx[0] = torch.tensor([0, 1, 2, 3])
    idx[1] = torch.tensor([3, 2, 1, 0])  # same set as latent 0: duplicate
    idx[2] = -1  # empty: left out
    idx[3, 2:] = -1
    sets = {k: {i for i in idx[k].tolist() if i != -1} for k in range(8)}
    live = [k for k in sets if sets[k]]
    pairs = {(a, b): len(sets[a] & sets[b]) / len(sets[a] | sets[b]) for a, b in itertools.combinations(live, 2)}
    out = top_set_jaccard(idx)
    assert out["mean"] == pytest.approx(sum(pairs.values()) / len(pairs))
    assert out["max"] == pytest.approx(max(pairs.values())) and out["max"] == 1.0
    for k in live:
        near = max(j for (a, b), j in pairs.items() if k in (a, b))
        assert out["nearest_K"][k].item() == pytest.approx(near)
    assert torch.isnan(out["nearest_K"][2]) and out["n_duplicates"] >= 2


def test_extra_tensors_round_trip(tmp_path):
    """Tensors beside image_idx/acts (e.g. per-patch activations for the browser) survive save -> load."""
    import torch

    from vlmsae.metrics.topimages import TopImages

    patch_KXP = torch.rand(2, 3, 4)
    top = TopImages(
        torch.tensor([[0, 1, -1], [1, -1, -1]]),
        torch.tensor([[2.0, 1.0, 0.0], [3.0, 0.0, 0.0]]),
        ["a", "b"],
        extra={"patch_acts": patch_KXP},
    )
    back = TopImages.load(top.save(tmp_path / "top_images"))
    assert torch.equal(back.extra["patch_acts"], patch_KXP) and back.keys == ["a", "b"]
    assert torch.equal(back.image_idx, top.image_idx)

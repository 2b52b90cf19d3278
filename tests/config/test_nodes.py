"""Bad configs and bad inputs are refused with errors that name the value and what is expected."""

from __future__ import annotations

import pytest
import torch

from vlmsae.sae import SAEConfig, build_sae, estimate_input_scale, load_sae, save_sae


def _cfg(**kw) -> SAEConfig:
    base = dict(arch="batchtopk", d_in=8, n_latents=32, k=4)
    return SAEConfig(**{**base, **kw})


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        (dict(arch="topkk"), r"arch must be one of relu, topk, batchtopk, matryoshka; got 'topkk'"),
        (dict(k=33), r"k=33 is larger than n_latents=32"),
        (dict(arch="topk", k=0), r"k must be a positive integer; got 0"),
        (dict(d_in=0), r"d_in must be a positive integer; got 0"),
        (dict(n_latents=2.5), r"n_latents must be a positive integer; got 2.5"),
        (dict(arch="matryoshka", group_fractions=[0.5, 0.4]), r"must sum to 1 .* sums to 0.9"),
        (dict(arch="matryoshka", group_fractions=[0.5, -0.5, 1.0]), r"fractions > 0; got \[0.5, -0.5, 1.0\]"),
        (dict(arch="matryoshka", group_fractions=[0.01, 0.99]), r"empty group with n_latents=32"),
        (dict(group_fractions=[0.5, 0.5]), r"only used by arch=matryoshka"),
        (dict(threshold_beta=1.0), r"threshold_beta must be in \[0, 1\)"),
        (dict(sparse_kernel="fast"), r"sparse_kernel must be one of auto, sparse, dense; got 'fast'"),
        (dict(aux_k=0), r"aux_k must be a positive integer or None"),
        (dict(l1_coeff=-1.0), r"l1_coeff must be a finite number >= 0; got -1.0"),
    ],
)
def test_bad_config_is_refused(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        _cfg(**kwargs)


def test_config_is_frozen_and_relu_ignores_k():
    cfg = _cfg()
    with pytest.raises(AttributeError):
        cfg.k = 3  # type: ignore[misc]
    assert SAEConfig(arch="relu", d_in=8, n_latents=4, k=20).k == 20  # k unused by ReLU-L1: no error


def test_from_schema_uses_expansion_and_rejects_unknown_keys():
    node = {"arch": "matryoshka", "expansion": 4, "n_latents": None, "k": 3, "group_fractions": [0.25, 0.75]}
    cfg = SAEConfig.from_schema(node, d_in=16)
    assert (cfg.n_latents, cfg.group_sizes) == (64, [16, 48])
    with pytest.raises(ValueError, match=r"Unknown SAE config keys \['kk'\]"):
        SAEConfig.from_schema({"arch": "topk", "expansion": 2, "kk": 3}, d_in=16)


def test_group_sizes_follow_the_paper():
    fractions = [0.002, 0.009, 0.035, 0.189, 0.765]  # SPEC 4: iNat ranks, 1536 latents
    cfg = SAEConfig(arch="matryoshka", d_in=768, n_latents=1536, k=20, group_fractions=fractions)
    assert cfg.group_sizes == [3, 13, 53, 290, 1177]
    default = SAEConfig(arch="matryoshka", d_in=1024, n_latents=65536, k=20)
    assert default.group_sizes == [4096, 8192, 16384, 36864]
    sae = build_sae(SAEConfig(arch="matryoshka", d_in=4, n_latents=16, k=2, group_fractions=[0.25, 0.25, 0.5]))
    assert sae.group_sizes == [4, 4, 8]
    assert sae.group_of_latent.tolist() == [0] * 4 + [1] * 4 + [2] * 8


@pytest.fixture(scope="module")
def sae():
    sae = build_sae(_cfg(), seed=0)
    sae.threshold.fill_(0.05)
    return sae


def test_unestimated_threshold_falls_back_to_topk_with_a_warning():
    fresh = build_sae(_cfg(), seed=0)
    with pytest.warns(UserWarning, match="threshold is not estimated yet"):
        codes = fresh.encode(torch.randn(20, 8))
    assert torch.all((codes > 0).sum(1) <= 4) and int((codes > 0).sum()) > 20


@pytest.mark.parametrize("method", ["encode", "encode_pre", "forward", "loss"])
def test_wrong_width_names_expected_and_got(sae, method):
    with pytest.raises(ValueError, match=r"d_in=8; got shape \(5, 7\)"):
        getattr(sae, method)(torch.randn(5, 7))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("method", ["encode", "loss"])
def test_non_finite_batch_is_refused(sae, method, bad):
    x = torch.randn(6, 8)
    x[3, 2] = bad
    with pytest.raises(ValueError, match=r"NaN .* inf values \(first bad row 3\)"):
        getattr(sae, method)(x)


def test_dtypes_are_cast_or_refused(sae):
    x = torch.randn(5, 8)
    torch.testing.assert_close(sae.encode(x.half()), sae.encode(x.half().float()))  # fp16 shards: cast
    assert sae.encode(x.double()).dtype == torch.float32
    with pytest.raises(TypeError, match=r"floating-point activations, got dtype torch.int64"):
        sae.encode(torch.ones(5, 8, dtype=torch.long))
    with pytest.raises(TypeError, match=r"expected a torch.Tensor"):
        sae.encode([[0.0] * 8])
    with pytest.raises(ValueError, match=r"shape \[B, d_in\]"):
        sae.loss(torch.randn(2, 3, 8))  # loss needs a flat batch
    with pytest.raises(ValueError, match=r"n_latents=32; got shape \(5, 31\)"):
        sae.decode(torch.rand(5, 31))


def test_bad_checkpoint_folders(tmp_path, sae):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_sae(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_sae(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_sae(tmp_path)
    (tmp_path / "config.json").write_text('{"a": 1}')
    with pytest.raises(ValueError, match="not a vlmsae SAE config"):
        load_sae(tmp_path)
    good = save_sae(sae, tmp_path / "good")
    (good / "sae.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_sae(good)
    (good / "sae.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no sae.safetensors"):
        load_sae(good)


def test_input_scale_estimate_refuses_bad_batches():
    assert estimate_input_scale([torch.full((4, 9), 3.0)], d_in=9) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="width d_in=9"):
        estimate_input_scale([torch.ones(4, 8)], d_in=9)
    with pytest.raises(ValueError, match="no rows"):
        estimate_input_scale([], d_in=9)
    with pytest.raises(ValueError, match="NaN or inf"):
        estimate_input_scale([torch.tensor([[float("nan")] * 9])], d_in=9)

"""ViT-Prisma checkpoints: run folders written as Prisma lays them out (``n_images_<N>.pt`` = torch.save of
{cfg: a pickled vit_prisma config dataclass, state_dict} + config.json), loaded through vlmsae without unpickling
the config, and compared with Prisma's StandardSparseAutoencoder forward re-implemented here."""

from __future__ import annotations

import dataclasses
import json
import sys
import types
from pathlib import Path

import pytest
import torch

from vlmsae.sae.interop import prisma

D, EXP = 8, 4
F = D * EXP


@dataclasses.dataclass
class _HookedViTConfig:
    d_model: int = D
    n_layers: int = 12


@dataclasses.dataclass
class _RunnerConfig:
    model_name: str = "open-clip:timm/vit_base_patch32_clip_224.openai"
    vit_model_cfg: _HookedViTConfig | None = None
    hook_point_layer: int = 9
    layer_subtype: str = "hook_resid_post"
    d_in: int = D
    expansion_factor: int = EXP
    architecture: str = "standard"
    activation_fn_str: str = "topk"
    activation_fn_kwargs: dict = dataclasses.field(default_factory=lambda: {"k": 5})
    normalize_activations: str = "layer_norm"
    cls_token_only: bool = False
    use_patches_only: bool = False
    context_size: int = 50
    _device: str = "cpu"
    _dtype: str = "float32"


def _fake_vit_prisma() -> list[str]:
    """Register the config classes under vit_prisma's module names, only for as long as torch.save pickles them."""
    names = ["vit_prisma", "vit_prisma.sae", "vit_prisma.sae.config", "vit_prisma.configs"]
    for name in names:
        sys.modules[name] = types.ModuleType(name)
    for cls, module in ((_RunnerConfig, "vit_prisma.sae.config"), (_HookedViTConfig, "vit_prisma.configs")):
        real = "VisionModelSAERunnerConfig" if cls is _RunnerConfig else "HookedViTConfig"
        setattr(sys.modules[module], real, cls)
        cls.__module__, cls.__qualname__ = module, real
    return names


def _write_run(dpath: Path, seed: int = 0, n_images: int = 2600058, **cfg_kwargs) -> dict[str, torch.Tensor]:
    """Prisma: save_model -> n_images_<N>.pt = {cfg, state_dict}; save_config -> config.json (asdict)."""
    g = torch.Generator().manual_seed(seed)
    state = {
        "W_enc": torch.randn(D, F, generator=g) / D**0.5,
        "b_enc": torch.randn(F, generator=g) * 0.1,
        "W_dec": torch.randn(F, D, generator=g) / D**0.5,
        "b_dec": torch.randn(D, generator=g) * 0.3,
    }
    cfg = _RunnerConfig(vit_model_cfg=_HookedViTConfig(), **cfg_kwargs)
    names = _fake_vit_prisma()
    try:
        dpath.mkdir(parents=True, exist_ok=True)
        torch.save({"cfg": cfg, "state_dict": state}, dpath / f"n_images_{n_images}.pt")
    finally:
        for name in names:  # the loader must not find any vit_prisma module
            sys.modules.pop(name, None)
    (dpath / "config.json").write_text(json.dumps(dataclasses.asdict(cfg)))
    return state


def _reference(state, x, act: str, k: int | None, norm: str):
    """Prisma: sae_in = norm_in(x) - b_dec; f = act(sae_in W_enc + b_enc); x_hat = norm_out(f W_dec + b_dec)."""
    if norm == "layer_norm":
        mu = x.mean(-1, keepdim=True)
        std = (x - mu).std(-1, keepdim=True)
        xn, out = (x - mu) / (std + 1e-5), lambda y: y * std + mu
    elif norm == "constant_norm_rescale":
        coeff = D**0.5 / x.norm(dim=-1, keepdim=True)
        xn, out = x * coeff, lambda y: y / coeff
    else:
        xn, out = x, lambda y: y
    h = (xn - state["b_dec"]) @ state["W_enc"] + state["b_enc"]
    if act == "relu":
        f = torch.relu(h)
    else:
        top = torch.topk(h, k=k, dim=-1)
        f = torch.zeros_like(h).scatter_(-1, top.indices, torch.relu(top.values))
    return f, out(f @ state["W_dec"] + state["b_dec"])


@pytest.mark.parametrize(
    ("act", "k", "norm"),
    [("topk", 5, "layer_norm"), ("relu", None, "constant_norm_rescale"), ("relu", None, "none")],
)
def test_load_matches_prisma_forward(tmp_path, act, k, norm):
    kwargs = {"activation_fn_str": act, "activation_fn_kwargs": {"k": k} if k else {}, "normalize_activations": norm}
    state = _write_run(tmp_path / "run", **kwargs)
    sae = prisma.load(tmp_path / "run")
    x = torch.randn(32, D, generator=torch.Generator().manual_seed(1)) * 2 + 0.5
    f_ref, x_hat_ref = _reference(state, x, act, k, norm)
    codes = sae.encode(x)
    torch.testing.assert_close(codes, f_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sae.decode(codes), x_hat_ref, atol=1e-5, rtol=1e-5)  # stats of the last encode
    torch.testing.assert_close(sae(x), x_hat_ref, atol=1e-5, rtol=1e-5)
    assert isinstance(sae, prisma.NormalisedInputSAE) == (norm != "none")
    if norm != "none":
        assert sae.input_transform == norm
        torch.testing.assert_close(sae.decode(codes, x=x), x_hat_ref, atol=1e-5, rtol=1e-5)
    src = sae.trained_on
    assert (src["model"], src["layer"], src["tokens"], src["format"]) == ("clip_b32", 9, "all", "prisma")
    assert src["hook"] == "blocks.9.hook_resid_post" and src["original_path"].endswith("n_images_2600058.pt")


def test_layer_norm_decode_needs_matching_stats(tmp_path):
    _write_run(tmp_path)
    sae = prisma.load(tmp_path)
    codes = sae.encode(torch.randn(4, D))
    sae.encode(torch.randn(3, D))
    with pytest.raises(ValueError, match="decode"):
        sae.decode(codes)
    with pytest.raises(NotImplementedError, match="inference-only"):
        sae.loss(torch.randn(4, D))


def test_source_tokens_and_non_residual_hooks(tmp_path):
    _write_run(tmp_path, layer_subtype="hook_mlp_out", cls_token_only=True, model_name="some/other-vit")
    src = prisma.load(tmp_path).trained_on
    assert src["layer"] is None and src["hook"] == "blocks.9.hook_mlp_out"  # not the residual stream
    assert src["tokens"] == "cls" and src["model"] is None and src["pretrained"] == "some/other-vit"


def test_latest_checkpoint_and_file_path(tmp_path):
    _write_run(tmp_path, seed=1, n_images=1000)
    state = _write_run(tmp_path, seed=2, n_images=20000)
    sae = prisma.load(tmp_path)
    assert sae.trained_on["original_path"].endswith("n_images_20000.pt")
    torch.testing.assert_close(sae.W_dec.detach(), state["W_dec"])
    assert prisma.load(tmp_path / "n_images_1000.pt").trained_on["original_path"].endswith("n_images_1000.pt")


def test_missing_config_json_refused(tmp_path):
    _write_run(tmp_path)
    (tmp_path / "config.json").unlink()
    assert not prisma.detect(tmp_path)
    with pytest.raises(FileNotFoundError, match="config.json.*pickled"):
        prisma.load(tmp_path)


def test_shape_contradicting_config_refused(tmp_path):
    _write_run(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "expansion_factor": 8}))
    with pytest.raises(ValueError, match=r"W_enc has shape \(8, 32\); expected \(8, 64\)"):
        prisma.load(tmp_path)


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))  # unpickling would create the marker file


def test_pickle_with_custom_class_refused_without_executing(tmp_path):
    state = _write_run(tmp_path)
    marker = tmp_path / "executed"
    torch.save({"cfg": _Evil(marker), "state_dict": state}, tmp_path / "n_images_2600058.pt")
    assert prisma.detect(tmp_path)
    with pytest.raises(ValueError, match=r"needs code to unpickle \(\S*open\).*executed nothing"):
        prisma.load(tmp_path)
    assert not marker.exists()


def test_plain_pickle_refused(tmp_path):
    _write_run(tmp_path)
    (tmp_path / "n_images_2600058.pt").unlink()
    (tmp_path / "n_images_1.pkl.gz").write_bytes(b"\x1f\x8b")
    with pytest.raises(ValueError, match="plain pickle"):
        prisma.load(tmp_path)


def test_detect(tmp_path):
    assert not prisma.detect(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"trainer": {}, "buffer": {}}))  # dictionary_learning
    torch.save({}, tmp_path / "ae.pt")
    assert not prisma.detect(tmp_path)
    _write_run(tmp_path / "run")
    assert prisma.detect(tmp_path / "run") and prisma.detect(tmp_path / "run" / "n_images_2600058.pt")

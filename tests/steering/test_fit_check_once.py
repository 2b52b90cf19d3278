"""The steering jobs' fit check (vlmsae.steering.setup.check_fit_once): the first vision forward is checked."""

from __future__ import annotations

import pytest
import torch

from vlmsae.models.llava import build_tiny_llava, load_llava, vision_tower
from vlmsae.sae import SAEConfig, build_sae
from vlmsae.steering.hooks import steer
from vlmsae.steering.setup import check_fit_once

LAYER = 2  # tiny LLaVA: 4 vision blocks of width 32


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    model, _ = load_llava(build_tiny_llava(tmp_path_factory.mktemp("llava") / "tiny_llava"), dtype="float32")
    return model


def _pixels() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _trained(sae):
    sae.trained_on = {"model": "tiny_llava", "layer": LAYER, "tokens": "random_2", "train_steps": 100}
    return sae.eval()


def test_an_sae_that_does_not_fit_stops_the_first_forward_even_when_steering(llava):
    sae = _trained(build_sae(SAEConfig(arch="topk", d_in=32, n_latents=64, k=8), seed=0))
    with torch.no_grad():
        sae.b_dec.add_(10.0)  # another model's mean: every reconstruction far off
    check_fit_once(llava, sae, LAYER, {"model": "tiny_llava", "seed": 7}, "runs/x/sae")
    stopped = pytest.raises(ValueError, match=r"SAE at runs/x/sae does not fit.*'seed': 7.*check_fit=false")
    with stopped, steer(llava, sae, {0: 5.0}, layer=LAYER), torch.no_grad():
        vision_tower(llava)(_pixels())
    with torch.no_grad():
        vision_tower(llava)(_pixels())  # checked once: the hook is gone


def test_an_sae_that_fits_passes_and_the_forward_is_unchanged(llava, identity_sae):
    """An SAE that reconstructs exactly (FVE 1) passes, and the checked forward equals the unhooked one."""
    sae = _trained(identity_sae())
    with torch.no_grad():
        before = vision_tower(llava)(_pixels())
        check_fit_once(llava, sae, LAYER, {"model": "tiny_llava"}, "runs/y/sae")
        after = vision_tower(llava)(_pixels())
    torch.testing.assert_close(after.last_hidden_state, before.last_hidden_state, rtol=0, atol=0)

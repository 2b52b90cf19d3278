"""The one Lightning module (vlmsae.lit.module.SAELitModule): one SAE is a grid of one, and a single-SAE checkpoint
written before that (weights named ``sae.*``) still loads, so such a run can resume."""

from __future__ import annotations

import pytest
import torch

from vlmsae.lit.module import SAELitModule
from vlmsae.sae import SAEConfig


def _config(**kw) -> SAEConfig:
    return SAEConfig(**{"arch": "topk", "d_in": 8, "n_latents": 16, "k": 2, **kw})


def test_a_single_sae_checkpoint_with_the_old_weight_names_loads():
    old = SAELitModule(_config(), seed=1)
    checkpoint = {"state_dict": {f"sae.{k}": v.clone() for k, v in old.sae.state_dict().items()}}
    new = SAELitModule(_config(), seed=2)
    assert not torch.equal(new.sae.W_enc, old.sae.W_enc)
    new.on_load_checkpoint(checkpoint)
    new.load_state_dict(checkpoint["state_dict"])  # strict: every name matches
    for key, value in old.sae.state_dict().items():
        assert torch.equal(new.sae.state_dict()[key], value), key


def test_one_sae_is_a_grid_of_one():
    one = SAELitModule(_config(), lrs=[1e-3], seed=0)
    grid = SAELitModule([_config(), _config(k=4)], lrs=[1e-3, None], names=["sae_0", "sae_1"], seed=0)
    assert len(one.saes) == 1 and one.names == [""] and one._key(0, "train/loss") == "train/loss"
    assert grid._key(1, "train/loss") == "sae_1/train/loss"
    assert grid.lrs[1] == pytest.approx(2e-4 / (16 / 2**14) ** 0.5)  # None: METHOD §2's default
    torch.testing.assert_close(one.sae.W_enc, grid.saes[0].W_enc)  # the same seed builds the same SAE
    with pytest.raises(AttributeError):  # a grid has no one SAE
        _ = grid.sae

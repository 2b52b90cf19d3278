from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from vlmsae.sae import SAEConfig, build_sae


@pytest.fixture(scope="session")
def identity_sae() -> Callable:
    """Builds a ReLU SAE with decode(encode(x)) == x exactly on the tiny LLaVA's 32-d tower: latents [x+, x-]
    (W_enc = W_dec = [I; -I], no biases), since x = relu(x) - relu(-x)."""

    def build():
        sae = build_sae(SAEConfig(arch="relu", d_in=32, n_latents=64), seed=0).eval()
        eye_DD = torch.eye(32)
        with torch.no_grad():
            sae.W_enc.copy_(torch.cat([eye_DD, -eye_DD]))
            sae.W_dec.copy_(torch.cat([eye_DD, -eye_DD]))
            sae.b_enc.zero_()
            sae.b_dec.zero_()
        return sae

    return build

"""The plain Adam loop (vlmsae.sae.fit.train_steps): it ends with the SAE recorded before the training step was
shared by every trainer (issue 22), so moving the step into vlmsae.sae.step changed no arithmetic."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from vlmsae.data.synthetic import PlantedDictionary
from vlmsae.sae import SAEConfig, build_sae, train_steps

REFERENCE_DPATH = Path(__file__).resolve().parents[1] / "fixtures" / "engine_reference"


def test_train_steps_ends_with_the_recorded_sae():
    planted = PlantedDictionary.random(d_in=32, n_atoms=64, k=3, scale=3.0, offset_norm=2.0, seed=0)
    sae = build_sae(SAEConfig(arch="batchtopk", d_in=32, n_latents=64, k=4, threshold_start_step=6), seed=0)
    train_steps(sae, planted.batches(64, 10, seed=1), lr=3e-3, warmup_steps=3)  # warmup, then the threshold EMA
    want = load_file(str(REFERENCE_DPATH / "fit_planted.safetensors"))
    got = sae.state_dict()
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-6, msg=f"{key} differs from the recording")

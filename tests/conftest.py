"""Shared fixtures: the repo root and a composer for the real Hydra configs.

Where a test goes: tests/ mirrors vlmsae/. The tests of ``vlmsae/<sub>/<module>.py`` are in
``tests/<sub>/test_<module>.py`` (vlmsae/sae/sparse.py -> tests/sae/test_sparse.py), and the tests of a top-level
module, a job entrypoint (train.py, extract.py, ...) or formats.py / demo.py, are in ``tests/test_<module>.py``.
One file per module: a test that exercises several modules goes with the one it is about (a job's end-to-end and
CLI tests, slow ones included, go in the job's file; the library it calls has its own file). Two files check the
repository as a whole and match no module: test_layers.py (import layers) and test_packaging.py (wheel, pins).
Fixture files stay in tests/fixtures/. Test files are imported with ``--import-mode=importlib`` (pyproject), so
equal basenames in different folders coexist and test files never import each other: shared fixtures live here.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("WANDB_MODE", "disabled")
REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture
def compose_cfg() -> Callable:
    """compose_cfg("train", ["model=tiny", ...]) -> DictConfig from the real conf/ tree."""
    from hydra import compose, initialize_config_dir

    from vlmsae.config import conf_dir, register_configs

    register_configs()

    def _compose(config_name: str, overrides: list[str] | None = None):
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            return compose(config_name=config_name, overrides=overrides or [])

    return _compose


@pytest.fixture
def compose_error() -> Callable:
    """compose_error(config_dpath, "train", ["layr=3"]) -> the message chain of the error that composing raises
    ('' if none): Hydra wraps the OmegaConf error, and the misspelt key is named somewhere in the chain."""
    from hydra import compose, initialize_config_dir

    from vlmsae.config import register_configs

    register_configs()

    def _compose_error(config_dpath, config_name: str, overrides: list[str]) -> str:
        try:
            with initialize_config_dir(config_dir=str(config_dpath), version_base="1.3"):
                compose(config_name=config_name, overrides=overrides)
        except Exception as err:
            parts = []
            while err is not None:
                parts.append(str(err))
                err = err.__cause__ or err.__context__
            return "\n".join(parts)
        return ""

    return _compose_error


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch) -> Callable:
    """WANDB_MODE=offline with W&B's own folders under tmp_path (and a fresh service, as from a shell); returns
    :func:`read_offline_run`, which reads a job's offline run back from its run dir."""
    pytest.importorskip("wandb")

    for key in [k for k in os.environ if k.startswith("WANDB_SERVICE")]:
        monkeypatch.delenv(key)
    home = tmp_path / "wandb_home"
    for key, sub in (("WANDB_DIR", ""), ("WANDB_CACHE_DIR", "cache"), ("WANDB_CONFIG_DIR", "config")):
        monkeypatch.setenv(key, str(home / sub))
    monkeypatch.setenv("WANDB_DATA_DIR", str(home / "data"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    return read_offline_run


def read_offline_run(out_dpath: str | Path) -> dict[str, Any]:
    """Read back the newest offline W&B run of a job's run dir (offline runs have no ``wandb-summary.json``):
    ``{"project", "group", "job_type", "name", "run_id", "config", "summary", "logged"}``; ``summary`` holds
    the last value of each summary key, ``logged`` the keys logged as history (plots, tables)."""
    import json

    import wandb

    from vlmsae.lit.loggers import iter_wandb_records

    wandb.teardown()  # the in-process W&B service writes the transaction log lazily: flush it before reading

    files = sorted(Path(out_dpath).glob("wandb/offline-run-*/run-*.wandb"), key=lambda p: p.parent.name)
    if not files:
        raise FileNotFoundError(f"no offline W&B run under {Path(out_dpath) / 'wandb'} (logger=wandb, mode offline?)")
    out: dict[str, Any] = {"config": {}, "summary": {}, "logged": set()}
    for record in iter_wandb_records(files[-1]):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            r = record.run
            out.update(project=r.project, group=r.run_group, job_type=r.job_type, name=r.display_name, run_id=r.run_id)
            out["config"].update({i.key: json.loads(i.value_json) for i in r.config.update if i.key})
        elif kind == "config":
            out["config"].update({i.key: json.loads(i.value_json) for i in record.config.update if i.key})
        elif kind == "summary":
            out["summary"].update({i.key: json.loads(i.value_json) for i in record.summary.update if i.key})
        elif kind == "history":
            out["logged"].update(i.nested_key[0] for i in record.history.item if i.nested_key)
    return out


@pytest.fixture
def count_embeddings(monkeypatch):
    """``embedded = count_embeddings("vlmsae.models.embedders.load_embedder")``: replaces that loader so every embedder
    it returns appends the size of each batch of images it embeds to ``embedded`` (a sweep embeds once)."""
    from vlmsae.models import embedders

    embedded: list[int] = []
    real_load = embedders.load_embedder

    def counting_load(spec):
        emb = real_load(spec)
        real_embed = emb.embed
        emb.embed = lambda images, *args, **kwargs: (embedded.append(len(images)), real_embed(images, *args, **kwargs))[
            1
        ]
        return emb

    def patch(target: str) -> list[int]:
        monkeypatch.setattr(target, counting_load)
        return embedded

    return patch


class PlantedTap:
    """A stand-in vision tower with a known answer (the inspect tests): each patch's activation is
    ``offset + 4 * sum_c share_c * atom_c``, where ``share_c`` is the fraction of the patch's pixels near planted
    colour c (:data:`vlmsae.data.concepts.COLOURS`) and the atoms and offset are the ground-truth study's
    (:func:`vlmsae.studies.ground_truth.planted_concepts`, 64-d like the tiny model). 64 px images, an 8 x 8 grid of
    8 px patches (row-major), a CLS token first (the mean of the patches)."""

    name, n_layers, width, embed_dim, has_cls, image_size, grid = "planted", 4, 64, 32, True, 64, 8

    def __init__(self, spec: Any = None) -> None:
        import torch

        from vlmsae.data.concepts import COLOURS
        from vlmsae.studies.ground_truth import planted_concepts

        planted = planted_concepts(n_images=8, d_in=self.width, n_concepts=len(COLOURS), seed=0)
        self.colours = list(COLOURS)
        self.atoms_AD, self.offset_D = planted.atoms_AD, planted.offset_D
        self.rgb_A3 = torch.tensor([COLOURS[c] for c in self.colours], dtype=torch.float32)
        self.device, self.dtype = torch.device("cpu"), torch.float32

    def resolve_layer(self, layer: Any) -> Any:
        return layer

    def preprocess(self, image: Any) -> Any:
        import numpy as np
        import torch

        px = np.asarray(image.convert("RGB").resize((self.image_size, self.image_size)), dtype=np.float32)
        return torch.from_numpy(px).permute(2, 0, 1)

    def forward_to(self, images_BCHW: Any, layer: Any) -> Any:
        import torch

        px_BHW3 = images_BCHW.permute(0, 2, 3, 1)
        near_BHWA = (torch.cdist(px_BHW3.reshape(-1, 3), self.rgb_A3) < 60).float().reshape(*px_BHW3.shape[:3], -1)
        side = self.image_size // self.grid
        share_BAGG = torch.nn.functional.avg_pool2d(near_BHWA.permute(0, 3, 1, 2), side)
        share_BPA = share_BAGG.flatten(2).transpose(1, 2)  # patch p = row * grid + col
        patches_BPD = self.offset_D + 4.0 * share_BPA @ self.atoms_AD
        acts_BTD = torch.cat([patches_BPD.mean(1, keepdim=True), patches_BPD], dim=1)
        return acts_BTD[:, 0] if layer == "last" else acts_BTD


@pytest.fixture
def planted_tap(monkeypatch) -> PlantedTap:
    """Every model a job opens for an SAE is the :class:`PlantedTap` (the spec's name and width are the tiny
    model's): the SAE opener's and the study runner's tap loader are replaced; returns one for the atoms."""
    from vlmsae.models import open_sae
    from vlmsae.studies import sweep

    monkeypatch.setattr(open_sae, "load_tap", PlantedTap)
    monkeypatch.setattr(sweep, "load_tap", PlantedTap)
    return PlantedTap()


@pytest.fixture
def planted_sae(planted_tap, tmp_path):
    """An SAE whose dictionary holds the planted colour atoms and as many random directions, in a shuffled order
    (so no test can assume latent c = concept c), saved as a tiny-model layer-2 patch SAE. Returns
    ``(sae folder, latent of concept c for c in COLOURS order)``, the latent matched to each atom by
    :func:`vlmsae.metrics.seed_matching.match_latents`."""
    import torch

    from vlmsae.metrics.seed_matching import match_latents
    from vlmsae.sae import save_sae
    from vlmsae.studies.ground_truth import oracle_sae

    n = planted_tap.atoms_AD.shape[0]
    noise_AD = torch.nn.functional.normalize(torch.randn(n, 64, generator=torch.Generator().manual_seed(1)), dim=1)
    order = torch.randperm(2 * n, generator=torch.Generator().manual_seed(2))
    dictionary = torch.cat([planted_tap.atoms_AD, noise_AD])[order]
    sae = oracle_sae(dictionary, planted_tap.offset_D, k=2)
    latent_of_concept, _ = match_latents(planted_tap.atoms_AD, sae.W_dec.detach())
    dpath = save_sae(sae, tmp_path / "planted_sae", trained_on={"model": "tiny", "layer": 2, "tokens": "patches"})
    return dpath, latent_of_concept.tolist()


@pytest.fixture(scope="module")
def planted_store(tmp_path_factory):
    """A 6,000-row fp16 activation store of planted atoms (d = 64) in 2 shards, for the kill-and-resume CLI tests."""
    from vlmsae.data.store import write_acts_store
    from vlmsae.data.synthetic import PlantedDictionary

    planted = PlantedDictionary.random(d_in=64, n_atoms=128, k=3, scale=5.0, seed=0)
    dpath = tmp_path_factory.mktemp("acts") / "layer2"
    write_acts_store(dpath, planted.sample(6000, seed=1).x.half(), 500, 2, meta={"model": "tiny", "layer": 2})
    return dpath

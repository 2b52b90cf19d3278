"""hf:// paths against a local Hugging Face cache built here (models--org--repo/refs, snapshots/<commit>/...),
with HF_HUB_OFFLINE=1: resolution of subfolders and revisions, the miss message, malformed and missing paths."""

from __future__ import annotations

import json

import pytest
import torch

from vlmsae.sae import load
from vlmsae.sae.interop.hub import parse_hf_uri, resolve_hf

COMMIT_MAIN, COMMIT_V1 = "a" * 40, "b" * 40
SUB = "clip/trainer_0"


def _checkpoint(dpath, b_dec: float):
    dpath.mkdir(parents=True)
    state = {
        "encoder.weight": torch.eye(4),
        "encoder.bias": torch.zeros(4),
        "decoder.weight": torch.eye(4),
        "b_dec": torch.full((4,), b_dec),
        "k": torch.tensor(2, dtype=torch.int32),
        "threshold": torch.tensor(0.1),
    }
    torch.save(state, dpath / "ae.pt")
    trainer = {"dict_class": "BatchTopKSAE", "k": 2, "layer": 5, "lm_name": "openai/clip-vit-base-patch32"}
    (dpath / "config.json").write_text(json.dumps({"trainer": trainer, "buffer": {}}))


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hf_home" / "hub"
    repo = cache / "models--org--saes"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT_MAIN)
    (repo / "refs" / "v1").write_text(COMMIT_V1)
    _checkpoint(repo / "snapshots" / COMMIT_MAIN / SUB, b_dec=1.0)
    _checkpoint(repo / "snapshots" / COMMIT_V1 / SUB, b_dec=2.0)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return repo


def test_resolves_subfolder_and_revision_from_the_cache(hub_cache):
    assert resolve_hf(f"hf://org/saes/{SUB}") == hub_cache / "snapshots" / COMMIT_MAIN / SUB
    assert resolve_hf(f"hf://org/saes/{SUB}@v1") == hub_cache / "snapshots" / COMMIT_V1 / SUB
    assert resolve_hf(f"hf://org/saes/{SUB}@{COMMIT_V1}") == hub_cache / "snapshots" / COMMIT_V1 / SUB
    assert resolve_hf("hf://org/saes") == hub_cache / "snapshots" / COMMIT_MAIN
    assert resolve_hf(f"hf://org/saes/{SUB}/ae.pt") == hub_cache / "snapshots" / COMMIT_MAIN / SUB / "ae.pt"


def test_load_through_hf_records_the_uri(hub_cache):
    sae = load(f"hf://org/saes/{SUB}@v1")
    assert torch.equal(sae.b_dec.detach(), torch.full((4,), 2.0))
    src = sae.trained_on
    assert src["original_path"] == f"hf://org/saes/{SUB}@v1" and src["format"] == "dictionary_learning"
    assert src["local_path"] == str(hub_cache / "snapshots" / COMMIT_V1 / SUB)
    assert (src["model"], src["layer"]) == ("clip_b32", 5)
    assert torch.equal(load(f"hf://org/saes/{SUB}").b_dec.detach(), torch.full((4,), 1.0))


def test_offline_miss_says_how_to_fill_the_cache(hub_cache):
    with pytest.raises(FileNotFoundError) as err:
        resolve_hf("hf://org/other/some/folder@v2")
    msg = str(err.value)
    assert "'hf://org/other/some/folder@v2' is not in the Hugging Face cache" in msg and "HF_HUB_OFFLINE=1" in msg
    assert 'hf download org/other --revision v2 --include "some/folder/**"' in msg
    assert "snapshot_download('org/other', revision='v2', allow_patterns=['some/folder/**'])" in msg
    assert str(hub_cache.parent) in msg


def test_offline_missing_subfolder_of_a_cached_repo_names_it_and_its_neighbours(hub_cache):
    with pytest.raises(FileNotFoundError, match=r"'clip/trainer_9' is not in the cached snapshot.*trainer_0/.*hf down"):
        resolve_hf("hf://org/saes/clip/trainer_9")


@pytest.mark.parametrize("bad", ["hf://org", "hf://org//x", "hf://org/repo/../x", "hf://org/repo@", "hf:///repo"])
def test_malformed_paths_are_refused_naming_them(bad):
    with pytest.raises(ValueError, match="hf://<org>/<repo>|empty revision") as err:
        parse_hf_uri(bad)
    assert repr(bad) in str(err.value)


def test_file_paths_fetch_the_configs_beside_and_above():
    hub = parse_hf_uri("hf://o/r/run/trainer_0/checkpoints/ae_100000.pt@main")
    assert (hub.repo_id, hub.revision, hub.is_file) == ("o/r", "main", True)
    assert hub.allow_patterns() == [
        "run/trainer_0/checkpoints/ae_100000.pt",
        "run/trainer_0/checkpoints/config.json",
        "run/trainer_0/checkpoints/cfg.json",
        "run/trainer_0/config.json",
        "run/trainer_0/cfg.json",
    ]

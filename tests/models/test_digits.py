"""The networks trained offline on the real digits: the split, their accuracy through the real loaders, and a
cache that is rebuilt, never trusted, when it is missing, truncated, altered or from another version."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from vlmsae.config import to_typed
from vlmsae.data.digits import CLASS_NAMES, HELDOUT_PER_CLASS, ensure_digits, load_digit_arrays, split_indices
from vlmsae.data.images import iter_images, list_folder
from vlmsae.models import digits, get_model_spec, load_tap
from vlmsae.models.embedders import EmbedderSpec, load_embedder
from vlmsae.models.tiny import tiny_model_dpath


def test_split_is_fixed_disjoint_stratified_and_written_as_folders():
    import numpy as np

    root = ensure_digits()
    _, labels = load_digit_arrays()
    a, b = split_indices(labels), split_indices(labels)
    assert np.array_equal(a["heldout"], b["heldout"])  # fixed
    assert not set(a["train"]) & set(a["heldout"])
    assert len(a["heldout"]) == 10 * HELDOUT_PER_CLASS
    train, held = list_folder(root / "train"), list_folder(root / "heldout")
    assert train.classes == held.classes == sorted(CLASS_NAMES)
    assert (len(train.items), len(held.items)) == (1437, 360)
    train_ids = {Path(p).stem for _, p, _ in train.items}
    held_ids = {Path(p).stem for _, p, _ in held.items}
    assert not train_ids & held_ids  # the held-out images never appear in the folder SAEs train on
    meta = json.loads((root / "digits.json").read_text())
    assert sorted(int(i) for i in held_ids) == meta["heldout_indices"]


def test_digits_vit_is_trained_and_loads_through_the_open_clip_tap():
    spec = get_model_spec("digits_vit")
    tap = load_tap(spec)
    assert tap.n_tokens == 37 and tap.width == 48 and tap.n_layers == 4
    meta = digits.read_trained_meta(tiny_model_dpath("digits_vit"))
    assert meta["heldout_accuracy"] >= 0.9 and meta["version"] == digits.TRAINED_VERSION
    records = list(iter_images("folder", ensure_digits() / "heldout"))
    x = torch.stack([tap.preprocess(r.image) for r in records])
    with torch.no_grad():
        logits = tap.forward_to(x, layer="last")
        acts = tap.forward_to(x[:4], layer=1)
    acc = float((logits.argmax(1) == torch.tensor([r.label for r in records])).float().mean())
    # The loaded weights are the trained ones: the PNG round trip gives the recorded held-out accuracy.
    assert acc == pytest.approx(meta["heldout_accuracy"], abs=0.02) and acc >= 0.9
    assert acts.shape == (4, 37, 48)


def test_random_control_has_the_same_shapes_and_is_not_trained():
    trained = load_tap(get_model_spec("digits_vit"))
    control = load_tap(get_model_spec("digits_vit_random"))
    assert (control.n_tokens, control.width) == (trained.n_tokens, trained.width)
    meta = digits.read_trained_meta(tiny_model_dpath("digits_vit_random"))
    assert meta["random_init"] and meta["heldout_accuracy"] < 0.5


def test_digits_cnn_embedder_is_independent_and_accurate():
    emb = load_embedder(to_typed(_embedder_node(), EmbedderSpec))
    meta = digits.read_trained_meta(tiny_model_dpath("embedder_digits_cnn"))
    assert meta["heldout_accuracy"] >= 0.9 and meta["network"] == "digits_cnn"
    records = list(iter_images("folder", ensure_digits() / "heldout"))
    e = emb.embed([r.image for r in records])
    assert e.shape == (360, 64)
    # Its embeddings separate the classes: nearest class mean (train split) classifies held-out images.
    train = list(iter_images("folder", ensure_digits() / "train"))
    et, yt = emb.embed([r.image for r in train]), torch.tensor([r.label for r in train])
    means = torch.stack([et[yt == c].mean(0) for c in range(10)])
    pred = torch.cdist(e, means).argmin(1)
    assert float((pred == torch.tensor([r.label for r in records])).float().mean()) > 0.85


def _embedder_node() -> dict:
    from omegaconf import OmegaConf

    from vlmsae.config import conf_dir

    node = OmegaConf.to_container(OmegaConf.load(conf_dir() / "embedder" / "digits_cnn.yaml"))
    node.pop("defaults")
    return node


def _break_truncate(dpath: Path) -> None:
    fpath = dpath / digits.CNN_WEIGHTS
    fpath.write_bytes(fpath.read_bytes()[: fpath.stat().st_size // 2])


def _break_alter(dpath: Path) -> None:
    fpath = dpath / digits.CNN_WEIGHTS
    data = bytearray(fpath.read_bytes())
    data[-1] ^= 0xFF  # same size, one weight changed
    fpath.write_bytes(bytes(data))


def _break_version(dpath: Path) -> None:
    meta = json.loads((dpath / digits.TRAINED_META).read_text())
    meta["version"] = "digits-trained-v0"
    (dpath / digits.TRAINED_META).write_text(json.dumps(meta))


def _break_meta(dpath: Path) -> None:
    (dpath / digits.TRAINED_META).write_text("{not json")


@pytest.mark.parametrize(
    ("breaker", "reason"),
    [
        (_break_truncate, "does not match its recorded sha256"),
        (_break_alter, "does not match its recorded sha256"),
        (_break_version, "version 'digits-trained-v0'"),
        (_break_meta, "unreadable trained.json"),
        (lambda d: (d / digits.CNN_WEIGHTS).unlink(), "no cnn.safetensors"),
    ],
)
def test_untrusted_cache_is_named_and_rebuilt_never_loaded(tmp_path, caplog, monkeypatch, breaker, reason):
    dpath = tmp_path / "cnn"
    digits.ensure_digits_cnn(dpath, seed=1)
    good = digits.read_trained_meta(dpath)
    breaker(dpath)
    loaded = []
    real_load = digits.DigitsCNN.load_state_dict
    monkeypatch.setattr(
        digits.DigitsCNN, "load_state_dict", lambda self, sd, **kw: loaded.append(sd) or real_load(self, sd)
    )
    with caplog.at_level(logging.WARNING, logger="vlmsae.models.digits"):
        model = digits.load_digits_cnn(dpath, seed=1)
    assert str(dpath) in caplog.text and reason in caplog.text and "training it again" in caplog.text
    assert digits.cache_problem(dpath, digits.CNN_WEIGHTS, 1) is None  # rebuilt, digest recorded again
    assert len(loaded) == 1  # only the rebuilt weights were loaded
    # Deterministic: the rebuild reproduces the same weights on this machine.
    assert digits.read_trained_meta(dpath)["weights_sha256"] == good["weights_sha256"]
    assert isinstance(model, digits.DigitsCNN)


def test_missing_cache_is_built_and_another_seed_is_not_reused(tmp_path, caplog):
    dpath = tmp_path / "cnn"
    assert digits.cache_problem(dpath, digits.CNN_WEIGHTS, 1) == "no trained.json"
    digits.ensure_digits_cnn(dpath, seed=1)
    assert digits.cache_problem(dpath, digits.CNN_WEIGHTS, 2) == "trained with seed 1, asked for seed 2"
    assert digits.cache_problem(dpath, digits.CNN_WEIGHTS, 1, digits.CNN_RECIPE) is None
    other = digits.Recipe(epochs=1, lr=1e-3)
    assert "trained with recipe" in digits.cache_problem(dpath, digits.CNN_WEIGHTS, 1, other)


def test_embedder_refuses_another_recipe_version():
    node = {**_embedder_node(), "pretrained": "digits-trained-v0"}
    with pytest.raises(ValueError, match="embedder.pretrained=digits-trained-v1"):
        load_embedder(node)
    assert _embedder_node()["pretrained"] == digits.TRAINED_VERSION  # the YAML keys the cache by the version

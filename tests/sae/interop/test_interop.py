"""The format registry: detection, load_any, vlmsae's own folder as a format, the safe .pt reader, export_sae."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch

import vlmsae.sae.interop as interop
from vlmsae.sae import SAEConfig, build_sae, load, load_sae, save_sae
from vlmsae.sae.interop import FORMAT_NAMES, TRAINED_ON_KEYS, detect_format, export_sae, load_any
from vlmsae.sae.interop.dictionary_learning import read_state_dict
from vlmsae.sae.interop.torchfile import read_torch_file


class Custom:
    pass


def _sae(arch="batchtopk"):
    sae = build_sae(SAEConfig(arch=arch, d_in=8, n_latents=32, k=3), seed=0)
    with torch.no_grad():
        sae.threshold.fill_(0.1)
    sae.trained_on = {"model": "tiny", "layer": 1, "tokens": "cls"}
    return sae


def test_load_is_load_any_and_a_vlmsae_folder_round_trips(tmp_path):
    dpath = save_sae(_sae(), tmp_path / "sae")
    assert load is load_any and detect_format(dpath) == "vlmsae"
    sae, ref = load(dpath), load_sae(dpath)
    x = torch.randn(5, 8)
    assert torch.equal(sae.encode(x), ref.encode(x)) and not sae.training
    assert set(TRAINED_ON_KEYS) <= set(sae.trained_on)
    assert sae.trained_on["format"] == "vlmsae" and sae.trained_on["original_path"] == str(dpath)
    assert (sae.trained_on["model"], sae.trained_on["layer"], sae.trained_on["tokens"]) == ("tiny", 1, "cls")
    assert sae.trained_on["pretrained"] is None  # unknown -> None, never a guess
    assert load(dpath, sae_format="vlmsae").trained_on["format"] == "vlmsae"


def test_unrecognised_folder_lists_every_format_tried_and_what_it_expects(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ValueError) as err:
        load(tmp_path)
    msg = str(err.value)
    assert "not an SAE checkpoint vlmsae recognises" in msg and "weights.bin" in msg and "sae_format=" in msg
    for name, module in interop.available_formats().items():
        assert f"- {name}: {module.EXPECTS}" in msg
    assert "- vlmsae: sae.safetensors + config.json" in msg and "- dictionary_learning: ae.pt" in msg


def test_a_format_module_missing_from_the_install_is_skipped_and_reported(tmp_path, monkeypatch):
    real = interop.importlib.import_module

    def fake(name):
        if name == "vlmsae.sae.interop.saev":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return real(name)

    monkeypatch.setattr(interop.importlib, "import_module", fake)
    assert "saev" not in interop.available_formats() and "vlmsae" in interop.available_formats()
    with pytest.raises(ValueError, match=r"not available in this install: .*saev"):
        detect_format(tmp_path)
    with pytest.raises(ValueError, match=r"sae_format='saev': this install has no reader"):
        load(tmp_path, sae_format="saev")


def test_a_broken_import_inside_a_format_module_is_not_hidden(monkeypatch):
    def fake(name):
        raise ModuleNotFoundError("No module named 'some_dependency'", name="some_dependency")

    monkeypatch.setattr(interop.importlib, "import_module", fake)
    with pytest.raises(ModuleNotFoundError, match="some_dependency"):
        interop.format_module("vlmsae")


def test_bad_format_names_and_missing_paths_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"sae_format='safetensors' is not a known SAE format; use one of vlmsae"):
        load(tmp_path, sae_format="safetensors")
    with pytest.raises(FileNotFoundError, match=r"'/no/such/sae' does not exist.*hf://<org>/<repo>"):
        load("/no/such/sae")
    assert FORMAT_NAMES[:2] == ("vlmsae", "dictionary_learning")


def test_export_to_a_format_without_a_writer_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(interop, "format_module", lambda name: None)
    with pytest.raises(ValueError, match=r"format='saelens': this install has no writer.*saelens.save is missing"):
        export_sae(_sae(), "saelens", tmp_path)
    with pytest.raises(ValueError, match=r"format='sparsify' cannot be exported; export targets: vlmsae"):
        export_sae(_sae(), "sparsify", tmp_path)


def test_export_sae_writes_the_target_layout(tmp_path):
    out = export_sae(_sae(), "dictionary_learning", tmp_path / "dl")
    assert detect_format(out) == "dictionary_learning"
    out = export_sae(load(out), "vlmsae", tmp_path / "v")
    assert detect_format(out) == "vlmsae" and load(out).trained_on["layer"] == 1


# ---------------------------------------------------------------------------------------------- torchfile
def test_reader_refuses_a_pickle_that_needs_code(tmp_path):
    marker = tmp_path / "ran"
    torch.save({"w": torch.zeros(2), "obj": Custom()}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=r"bad.pt.*needs code to unpickle.*nothing in it was executed") as err:
        read_state_dict(tmp_path / "bad.pt")
    assert isinstance(err.value.__cause__, pickle.UnpicklingError) and not marker.exists()
    assert "Custom" in str(err.value)  # names the global it asked for


def test_reader_reads_plain_state_dicts_and_numpy_scalars_only_when_allowed(tmp_path):
    torch.save({"w": torch.arange(3.0)}, tmp_path / "ok.pt")
    assert torch.equal(read_state_dict(tmp_path / "ok.pt")["w"], torch.arange(3.0))
    torch.save({"model": {"w": torch.ones(1)}, "target_norm": np.float64(2.5)}, tmp_path / "np.pt")
    with pytest.raises(ValueError, match="needs code to unpickle"):
        read_torch_file(tmp_path / "np.pt")
    assert read_torch_file(tmp_path / "np.pt", allow_numpy_scalars=True)["target_norm"] == 2.5
    torch.save({"model": {"w": torch.ones(1)}, "step": 3, "w": torch.ones(1)}, tmp_path / "nested.pt")
    with pytest.raises(ValueError, match=r"keys \['model', 'step'\] hold \['dict', 'int'\], not tensors"):
        read_state_dict(tmp_path / "nested.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="not a readable torch.save file"):
        read_torch_file(tmp_path / "junk.pt")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_torch_file(tmp_path / "none.pt")


def test_vlmsae_detection_reads_json_only(tmp_path):
    dpath = save_sae(_sae(), tmp_path / "s")
    info = json.loads((dpath / "config.json").read_text())
    (dpath / "config.json").write_text(json.dumps({**info, "format": "other"}))
    assert not interop.format_module("vlmsae").detect(dpath)

"""saev checkpoints: files written exactly as saev's ``dump`` lays them out, loaded through vlmsae, and compared
with saev's forward re-implemented here from its formulas (header line + torch payload; random weights)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch

from vlmsae.sae.interop import saev

D, F = 8, 24


def _weights(seed: int, d: int = D, f: int = F) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "W_enc": torch.randn(d, f, generator=g) / d**0.5,
        "b_enc": torch.randn(f, generator=g) * 0.1,
        "W_dec": torch.randn(f, d, generator=g) / d**0.5,
        "b_dec": torch.randn(d, generator=g),  # nonzero: the b_dec convention matters
    }


def _dump(fpath: Path, header: dict, state: dict[str, torch.Tensor]) -> Path:
    """saev.nn.modeling.dump: orjson header + newline, then torch.save(state_dict) into the same file."""
    with open(fpath, "wb") as fd:
        fd.write(json.dumps(header).encode() + b"\n")
        torch.save(state, fd)
    return fpath


def _header5(act_cls: str, top_k: int = 4) -> dict:
    params = {"key": "relu"} if act_cls == "Relu" else {"key": "top-k", "top_k": top_k}
    cfg = {"d_model": D, "d_sae": F, "activation": {"cls": act_cls, "params": params}, "reinit_blend": 0.8}
    return {"schema": 5, "cfg": cfg, "commit": "3d73f1f", "lib": "0.1.0"}


def _reference(state, x, act: str, k: int | None, subtract: bool, mean=None, scale=1.0):
    """saev's forward: h = (x~ [- b_dec]) W_enc + b_enc; activation; x~_hat = f W_dec + b_dec; x~ = (x - m)/s."""
    m = torch.zeros(x.shape[-1]) if mean is None else mean
    xn = (x - m) / scale
    h = (xn - state["b_dec"] if subtract else xn) @ state["W_enc"] + state["b_enc"]
    if act == "Relu":
        f = torch.relu(h)
    elif act == "TopK":
        idx = torch.topk(h, k, dim=-1).indices
        f = torch.zeros_like(h).scatter(-1, idx, 1.0) * h
    else:  # BatchTopK, eval mode
        theta = float(state["activation.threshold"])
        f = torch.where(h > (theta if theta > 0 else 0.0), h, torch.zeros_like(h))
    x_hat = (f @ state["W_dec"] + state["b_dec"]) * scale + m
    return f, x_hat


def _check(sae, state, x, act, k, subtract, mean=None, scale=1.0):
    f_ref, x_hat_ref = _reference(state, x, act, k, subtract, mean, scale)
    f = sae.encode(x)
    torch.testing.assert_close(f, f_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sae.decode(f), x_hat_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sae(x), x_hat_ref, atol=1e-5, rtol=1e-5)
    return f_ref


def test_schema5_topk_keeps_negative_values(tmp_path):
    state = _weights(0)
    state["b_enc"] -= 1.0  # most pre-activations negative: the top-k holds negatives, which saev keeps
    fpath = _dump(tmp_path / "sae.pt", _header5("TopK", top_k=6), state)
    sae = saev.load(tmp_path)
    assert isinstance(sae, saev.SignedTopKSAE) and sae.cfg.k == 6
    x = torch.randn(32, D, generator=torch.Generator().manual_seed(1))
    f_ref = _check(sae, state, x, "TopK", 6, subtract=False)
    assert (f_ref < 0).any()  # the case where a ReLU would differ
    assert sae.trained_on["format"] == "saev" and sae.trained_on["original_path"] == str(fpath)
    assert sae.trained_on["library"]["b_dec_subtracted"] is False and not sae.training


@pytest.mark.parametrize("theta", [0.3, -0.2, 0.0])
def test_schema5_batchtopk_threshold(tmp_path, theta):
    state = {**_weights(2), "activation.threshold": torch.tensor(theta)}
    _dump(tmp_path / "sae.pt", _header5("BatchTopK", top_k=5), state)
    sae = saev.load(tmp_path / "sae.pt")
    x = torch.randn(32, D, generator=torch.Generator().manual_seed(3))
    f_ref = _check(sae, state, x, "BatchTopK", 5, subtract=False)
    if theta > 0:
        assert ((f_ref > 0) & (f_ref <= theta)).sum() == 0 and (f_ref > theta).any()


def test_schema5_relu_with_folded_input_normalisation(tmp_path):
    state = _weights(4)
    _dump(tmp_path / "sae.pt", _header5("Relu"), state)
    mean, scale = torch.randn(D) * 3, 2.0181241035461426
    sae = saev.load(tmp_path, input_mean=mean, input_scale=scale, layer=10, model="clip_b16", tokens="patches")
    x = torch.randn(32, D, generator=torch.Generator().manual_seed(5)) * 2 + mean
    _check(sae, state, x, "Relu", None, subtract=False, mean=mean, scale=scale)
    assert (
        sae.trained_on["layer"] == 10
        and sae.trained_on["tokens"] == "patches"
        and sae.trained_on["model"] == "clip_b16"
    )
    assert "folded" in sae.trained_on["input_normalisation"]


def test_old_unversioned_file_subtracts_b_dec(tmp_path):
    """Pre-schema saev (2025-02): flat header with d_vit / exp_factor, ReLU, h = (x - b_dec) W_enc + b_enc."""
    d, f = 6, 12
    state = _weights(6, d, f)
    header = {"d_vit": d, "exp_factor": 2, "sparsity_coeff": 4e-4, "n_reinit_samples": 524288, "ghost_grads": False}
    _dump(tmp_path / "sae.pt", header, state)
    sae = saev.load(tmp_path)
    x = torch.randn(16, d, generator=torch.Generator().manual_seed(7))
    _check(sae, state, x, "Relu", None, subtract=True)
    assert sae.trained_on["library"]["b_dec_subtracted"] is True
    # The other convention gives different codes here (b_dec != 0): the choice is tested, not incidental.
    f_other, _ = _reference(state, x, "Relu", None, subtract=False)
    assert not torch.allclose(sae.encode(x), f_other, atol=1e-3)


def test_schema1_form_a_topk_subtracts(tmp_path):
    state = _weights(8)
    header = {"schema": 1, "cls": "TopK", "cfg": {"d_vit": D, "exp_factor": 3, "top_k": 5}, "commit": "c6e3552"}
    _dump(tmp_path / "sae.pt", header, state)
    sae = saev.load(tmp_path)
    x = torch.randn(16, D, generator=torch.Generator().manual_seed(9))
    _check(sae, state, x, "TopK", 5, subtract=True)


@pytest.mark.parametrize(("commit", "subtract"), [("a4c2c60", True), ("654befb", False)])
def test_schema2_forward_chosen_by_commit(tmp_path, commit, subtract):
    state = _weights(10)
    header = {**_header5("TopK", top_k=4), "schema": 2, "commit": commit}
    _dump(tmp_path / "sae.pt", header, state)
    sae = saev.load(tmp_path)
    x = torch.randn(16, D, generator=torch.Generator().manual_seed(11))
    _check(sae, state, x, "TopK", 4, subtract=subtract)


def test_schema2_unknown_commit_needs_the_option(tmp_path):
    state = _weights(12)
    _dump(tmp_path / "sae.pt", {**_header5("Relu"), "schema": 2, "commit": "unknown"}, state)
    with pytest.raises(ValueError, match="subtract_b_dec"):
        saev.load(tmp_path)
    sae = saev.load(tmp_path, subtract_b_dec=True)
    _check(sae, state, torch.randn(4, D), "Relu", None, subtract=True)


def test_batchtopk_without_threshold_refused(tmp_path):
    _dump(tmp_path / "sae.pt", {**_header5("BatchTopK"), "schema": 4}, _weights(13))
    with pytest.raises(ValueError, match="activation.threshold"):
        saev.load(tmp_path)


def test_header_width_contradicting_weights_refused(tmp_path):
    header = _header5("Relu")
    header["cfg"]["d_sae"] = F * 2
    _dump(tmp_path / "sae.pt", header, _weights(14))
    with pytest.raises(ValueError, match="d_sae=48"):
        saev.load(tmp_path)


def test_detect(tmp_path):
    assert not saev.detect(tmp_path)
    torch.save(_weights(15), tmp_path / "ae.pt")  # a bare torch zip (dictionary_learning): not saev
    (tmp_path / "config.json").write_text("{}")
    assert not saev.detect(tmp_path)
    _dump(tmp_path / "sae.pt", _header5("Relu"), _weights(15))
    assert saev.detect(tmp_path) and saev.detect(tmp_path / "sae.pt") and not saev.detect(tmp_path / "ae.pt")


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))  # unpickling would create the marker file


def test_payload_needing_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "executed"
    state = {**_weights(16), "extra": _Evil(marker)}
    buf = io.BytesIO()
    torch.save(state, buf)
    (tmp_path / "sae.pt").write_bytes(json.dumps(_header5("Relu")).encode() + b"\n" + buf.getvalue())
    with pytest.raises(ValueError, match="nothing in it was executed"):
        saev.load(tmp_path)
    assert not marker.exists()


def test_non_native_forward_is_marked(tmp_path):
    _dump(tmp_path / "sae.pt", _header5("TopK"), _weights(17))
    assert "negative" in saev.load(tmp_path).interop_only
    _dump(tmp_path / "sae.pt", _header5("Relu"), _weights(17))
    assert getattr(saev.load(tmp_path), "interop_only", None) is None

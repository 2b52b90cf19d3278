"""dictionary_learning / sae-for-vlm checkpoints: written here exactly as the library lays them out (keys, shapes,
transposes, config.json), loaded through vlmsae, compared with the library's forward re-implemented below in plain
torch (from its trained_on: trainers/top_k.py, batch_top_k.py, matryoshka_batch_top_k.py, dictionary.py)."""

from __future__ import annotations

import json
import pickle
import warnings
from pathlib import Path

import pytest
import torch

from vlmsae.sae import SAEConfig, build_sae, load
from vlmsae.sae.interop import detect_format
from vlmsae.sae.interop import dictionary_learning as dl

D, F, K = 12, 48, 4
VLM_NAME = "imagenet_train_activations_clip-vit-large-patch14-336_22_post_mlp_residual_matroyshka_batch_top_k_20_x64"


class Custom:  # a pickle that needs this class: must be refused, never run
    pass


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


def _library_state(dict_class: str, threshold: float = 0.3, group_sizes=(6, 12, 30), seed=0) -> dict:
    g = _g(seed)
    if dict_class == "AutoEncoder":
        return {
            "bias": torch.randn(D, generator=g),
            "encoder.weight": torch.randn(F, D, generator=g) * 0.3,
            "encoder.bias": torch.randn(F, generator=g) * 0.1,
            "decoder.weight": torch.randn(D, F, generator=g) * 0.5,  # not unit norm: from_pretrained normalises
        }
    if dict_class in ("AutoEncoderTopK", "BatchTopKSAE"):
        return {
            "k": torch.tensor(K, dtype=torch.int32),
            "threshold": torch.tensor(threshold, dtype=torch.float32),
            "decoder.weight": torch.randn(D, F, generator=g),
            "encoder.weight": torch.randn(F, D, generator=g) * 0.3,
            "encoder.bias": torch.randn(F, generator=g) * 0.1,
            "b_dec": torch.randn(D, generator=g),
        }
    state = {
        "W_enc": torch.randn(D, F, generator=g) * 0.3,
        "b_enc": torch.randn(F, generator=g) * 0.1,
        "W_dec": torch.randn(F, D, generator=g),
        "b_dec": torch.randn(D, generator=g),
    }
    if dict_class == "JumpReluAutoEncoder":
        return {**state, "threshold": torch.rand(F, generator=g) * 0.5}
    return {
        "k": torch.tensor(K, dtype=torch.int32),
        "threshold": torch.tensor(threshold, dtype=torch.float32),
        "group_sizes": torch.tensor(list(group_sizes)),
        **state,
    }


def _write(dpath: Path, dict_class: str, state: dict, **trainer) -> Path:
    dpath.mkdir(parents=True, exist_ok=True)
    torch.save(state, dpath / "ae.pt")
    cfg = {"dict_class": dict_class, "trainer_class": "X", "activation_dim": D, "dict_size": F, "layer": 3}
    cfg |= {"lm_name": "EleutherAI/pythia-70m-deduped", **trainer}
    if dict_class != "AutoEncoder" and dict_class != "JumpReluAutoEncoder":
        cfg.setdefault("k", K)
    (dpath / "config.json").write_text(json.dumps({"trainer": cfg, "buffer": {"d_submodule": D}}))
    return dpath


def _library_forward(dict_class: str, s: dict, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The library's encode/decode with its loader's defaults (use_threshold, normalize_decoder)."""
    if dict_class == "AutoEncoder":
        W_e, b_e, W_d = s["encoder.weight"].clone(), s["encoder.bias"].clone(), s["decoder.weight"].clone()
        norms = W_d.norm(dim=0)
        W_d, W_e, b_e = W_d / norms, W_e * norms[:, None], b_e * norms
        f = torch.relu((x - s["bias"]) @ W_e.T + b_e)
        return f, f @ W_d.T + s["bias"]
    if dict_class in ("AutoEncoderTopK", "BatchTopKSAE"):
        p = torch.relu((x - s["b_dec"]) @ s["encoder.weight"].T + s["encoder.bias"])
        if dict_class == "AutoEncoderTopK":
            top = p.topk(int(s["k"]), dim=-1)
            f = torch.zeros_like(p).scatter_(-1, top.indices, top.values)
        else:
            f = p * (p > s["threshold"])
        return f, f @ s["decoder.weight"].T + s["b_dec"]
    if dict_class == "JumpReluAutoEncoder":
        pre = x @ s["W_enc"] + s["b_enc"]
        f = torch.relu(pre * (pre > s["threshold"]))
        return f, f @ s["W_dec"] + s["b_dec"]
    p = torch.relu((x - s["b_dec"]) @ s["W_enc"] + s["b_enc"])
    f = p * (p > s["threshold"])
    f[:, int(s["group_sizes"].sum()) :] = 0  # all groups active
    return f, f @ s["W_dec"] + s["b_dec"]


def _x(n=64, seed=1):
    return torch.randn(n, D, generator=_g(seed)) * 2 + 0.5


CLASSES = ["AutoEncoder", "AutoEncoderTopK", "BatchTopKSAE", "MatryoshkaBatchTopKSAE", "MatroyshkaBatchTopKSAE"]


@pytest.mark.parametrize("dict_class", CLASSES)
def test_load_matches_the_library_forward(tmp_path, dict_class):
    state = _library_state(dict_class)
    dpath = _write(tmp_path / "trainer_0", dict_class, state)
    assert detect_format(dpath) == "dictionary_learning"
    sae = load(dpath)
    assert sae.arch == dl.DICT_CLASSES[dict_class] and (sae.d_in, sae.n_latents) == (D, F) and not sae.training
    x = _x()
    f_ref, x_hat_ref = _library_forward(dict_class, state, x)
    codes = sae.encode(x)
    assert (codes > 0).any() and (codes == 0).any()
    torch.testing.assert_close(codes, f_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sae(x), x_hat_ref, atol=1e-5, rtol=1e-5)
    if dict_class != "AutoEncoder":
        assert sae.cfg.k == K
    if "shkaBatchTopK" in dict_class:
        assert sae.group_sizes == [6, 12, 30]
    assert sae.trained_on["format"] == "dictionary_learning" and sae.trained_on["layer"] == 3
    assert sae.trained_on["model"] is None and sae.trained_on["hf_model"] == "EleutherAI/pythia-70m-deduped"
    assert sae.trained_on["original_path"] == str(dpath) and "raw" in sae.trained_on["input_normalisation"]


@pytest.mark.parametrize("dict_class", ["BatchTopKSAE", "MatryoshkaBatchTopKSAE"])
def test_unset_threshold_encodes_like_the_library_a_plain_relu(tmp_path, dict_class):
    state = _library_state(dict_class, threshold=-1.0)
    with pytest.warns(UserWarning, match="never estimated"):
        sae = load(_write(tmp_path / "t", dict_class, state))
    x = _x()
    f_ref, x_hat_ref = _library_forward(dict_class, state, x)
    torch.testing.assert_close(sae.encode(x), f_ref, atol=1e-5, rtol=1e-5)
    assert int((sae.encode(x) > 0).sum(dim=1).min()) > K  # dense, not per-sample top-k
    torch.testing.assert_close(sae(x), x_hat_ref, atol=1e-5, rtol=1e-5)


def test_jumprelu_autoencoder_matches_the_library(tmp_path):
    state = _library_state("JumpReluAutoEncoder")
    sae = load(_write(tmp_path / "t", "JumpReluAutoEncoder", state))
    f_ref, x_hat_ref = _library_forward("JumpReluAutoEncoder", state, _x())
    torch.testing.assert_close(sae.encode(_x()), f_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sae(_x()), x_hat_ref, atol=1e-5, rtol=1e-5)


def test_paper_folder_gives_model_layer_and_tokens(tmp_path):
    """sae-for-vlm saves layer="" and lm_name=""; the folder name holds them, random_k_2/ the token selection."""
    trainer = tmp_path / "random_k_2" / VLM_NAME / "trainer_0"
    state = _library_state("MatroyshkaBatchTopKSAE")
    _write(trainer, "MatroyshkaBatchTopKSAE", state, layer="", lm_name="", submodule_name="")
    (trainer / "ae.pt").unlink()  # the paper's scripts load an intermediate checkpoint
    (trainer / "checkpoints").mkdir()
    torch.save(state, trainer / "checkpoints" / "ae_100000.pt")
    torch.save(_library_state("MatroyshkaBatchTopKSAE", seed=5), trainer / "checkpoints" / "ae_20000.pt")
    x = _x()
    for path in (trainer, trainer / "checkpoints" / "ae_100000.pt"):  # the latest checkpoint, or that file
        sae = load(path)
        src = sae.trained_on
        assert (src["model"], src["pretrained"], src["layer"]) == ("clip_l14_336", "openai", 22)
        assert (src["tokens"], src["tokens_k"], src["hf_model"]) == ("random_k", 2, "clip-vit-large-patch14-336")
        assert src["checkpoint"] == "checkpoints/ae_100000.pt"
        torch.testing.assert_close(sae.encode(x), _library_forward("MatroyshkaBatchTopKSAE", state, x)[0])
    proj = tmp_path / VLM_NAME.replace("_22_post_mlp_residual", "_-1_post_projection") / "trainer_0"
    src = load(_write(proj, "BatchTopKSAE", _library_state("BatchTopKSAE"), layer="", lm_name="")).trained_on
    assert (src["layer"], src["tokens"], src["library_layer"]) == ("last", "cls", -1)
    plain = load(
        _write(tmp_path / "plain" / "trainer_0", "BatchTopKSAE", _library_state("BatchTopKSAE"), layer="", lm_name="")
    ).trained_on
    assert plain["model"] is None and plain["layer"] is None and plain["tokens"] is None


def test_run_folder_one_level_above_its_trainer_is_searched(tmp_path):
    """A training run (the paper's Hub folders) holds trainer_0/: sae_path=<run> loads it, as the job loader and
    the sweep finder see it; a run with several trainers is refused, naming them."""
    from vlmsae.models.open_sae import load_job_sae
    from vlmsae.studies.sweep import sweep_paths

    run = tmp_path / VLM_NAME
    state = _library_state("MatroyshkaBatchTopKSAE")
    trainer = _write(run / "trainer_0", "MatroyshkaBatchTopKSAE", state, layer="", lm_name="")
    (trainer / "ae.pt").unlink()
    (trainer / "checkpoints").mkdir()
    torch.save(state, trainer / "checkpoints" / "ae_100000.pt")
    assert dl.detect(run) and detect_format(run) == "dictionary_learning"
    assert sweep_paths(str(run)) is None  # one SAE, not a sweep folder without SAEs
    x = _x()
    sae = load_job_sae(run)
    torch.testing.assert_close(sae.encode(x), _library_forward("MatroyshkaBatchTopKSAE", state, x)[0])
    assert sae.trained_on["layer"] == 22 and sae.trained_on["checkpoint"] == "checkpoints/ae_100000.pt"
    for i in (1, 10, 2):
        _write(run / f"trainer_{i}", "BatchTopKSAE", _library_state("BatchTopKSAE", seed=i))
    with pytest.raises(ValueError, match=r"holds 4 dictionary_learning trainers \(trainer_0, trainer_1, trainer_2, "):
        load(run)
    assert not dl.detect(tmp_path / "nothing_here")


EXPORTS = [("relu", False), ("topk", False), ("batchtopk", False), ("matryoshka", False), ("matryoshka", True)]


@pytest.mark.parametrize("arch, paper", EXPORTS)
def test_export_then_import_is_exact_and_the_library_forward_agrees(tmp_path, arch, paper):
    cfg = SAEConfig(arch=arch, d_in=D, n_latents=F, k=K, group_fractions=(0.25, 0.75) if arch == "matryoshka" else None)
    sae = build_sae(cfg, seed=0)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1, generator=_g(2))
        sae.b_dec.normal_(0, 1.0, generator=_g(3))
        sae.threshold.fill_(0.2)
        sae.input_scale.fill_(1.7)  # folded on export
    sae.trained_on = {"model": "clip_l14_336", "pretrained": "openai", "layer": 22, "tokens": "cls"}
    out = dl.save(sae, tmp_path / "export", **({"matryoshka_class": "MatroyshkaBatchTopKSAE"} if paper else {}))
    raw = torch.load(out / "ae.pt", weights_only=True)
    trainer = json.loads((out / "config.json").read_text())["trainer"]
    dict_class = trainer["dict_class"]
    assert (
        dict_class
        == {
            "relu": "AutoEncoder",
            "topk": "AutoEncoderTopK",
            "batchtopk": "BatchTopKSAE",
            "matryoshka": "MatroyshkaBatchTopKSAE" if paper else "MatryoshkaBatchTopKSAE",
        }[arch]
    )
    assert set(raw) == set(dl._KEYS[arch]) | ({"threshold"} if arch == "topk" else set())
    assert trainer["layer"] == 22 and trainer["lm_name"] == "openai/clip-vit-large-patch14-336"
    if arch != "relu":
        assert raw["k"].dtype == torch.int32 and int(raw["k"]) == K == trainer["k"]
    back = load(out)
    x = _x()
    assert torch.equal(back.encode(x), sae.encode(x)) or torch.allclose(back.encode(x), sae.encode(x), atol=1e-6)
    torch.testing.assert_close(back(x), sae(x), atol=1e-5, rtol=1e-5)
    assert back.arch == arch and back.group_sizes == sae.group_sizes
    assert {k: back.trained_on[k] for k in ("model", "layer", "tokens")} == {
        "model": "clip_l14_336",
        "layer": 22,
        "tokens": "cls",
    }
    f_ref, x_hat_ref = _library_forward(dict_class, raw, x)
    torch.testing.assert_close(f_ref, sae.encode(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x_hat_ref, sae(x), atol=1e-5, rtol=1e-5)


def test_relu_export_with_non_unit_decoder_rows_loads_unchanged_in_the_library(tmp_path):
    """A ReLU SAE whose decoder rows are not unit norm (every SAELens standard SAE): AutoEncoder.from_pretrained
    would renormalise them on load, so the export folds the norms; the file is then what the library encodes."""
    sae = build_sae(SAEConfig(arch="relu", d_in=D, n_latents=F), seed=0)
    norms_F = torch.rand(F, generator=_g(4)) * 3 + 0.2
    with torch.no_grad():
        sae.W_dec.mul_(norms_F[:, None])
        sae.b_enc.normal_(0, 0.1, generator=_g(2))
        sae.b_dec.normal_(0, 1.0, generator=_g(3))
    with pytest.warns(UserWarning, match="renormalises them on load"):
        out = dl.save(sae, tmp_path / "export")
    raw = torch.load(out / "ae.pt", weights_only=True)
    columns = raw["decoder.weight"].norm(dim=0)
    assert torch.allclose(columns, torch.ones_like(columns))  # AutoEncoder.normalize_decoder leaves it as is
    x = _x()
    f_lib = torch.relu((x - raw["bias"]) @ raw["encoder.weight"].T + raw["encoder.bias"])  # the file as written
    x_hat_lib = f_lib @ raw["decoder.weight"].T + raw["bias"]
    back = load(out)
    with torch.no_grad():
        torch.testing.assert_close(back.encode(x), f_lib, atol=5e-6, rtol=5e-6)
        torch.testing.assert_close(back(x), x_hat_lib, atol=5e-6, rtol=5e-6)
        torch.testing.assert_close(back(x), sae(x), atol=1e-5, rtol=1e-5)  # reconstructions unchanged
        torch.testing.assert_close(back.encode(x), sae.encode(x) * norms_F, atol=1e-5, rtol=1e-5)
    again = dl.save(back, tmp_path / "again")  # already unit norm: no warning, the same file
    assert all(torch.equal(v, torch.load(again / "ae.pt", weights_only=True)[k]) for k, v in raw.items())


def test_matryoshka_class_is_checked(tmp_path):
    sae = build_sae(SAEConfig(arch="matryoshka", d_in=D, n_latents=F, k=K, group_fractions=(0.25, 0.75)), seed=0)
    with pytest.raises(ValueError, match="MatryoshkaBatchTopKSAE.*MatroyshkaBatchTopKSAE"):
        dl.save(sae, tmp_path / "e", matryoshka_class="MatryoshkaSAE")


def test_batchtopk_without_threshold_exports_as_topk(tmp_path):
    sae = build_sae(SAEConfig(arch="batchtopk", d_in=D, n_latents=F, k=K), seed=0)
    with pytest.warns(UserWarning, match="AutoEncoderTopK"):
        out = dl.save(sae, tmp_path / "e")
    raw = torch.load(out / "ae.pt", weights_only=True)
    x = _x()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # vlmsae's own "threshold not estimated" warning
        want = sae.encode(x)
    torch.testing.assert_close(_library_forward("AutoEncoderTopK", raw, x)[0], want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(load(out).encode(x), want, atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------------------------------------- bad input
def test_group_sizes_that_do_not_sum_to_f_are_refused(tmp_path):
    state = _library_state("MatryoshkaBatchTopKSAE", group_sizes=(6, 12, 20))
    with pytest.raises(ValueError, match=r"group_sizes=\[6, 12, 20\] sum to 38.*F=48.*fix group_sizes"):
        load(_write(tmp_path / "t", "MatryoshkaBatchTopKSAE", state))


def test_config_group_sizes_contradicting_the_weights_are_refused(tmp_path):
    state = _library_state("MatryoshkaBatchTopKSAE")
    with pytest.raises(ValueError, match=r"trainer.group_sizes=\[8, 10, 30\].*make them agree"):
        load(_write(tmp_path / "t", "MatryoshkaBatchTopKSAE", state, group_sizes=[8, 10, 30]))


def test_threshold_of_the_wrong_shape_is_refused(tmp_path):
    state = _library_state("BatchTopKSAE")
    state["threshold"] = torch.zeros(F - 1)
    with pytest.raises(ValueError, match=r"threshold has shape \(47,\).*single scalar"):
        load(_write(tmp_path / "t", "BatchTopKSAE", state))


def test_jumprelu_threshold_of_the_wrong_length_is_refused(tmp_path):
    state = _library_state("JumpReluAutoEncoder")
    state["threshold"] = torch.zeros(F + 2)
    with pytest.raises((ValueError, NotImplementedError), match=r"threshold has shape \(50,\).*\(48,\)|JumpReLUSAE"):
        load(_write(tmp_path / "t", "JumpReluAutoEncoder", state))


def test_k_contradicting_config_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"k=4 in the weights but trainer.k=8"):
        load(_write(tmp_path / "t", "BatchTopKSAE", _library_state("BatchTopKSAE"), k=8))


def test_missing_keys_and_unknown_class_are_named(tmp_path):
    state = _library_state("BatchTopKSAE")
    del state["b_dec"]
    with pytest.raises(ValueError, match=r"lacks \['b_dec'\] for dict_class 'BatchTopKSAE'"):
        load(_write(tmp_path / "a", "BatchTopKSAE", state))
    with pytest.raises(ValueError, match=r"dict_class 'GatedAutoEncoder' is not supported; supported: AutoEncoder"):
        load(_write(tmp_path / "b", "GatedAutoEncoder", _library_state("AutoEncoder")))


def test_a_pickle_that_needs_code_is_refused_and_not_run(tmp_path):
    dpath = _write(tmp_path / "t", "BatchTopKSAE", _library_state("BatchTopKSAE"))
    torch.save({"encoder.weight": torch.zeros(F, D), "evil": Custom()}, dpath / "ae.pt")
    with pytest.raises(ValueError, match=r"needs code to unpickle.*nothing in it was executed") as err:
        load(dpath)
    assert isinstance(err.value.__cause__, pickle.UnpicklingError)


def test_training_backup_is_refused_with_the_fix(tmp_path):
    dpath = _write(tmp_path / "t", "BatchTopKSAE", _library_state("BatchTopKSAE"))
    backup = {"step": 10, "ae": _library_state("BatchTopKSAE"), "optimizer": {"state": {}}, "norm_factor": 2.0}
    torch.save(backup, dpath / "ae.pt")
    with pytest.raises(ValueError, match=r"mid-training backup.*checkpoints/ae_<step>.pt"):
        load(dpath)


def test_an_export_from_before_the_trained_on_rename_keeps_its_exact_record(tmp_path):
    """vlmsae's own export wrote the training record under ``vlmsae.source`` before it was ``trained_on``."""
    sae = build_sae(SAEConfig(arch="topk", d_in=8, n_latents=16, k=2), seed=0)
    sae.trained_on = {"model": "clip_l14_336", "pretrained": "openai", "layer": 22, "tokens": "random_k", "tokens_k": 3}
    out = dl.save(sae, tmp_path / "export")
    config = json.loads((out / "config.json").read_text())
    config["vlmsae"]["source"] = config["vlmsae"].pop("trained_on")
    (out / "config.json").write_text(json.dumps(config))
    back = load(out).trained_on
    assert {k: back[k] for k in ("model", "pretrained", "layer", "tokens", "tokens_k")} == sae.trained_on

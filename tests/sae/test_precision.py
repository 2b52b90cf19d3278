"""The precision policy (vlmsae.sae.precision): float32 master weights, and selection, threshold and all SAE
compute in float32 whatever the trainer's autocast says, on the dense and the sparse path alike."""

from __future__ import annotations

import json

import pytest
import torch

from vlmsae.sae import SAEConfig, build_sae, load_sae, save_sae, set_input_scale_, train_steps

D_IN, N_LATENTS, K, BATCH, STEPS = 24, 96, 4, 80, 8
KERNELS = ("dense", "sparse")


def _sae(arch: str, kernel: str):
    extra = {"group_fractions": (0.25, 0.25, 0.5)} if arch == "matryoshka" else {}
    cfg = SAEConfig(
        arch=arch,
        d_in=D_IN,
        n_latents=N_LATENTS,
        k=K,
        sparse_kernel=kernel,
        dead_after_samples=2 * BATCH,
        threshold_start_step=2,
        threshold_beta=0.5,
        **extra,
    )
    sae = build_sae(cfg, seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        sae.b_enc.copy_(0.1 * torch.randn(N_LATENTS, generator=g))
        sae.b_dec.copy_(torch.randn(D_IN, generator=g))
    set_input_scale_(sae, 0.7)
    return sae


def _batches():
    g = torch.Generator().manual_seed(2)
    # Stored activations are half precision, as in the activation store.
    return [(3 * torch.randn(BATCH, D_IN, generator=g)).to(torch.bfloat16) for _ in range(STEPS)]


def _train(arch: str, kernel: str, autocast: bool):
    """Train STEPS steps (forward, backward and optimiser step all under bf16 CPU autocast when asked, as
    Lightning's bf16-mixed does); returns the SAE, its selections per step and its threshold per step."""
    sae = _sae(arch, kernel)
    assert sae.use_sparse_path(BATCH) == (kernel == "sparse")
    selections, thresholds = [], []
    select = sae._select

    def recording_select(pre):
        rows_Z, cols_Z, vals_Z = select(pre)
        selections.append((vals_Z.dtype, torch.sort(rows_Z * N_LATENTS + cols_Z).values))
        return rows_Z, cols_Z, vals_Z

    sae._select = recording_select
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        train_steps(
            sae, _batches(), lr=1e-2, init=False, on_step=lambda step, out: thresholds.append(float(sae.threshold))
        )
    return sae, selections, thresholds


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "matryoshka"])
def test_selection_and_threshold_ignore_autocast_and_kernel(arch):
    runs = {(kernel, autocast): _train(arch, kernel, autocast) for kernel in KERNELS for autocast in (False, True)}
    ref_sae, ref_sel, ref_thr = runs[("dense", False)]
    assert len(ref_sel) == STEPS
    if arch != "topk":
        assert ref_thr[0] < 0 < ref_thr[2] != ref_thr[-1]  # the EMA started at step 2 and moved
    for (kernel, autocast), (sae, sel, thr) in runs.items():
        tag = f"{kernel}, autocast={autocast}"
        for step, ((dtype, flat_Z), (_, ref_flat_N)) in enumerate(zip(sel, ref_sel)):
            assert dtype == torch.float32, f"{tag}: step {step} selected from {dtype} pre-activations"
            assert torch.equal(flat_Z, ref_flat_N), f"{tag}: step {step} selected other latents than fp32 dense"
        torch.testing.assert_close(torch.tensor(thr), torch.tensor(ref_thr), rtol=1e-5, atol=1e-6, msg=tag)
        for name, p in sae.named_parameters():
            assert p.dtype == torch.float32, f"{tag}: {name} master weights are {p.dtype}"
            torch.testing.assert_close(p, dict(ref_sae.named_parameters())[name], rtol=1e-4, atol=1e-5, msg=tag)
        # Autocast changes nothing at all inside the SAE: same kernel, bit-identical run.
        no_amp_sae, _no_amp_sel, no_amp_thr = runs[(kernel, False)]
        assert thr == no_amp_thr, tag
        for name, p in sae.named_parameters():
            assert torch.equal(p, dict(no_amp_sae.named_parameters())[name]), f"{tag}: {name}"


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_inference_encode_decode_ignore_autocast(arch):
    sae, _, _ = _train(arch, "dense", autocast=False)
    x_BD = _batches()[0]
    want_codes, want_hat = sae.encode(x_BD), sae.decode(sae.encode(x_BD))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        codes, x_hat, z = sae.encode(x_BD), sae(x_BD), sae.encode_pre(x_BD)
        sparse_hat = sae.decode(sae.encode(x_BD, sparse=True))
    assert codes.dtype == x_hat.dtype == z.dtype == sparse_hat.dtype == torch.float32
    assert torch.equal(codes, want_codes) and torch.equal(x_hat, want_hat)
    torch.testing.assert_close(sparse_hat, want_hat)


def test_selection_preacts_ignores_autocast():
    from vlmsae.sae.sparse import selection_preacts

    g = torch.Generator().manual_seed(3)
    x, W, b = torch.randn(8, 5, generator=g), torch.randn(11, 5, generator=g), torch.randn(11, generator=g)
    want = torch.addmm(b, x, W.T)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = selection_preacts(x, W, b)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want)


def test_fp32_region_forces_full_precision_matmuls_and_restores_the_setting():
    from vlmsae.sae.precision import fp32_region

    previous = torch.get_float32_matmul_precision()
    seen = {}
    try:
        torch.set_float32_matmul_precision("high")  # what Lightning suggests on tensor-core GPUs (TF32)
        sae = _sae("topk", "dense")
        real_addmm = torch.addmm

        def spying_addmm(*args, **kwargs):
            seen["precision"] = torch.get_float32_matmul_precision()
            seen["autocast"] = torch.is_autocast_enabled("cpu")
            return real_addmm(*args, **kwargs)

        torch.addmm = spying_addmm
        try:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                sae.loss(_batches()[0])
        finally:
            torch.addmm = real_addmm
        assert seen == {"precision": "highest", "autocast": False}
        assert torch.get_float32_matmul_precision() == "high"  # restored on exit
        with pytest.raises(RuntimeError, match="boom"), fp32_region("cpu"):
            raise RuntimeError("boom")
        assert torch.get_float32_matmul_precision() == "high"  # restored on errors too
    finally:
        torch.set_float32_matmul_precision(previous)


def test_checkpoint_records_the_precision_policy(tmp_path):
    from vlmsae.formats import read_sae_config

    sae = _sae("batchtopk", "auto")
    want = {
        "policy": "fp32",
        "master": "float32",
        "selection": "float32",
        "matmul": "float32",
        "autocast": "off inside the SAE",
        "float32_matmul_precision": "highest",
    }
    save_sae(sae, tmp_path / "plain")
    assert read_sae_config(tmp_path / "plain").precision == {**want, "trainer_precision": None}
    save_sae(sae, tmp_path / "given", trainer_precision="bf16-mixed")
    info = json.loads((tmp_path / "given" / "config.json").read_text())
    assert info["precision"] == {**want, "trainer_precision": "bf16-mixed"}
    sae.trainer_precision = "16-mixed"  # what the Lightning module sets at fit start
    save_sae(sae, tmp_path / "attr")
    assert read_sae_config(tmp_path / "attr").precision["trainer_precision"] == "16-mixed"
    loaded = load_sae(tmp_path / "attr")
    assert loaded.trainer_precision == "16-mixed"  # survives a load -> save round trip
    save_sae(loaded, tmp_path / "again")
    assert read_sae_config(tmp_path / "again").precision == {**want, "trainer_precision": "16-mixed"}


def test_non_float32_master_weights_and_other_trainer_precisions_are_refused():
    from vlmsae.sae.precision import check_master_weights, check_trainer_precision

    sae = _sae("topk", "dense")
    check_master_weights(sae, "32-true")  # float32 weights: fine
    with pytest.raises(ValueError, match=r"W_dec is torch.bfloat16 \(trainer.precision='32-true'\).*float32 master"):
        check_master_weights(sae.to(torch.bfloat16), "32-true")
    assert check_trainer_precision("32-true") == "32-true" and check_trainer_precision(32) == "32"
    for bad in ("bf16-mixed", "16-mixed", "bf16-true", "64-true"):
        with pytest.raises(ValueError, match=f"trainer.precision='{bad}' is not supported.*32-true"):
            check_trainer_precision(bad)


@pytest.fixture(scope="module")
def small_store(tmp_path_factory):
    from vlmsae.data.store import write_acts_store
    from vlmsae.data.synthetic import PlantedDictionary

    x = PlantedDictionary.random(d_in=64, n_atoms=128, k=3, scale=5.0, seed=0).sample(4_000, seed=1).x
    dpath = tmp_path_factory.mktemp("acts") / "layer2"
    write_acts_store(dpath, x.half(), rows_per_chunk=500, chunks_per_shard=2, meta={"model": "tiny", "layer": 2})
    return dpath


def _train_overrides(store, *extra):
    return [
        "data=acts",
        f"data.acts={store}",
        "data.batch_size=128",
        "data.num_workers=0",
        "data.shuffle_buffer=512",
        "data.val_fraction=0.25",
        "trainer.max_steps=3",
        "trainer.val_check_interval=1000",
        "trainer.limit_val_batches=1",
        "trainer.scale_batches=1",
        "logger=none",
        "sae=batchtopk",
        *extra,
    ]


@pytest.mark.slow
def test_training_run_records_the_policy_and_refuses_other_precisions(compose_cfg, small_store, tmp_path):
    import lightning as L

    from vlmsae.train import run

    seen = []

    class _SpyBackward(L.Callback):
        def on_train_start(self, trainer, pl_module):
            pl_module.sae.W_enc.register_hook(lambda grad: seen.append(torch.get_float32_matmul_precision()))

    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")  # TF32, as Lightning suggests on tensor-core GPUs
        run(
            compose_cfg("train", _train_overrides(small_store)), out_dpath=tmp_path / "fp32", callbacks=[_SpyBackward()]
        )
    finally:
        torch.set_float32_matmul_precision(previous)
    assert seen == ["highest"] * 3  # the backward of every step ran at full float32 precision
    info = json.loads((tmp_path / "fp32" / "sae" / "config.json").read_text())
    assert info["precision"] == {
        "policy": "fp32",
        "master": "float32",
        "selection": "float32",
        "matmul": "float32",
        "autocast": "off inside the SAE",
        "float32_matmul_precision": "highest",
        "trainer_precision": "32-true",
    }
    with pytest.raises(ValueError, match="trainer.precision='bf16-mixed' is not supported"):
        run(
            compose_cfg("train", _train_overrides(small_store, "trainer.precision=bf16-mixed")),
            out_dpath=tmp_path / "mixed",
        )
    assert not (tmp_path / "mixed" / "sae").exists()  # refused before any training


def test_lit_module_checks_precision_at_fit_start():
    """Callers of SAELitModule other than vlmsae.train get the same check when Lightning starts fitting."""
    from types import SimpleNamespace

    from vlmsae.lit.module import SAELitModule

    module = SAELitModule(_sae("topk", "dense").cfg)
    module.trainer = SimpleNamespace(precision="32-true")
    module.on_fit_start()
    assert module.sae.trainer_precision == "32-true"
    module.trainer = SimpleNamespace(precision="bf16-mixed")
    with pytest.raises(ValueError, match="bf16-mixed"):
        module.on_fit_start()


def test_backward_of_train_steps_runs_at_full_float32_precision():
    """The backward's matmuls (dense path: dW_enc, dx, the decoder's) also ignore a global TF32 setting."""
    previous = torch.get_float32_matmul_precision()
    seen = []
    try:
        torch.set_float32_matmul_precision("high")
        sae = _sae("topk", "dense")
        sae.W_enc.register_hook(lambda grad: seen.append(torch.get_float32_matmul_precision()))
        train_steps(sae, _batches()[:2], lr=1e-3, init=False)
        assert seen == ["highest", "highest"]
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(previous)


def test_checkpoint_records_the_chosen_policy_and_old_configs_load(tmp_path):
    from vlmsae.formats import read_sae_config

    cfg = SAEConfig(arch="topk", d_in=D_IN, n_latents=N_LATENTS, k=K, precision="fast_exact")
    save_sae(build_sae(cfg, seed=0), tmp_path / "fast")
    info = read_sae_config(tmp_path / "fast")
    assert info.config["precision"] == "fast_exact"
    assert info.precision["policy"] == "fast_exact" and info.precision["matmul"] == "bf16"  # CPU: bf16 inputs
    assert load_sae(tmp_path / "fast").cfg.precision == "fast_exact"
    # A config.json from before the key: the default (auto) applies, fp32 on this CPU.
    raw = json.loads((tmp_path / "fast" / "config.json").read_text())
    del raw["config"]["precision"]
    (tmp_path / "fast" / "config.json").write_text(json.dumps(raw))
    old = load_sae(tmp_path / "fast")
    assert old.cfg.precision == "auto" and old.precision_policy == "fp32"

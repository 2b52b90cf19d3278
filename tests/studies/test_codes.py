"""Every job takes its SAE through ``vlmsae.sae.load`` (``sae_path=`` + ``sae_format=``) and runs on what the
loaded SAE's ``trained_on`` says it reads; an SAE that does not fit the chosen model/layer, or that leaves the
model or the layer unsaid, is refused before any image is encoded, naming the one option still needed."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import pytest

from vlmsae.sae import SAEConfig, build_sae, save_sae


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("VLMSAE_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def _sae(dpath: Path, d_in: int = 64, **trained_on) -> Path:
    """A vlmsae TopK SAE saved with ``source`` (the tiny open_clip: 4 blocks, width 64, embedding 32)."""
    sae = build_sae(SAEConfig(arch="topk", d_in=d_in, n_latents=32, k=4), seed=0)
    return save_sae(sae, dpath, trained_on=trained_on)


def _no_model_load(monkeypatch):
    """Fail the test if a job gets as far as loading model weights (the refusals must come first)."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the SAE inputs were checked")

    # studies.sweep binds load_tap at import: patch it there too, so a first import under the patch keeps nothing
    for where in ("vlmsae.studies.sweep.load_tap", "vlmsae.models.load_tap"):
        monkeypatch.setattr(where, refuse)


def _fake_sae(d_in: int, **trained_on):
    return SimpleNamespace(d_in=d_in, trained_on=trained_on)


def _ms_cfg(compose_cfg, sae_dpath, tmp_path, *extra):
    return compose_cfg(
        "monosemanticity",
        [
            f"sae_path={sae_dpath}",
            "data=tiny",
            "data.n_per_class=2",
            "embedder=pixels",
            "baseline=false",
            f"embed_cache={tmp_path / 'emb'}",
            "progress=false",
            "top_k=3",
            *extra,
        ],
    )


# --------------------------------------------------------------------------------- the source picks
def test_source_picks_model_layer_and_pool(home, tmp_path):
    from vlmsae.models.open_sae import load_job_sae, open_tapped_sae

    def open_sae_checkpoint(sae_dpath):
        return open_tapped_sae(load_job_sae(sae_dpath))

    src = open_sae_checkpoint(_sae(tmp_path / "cls", model="tiny", layer=-2, tokens="cls"))
    assert (src.spec.name, src.layer, src.pool, src.tap.width) == ("tiny", 2, "cls", 64)
    src = open_sae_checkpoint(_sae(tmp_path / "patch", model="tiny", layer=1, tokens="patches"))
    assert (src.layer, src.pool) == (1, "mean")
    src = open_sae_checkpoint(_sae(tmp_path / "last", d_in=32, model="tiny", layer="last", tokens="cls"))
    assert src.layer == "last" and src.tap.embed_dim == 32


def test_a_published_pretrained_id_picks_its_registered_model():
    from vlmsae.models.open_sae import resolve_sae_inputs

    sae = _fake_sae(1024, model=None, pretrained="openai/clip-vit-large-patch14-336", layer=22, tokens="random_k")
    spec, layer, pool = resolve_sae_inputs(sae, sae.trained_on)
    assert (spec.name, layer, pool) == ("clip_l14_336_hf", 22, "mean")
    # A bare tag ("openai") fits several models: no guess, the error names model=.
    with pytest.raises(ValueError, match=r"pretrained='openai' matches no single model.*pass model=<name>"):
        resolve_sae_inputs(_fake_sae(1024, pretrained="openai", layer=22), {"pretrained": "openai", "layer": 22})


def test_a_foreign_pretrained_name_does_not_replace_the_registered_weights():
    from vlmsae.models.open_sae import trained_on_model_spec

    native = trained_on_model_spec({"model": "clip_l14", "pretrained": "laion2b_s32b_b82k"})
    assert native.pretrained == "laion2b_s32b_b82k"  # a vlmsae SAE trained on other weights of the same arch
    foreign = {"model": "clip_l14", "pretrained": "openai/clip-vit-large-patch14", "format": "saelens"}
    assert trained_on_model_spec(foreign).pretrained == "openai"


def test_unknown_tokens_default_to_cls_with_a_note(caplog):
    from vlmsae.models.open_sae import resolve_sae_inputs

    with caplog.at_level(logging.WARNING, logger="vlmsae.models.open_sae"):
        _, _, pool = resolve_sae_inputs(_fake_sae(64, model="tiny", layer=2), {"model": "tiny", "layer": 2})
    assert pool == "cls" and "trained_on.tokens is None): using pool=cls" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="vlmsae.models.open_sae"):  # no CLS token: mean instead
        src = {"model": "siglip_so400m", "layer": 20, "tokens": None}
        assert resolve_sae_inputs(_fake_sae(1152, **src), src)[2] == "mean"
    assert "using pool=mean" in caplog.text
    with pytest.raises(ValueError, match=r"pool=cls: siglip_so400m has no CLS token.*pool=mean"):
        resolve_sae_inputs(_fake_sae(1152, **src), src, pool="cls")


# --------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize(
    "d_in, trained_on, extra, pattern",
    [
        (
            64,
            {"layer": 2, "tokens": "cls"},
            [],
            r"does not say which model it reads \(trained_on.model is None\): pass model=<name> \(one of: .*tiny",
        ),
        (
            64,
            {"model": "tiny", "tokens": "cls"},
            [],
            r"does not say which layer it reads \(trained_on.layer is None\): pass layer=<L> \(a block index 0\.\.3 of "
            r"tiny",
        ),
        (64, {"model": "clip_h14", "layer": 2}, [], r"says it reads model 'clip_h14'\. Unknown model.*Pass model="),
        (
            48,
            {"model": "tiny", "layer": 2, "tokens": "cls"},
            [],
            r"reads 48-d activations \(d_in=48\) but tiny's layer 2's residual stream is 64-d.*model=<name> layer=<L",
        ),
        (
            64,
            {"model": "tiny", "layer": "last", "tokens": "cls"},
            [],
            r"reads 64-d .* tiny's the projected image embedding \(layer=last\) is 32-d",
        ),
        (
            64,
            {"model": "tiny", "layer": 7, "tokens": "cls"},
            [],
            r"Layer 7 is out of range for tiny, which has 4 blocks.*came from the SAE's trained_on\.layer; "
            r"pass layer=<L>",
        ),
        (
            64,
            {"model": "tiny", "layer": 2, "tokens": "cls"},
            ["layer=9"],
            r"Layer 9 is out of range for tiny.*came from layer=;",
        ),
        (32, {"layer": "last"}, ["model=tiny_llava"], r"tiny_llava has no projected image embedding.*pass layer=<L>"),
    ],
    ids=["no-model", "no-layer", "unknown-model", "width", "embed-width", "source-layer", "option-layer", "no-embed"],
)
def test_monosemanticity_refuses_before_loading_the_model(
    compose_cfg, home, tmp_path, monkeypatch, d_in, trained_on, extra, pattern
):
    from vlmsae.monosemanticity import run

    sae_dpath = _sae(tmp_path / "sae", d_in=d_in, **trained_on)
    _no_model_load(monkeypatch)
    with pytest.raises(ValueError, match=pattern):
        run(_ms_cfg(compose_cfg, sae_dpath, tmp_path, *extra), out_dpath=tmp_path / "out")
    assert not (tmp_path / "out" / "top_images").exists()


def test_a_model_override_that_does_not_fit_is_refused(compose_cfg, home, tmp_path, monkeypatch):
    """The SAE fits the tiny CLIP, but the user points it at the tiny LLaVA tower (32-d)."""
    from vlmsae.monosemanticity import run

    sae_dpath = _sae(tmp_path / "sae", model="tiny", layer=2, tokens="cls")
    _no_model_load(monkeypatch)
    with pytest.raises(ValueError, match=r"reads 64-d .* tiny_llava's layer 2's residual stream is 32-d"):
        run(_ms_cfg(compose_cfg, sae_dpath, tmp_path, "model=tiny_llava"), out_dpath=tmp_path / "out")


def test_the_loaded_tap_is_checked_too(home, tmp_path, monkeypatch):
    """A spec that claims the wrong width (an overridden model node) is caught once the weights load."""
    from vlmsae.models import get_model_spec
    from vlmsae.models.open_sae import open_tapped_sae
    from vlmsae.sae import load_sae

    sae = load_sae(_sae(tmp_path / "sae", d_in=48, model="tiny", layer=2, tokens="cls"))
    lying = get_model_spec("tiny", width=48)  # the tiny CLIP is really 64-d
    with pytest.raises(ValueError, match=r"reads 48-d .* tiny's layer 2's residual stream is 64-d"):
        open_tapped_sae(sae, model=lying)


def test_hierarchy_refuses_an_sae_without_a_model(compose_cfg, home, tmp_path, monkeypatch):
    from vlmsae.hierarchy import run

    sae_dpath = _sae(tmp_path / "sae", layer=2, tokens="cls")
    _no_model_load(monkeypatch)
    with pytest.raises(ValueError, match=r"does not say which model it reads.*pass model=<name>"):
        run(compose_cfg("hierarchy", [f"sae_path={sae_dpath}"]), out_dpath=tmp_path / "out")


@pytest.mark.parametrize(
    "d_in, layer, pattern",
    [
        (48, 2, r"reads 48-d activations but LlavaForConditionalGeneration's vision tower is 32-d"),
        (32, 7, r"layer=7 is out of range: the vision tower has 4 blocks \(0\.\.3.*pass layer=<block>"),
        (32, None, r"does not say which vision block .* pass layer=<block>"),
    ],
    ids=["width", "layer", "no-layer"],
)
def test_steer_refuses_before_any_image(compose_cfg, home, tmp_path, monkeypatch, d_in, layer, pattern):
    from vlmsae.steer import run

    sae_dpath = _sae(tmp_path / "sae", d_in=d_in, model="tiny_llava", layer=layer, tokens="random_k")

    def no_images(*args, **kwargs):
        raise AssertionError("images were read before the SAE was checked against the tower")

    monkeypatch.setattr("vlmsae.steering.compare.load_images", no_images)
    with pytest.raises(ValueError, match=pattern):
        run(compose_cfg("steer", [f"sae_path={sae_dpath}", "max_new_tokens=2"]), out_dpath=tmp_path / "out")


# --------------------------------------------------------------------------------- one loader, sae_format
class _Spy(Exception):
    pass


@pytest.fixture
def spy_load(monkeypatch):
    """Replace vlmsae.sae.load: record (path, sae_format) and stop the job there."""
    calls = []

    def load(path, sae_format=None, device="cpu"):
        calls.append((str(path), sae_format))
        raise ValueError(f"spy stops here: {path} as {sae_format}")

    monkeypatch.setattr("vlmsae.sae.load", load)
    return calls


def test_every_job_loads_through_vlmsae_sae_load(compose_cfg, home, tmp_path, spy_load, monkeypatch):
    from vlmsae import hierarchy, monosemanticity, steer, steer_eval

    _no_model_load(monkeypatch)
    hf = "hf://org/repo/sub@main"
    (tmp_path / "top").mkdir()
    jobs = [
        (monosemanticity.run, _ms_cfg(compose_cfg, hf, tmp_path, "sae_format=saelens")),
        (hierarchy.run, compose_cfg("hierarchy", [f"sae_path={hf}", "sae_format=saev"])),
        (steer.run, compose_cfg("steer", [f"sae_path={hf}", "sae_format=sparsify"])),
        (
            steer_eval.run,
            compose_cfg(
                "steer_eval",
                [f"sae_path={hf}", f"top_images={tmp_path / 'top'}", "embedder=tiny", "sae_format=dictionary_learning"],
            ),
        ),
    ]
    for i, (run, cfg) in enumerate(jobs):
        with pytest.raises(ValueError, match=r"sae_path='hf://org/repo/sub@main' .*spy stops here"):
            run(cfg, out_dpath=tmp_path / f"out{i}")
    # The hf:// path arrives intact (a Path would have collapsed "//"), with each job's sae_format.
    assert spy_load == [(hf, "saelens"), (hf, "saev"), (hf, "sparsify"), (hf, "dictionary_learning")]
    with pytest.raises(Exception, match=r"sae_format"):  # the key is typed: a list is not a format name
        compose_cfg("monosemanticity", ["sae_path=/x", "sae_format=[a,b]"])


def test_browser_heatmaps_load_through_vlmsae_sae_load(home, tmp_path, spy_load):
    from vlmsae.report.browser import recompute_heatmaps

    ms_config = {"sae_path": "hf://org/repo", "sae_format": "saelens", "model": None, "layer": None}
    trained_on = {"model": "tiny", "layer": 1, "tokens": "patches"}
    values, reason = recompute_heatmaps(ms_config, {0: [(0, 0, 1)]}, ["x.png"], sae_trained_on=trained_on)
    assert values == {} and "spy stops here" in reason and spy_load == [("hf://org/repo", "saelens")]
    recompute_heatmaps(ms_config, {0: [(0, 0, 1)]}, ["x.png"], sae_trained_on=trained_on, sae_format="saev")
    assert spy_load[-1] == ("hf://org/repo", "saev")  # browse's own sae_format= wins over the MS run's


@pytest.mark.slow
def test_monosemanticity_runs_on_a_foreign_sae_from_its_source(compose_cfg, home, tmp_path, monkeypatch):
    """A loaded SAE with no vlmsae config.json anywhere (as a foreign format gives): model, layer and pool
    come from ``sae.trained_on`` alone, and the run records that trained_on for the browser."""
    from vlmsae.formats import read_run_info
    from vlmsae.monosemanticity import run

    foreign = build_sae(SAEConfig(arch="topk", d_in=64, n_latents=32, k=4), seed=0).eval()
    foreign.trained_on = {
        "model": "tiny",
        "pretrained": "some/lib-name",
        "layer": 2,
        "tokens": None,
        "input_normalisation": "none",
        "format": "saelens",
        "original_path": "hf://org/repo",
    }

    def load(path, sae_format=None, device="cpu"):
        assert (path, sae_format) == ("hf://org/repo", None)
        return foreign

    monkeypatch.setattr("vlmsae.sae.load", load)
    summary = run(_ms_cfg(compose_cfg, "hf://org/repo", tmp_path), out_dpath=tmp_path / "out")
    assert summary["n_latents"] == 32 and summary["n_images"] == 32
    info = read_run_info(tmp_path / "out")
    assert info.extra["sae_trained_on"]["format"] == "saelens" and info.extra["sae_path"] == "hf://org/repo"
    from vlmsae.metrics.topimages import TopImages

    meta = TopImages.load(tmp_path / "out" / "top_images").meta
    assert (meta.get("model"), meta.get("layer"), meta.get("pool")) == ("tiny", 2, "cls")

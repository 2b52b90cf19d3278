"""vlmsae.formats: every shared on-disk format round-trips, says its version, refuses a newer one,
reads files written before versions existed as version 1, and is the only place that reads them."""

from __future__ import annotations

import ast
import json
import math
from pathlib import Path

import pytest
import torch

from vlmsae import formats
from vlmsae.formats import (
    FormatVersionError,
    HierarchySummary,
    LatentRow,
    LatentsTable,
    MsSummary,
    RunInfo,
    SteerResult,
    TopImagesIndex,
)

REPO = Path(__file__).resolve().parents[1]


def _table() -> LatentsTable:
    return LatentsTable(
        [
            LatentRow(0, 0.5, 0.25, 3.0, 1, ("cls_a/0.png", "cls_b/1.png")),
            LatentRow(1, math.nan, 0.0, 0.0, 0, ()),
            LatentRow(2, 0.1234567, 1e-7, 12345678.0, None, ("x#y",)),
        ]
    )


# ------------------------------------------------------------------------------------------
# latents.csv
# ------------------------------------------------------------------------------------------
def test_latents_csv_round_trip_and_exact_text(tmp_path: Path):
    fpath = formats.write_latents_csv(tmp_path, _table())
    assert fpath == tmp_path / "latents.csv"
    # The version line, then the CSV the monosemanticity job always wrote (6 decimals for ms, "nan" = dead).
    assert fpath.read_bytes().decode() == (
        "# vlmsae latents.csv format_version=3\r\n"
        "latent,ms,freq,max_act,group,top_keys\r\n"
        "0,0.500000,0.25,3,1,cls_a/0.png|cls_b/1.png\r\n"
        "1,nan,0,0,0,\r\n"
        "2,0.123457,1e-07,1.23457e+07,,x#y\r\n"
    )
    back = formats.read_latents_csv(tmp_path)  # the run folder or the file itself
    assert back.format_version == 3 and formats.read_latents_csv(fpath).rows[0] == back.rows[0]
    assert [r.latent for r in back.rows] == [0, 1, 2]
    assert back.rows[0] == LatentRow(0, 0.5, 0.25, 3.0, 1, ("cls_a/0.png", "cls_b/1.png"))
    assert math.isnan(back.rows[1].ms) and back.rows[1].top_keys == () and back.rows[2].group is None
    assert back.rows[2].top_keys == ("x#y",)
    ms_K = back.ms_K(4)
    assert ms_K.dtype == torch.float64 and ms_K[0] == 0.5 and ms_K[2] == pytest.approx(0.123457)
    assert math.isnan(ms_K[1]) and math.isnan(ms_K[3])  # dead, and absent from the file


def test_latents_csv_name_columns_round_trip_exactly(tmp_path: Path):
    # Version 3: the name columns appear when any row has a name; "" = named run, latent without images.
    table = LatentsTable(
        [
            LatentRow(0, 0.5, 0.25, 3.0, 1, ("a",), name="red", name_score=0.8125, names=("red", "blue", "car")),
            LatentRow(1, math.nan, 0.0, 0.0, 0, (), name=""),
        ]
    )
    fpath = formats.write_latents_csv(tmp_path, table)
    assert fpath.read_bytes().decode() == (
        "# vlmsae latents.csv format_version=3\r\n"
        "latent,ms,freq,max_act,group,top_keys,name,name_score,names\r\n"
        "0,0.500000,0.25,3,1,a,red,0.812500,red|blue|car\r\n"
        "1,nan,0,0,0,,,,\r\n"
    )
    back = formats.read_latents_csv(fpath)
    assert back.rows[0] == table.rows[0] and back.rows[1].name == "" and back.rows[1].names == ()
    assert math.isnan(back.rows[1].name_score) and back.rows[0].autointerp is None
    # autointerp columns come after the name columns, only when asked for
    rows = [LatentRow(0, 0.5, name="red", name_score=0.5, names=("red",), autointerp="dog", autointerp_score=0.25)]
    text = formats.write_latents_csv(tmp_path, LatentsTable(rows)).read_text()
    assert (
        text.splitlines()[1]
        == "latent,ms,freq,max_act,group,top_keys,name,name_score,names,autointerp,autointerp_score"
    )
    (row,) = formats.read_latents_csv(tmp_path).rows
    assert row.autointerp == "dog" and row.autointerp_score == 0.25 and row.names == ("red",)
    # A version-2 file (no name columns) reads with the names absent.
    fpath.write_text("# vlmsae latents.csv format_version=2\nlatent,ms,freq,max_act,group,top_keys\n0,0.5,0.1,1,0,a\n")
    (row,) = formats.read_latents_csv(fpath).rows
    assert formats.read_latents_csv(fpath).format_version == 2
    assert row.name is None and row.names == () and math.isnan(row.name_score) and row.autointerp is None


def test_latents_csv_stays_readable_by_pandas(tmp_path: Path):
    pd = pytest.importorskip("pandas")
    df = pd.read_csv(formats.write_latents_csv(tmp_path, _table()), skiprows=1)  # as documented in formats.py
    assert list(df.columns) == list(formats.LATENTS_COLUMNS) and df["latent"].tolist() == [0, 1, 2]
    assert df["top_keys"].tolist()[2] == "x#y"


def test_latents_csv_without_version_line_reads_as_version_1(tmp_path: Path):
    # As the monosemanticity job wrote it before formats.py (and as people write it by hand).
    (tmp_path / "latents.csv").write_text(
        "latent,ms,freq,max_act,group,top_keys\r\n0,0.500000,0.25,3,1,a|b\r\n1,nan,0,0,0,\r\n2,,0.1,1,0,\r\n"
    )
    table = formats.read_latents_csv(tmp_path / "latents.csv")
    assert table.format_version == 1
    assert table.rows[0] == LatentRow(0, 0.5, 0.25, 3.0, 1, ("a", "b"))
    assert math.isnan(table.rows[1].ms) and math.isnan(table.rows[2].ms)  # "nan" and empty: dead
    # Only latent and ms are required; the other columns read as NaN / None / ().
    (tmp_path / "min.csv").write_text("latent,ms\n3,0.7\n")
    (row,) = formats.read_latents_csv(tmp_path / "min.csv").rows
    assert row.latent == 3 and row.ms == 0.7 and math.isnan(row.freq) and row.group is None and row.top_keys == ()


@pytest.mark.parametrize(
    ("line", "found"),
    [("# vlmsae latents.csv format_version=4", "4"), ("# vlmsae latents.csv format_version=x", "'x'")],
)
def test_latents_csv_refuses_an_unknown_version(tmp_path: Path, line: str, found: str):
    fpath = tmp_path / "latents.csv"
    fpath.write_text(f"{line}\nlatent,ms\n0,0.5\n")
    with pytest.raises(FormatVersionError) as err:
        formats.read_latents_csv(fpath)
    _assert_version_message(str(err.value), fpath, found, "1, 2, 3")


def test_latents_csv_bad_content_names_the_problem(tmp_path: Path):
    fpath = tmp_path / "latents.csv"
    fpath.write_text("# something else\nlatent,ms\n")
    with pytest.raises(ValueError, match="format_version=<n>"):
        formats.read_latents_csv(fpath)
    fpath.write_text("# vlmsae latents.csv format_version=2\nlatent,ms\n0,0.5\n1,high\n")
    with pytest.raises(ValueError, match=r"line 4: ms='high' is not a number"):
        formats.read_latents_csv(fpath)
    fpath.write_text("id,score\n1,0.5\n")
    with pytest.raises(ValueError, match=r"lacks the column\(s\) \['latent', 'ms'\]"):
        formats.read_latents_csv(fpath)
    with pytest.raises(FileNotFoundError, match="vlmsae.monosemanticity"):
        formats.read_latents_csv(tmp_path / "nowhere")


# ------------------------------------------------------------------------------------------
# JSON formats
# ------------------------------------------------------------------------------------------
JSON_CASES = {
    "ms_summary.json": (
        formats.write_ms_summary,
        formats.read_ms_summary,
        MsSummary(
            mean=0.6,
            std=0.1,
            min=0.2,
            max=0.9,
            dead=1,
            n_latents=8,
            n_images=10,
            baseline={"mean": 0.4, "dead": 0},
            extra={"uniqueness": {"mean_jaccard": 0.0}, "undefined": 0},
        ),
    ),
    "hierarchy.json": (
        formats.write_hierarchy,
        formats.read_hierarchy,
        HierarchySummary(
            groups=[{"group": 0, "n_latents": 2, "depth_mean": 1.5}],
            group_sizes=[2],
            n_latents=2,
            n_scored=2,
            n_images=16,
            n_top=16,
            ranks=["kingdom", "family"],
            taxonomy="csv",
            sae_path="/sae",
            ms_run=None,
            paper_table2={"depth": [3.33]},
        ),
    ),
    "steer.json": (
        formats.write_steer,
        formats.read_steer,
        SteerResult(
            steered=["pencil"],
            baseline=["cat"],
            sweep={"0.0": ["cat"], "10.0": ["pencil"]},
            settings={"latents": {"4": 10.0}, "mode": "replace", "images": ["white"]},
        ),
    ),
    "steer_eval.json": (
        formats.write_steer_eval,
        formats.read_steer_eval,
        formats.SteerEvalResult(
            summary={"steered": {"mean": 0.3}},
            per_latent=[{"latent": 4, "steered": 0.3}],
            paper={"steered": 0.2},
            settings={"alpha": 30.0},
        ),
    ),
    "splice.json": (
        formats.write_splice,
        formats.read_splice,
        formats.SpliceResult(
            summary={"kl": 0.1, "nll_clean": 1.0, "frac_recovered_zero": 0.9},
            rows=[{"condition": "clean", "nll": 1.0, "kl": 0.0}],
            per_answer=[{"image": "white", "answer": "a cat", "n_tokens": 2}],
            notes=["a note"],
            settings={"layer": 2},
        ),
    ),
    "run_info.json": (
        formats.write_run_info,
        formats.read_run_info,
        RunInfo(
            config={"data": {"source": "folder"}},
            vlmsae_version="0.1.0",
            git_commit="abc",
            versions={"torch": "2"},
            command="python -m x",
            created="2024-01-01T00:00:00+00:00",
            extra={"status": "done"},
        ),
    ),
    "manifest.json": (
        formats.write_manifest,
        formats.read_manifest,
        formats.StoreManifest(
            d=4,
            n_rows=6,
            dtype="float16",
            n_shards=1,
            n_chunks=2,
            rows_per_chunk=4,
            shards=["acts-000000.tar"],
            mean=[0.0, 1.0, 2.0, 3.0],
            var=[1.0, 1.0, 1.0, 1.0],
            mean_sq_norm=18.0,
            versions={"torch": "2"},
            git_commit="abc",
            complete=True,
            model="tiny",
            layer="last",
            tokens="random_k",
            k=2,
            n_images=3,
            skipped=[{"key": "a.png", "reason": "truncated"}],
            skipped_by_reason={"truncated": 1},
            classes=["a", "b"],
            extra={"future_key": [1, 2]},
        ),
    ),
    "progress.json": (
        formats.write_progress,
        formats.read_progress,
        formats.StoreProgress(
            meta={"model": "tiny", "layer": 1},
            n_shards=2,
            n_rows=10,
            n_chunks=3,
            stats={"n": 10, "mean": [0.0], "m2": [1.0], "sq_norm_sum": 5.0},
            state={"next_pos": 5, "done": False},
            extra={"note": "x"},
        ),
    ),
}


@pytest.mark.parametrize("name", list(JSON_CASES))
def test_json_formats_round_trip(tmp_path: Path, name: str):
    write, read, obj = JSON_CASES[name]
    fpath = write(tmp_path, obj)
    assert fpath == tmp_path / name
    raw = json.loads(fpath.read_text())
    assert raw["format_version"] == 1 and next(iter(raw)) == "format_version"
    assert read(tmp_path) == obj and read(fpath) == obj
    # The extras sit at the top level beside the typed fields, as the jobs wrote them before formats.py.
    assert all(raw[k] == v for k, v in obj.extra.items()) and "extra" not in raw


def test_json_formats_keep_the_flat_layout(tmp_path: Path):
    raw = json.loads(formats.write_ms_summary(tmp_path, JSON_CASES["ms_summary.json"][2]).read_text())
    assert raw == {
        "format_version": 1,
        "mean": 0.6,
        "std": 0.1,
        "min": 0.2,
        "max": 0.9,
        "dead": 1,
        "n_latents": 8,
        "n_images": 10,
        "baseline": {"mean": 0.4, "dead": 0},
        "uniqueness": {"mean_jaccard": 0.0},
        "undefined": 0,
    }
    raw = json.loads(formats.write_steer(tmp_path, JSON_CASES["steer.json"][2]).read_text())
    assert "activation_steering" not in raw  # absent unless asked for, as vlmsae.steer always wrote it
    assert raw["steered"] == ["pencil"] and raw["sweep"]["10.0"] == ["pencil"]


@pytest.mark.parametrize("name", list(JSON_CASES))
def test_json_formats_without_version_read_as_version_1(tmp_path: Path, name: str):
    write, read, obj = JSON_CASES[name]
    raw = json.loads(write(tmp_path, obj).read_text())
    del raw["format_version"]  # as every job wrote it before formats.py
    (tmp_path / name).write_text(json.dumps(raw))
    back = read(tmp_path / name)
    assert back.format_version == 1 and back == obj


@pytest.mark.parametrize("name", list(JSON_CASES))
@pytest.mark.parametrize("version", [2, 0, "1"])
def test_json_formats_refuse_an_unknown_version(tmp_path: Path, name: str, version):
    write, read, obj = JSON_CASES[name]
    fpath = write(tmp_path, obj)
    fpath.write_text(json.dumps({**json.loads(fpath.read_text()), "format_version": version}))
    with pytest.raises(FormatVersionError) as err:
        read(fpath)
    _assert_version_message(str(err.value), fpath, repr(version), "1")


def test_json_formats_name_missing_keys_and_bad_types(tmp_path: Path):
    (tmp_path / "steer.json").write_text(json.dumps({"steered": ["a"]}))
    with pytest.raises(ValueError, match=r"lacks the key\(s\) \['baseline'\].*vlmsae.steer"):
        formats.read_steer(tmp_path)
    (tmp_path / "steer.json").write_text(json.dumps({"steered": "a", "baseline": []}))
    with pytest.raises(ValueError, match="steered must be list"):
        formats.read_steer(tmp_path)
    (tmp_path / "hierarchy.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON.*vlmsae.hierarchy"):
        formats.read_hierarchy(tmp_path)
    with pytest.raises(FileNotFoundError, match="vlmsae.monosemanticity"):
        formats.read_ms_summary(tmp_path)


def test_manifest_types_the_writers_keys_and_keeps_the_rest(tmp_path: Path):
    m = formats.StoreManifest.from_dict({"d": 4, "n_rows": 8, "model": "m", "pretrained": None, "new_key": 1})
    assert (m.d, m.n_rows, m.model, m.pretrained, m.layer) == (4, 8, "m", None, None) and m.extra == {"new_key": 1}
    raw = json.loads(formats.write_manifest(tmp_path, m).read_text())
    # The writer's keys are always there; the extraction's only when known (a store from write_acts_store has few).
    assert raw["d"] == 4 and "git_commit" in raw and "pretrained" not in raw and "layer" not in raw
    assert raw["new_key"] == 1
    with pytest.raises(ValueError, match="d must be int, got str"):
        formats.StoreManifest.from_dict({"d": "4"})
    (tmp_path / "manifest.json").write_text(json.dumps({"n_rows": 1.5}))
    with pytest.raises(ValueError, match=r"manifest.json: n_rows must be int.*vlmsae.extract"):
        formats.read_manifest(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"No manifest.json in .*run `python -m vlmsae.extract"):
        formats.read_manifest(tmp_path / "nowhere")


def _sae_config() -> formats.SAECheckpointConfig:
    return formats.SAECheckpointConfig(
        arch="topk",
        d_in=8,
        n_latents=16,
        k=2,
        group_sizes=[16],
        threshold=None,
        input_scale={"value": 1.5, "folded": True},
        n_steps=3,
        dtype="float32",
        precision={"master": "float32", "trainer_precision": None},
        trained_on={"model": "tiny", "layer": 1},
        config={"arch": "topk", "d_in": 8, "n_latents": 16, "k": 2},
        vlmsae_version="0.1.0",
        git_commit="abc",
        created="2024-01-01T00:00:00+00:00",
        extra={"future": True},
    )


def test_sae_config_round_trip_legacy_and_newer(tmp_path: Path):
    info = _sae_config()
    fpath = formats.write_sae_config(tmp_path, info)
    raw = json.loads(fpath.read_text())
    assert fpath == tmp_path / "config.json" and list(raw)[:2] == ["format", "format_version"]
    assert raw["format"] == "vlmsae-sae" and raw["format_version"] == 2 and raw["future"] is True
    assert raw["trained_on"] == {"model": "tiny", "layer": 1} and "source" not in raw
    assert formats.read_sae_config(tmp_path) == info and formats.read_sae_config(fpath) == info
    # a checkpoint from before versions, the precision record and the "trained_on" name (version 1: "source")
    del raw["format_version"], raw["precision"]
    raw["source"] = raw.pop("trained_on")
    fpath.write_text(json.dumps(raw))
    old = formats.read_sae_config(tmp_path)
    assert old.format_version == 2 and old.precision is None and old.trained_on == {"model": "tiny", "layer": 1}
    assert "source" not in old.extra  # read as the record, not kept as an unknown key
    for version in (3, 0, "1"):
        fpath.write_text(json.dumps({**raw, "format_version": version}))
        with pytest.raises(FormatVersionError) as err:
            formats.read_sae_config(tmp_path)
        msg = str(err.value)
        assert str(fpath) in msg and f"format_version={version!r}" in msg and "reads format_version 1" in msg, msg
        assert "upgrade vlmsae" in msg and "re-run `python -m vlmsae.train`" in msg, msg


def test_sae_config_refuses_what_is_not_an_sae_checkpoint(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        formats.read_sae_config(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        formats.read_sae_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "clip"}))  # a Hugging Face config.json
    with pytest.raises(ValueError, match="not a vlmsae SAE config"):
        formats.read_sae_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**_sae_config().to_dict(), "d_in": "8"}))
    with pytest.raises(ValueError, match="d_in must be int"):
        formats.read_sae_config(tmp_path)


def test_provenance_writes_run_info_in_the_format(tmp_path: Path):
    from vlmsae.utils.provenance import write_run_info

    write_run_info(tmp_path, {"sae_path": "/sae"}, status="done", outputs=["a"])
    raw = json.loads((tmp_path / "run_info.json").read_text())
    assert raw["format_version"] == 1 and raw["status"] == "done" and raw["config"] == {"sae_path": "/sae"}
    info = formats.read_run_info(tmp_path)
    assert info.config == {"sae_path": "/sae"} and info.extra == {"status": "done", "outputs": ["a"]}
    assert info.vlmsae_version and info.git_commit and info.created and "torch" in info.versions


# ------------------------------------------------------------------------------------------
# top_images/
# ------------------------------------------------------------------------------------------
def _index() -> TopImagesIndex:
    idx = torch.tensor([[0, 2], [1, -1]])
    return TopImagesIndex(
        idx,
        torch.tensor([[2.0, 1.0], [0.5, 0.0]]),
        ["a", "b", "c"],
        paths=["/a", "/b", "/c"],
        labels=[0, 1, 0],
        meta={"model": "tiny", "format_version": 7},
        extra={"patch_acts": torch.ones(2, 2, 4)},
    )


def test_top_images_round_trip(tmp_path: Path):
    formats.write_top_images(tmp_path / "top_images", _index())
    meta = json.loads((tmp_path / "top_images" / "meta.json").read_text())
    # The writer's version wins over a stale one carried in meta.
    assert meta == {"format_version": 1, "model": "tiny", "n_latents": 2, "top_k": 2, "n_images": 3}
    back = formats.read_top_images(tmp_path / "top_images")
    assert back.format_version == 1 and torch.equal(back.image_idx, _index().image_idx)
    assert torch.equal(back.acts, _index().acts) and torch.equal(back.extra["patch_acts"], torch.ones(2, 2, 4))
    assert back.keys == ["a", "b", "c"] and back.paths == ["/a", "/b", "/c"] and back.labels == [0, 1, 0]
    assert back.meta == {"model": "tiny", "n_latents": 2, "top_k": 2, "n_images": 3}


def test_top_images_class_goes_through_formats(tmp_path: Path, monkeypatch):
    from vlmsae.metrics.topimages import TopImages

    top = TopImages(torch.tensor([[0, 1]]), torch.tensor([[1.0, 0.5]]), ["a", "b"], meta={"model": "m"})
    top.save(tmp_path / "t")
    assert json.loads((tmp_path / "t" / "meta.json").read_text())["format_version"] == 1
    assert "format_version" not in TopImages.load(tmp_path / "t").meta  # not carried into a later save
    calls = []
    monkeypatch.setattr(
        formats,
        "read_top_images",
        lambda d: calls.append(d) or formats.TopImagesIndex(top.image_idx, top.acts, top.keys),
    )
    TopImages.load(tmp_path / "t")
    assert calls == [tmp_path / "t"]


def test_top_images_legacy_and_newer(tmp_path: Path):
    dpath = formats.write_top_images(tmp_path / "top_images", _index())
    meta_fpath = dpath / "meta.json"
    meta = json.loads(meta_fpath.read_text())
    meta_fpath.write_text(json.dumps({k: v for k, v in meta.items() if k != "format_version"}))
    assert formats.read_top_images(dpath).format_version == 1  # written before format_version existed
    meta_fpath.unlink()
    assert formats.read_top_images(dpath).meta == {}  # an index without meta.json is version 1 too
    meta_fpath.write_text(json.dumps({**meta, "format_version": 2}))
    with pytest.raises(FormatVersionError) as err:
        formats.read_top_images(dpath)
    _assert_version_message(str(err.value), meta_fpath, "2", "1")


def _assert_version_message(msg: str, fpath: Path, found: str, known: str) -> None:
    assert str(fpath) in msg, msg
    assert f"format_version={found}" in msg, msg
    assert f"reads format_version {known} of {fpath.name}" in msg, msg
    assert "upgrade vlmsae" in msg and ("re-run `python -m vlmsae." in msg or "re-run `the job" in msg), msg


# ------------------------------------------------------------------------------------------
# Only formats.py reads these files
# ------------------------------------------------------------------------------------------
NAME_CONSTANTS = (
    "LATENTS_CSV",
    "MS_SUMMARY_JSON",
    "HIERARCHY_JSON",
    "STEER_JSON",
    "STEER_EVAL_JSON",
    "SPLICE_JSON",
    "RUN_INFO_JSON",
    "TOP_TENSORS",
    "TOP_IMAGES_JSON",
    "TOP_META_JSON",
    "MANIFEST_JSON",
    "PROGRESS_JSON",
    "SAE_CONFIG_JSON",
    "STABILITY_JSON",
    "STABILITY_LATENTS_CSV",
)
FILE_NAMES = tuple(getattr(formats, name) for name in NAME_CONSTANTS)
# config.json is also the name of Hugging Face and LLaVA model files: vlmsae/models/ reads and writes those
# (never an SAE checkpoint), so the SAE config.json check skips it.
NOT_SAE_CONFIG = ("vlmsae/models/", "vlmsae/sae/interop/")  # HF / foreign SAE libraries name files config.json
READ_CALLS = {
    "open",
    "load",
    "loads",
    "read_text",
    "read_bytes",
    "DictReader",
    "reader",
    "load_file",
    "safe_open",
    "read_csv",
    "read_json",
}
# Modules outside this change's reach that still spell a format's file themselves; vlmsae.formats.read_run_info
# and write_steer_eval replace them. The test below fails once they no longer do, so the entry gets removed.
PENDING = {"vlmsae/lit/callbacks.py": {"run_info.json"}}


def _call_name(func: ast.expr) -> str:
    return func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""


def format_file_uses(source: str, rel: str = "") -> list[tuple[int, str]]:
    """(line, what) for each place ``source`` spells a format's file name, or reads a path built from
    one of the name constants of vlmsae.formats with open / json.load(s) / csv readers / read_text / ..."""
    found = []
    names = FILE_NAMES
    if rel.startswith(NOT_SAE_CONFIG):
        names = tuple(n for n in FILE_NAMES if n != formats.SAE_CONFIG_JSON)
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and not any(c.isspace() for c in node.value):
            # A path-like string (messages and docstrings have spaces; they may mention the files).
            found += [(node.lineno, name) for name in names if node.value == name or node.value.endswith("/" + name)]
        if isinstance(node, ast.Call) and _call_name(node.func) in READ_CALLS:
            for sub in ast.walk(node):
                name = sub.attr if isinstance(sub, ast.Attribute) else sub.id if isinstance(sub, ast.Name) else ""
                if name in NAME_CONSTANTS:
                    found.append((node.lineno, f"{_call_name(node.func)}(... {name} ...)"))
    return found


def test_the_check_finds_hand_written_readers():
    assert format_file_uses('json.loads((d / "steer.json").read_text())') == [(1, "steer.json")]
    assert format_file_uses('rows = csv.DictReader(open(f"{d}/latents.csv"))')  # inside an f-string
    assert format_file_uses("root.glob('*/run_info.json')") == [(1, "run_info.json")]
    assert [w for _, w in format_file_uses("f = open(d / formats.LATENTS_CSV)")] == ["open(... LATENTS_CSV ...)"]
    assert format_file_uses("x = (d / MS_SUMMARY_JSON).read_text()")
    # What the project may do: go through the readers, check that a file is there, mention it in a message.
    assert format_file_uses("t = formats.read_latents_csv(d / formats.LATENTS_CSV)") == []
    assert format_file_uses("ok = (d / formats.STEER_JSON).is_file()") == []
    assert format_file_uses('raise ValueError(f"{d} holds no latents.csv")') == []
    # The store and SAE files too; config.json only outside vlmsae/models/ (Hugging Face files are named so).
    assert format_file_uses('m = json.loads((d / "manifest.json").read_text())') == [(1, "manifest.json")]
    assert format_file_uses("p = json.loads((d / PROGRESS_JSON).read_text())")
    assert format_file_uses('c = json.loads((d / "config.json").read_text())', "vlmsae/report/browser.py")
    assert format_file_uses('c = json.loads((d / "config.json").read_text())', "vlmsae/models/llava.py") == []


def test_no_module_but_formats_reads_the_format_files():
    offenders = {}
    for fpath in sorted((REPO / "vlmsae").rglob("*.py")):
        rel = fpath.relative_to(REPO).as_posix()
        if rel == "vlmsae/formats.py":
            continue
        uses = format_file_uses(fpath.read_text(encoding="utf-8"), rel)
        if rel in PENDING:
            assert {what for _, what in uses} <= PENDING[rel], (rel, uses)
            assert uses, f"{rel} no longer spells {PENDING[rel]}: remove it from PENDING"
            continue
        if uses:
            offenders[rel] = uses
    assert not offenders, f"read these through vlmsae.formats: {offenders}"


def test_inspect_json_round_trip_nan_as_null_and_a_newer_version_refused(tmp_path):
    from vlmsae.formats import InspectResult, read_inspect, write_inspect

    hit = {"latent": 3, "pooled": 0.5, "peak": 2.0, "peak_patch": 7, "heat": [0.0, 2.0], "heat_png": "heat/x.png"}
    image = {"key": "a.png", "path": "/x/a.png", "fve": float("nan"), "nmse": 0.1, "n_rows": 1, "grid": None}
    result = InspectResult([{**image, "top_pooled": [hit], "top_peak": [hit]}], {"3": {"name": "zebra", "ms": 0.9}})
    fpath = write_inspect(tmp_path, result)
    assert json.loads(fpath.read_text())["images"][0]["fve"] is None and fpath.name == "inspect.json"
    back = read_inspect(tmp_path)
    assert back.latents == result.latents and back.images[0]["top_pooled"] == [hit] and back.format_version == 1
    assert back.query is None and back.compare is None
    obj = json.loads(fpath.read_text())
    fpath.write_text(json.dumps({**obj, "format_version": 2}))
    with pytest.raises(FormatVersionError, match=r"inspect\.json has format_version=2.*python -m vlmsae\.inspect"):
        read_inspect(fpath)
    with pytest.raises(ValueError, match="images must be list"):
        InspectResult({"not": "a list"})

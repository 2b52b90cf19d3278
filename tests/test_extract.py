"""``vlmsae.extract``: stored rows equal a direct forward pass, metadata is right, an interrupted run
resumes to exactly the rows of an uninterrupted one, corrupt images are skipped and reported; the row order mixes
classes; the CLI killed with SIGKILL then rerun gives the uninterrupted rows (slow)."""

from __future__ import annotations

import io
import json
import math
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vlmsae.config import to_typed
from vlmsae.data.concepts import make_concept_images
from vlmsae.data.shards import ShardWriter, list_shards, read_rows
from vlmsae.extract import run
from vlmsae.formats import read_manifest

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def image_root(tmp_path_factory):
    root = make_concept_images(tmp_path_factory.mktemp("imgs") / "concepts", n_per_class=2, size=40, seed=1)
    (root / "circle_blue" / "00000_corrupt.png").write_bytes(b"\x89PNG broken")
    return root


def _cfg(compose_cfg, root, *extra):
    return compose_cfg(
        "extract",
        [
            "model=tiny",
            "data=folder",
            f"data.root={root}",
            "data.images_per_forward=5",
            "data.num_workers=0",
            "progress=false",
            *extra,
        ],
    )


def test_manifest_counts_every_listed_file_not_used_by_reason(compose_cfg, tmp_path):
    root = make_concept_images(tmp_path / "imgs", n_per_class=1, size=32, seed=2)  # 16 images, one per class
    (root / "notes.txt").write_text("not an image")
    (root / "circle_blue" / "vector.svg").write_text("<svg/>")
    (root / "circle_blue" / ".DS_Store").write_bytes(b"x")
    run(_cfg(compose_cfg, root, "layer=1", "data.max_images=10"), out_dpath=tmp_path / "out")
    manifest = read_manifest(tmp_path / "out")
    assert manifest.n_images == 10 and manifest.n_skipped == 0
    assert manifest.ignored_by_reason == {
        "hidden file": 1,
        "not an image extension: .json": 1,  # the generator's concepts.json
        "not an image extension: .svg": 1,
        "not an image extension: .txt": 1,
        "not in the max_images subset": 6,
    }


def test_rows_equal_direct_forward_and_metadata(compose_cfg, image_root, tmp_path):
    from PIL import Image

    from vlmsae.data.images import image_order, list_folder, order_digest
    from vlmsae.models import ModelSpec, load_tap

    cfg = _cfg(
        compose_cfg, image_root, "layer=1", "tokens=patches", "dtype=float32", "rows_per_shard=100", "rows_per_chunk=64"
    )
    summary = run(cfg, out_dpath=tmp_path / "out")
    got = read_rows(tmp_path / "out")
    manifest = read_manifest(tmp_path / "out")

    tap = load_tap(to_typed(cfg.model, ModelSpec))
    listing = list_folder(image_root)
    want_acts, want_keys, want_idx, want_labels = [], [], [], []
    order = image_order(len(listing.items), 0)  # default order_seed=0: rows in the permuted visiting order
    assert order.tolist() != list(range(len(listing.items)))
    for index in order.tolist():
        key, path, label = listing.items[index]
        if "corrupt" in key:
            continue
        acts = tap.forward_to(tap.preprocess(Image.open(path)).unsqueeze(0), 1)[0]
        want_acts.append(acts[1:])  # patches: every token but CLS
        want_keys += [key] * 16
        want_idx += [index] * 16  # image_idx: the listing index, whatever the visiting order
        want_labels += [label] * 16
    torch.testing.assert_close(got["acts"], torch.cat(want_acts), rtol=1e-5, atol=1e-5)
    assert got["keys"] == want_keys
    assert got["image_idx"].tolist() == want_idx and got["label"].tolist() == want_labels
    assert [listing.items[i][0] for i in got["image_idx"].tolist()] == got["keys"]  # image_idx -> the row's image
    assert manifest.order_seed == 0 and manifest.order_digest == order_digest(order)
    assert "listing" in manifest.image_idx_meaning and manifest.exif_transpose is True
    assert got["token_idx"].tolist() == list(range(1, 17)) * 32
    assert summary["n_rows"] == manifest.n_rows == 32 * 16 and manifest.n_images == 32
    assert manifest.n_shards == len(list_shards(tmp_path / "out")) > 1
    assert manifest.n_skipped == 1 and manifest.skipped[0]["key"] == "circle_blue/00000_corrupt.png"
    assert manifest.skipped[0]["error"] and manifest.skipped[0]["reason"] == "not an image"
    assert manifest.skipped_by_reason == {"not an image": 1}
    assert manifest.layer == 1 and manifest.tokens == "patches" and manifest.d == 64
    assert manifest.model == "tiny" and manifest.dtype == "float32" and manifest.classes == listing.classes
    x = got["acts"].double()
    torch.testing.assert_close(torch.tensor(manifest.mean, dtype=torch.float64), x.mean(0))
    torch.testing.assert_close(torch.tensor(manifest.var, dtype=torch.float64), x.var(0, unbiased=False))
    run_info = json.loads((tmp_path / "out" / "run_info.json").read_text())
    assert run_info["config"]["tokens"] == "patches" and run_info["result"]["n_rows"] == 512


def _interrupt_after(monkeypatch, method: str, n_calls: int):
    """Make ShardWriter.<method> raise on its n-th call, as a kill at that point would."""
    original = getattr(ShardWriter, method)
    calls = {"n": 0}

    def wrapped(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n_calls:
            raise KeyboardInterrupt(f"simulated kill in {method}")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(ShardWriter, method, wrapped)


@pytest.mark.parametrize("method,n_calls", [("flush", 3), ("_write_progress", 2)])
def test_resume_gives_exactly_the_uninterrupted_rows(compose_cfg, image_root, tmp_path, monkeypatch, method, n_calls):
    args = ("layer=2", "tokens=random_k", "k=3", "rows_per_shard=20", "rows_per_chunk=7", "data.num_workers=2")
    cfg = _cfg(compose_cfg, image_root, *args)
    run(cfg, out_dpath=tmp_path / "full")
    with monkeypatch.context() as patch:
        _interrupt_after(patch, method, n_calls)
        with pytest.raises(KeyboardInterrupt):
            run(cfg, out_dpath=tmp_path / "resumed")
    assert not (tmp_path / "resumed" / "manifest.json").exists()
    assert 0 < len(list_shards(tmp_path / "resumed")) < len(list_shards(tmp_path / "full"))
    run(cfg, out_dpath=tmp_path / "resumed")
    full, resumed = read_rows(tmp_path / "full"), read_rows(tmp_path / "resumed")
    assert torch.equal(full["acts"], resumed["acts"])
    for name in ("token_idx", "image_idx", "label"):
        assert torch.equal(full[name], resumed[name]), name
    assert full["keys"] == resumed["keys"]
    m_full, m_res = read_manifest(tmp_path / "full"), read_manifest(tmp_path / "resumed")
    for name in ("n_rows", "n_images", "n_shards", "mean", "var", "mean_sq_norm", "image_list_digest", "skipped"):
        assert getattr(m_full, name) == getattr(m_res, name), name
    assert m_full.n_rows == 32 * 3
    # A rerun of a finished extraction does nothing; other settings in the same folder are refused.
    assert run(cfg, out_dpath=tmp_path / "full")["n_rows"] == m_full.n_rows
    with pytest.raises(ValueError, match="different extraction"):
        run(_cfg(compose_cfg, image_root, *args[:-1], "layer=1"), out_dpath=tmp_path / "full")


def test_workers_do_not_change_rows(compose_cfg, image_root, tmp_path):
    base = ("layer=last", "tokens=cls", "dtype=float32")
    run(_cfg(compose_cfg, image_root, *base), out_dpath=tmp_path / "w0")
    w2 = _cfg(compose_cfg, image_root, *base, "data.num_workers=2", "data.images_per_forward=3")
    run(w2, out_dpath=tmp_path / "w2")
    a, b = read_rows(tmp_path / "w0"), read_rows(tmp_path / "w2")
    assert a["keys"] == b["keys"] and a["acts"].shape == (32, 32)  # layer=last: the 32-d projected embedding
    torch.testing.assert_close(a["acts"], b["acts"], rtol=1e-5, atol=1e-6)
    assert a["token_idx"].tolist() == [-1] * 32
    assert read_manifest(tmp_path / "w0").image_list_digest == read_manifest(tmp_path / "w2").image_list_digest


def test_list_and_wds_sources(compose_cfg, image_root, tmp_path):
    from vlmsae.data.images import list_folder

    items = [it for it in list_folder(image_root).items if "corrupt" not in it[0]][:6]
    list_fpath = tmp_path / "images.txt"
    list_fpath.write_text("".join(f"{path}\t{label}\n" for _, path, label in items))
    tar_fpath = tmp_path / "shard-000000.tar"
    with tarfile.open(tar_fpath, "w") as tar:
        for i, (_, path, label) in enumerate(items):
            for ext, data in (("png", Path(path).read_bytes()), ("cls", str(label).encode())):
                info = tarfile.TarInfo(f"sample{i:03d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    common = (
        "model=tiny",
        "data.images_per_forward=4",
        "data.num_workers=0",
        "progress=false",
        "tokens=mean",
        "layer=0",
        "dtype=float32",
    )
    run(compose_cfg("extract", ["data=list", f"data.root={list_fpath}", *common]), out_dpath=tmp_path / "list")
    # two workers each decode every other sample of the tar; the round-robin keeps the order
    run(
        compose_cfg("extract", ["data=wds", f"data.root={tar_fpath}", *common, "data.num_workers=2"]),
        out_dpath=tmp_path / "wds",
    )
    from_list, from_wds = read_rows(tmp_path / "list"), read_rows(tmp_path / "wds")
    assert from_wds["keys"] == [f"sample{i:03d}" for i in range(6)]  # one tar: nothing to permute
    assert from_wds["image_idx"].tolist() == list(range(6))
    # the list is visited in the order_seed permutation; image_idx (the list line) puts the rows back
    back = from_list["image_idx"].argsort()
    assert from_list["image_idx"].tolist() != list(range(6)) and from_list["image_idx"][back].tolist() == list(range(6))
    assert [from_list["keys"][i] for i in back.tolist()] == [path for _, path, _ in items]  # the list lines
    assert from_list["label"][back].tolist() == from_wds["label"].tolist() == [label for *_, label in items]
    torch.testing.assert_close(from_list["acts"][back], from_wds["acts"], rtol=1e-5, atol=1e-6)


def test_synthetic_tiny_data_default(compose_cfg, tmp_path, monkeypatch):
    monkeypatch.setenv("VLMSAE_HOME", str(tmp_path / "home"))
    cfg = compose_cfg("extract", ["progress=false", "data.n_per_class=1", "data.size=32"])
    summary = run(cfg, out_dpath=tmp_path / "out")
    assert summary["n_images"] == 16 and summary["layer"] == 2  # default layer=-2 of 4 blocks
    assert read_manifest(tmp_path / "out").source == "synthetic"


def test_clear_errors(compose_cfg, image_root, tmp_path):
    with pytest.raises(ValueError, match="no CLS token.*tokens=mean"):
        run(_cfg(compose_cfg, image_root, "model.has_cls=false", "tokens=cls"), out_dpath=tmp_path / "a")
    with pytest.raises(ValueError, match=r"Layer 9 is out of range.*0\.\.3"):
        run(_cfg(compose_cfg, image_root, "layer=9"), out_dpath=tmp_path / "b")
    with pytest.raises(ValueError, match="Unknown tokens='some'"):
        run(_cfg(compose_cfg, image_root, "tokens=some"), out_dpath=tmp_path / "c")


def test_resume_refuses_a_changed_image_folder(compose_cfg, tmp_path):
    root = make_concept_images(tmp_path / "imgs", n_per_class=1, size=32, seed=0)
    cfg = _cfg(compose_cfg, root, "rows_per_shard=4")
    run(cfg, out_dpath=tmp_path / "out")
    (tmp_path / "out" / "manifest.json").unlink()  # as if killed before the end
    (root / "circle_red" / "00000.png").rename(root / "circle_red" / "zz_moved.png")
    with pytest.raises(ValueError, match=r"different extraction.*listing_digest"):
        run(cfg, out_dpath=tmp_path / "out")


def test_a_misspelt_or_mistyped_key_fails_at_compose_time_naming_it(tmp_path, compose_error):
    import shutil

    from vlmsae.config import conf_dir

    assert "Key 'layr' not in 'ExtractJob'" in compose_error(conf_dir(), "extract", ["layr=3"])
    assert "full_key: k" in compose_error(conf_dir(), "extract", ["k=abc"])  # the schema types the keys
    # A typo written in the YAML itself (no override involved) is caught too: the schema closes the top level.
    conf_copy = shutil.copytree(conf_dir(), tmp_path / "user_conf")
    with open(conf_copy / "extract.yaml", "a", encoding="utf-8") as fh:
        fh.write("\nrows_per_shrad: 10\n")
    assert "Key 'rows_per_shrad' not in 'ExtractJob'" in compose_error(conf_copy, "extract", [])


def test_run_is_thin():
    """The job only turns the config into an ExtractionPlan and calls vlmsae.models.extraction (issue 13)."""
    import inspect

    import vlmsae.extract

    assert len(inspect.getsource(vlmsae.extract.run).splitlines()) <= 45


# ------------------------------------------------------------------------------ row order
# Extraction's row order: a class-sorted folder extracted with default settings and streamed by the
# default training stream gives batches as class-diverse as uniform sampling (the seeded visiting
# order); a changed order on resume is refused; skipped files are counted by reason in the manifest.
torch.set_num_threads(1)
N_CLASSES, PER_CLASS, BATCH = 40, 30, 256


def expected_distinct_classes(class_sizes: list[int], n: int) -> float:
    """E[#distinct classes] in ``n`` rows drawn uniformly without replacement: sum_c 1 - C(N - n_c, n) / C(N, n)."""
    total = sum(class_sizes)
    return sum(1 - math.comb(total - n_c, n) / math.comb(total, n) for n_c in class_sizes)


@pytest.fixture(scope="module")
def sorted_folder(tmp_path_factory):
    """40 class folders x 30 tiny noise images (every image distinct, so every row maps back to its class)."""
    root = tmp_path_factory.mktemp("order") / "imgs"
    rng = np.random.default_rng(0)
    for c in range(N_CLASSES):
        (root / f"class{c:02d}").mkdir(parents=True)
        for i in range(PER_CLASS):
            pixels = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / f"class{c:02d}" / f"{i:02d}.png")
    return root


def _distinct_classes_per_batch(store, n_batches: int = 30, shuffle_buffer: int | None = None) -> list[int]:
    from vlmsae.data.stream import StreamConfig
    from vlmsae.lit.datamodule import ActsDataModule

    rows = read_rows(store)
    label_of = {row.numpy().tobytes(): label for row, label in zip(rows["acts"], rows["label"].tolist())}
    assert len(label_of) == N_CLASSES * PER_CLASS  # distinct rows: each one names its image's class
    stream = (
        StreamConfig(batch_size=BATCH)
        if shuffle_buffer is None
        else StreamConfig(batch_size=BATCH, shuffle_buffer=shuffle_buffer)
    )
    dm = ActsDataModule(store, stream)  # default: the trainer's default shuffle settings
    distinct = []
    for batch in dm.train_stream():
        distinct.append(len({label_of[row.numpy().tobytes()] for row in batch}))
        if len(distinct) == n_batches:
            return distinct
    raise AssertionError("the training stream ended")


def test_default_extraction_gives_uniformly_mixed_training_batches(compose_cfg, sorted_folder, tmp_path):
    # default settings (order_seed=0); worker processes only cost start-up time here and never change rows
    cfg = compose_cfg(
        "extract", ["model=tiny", "data=folder", f"data.root={sorted_folder}", "progress=false", "data.num_workers=0"]
    )
    run(cfg, out_dpath=tmp_path / "store")
    manifest = read_manifest(tmp_path / "store")
    assert manifest.order_seed == 0 and manifest.n_rows == N_CLASSES * PER_CLASS
    want = expected_distinct_classes([PER_CLASS] * N_CLASSES, BATCH)
    got = float(np.mean(_distinct_classes_per_batch(tmp_path / "store")))
    assert abs(got - want) <= 0.1 * want, (got, want)
    # the order itself is uniform: even a shuffle window of one batch (a real store is ~100x its window) mixes
    got_one_window = float(np.mean(_distinct_classes_per_batch(tmp_path / "store", shuffle_buffer=BATCH)))
    assert abs(got_one_window - want) <= 0.1 * want, (got_one_window, want)


def test_listing_order_is_still_available_and_is_class_sorted(compose_cfg, sorted_folder, tmp_path):
    """order_seed=null keeps the folder order: the stream's batches then hold far fewer classes.

    This 1,200-row store fits in one default shuffle window, which hides any order; a window of one batch
    (what a real store is, relative to the 16,384-row window: ~1% of ImageNet) shows it."""
    cfg = compose_cfg(
        "extract",
        [
            "model=tiny",
            "data=folder",
            f"data.root={sorted_folder}",
            "progress=false",
            "order_seed=null",
            "data.num_workers=0",
        ],
    )
    run(cfg, out_dpath=tmp_path / "store")
    rows = read_rows(tmp_path / "store")
    assert (
        rows["image_idx"].tolist() == list(range(N_CLASSES * PER_CLASS))
        and read_manifest(tmp_path / "store").order_seed is None
    )
    want = expected_distinct_classes([PER_CLASS] * N_CLASSES, BATCH)
    assert (
        float(np.mean(_distinct_classes_per_batch(tmp_path / "store", n_batches=4, shuffle_buffer=BATCH))) < 0.5 * want
    )


def test_max_images_is_a_random_subset(compose_cfg, sorted_folder, tmp_path):
    from vlmsae.data.images import image_order

    cfg = compose_cfg(
        "extract",
        [
            "model=tiny",
            "data=folder",
            f"data.root={sorted_folder}",
            "progress=false",
            "data.max_images=100",
            "data.num_workers=0",
            "tokens=cls",
        ],
    )
    run(cfg, out_dpath=tmp_path / "sub")
    rows = read_rows(tmp_path / "sub")
    assert rows["image_idx"].tolist() == image_order(N_CLASSES * PER_CLASS, 0)[:100].tolist()
    assert len(set(rows["label"].tolist())) > 30  # the first 100 in folder order would be 4 classes


def test_resume_refuses_a_changed_order(compose_cfg, sorted_folder, tmp_path):
    base = [
        "model=tiny",
        "data=folder",
        f"data.root={sorted_folder}",
        "progress=false",
        "data.num_workers=0",
        "data.max_images=40",
        "rows_per_shard=8",
    ]
    run(compose_cfg("extract", base), out_dpath=tmp_path / "out")
    (tmp_path / "out" / "manifest.json").unlink()  # as if killed before the end
    with pytest.raises(ValueError, match=r"different extraction.*order_digest.*order_seed: was 0, now 1"):
        run(compose_cfg("extract", [*base, "order_seed=1"]), out_dpath=tmp_path / "out")
    with pytest.raises(ValueError, match=r"order_seed='x' must be an integer"):
        run(compose_cfg("extract", [*base, "order_seed=x"]), out_dpath=tmp_path / "other")


def test_manifest_counts_skips_by_reason(compose_cfg, tmp_path):
    root = tmp_path / "imgs" / "only"
    root.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / f"ok{i}.png")
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(buf, format="JPEG")
    (root / "cut.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (root / "notes.jpg").write_text("a text file named .jpg")
    Image.fromarray((np.arange(64, dtype=np.uint16) * 1000).reshape(8, 8)).save(root / "deep.png")  # 16-bit: kept
    cfg = compose_cfg(
        "extract",
        [
            "model=tiny",
            "data=folder",
            f"data.root={tmp_path / 'imgs'}",
            "progress=false",
            "data.num_workers=0",
            "tokens=cls",
        ],
    )
    run(cfg, out_dpath=tmp_path / "out")
    manifest = read_manifest(tmp_path / "out")
    assert manifest.n_images == 5 and manifest.n_skipped == 2
    assert manifest.skipped_by_reason == {"not an image": 1, "truncated": 1}
    assert {e["key"]: e["reason"] for e in manifest.skipped} == {
        "only/cut.jpg": "truncated",
        "only/notes.jpg": "not an image",
    }


# ------------------------------------------------------------------------------ CLI: SIGKILL then resume
# The CLI end to end: ``python -m vlmsae.extract`` killed with SIGKILL mid-run, then the same command
# again, gives exactly the rows of an uninterrupted run.
@pytest.mark.slow
def test_cli_sigkill_then_resume_equals_uninterrupted(tmp_path, repo_root):
    root = make_concept_images(tmp_path / "imgs", n_per_class=25, size=32, seed=2)
    (root / "cross_red" / "00000_bad.jpg").write_bytes(b"garbage")

    def command(out):
        return [
            sys.executable,
            "-m",
            "vlmsae.extract",
            "model=tiny",
            "data=folder",
            f"data.root={root}",
            "data.images_per_forward=2",
            "data.num_workers=1",
            "layer=1",
            "tokens=random_k",
            "rows_per_shard=8",
            "progress=false",
            f"out={out}",
            f"hydra.run.dir={tmp_path / 'hydra'}",
        ]

    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    subprocess.run(command(tmp_path / "full"), cwd=repo_root, env=env, check=True, capture_output=True)
    proc = subprocess.Popen(
        command(tmp_path / "killed"), cwd=repo_root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    progress = tmp_path / "killed" / "progress.json"
    while proc.poll() is None:  # no wall-clock limit: a slow machine only waits longer
        if progress.exists() and json.loads(progress.read_text())["n_shards"] >= 5:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "manifest.json").exists(), "the run finished before it could be killed"
    subprocess.run(command(tmp_path / "killed"), cwd=repo_root, env=env, check=True, capture_output=True)
    full, resumed = read_rows(tmp_path / "full"), read_rows(tmp_path / "killed")
    assert torch.equal(full["acts"], resumed["acts"]) and full["keys"] == resumed["keys"]
    assert torch.equal(full["token_idx"], resumed["token_idx"]) and torch.equal(full["image_idx"], resumed["image_idx"])
    m_full, m_res = read_manifest(tmp_path / "full"), read_manifest(tmp_path / "killed")
    assert m_full.n_rows == m_res.n_rows == 400 * 2 and m_res.n_skipped == 1
    assert m_full.image_list_digest == m_res.image_list_digest and m_full.mean == m_res.mean
    assert (tmp_path / "killed" / "run_info.json").exists()


@pytest.mark.slow
def test_logger_wandb_offline_run_holds_rows_shards_and_speed(compose_cfg, image_root, tmp_path, wandb_offline):
    from vlmsae.extract import run

    summary = run(_cfg(compose_cfg, image_root, "layer=1", "logger=wandb"), out_dpath=tmp_path / "acts")
    s = wandb_offline(tmp_path / "acts")["summary"]
    assert s["extract/n_rows"] == summary["n_rows"] > 0 and s["extract/n_shards"] == summary["n_shards"]
    assert s["extract/images_per_s"] == pytest.approx(summary["images_per_s"]) and s["extract/images_per_s"] > 0

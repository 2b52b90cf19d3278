"""``python -m vlmsae.extract ... out=<fsspec url>`` (vlmsae.data.sink): a memory:// or file:// store holds the files
and rows of a local extraction; a run killed after n uploads resumes from the remote progress.json to the rows of an
uninterrupted one; a reader listing the URL mid-way never sees a half-written shard under a shard name; unknown,
read-only and package-less protocols are refused before any image. No network: memory:// and file:// only."""

from __future__ import annotations

import sys
import tarfile
import uuid

import fsspec
import pytest
import torch
from fsspec.implementations.memory import MemoryFileSystem

from vlmsae.data.shards import iter_chunks, list_shards, read_rows
from vlmsae.data.sink import StoreSink
from vlmsae.data.store import open_store
from vlmsae.extract import run
from vlmsae.formats import read_manifest

torch.set_num_threads(1)
ARGS = ("layer=1", "tokens=random_k", "k=2", "rows_per_shard=12", "rows_per_chunk=5")


@pytest.fixture(scope="module")
def image_root(tmp_path_factory):
    from vlmsae.data.concepts import make_concept_images

    root = make_concept_images(tmp_path_factory.mktemp("imgs") / "concepts", n_per_class=2, size=40, seed=1)
    (root / "circle_blue" / "00000_corrupt.png").write_bytes(b"\x89PNG broken")
    return root


def _cfg(compose_cfg, root, *extra):
    overrides = ["model=tiny", "data=folder", f"data.root={root}", "data.images_per_forward=5", "data.num_workers=0"]
    return compose_cfg("extract", [*overrides, "progress=false", *ARGS, *extra])


@pytest.fixture
def local_store(compose_cfg, image_root, tmp_path):
    run(_cfg(compose_cfg, image_root), out_dpath=tmp_path / "local")
    return tmp_path / "local"


def _memory_url() -> str:
    return f"memory://vlmsae-test-{uuid.uuid4().hex}/store"


def _url(kind: str, tmp_path) -> str:
    return _memory_url() if kind == "memory" else (tmp_path / "remote").resolve().as_uri()


def _remote_rows(url: str) -> dict:
    shard_urls = open_store(url)[2]
    chunks = list(iter_chunks(shard_urls))
    out = {name: torch.cat([c[name] for c in chunks]) for name in ("acts", "token_idx", "image_idx", "label")}
    out["keys"] = [k for c in chunks for k in c["keys"]]
    return out


def _assert_same_rows(got: dict, want: dict) -> None:
    for name in ("acts", "token_idx", "image_idx", "label"):
        assert torch.equal(got[name], want[name]), name
    assert got["keys"] == want["keys"]


def _assert_same_store(url: str, local) -> None:
    """The URL holds the local store's files (byte-equal shards, the same manifest and progress) and rows."""
    fs, root = fsspec.core.url_to_fs(url)
    names = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False))
    # shards, progress, manifest, run_info; no temporary (csv/ is the job's logger summary, not part of the store)
    assert names == sorted(p.name for p in local.iterdir() if p.name != "csv")
    for fpath in list_shards(local):
        assert fs.cat_file(f"{root}/{fpath.name}") == fpath.read_bytes(), fpath.name
    remote_manifest, local_manifest = read_manifest_at(url), read_manifest(local)
    for name in ("n_rows", "n_images", "n_shards", "shards", "shard_rows", "mean", "var", "skipped", "order_digest"):
        assert getattr(remote_manifest, name) == getattr(local_manifest, name), name
    _assert_same_rows(_remote_rows(url), read_rows(local))


def read_manifest_at(url: str):
    return open_store(url)[1]


@pytest.mark.parametrize("kind", ["memory", "file"])
def test_url_store_equals_local_store(compose_cfg, image_root, tmp_path, local_store, kind):
    url = _url(kind, tmp_path)
    staging = tmp_path / "staging"
    summary = run(_cfg(compose_cfg, image_root, f"staging_dir={staging}"), out_dpath=url)
    assert summary["out"] == url and summary["n_rows"] == read_manifest(local_store).n_rows == 32 * 2
    _assert_same_store(url, local_store)
    assert not list(staging.glob("*.tar"))  # the staging folder held one shard at a time, none at the end
    if kind == "memory":  # a downloaded copy is an ordinary local store
        fs, root = fsspec.core.url_to_fs(url)
        fs.get(root + "/", str(tmp_path / "copy") + "/", recursive=True)
        assert open_store(tmp_path / "copy")[1].n_rows == summary["n_rows"]
        _assert_same_rows(read_rows(tmp_path / "copy"), read_rows(local_store))
    # a rerun of the finished URL store does nothing (the remote manifest says complete)
    assert run(_cfg(compose_cfg, image_root), out_dpath=url)["n_rows"] == summary["n_rows"]


def test_temporary_staging_folder_is_removed(compose_cfg, image_root, monkeypatch):
    made = []
    original = StoreSink.open.__func__

    def spy(cls, url, staging_dir=None):
        sink = original(cls, url, staging_dir)
        made.append(sink)
        return sink

    monkeypatch.setattr(StoreSink, "open", classmethod(spy))
    url = _memory_url()
    run(_cfg(compose_cfg, image_root), out_dpath=url)
    assert len(made) == 1 and made[0].owns_staging and not made[0].staging_dpath.exists()


@pytest.mark.parametrize("where,n", [("after shard upload", 3), ("before progress upload", 2), ("before move", 2)])
def test_kill_after_n_uploads_then_rerun_resumes_from_remote_progress(
    compose_cfg, image_root, tmp_path, local_store, monkeypatch, where, n
):
    url = _memory_url()
    calls = {"shard": 0, "progress": 0}
    original_put, original_mv = StoreSink.put, MemoryFileSystem.mv

    def put(self, local_fpath):
        kind = "shard" if local_fpath.name.endswith(".tar") else local_fpath.name.split(".")[0]
        calls[kind] = calls.get(kind, 0) + 1
        if where == "before progress upload" and kind == "progress" and calls[kind] == n:
            raise KeyboardInterrupt("simulated kill")
        out = original_put(self, local_fpath)
        if where == "after shard upload" and kind == "shard" and calls[kind] == n:
            raise KeyboardInterrupt("simulated kill")
        return out

    def mv(self, path1, path2, *args, **kwargs):
        if where == "before move" and path2.endswith(".tar") and calls["shard"] == n:
            raise KeyboardInterrupt("simulated kill")  # the shard's bytes are uploaded under the temporary name
        return original_mv(self, path1, path2, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(StoreSink, "put", put)
        patch.setattr(MemoryFileSystem, "mv", mv)
        with pytest.raises(KeyboardInterrupt):
            run(_cfg(compose_cfg, image_root), out_dpath=url)
    fs, root = fsspec.core.url_to_fs(url)
    names = [p.rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)]
    assert "manifest.json" not in names and "progress.json" in names
    assert any(name.endswith(".tmp") for name in names) == (where == "before move")
    with pytest.raises(FileNotFoundError, match="not a finished activation store"):
        open_store(url)
    summary = run(_cfg(compose_cfg, image_root), out_dpath=url)
    assert summary["n_rows"] == read_manifest(local_store).n_rows
    _assert_same_store(url, local_store)


def test_a_reader_listing_mid_way_never_sees_a_temporary_name_as_a_shard(compose_cfg, image_root, monkeypatch):
    url = _memory_url()
    fs, root = fsspec.core.url_to_fs(url)
    original_mv = MemoryFileSystem.mv
    seen = []

    def mv(self, path1, path2, *args, **kwargs):  # a reader lists the folder while a file sits under its temp name
        names = [p.rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)]
        seen.append(names)
        assert path1.rsplit("/", 1)[-1] in names
        shards = [name for name in names if name.endswith(".tar")]
        assert all(name.startswith("acts-") for name in shards)
        for name in shards:  # every shard name is a whole tar
            with fs.open(f"{root}/{name}", "rb") as fh, tarfile.open(fileobj=fh, mode="r:") as tar:
                assert tar.getmembers()
        assert sorted(shards) == list_shards_names(len(shards))
        return original_mv(self, path1, path2, *args, **kwargs)

    monkeypatch.setattr(MemoryFileSystem, "mv", mv)
    run(_cfg(compose_cfg, image_root), out_dpath=url)
    assert len(seen) > 6 and any(any(n.endswith(".tmp") for n in names) for names in seen)


def list_shards_names(n: int) -> list[str]:
    return [f"acts-{i:06d}.tar" for i in range(n)]


@pytest.mark.parametrize(
    "url,match,error",
    [
        ("nosuch://bucket/x", r"out=nosuch://bucket/x: unknown protocol nosuch://", ValueError),
        ("s3://bucket/acts", r"out=s3://bucket/acts needs s3fs: pip install s3fs", ImportError),
        ("https://host/acts", r"out=https://host/acts: https: is read-only", ValueError),
    ],
)
def test_unusable_url_is_refused_before_any_image(compose_cfg, image_root, monkeypatch, url, match, error):
    import vlmsae.models.extraction

    monkeypatch.setitem(sys.modules, "s3fs", None)  # s3fs missing, even where it is installed

    def no_images(*args, **kwargs):
        raise AssertionError("an image was listed or processed before the URL was checked")

    monkeypatch.setattr(vlmsae.models.extraction, "StoreExtraction", no_images)  # extract.run imports it there
    with pytest.raises(error, match=match):
        run(_cfg(compose_cfg, image_root), out_dpath=url)


def test_torchrun_ranks_to_a_url_are_refused(tmp_path):
    from vlmsae.models.extraction import Ranks, StoreExtraction

    sink = StoreSink.open(_memory_url(), tmp_path / "staging")
    with pytest.raises(ValueError, match=r"out=memory://.*torchrun ranks \(world size 2\) cannot write to a URL"):
        StoreExtraction(None, None, sink.staging_dpath, Ranks(rank=0, world=2), sink=sink)


@pytest.mark.slow
def test_training_from_a_file_url_store_equals_training_from_the_local_store(
    compose_cfg, image_root, tmp_path, local_store
):
    from vlmsae.sae import load_sae
    from vlmsae.train import run as train

    url = _url("file", tmp_path)
    run(_cfg(compose_cfg, image_root), out_dpath=url)
    weights = []
    for name, acts in (("local", local_store), ("url", url)):
        overrides = ["data=acts", f"data.acts={acts}", "data.batch_size=16", "data.num_workers=0"]
        cfg = compose_cfg("train", [*overrides, "data.shuffle_buffer=32", "trainer.max_steps=4", "logger=csv"])
        train(cfg, out_dpath=tmp_path / name)
        weights.append(load_sae(tmp_path / name / "sae").state_dict())
    assert weights[0].keys() == weights[1].keys()
    for key in weights[0]:
        assert torch.equal(weights[0][key], weights[1][key]), key


def test_writer_resumes_from_the_remote_progress_and_prunes_what_is_newer(tmp_path):
    from vlmsae.data.shards import ShardWriter

    url = _memory_url()
    fs, root = fsspec.core.url_to_fs(url)

    def writer(staging):
        return ShardWriter(staging, d=3, rows_per_shard=4, meta={"model": "m"}, sink=StoreSink.open(url, staging))

    first = writer(tmp_path / "a")
    for i in range(2):
        first.add(torch.ones(4, 3) * i, torch.zeros(4), torch.arange(4), torch.zeros(4), ["k"] * 4)
        first.flush({"next": i + 1})
    assert not list((tmp_path / "a").glob("*.tar"))  # uploaded, then dropped from the staging folder
    fs.pipe_file(f"{root}/acts-000002.tar", b"a shard newer than progress.json")  # killed before its progress
    fs.pipe_file(f"{root}/.acts-000003.tar.0123.tmp", b"half an upload")
    resumed = writer(tmp_path / "b")  # a fresh staging folder: the resume point comes from the URL
    assert (resumed.n_shards, resumed.n_rows, resumed.state, resumed.shard_rows) == (2, 8, {"next": 2}, [4, 4])
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)) == [
        "acts-000000.tar",
        "acts-000001.tar",
        "progress.json",
    ]
    with pytest.raises(ValueError, match="different extraction"):
        ShardWriter(tmp_path / "c", d=3, meta={"model": "other"}, sink=StoreSink.open(url, tmp_path / "c"))
    fs.rm(f"{root}/progress.json")
    with pytest.raises(ValueError, match=r"memory://.* holds activation shards but no progress.json"):
        writer(tmp_path / "d")

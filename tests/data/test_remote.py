"""Remote activation stores (vlmsae.data.remote, vlmsae.data.store.open_remote_store): a store served over HTTP
by a server the test starts on 127.0.0.1 trains to the same SAE as its local copy; an unreachable URL and a
half-uploaded store fail with the URL and what is missing. Only 127.0.0.1 is ever contacted."""

from __future__ import annotations

import functools
import http.server
import io
import shutil
import socket
import tarfile
import threading

import numpy as np
import pytest
import torch

from vlmsae.data.remote import is_remote, join_url
from vlmsae.data.shards import chunk_row_counts, iter_chunks, list_shards
from vlmsae.data.store import open_store, write_acts_store
from vlmsae.data.stream import build_chunk_index
from vlmsae.formats import read_manifest

D = 64  # = conf/model/tiny.yaml width


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # keep pytest output clean
        pass


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(local store folder, URL of the same store, served root): 4000 rows, 4 shards of 2 chunks."""
    root = tmp_path_factory.mktemp("www")
    x = torch.randn(4000, D, generator=torch.Generator().manual_seed(0)) * 2 + 1
    store = write_acts_store(root / "store", x.half(), rows_per_chunk=500, chunks_per_shard=2, meta={"layer": 2})
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    stopper = threading.Timer(300, server.shutdown)  # bounded: never outlives a hung test run by much
    stopper.daemon = True
    stopper.start()
    try:
        yield store, f"http://127.0.0.1:{server.server_address[1]}/store", root
    finally:
        stopper.cancel()
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_is_remote_and_join_url():
    assert is_remote("https://h/s") and is_remote("s3://b/s") and is_remote("pipe:cat /x/{name}")
    assert not is_remote("/data/acts") and not is_remote("outputs/extract/run")
    assert join_url("http://h/s/", "manifest.json") == "http://h/s/manifest.json"
    assert join_url("pipe:cat /x/{name}", "acts-000000.tar") == "pipe:cat /x/acts-000000.tar"
    with pytest.raises(ValueError, match=r"\{name\}"):
        join_url("pipe:cat /x/acts.tar", "manifest.json")


def test_remote_store_lists_shards_from_manifest_and_reads_same_rows(served):
    store, url, _ = served
    where, manifest, shard_urls = open_store(url)
    assert where == url and shard_urls == [f"{url}/{p.name}" for p in list_shards(store)]
    # the chunk index comes from the manifest (no shard read) and equals the local headers' index
    index = build_chunk_index(shard_urls, d=D, manifest=manifest)
    assert [index[u] for u in shard_urls] == [chunk_row_counts(p) for p in list_shards(store)]
    assert manifest.shard_rows == [1000] * 4
    remote = [c["acts"] for c in iter_chunks(shard_urls)]
    local = [c["acts"] for c in iter_chunks(list_shards(store))]
    assert len(remote) == 8 and all(torch.equal(a, b) for a, b in zip(remote, local, strict=True))


def test_pipe_store_reads_the_same_rows(served):
    store, _, _ = served
    _, _, shard_urls = open_store(f"pipe:cat {store}/{{name}}")
    assert shard_urls[0] == f"pipe:cat {store}/acts-000000.tar"
    first = next(iter_chunks(shard_urls[:1]))
    assert torch.equal(first["acts"], next(iter_chunks(list_shards(store)[:1]))["acts"])


@pytest.mark.slow
def test_training_from_url_equals_training_from_local_copy(compose_cfg, served, tmp_path):
    from vlmsae.sae import load_sae
    from vlmsae.train import run

    store, url, _ = served
    weights = []
    for name, acts in (("local", store), ("remote", url)):
        cfg = compose_cfg(
            "train",
            [
                "data=acts",
                f"data.acts={acts}",
                "data.batch_size=128",
                "data.num_workers=0",
                "data.shuffle_buffer=512",
                "data.val_fraction=0.25",
                "trainer.max_steps=8",
                "logger=csv",
            ],
        )
        run(cfg, out_dpath=tmp_path / name)
        weights.append(load_sae(tmp_path / name / "sae").state_dict())
    assert weights[0].keys() == weights[1].keys()
    for key in weights[0]:
        assert torch.equal(weights[0][key], weights[1][key]), key


def test_unreachable_url_names_the_url():
    url = f"http://127.0.0.1:{_closed_port()}/store"
    with pytest.raises(ConnectionError, match=rf"{url}/manifest\.json.*manifest of the activation store"):
        open_store(url)


def test_half_written_store_names_the_missing_shard(served):
    store, url, root = served
    half = root / "half"
    shutil.copytree(store, half)
    (half / "acts-000002.tar").unlink()  # the upload stopped before this shard; the manifest says it exists
    with pytest.raises(FileNotFoundError, match=r"store .*/half is half-written.*1 are missing.*acts-000002\.tar"):
        open_store(url.replace("/store", "/half"))
    with pytest.raises(FileNotFoundError, match=r"/nothing/manifest\.json not found.*not a finished"):
        open_store(url.replace("/store", "/nothing"))


def test_shard_vanishing_after_open_names_the_url(served):
    store, url, root = served
    gone = root / "gone"
    shutil.copytree(store, gone)
    _, _, shard_urls = open_store(url.replace("/store", "/gone"))
    (gone / "acts-000001.tar").unlink()
    with pytest.raises(FileNotFoundError, match=r"/gone/acts-000001\.tar not found: the activation shard"):
        list(iter_chunks(shard_urls[1:2]))


def test_manifest_records_rows_per_shard(tmp_path):
    store = write_acts_store(tmp_path / "s", torch.randn(700, 4).half(), rows_per_chunk=100, chunks_per_shard=3)
    manifest = read_manifest(store)
    assert manifest.shard_rows == [300, 300, 100] and manifest.rows_per_chunk == 100


def _write_wds(fpath, samples):
    with tarfile.open(fpath, "w") as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_wds_images_from_url_and_pipe_equal_local(served):
    from PIL import Image

    from vlmsae.data.images import iter_images

    _, url, root = served
    (root / "wds").mkdir(exist_ok=True)
    for t in range(2):
        samples = []
        for i in range(3):
            buf = io.BytesIO()
            Image.fromarray(np.full((8, 8, 3), 10 * t + i, np.uint8)).save(buf, format="PNG")
            samples.append((f"s{t}{i}", {"png": buf.getvalue(), "cls": str(i).encode()}))
        _write_wds(root / "wds" / f"train-{t:06d}.tar", samples)
    pattern = "train-{000000..000001}.tar"
    base = url.replace("/store", "/wds")

    def seen(root_pattern):
        return [(r.key, r.label, np.asarray(r.image)[0, 0, 0]) for r in iter_images("wds", root_pattern)]

    local = seen(str(root / "wds" / pattern))
    assert len(local) == 6
    assert seen(f"{base}/{pattern}") == local
    assert seen(f"pipe:cat {root}/wds/{pattern}") == local
    with pytest.raises(FileNotFoundError, match=r"/wds/train-000009\.tar not found: the WebDataset shard"):
        seen(f"{base}/train-000009.tar")


def test_s3_without_s3fs_says_pip_install_s3fs():
    import importlib.util

    if importlib.util.find_spec("s3fs") is not None:
        pytest.skip("s3fs is installed")
    with pytest.raises(ImportError, match=r"s3://bucket/store/manifest\.json needs s3fs: pip install s3fs"):
        open_store("s3://bucket/store")

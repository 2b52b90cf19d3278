"""``python -m vlmsae.extract model=<name> data=folder data.root=<dir> layer=<L|last> tokens=<sel> out=<dir>``

Runs images through a vision encoder up to block ``layer`` (SPEC 1; later blocks never run), keeps
the rows ``tokens`` selects (cls | patches | all | random_k | mean), and writes them as an activation
store (``acts-%06d.tar`` + ``manifest.json``, see :mod:`vlmsae.data.shards`) with ``run_info.json``.

Row order: images are visited in the seeded permutation ``numpy.random.default_rng(order_seed)
.permutation(n)`` of the source's listing (``order_seed``, default 0; ``order_seed=null`` keeps the
listing order), so every shard and chunk is a uniform sample of the images. Folder listings are
sorted by class, and the trainer shuffles rows only within a bounded buffer: without the permutation
a training batch of an ImageNet store would hold a dozen classes. ``data.max_images=N`` keeps the
first N images of that order, a uniform random subset. A ``wds`` source streams: only its tar order
is permuted (samples inside a tar keep their order; shuffle the tars' contents when writing them).
Each row's ``image_idx`` is the image's index in the listing (the stable image id, whatever the
order), and ``keys.json`` its key. The manifest records ``order_seed``, ``order_digest`` and
``image_idx_meaning``.

Resumable: rerunning the same command in the same ``out`` continues after the last complete shard;
the rows are exactly those of an uninterrupted run (batches start at the same visiting positions,
and ``random_k`` draws from a generator seeded by ``seed`` and the batch's first visiting position).
A changed listing, ``order_seed`` or order is refused on resume. Unreadable images are skipped,
counted by reason (``skipped_by_reason``) and listed in the manifest; decoding follows
:mod:`vlmsae.data.images` (EXIF orientation, 16-bit, alpha over white, CMYK).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from vlmsae.config import conf_dir, register_configs
from vlmsae.formats import MANIFEST_JSON, StoreManifest, read_manifest

log = logging.getLogger(__name__)


class _ImageStream(torch.utils.data.IterableDataset):
    """Decoded + preprocessed images in visiting order, one item per record (unreadable ones included).

    With W DataLoader workers, worker i handles positions ``start + i, start + i + W, ...``; the
    DataLoader takes one item from each worker in turn, so items come out in position order.
    """

    def __init__(self, source: str, root: Any, start: int, max_images: int | None, preprocess: Any,
                 synthetic: dict[str, Any] | None, order_seed: int | None = None, exif_transpose: bool = True):
        super().__init__()
        self.source, self.root, self.start, self.max_images = source, root, start, max_images
        self.preprocess, self.synthetic = preprocess, synthetic
        self.order_seed, self.exif_transpose = order_seed, exif_transpose

    def __iter__(self):
        from vlmsae.data.images import iter_images

        info = torch.utils.data.get_worker_info()
        worker = (info.id, info.num_workers) if info is not None else (0, 1)
        for record in iter_images(self.source, self.root, start=self.start, max_images=self.max_images,
                                  yield_skipped=True, worker=worker, synthetic=self.synthetic,
                                  order_seed=self.order_seed, exif_transpose=self.exif_transpose):
            pixels, error, reason = None, record.error, record.reason
            if record.image is not None:
                try:
                    pixels = self.preprocess(record.image)
                except Exception as err:  # a decodable but unusable image (e.g. zero-sized) is skipped too
                    error, reason = f"{type(err).__name__}: {err}", "preprocess failed"
            yield {"pos": record.pos, "index": record.index, "key": record.key, "path": record.path,
                   "label": record.label, "pixels": pixels, "error": error, "reason": reason}


def _identity(item: Any) -> Any:
    return item


def _batch_generator(seed: int, first_pos: int) -> torch.Generator:
    """random_k's generator for the batch starting at image ``first_pos``: the same on a resumed run."""
    return torch.Generator().manual_seed((seed * 1_000_003 + first_pos) % (2**63))


def run(cfg: DictConfig, out_dpath: str | Path | None = None) -> dict[str, Any]:
    """Extract activations as ``cfg`` says into ``out_dpath`` (or ``cfg.out``, or Hydra's run dir)."""
    from tqdm.auto import tqdm

    from vlmsae.data.images import SkipLog, expand_urls, image_order, list_source, order_digest, synthetic_options
    from vlmsae.data.shards import ImageListDigest, ShardWriter, image_list_digest
    from vlmsae.models import TOKEN_CHOICES, ModelSpec, load_tap, select_tokens
    from vlmsae.utils.paths import run_dir
    from vlmsae.utils.provenance import write_run_info

    out_dpath = run_dir(out_dpath if out_dpath is not None else cfg.get("out"))
    spec = ModelSpec.from_cfg(cfg.model)
    tokens = str(cfg.tokens)
    if tokens not in TOKEN_CHOICES:
        raise ValueError(f"Unknown tokens={tokens!r}: use one of {list(TOKEN_CHOICES)}.")
    if tokens == "cls" and not spec.has_cls and str(cfg.layer) != "last":
        raise ValueError(
            f"tokens=cls: model {spec.name} has no CLS token (e.g. SigLIP). Use tokens=mean (mean-pooled patches) "
            "or tokens=patches."
        )
    data = cfg.data
    synthetic = synthetic_options(str(data.source), data.get("extra"), data.get("seed", 0))
    if data.source not in ("folder", "list", "wds", "synthetic"):
        raise ValueError(f"extract reads images: data.source={data.source!r} must be folder, list, wds or synthetic.")

    order_seed = cfg.get("order_seed", 0)
    if order_seed is not None and (isinstance(order_seed, bool) or not isinstance(order_seed, int)):
        raise ValueError(f"order_seed={order_seed!r} must be an integer (the image-order permutation's seed) or "
                         "null (listing order).")
    exif_transpose = bool(data.get("exif_transpose", True))
    max_images = None if data.max_images is None else int(data.max_images)
    classes: list[str] = []
    total = listing_digest = None
    if data.source != "wds":  # wds streams; the other sources are listed up front (cheap, no decoding)
        listing = list_source(str(data.source), data.root, synthetic=synthetic)
        order = image_order(len(listing.items), order_seed)[:max_images]  # max_images: a random subset
        classes, total = listing.classes, len(order)
        listing_digest = image_list_digest(key for key, _, _ in listing.items)
        image_idx_meaning = ("the image's index in the sorted listing of data.source (0-based; keys.json has its key), "
                             "not its position in the visiting order")
    else:  # only the tars' order can be permuted
        order = image_order(len(expand_urls(str(data.root))), order_seed) if data.root is not None else []
        image_idx_meaning = ("the image's position in the streamed order (tars in the order_seed permutation, "
                             "samples in tar order); keys.json has its __key__")

    tap = load_tap(spec)
    layer = tap.resolve_layer(cfg.layer)
    if tokens == "cls" and layer != "last" and not tap.has_cls:
        raise ValueError(f"tokens=cls: model {spec.name} has no CLS token. Use tokens=mean or tokens=patches.")
    d = tap.embed_dim if layer == "last" else tap.width
    dtype = str(cfg.dtype)
    meta = {
        "model": spec.name, "backend": spec.backend, "arch": spec.arch, "pretrained": spec.pretrained,
        "local_path": spec.local_path, "layer": layer, "tokens": tokens,
        "k": int(cfg.k) if tokens == "random_k" else None, "seed": int(cfg.seed),
        "source": str(data.source), "root": None if data.root is None else str(data.root),
        "synthetic": synthetic, "max_images": max_images, "batch_size": int(data.batch_size),
        "image_size": tap.image_size, "has_cls": tap.has_cls, "model_dtype": spec.dtype,
        "rows_per_shard": int(cfg.rows_per_shard),
        "listing_digest": listing_digest,  # a changed image folder is refused on resume, not silently mixed
        # the visiting order: a changed seed or order is refused on resume too (positions would mean other images)
        "order_seed": order_seed, "order_unit": "shard" if data.source == "wds" else "image",
        "order_digest": order_digest(order), "image_idx_meaning": image_idx_meaning,
        "exif_transpose": exif_transpose, "alpha_background": "white",
    }
    writer = ShardWriter(out_dpath, d=d, dtype=dtype, rows_per_chunk=int(cfg.rows_per_chunk),
                         rows_per_shard=int(cfg.rows_per_shard), meta=meta)
    config = OmegaConf.to_container(cfg, resolve=True)
    if writer.state is not None and writer.state.get("done") and (out_dpath / MANIFEST_JSON).exists():
        manifest = read_manifest(out_dpath)
        log.info("extraction in %s is already complete (%d rows)", out_dpath, manifest.n_rows)
        return _summary(out_dpath, manifest, seconds=0.0)

    write_run_info(out_dpath, config, result=None)  # says what is being made, even if the run is killed
    state = writer.state or {"next_pos": 0, "n_images": 0, "skipped": [], "digest": ImageListDigest().state_dict()}
    if state["next_pos"]:
        log.info("resuming %s after %d shards (%d rows, image position %d)", out_dpath, writer.n_shards,
                 writer.n_rows, state["next_pos"])
    digest = ImageListDigest.from_state(state["digest"])
    skipped = SkipLog(list(state["skipped"]))
    n_images = int(state["n_images"])
    stream = _ImageStream(str(data.source), data.root, state["next_pos"], max_images, tap.preprocess, synthetic,
                          order_seed=order_seed, exif_transpose=exif_transpose)
    num_workers = int(data.num_workers)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=num_workers, collate_fn=_identity,
                                         prefetch_factor=4 if num_workers else None)
    batch_size = int(data.batch_size)
    seed, k = int(cfg.seed), int(cfg.k)
    batch: list[dict[str, Any]] = []
    next_pos = state["next_pos"]
    t0 = time.perf_counter()
    n_new = 0

    def current_state(done: bool = False) -> dict[str, Any]:
        return {"next_pos": next_pos, "n_images": n_images, "skipped": skipped.to_list(),
                "digest": digest.state_dict(), "done": done}

    def process(batch: list[dict[str, Any]]) -> None:
        x_BCHW = torch.stack([item["pixels"] for item in batch])
        acts = tap.forward_to(x_BCHW, layer)
        generator = _batch_generator(seed, batch[0]["pos"]) if tokens == "random_k" else None
        rows_ND, token_idx_N, in_batch_N = select_tokens(acts, tokens, k=k, generator=generator, has_cls=tap.has_cls)
        index_B = torch.tensor([item["index"] for item in batch], dtype=torch.long)  # image_idx: the listing index
        label_B = torch.tensor([item["label"] for item in batch], dtype=torch.long)
        keys = [batch[i]["key"] for i in in_batch_N.tolist()]
        writer.add(rows_ND, token_idx_N, index_B[in_batch_N], label_B[in_batch_N], keys)

    with tqdm(total=total, initial=next_pos, unit="img", desc=f"extract {spec.name} L{layer} {tokens}",
              disable=not cfg.get("progress", True), dynamic_ncols=True, mininterval=1.0) as bar:
        for item in loader:
            next_pos = item["pos"] + 1
            digest.update(item["key"])
            bar.update(1)
            if item["pixels"] is None:
                skipped.add(item["key"], item["path"], item["error"] or "unreadable", item["reason"] or "other")
                log.warning("skipped unreadable image %s: %s", item["key"], item["error"])
                continue
            batch.append(item)
            n_images += 1
            n_new += 1
            if len(batch) == batch_size:
                process(batch)
                batch = []
                if writer.buffered_rows >= writer.rows_per_shard:
                    writer.flush(current_state())
        if batch:
            process(batch)
        writer.flush(current_state(done=True))
    seconds = time.perf_counter() - t0
    if n_images == 0:
        raise ValueError(f"No readable images in data.source={data.source} data.root={data.root} "
                         f"({len(skipped)} skipped).")
    manifest = writer.write_manifest(
        n_images=n_images, n_listed=next_pos, n_skipped=len(skipped), skipped_by_reason=skipped.by_reason(),
        skipped=skipped.to_list(),
        image_list_digest=digest.hexdigest(), classes=classes, n_tokens_per_image=tap.n_tokens,
        embed_dim=tap.embed_dim, width=tap.width, n_layers=tap.n_layers, complete=True,
    )
    summary = _summary(out_dpath, manifest, seconds=seconds, n_new=n_new)
    write_run_info(out_dpath, config, result=summary)
    log.info("wrote %d rows from %d images to %s (%.1f images/s)", manifest.n_rows, n_images, out_dpath,
             summary["images_per_s"])
    return summary


def _summary(out_dpath: Path, manifest: StoreManifest, seconds: float, n_new: int = 0) -> dict[str, Any]:
    return {
        "out": str(out_dpath), "n_rows": manifest.n_rows, "n_images": manifest.n_images,
        "n_shards": manifest.n_shards, "n_skipped": manifest.n_skipped, "d": manifest.d,
        "layer": manifest.layer, "tokens": manifest.tokens, "seconds": seconds,
        "images_per_s": n_new / seconds if seconds > 0 else 0.0,
    }


def _main(cfg: DictConfig) -> None:
    summary = run(cfg)
    print(OmegaConf.to_yaml(OmegaConf.create(summary)))


def main() -> None:
    register_configs()
    hydra.main(config_path=str(conf_dir()), config_name="extract", version_base="1.3")(_main)()


if __name__ == "__main__":
    main()

"""Write an activation store: images -> vision encoder up to a layer -> selected tokens -> shards (METHOD §1).

```python
plan = ExtractionPlan(source="folder", root="/imgs", layer=22, tokens="cls", ...)
extraction = StoreExtraction(job.model, plan, out_dpath)  # checks, listing, tap, resume state
summary = extraction.finished or extraction.run()                     # finished: a rerun of a complete store
```

Row order (a seeded permutation of the listing), ``image_idx`` and resuming are docs/outputs.md's (``extract``)
and docs/training.md's: a resumed run writes exactly the rows of an uninterrupted one, because batches start at
the same visiting positions and ``random_k`` draws from a generator seeded by ``seed`` and the batch's first
position. Unreadable images are skipped, counted by reason and listed in the manifest.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vlmsae.data.images import (
    ImageList,
    SkipLog,
    expand_urls,
    image_order,
    iter_images,
    list_source,
    order_digest,
)
from vlmsae.data.shards import (
    RANK_DIR_PATTERN,
    ImageListDigest,
    ShardWriter,
    image_list_digest,
    rank_dpaths,
    write_merged_manifest,
)
from vlmsae.formats import MANIFEST_JSON, PROGRESS_JSON, StoreManifest, read_manifest, read_progress
from vlmsae.models import load_tap
from vlmsae.models.gpu_decode import BlockDecoder, choose_decode
from vlmsae.models.spec import ModelSpec, seed_decides_weights
from vlmsae.models.tap import TOKEN_CHOICES, Layer, select_tokens

log = logging.getLogger(__name__)

IMAGE_SOURCES = ("folder", "list", "wds", "synthetic")


@dataclass(frozen=True)
class ExtractionPlan:
    """What to extract and how (the ``extract`` job's keys and its image source's); no defaults here:
    they live in the job's schema (vlmsae.config.jobs.extract) and the data group's."""

    source: str  # folder | list | wds | synthetic
    root: str | None  # image folder, list file or WebDataset url/pattern (synthetic: where the images are made)
    layer: Layer  # block index (negative from the end) or "last", as asked; the tap resolves it
    tokens: str  # one of vlmsae.models.tap.TOKEN_CHOICES
    k: int  # tokens per image for tokens=random_k
    seed: int  # random_k token draws
    dtype: str  # stored activations
    rows_per_shard: int
    rows_per_chunk: int
    order_seed: Any  # int seed of the visiting permutation, or None for the listing order
    max_images: int | None  # the first N images of the visiting order (a uniform random subset)
    batch_size: int  # images per encoder forward
    num_workers: int  # DataLoader workers decoding images
    exif_transpose: bool
    synthetic: dict[str, Any] | None = field(default=None)  # source=synthetic: vlmsae.data.images.synthetic_options
    progress: bool = True  # a tqdm bar with images/s
    fast_decode: bool = False  # data.fast_decode: JPEG draft decoding + reduce (vlmsae.data.images.load_image)
    # with fast_decode on a CUDA model: decode JPEGs there (nvjpeg, vlmsae.models.gpu_decode); False keeps cpu_draft
    gpu_decode: bool = True

    def __post_init__(self) -> None:
        if self.tokens not in TOKEN_CHOICES:
            raise ValueError(f"Unknown tokens={self.tokens!r}: use one of {list(TOKEN_CHOICES)}.")
        if self.source not in IMAGE_SOURCES:
            raise ValueError(
                f"extract reads images: data.source={self.source!r} must be folder, list, wds or synthetic."
            )
        seed = self.order_seed
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(
                f"order_seed={seed!r} must be an integer (the image-order permutation's seed) or null (listing order)."
            )


class _ImageStream(torch.utils.data.IterableDataset):
    """Decoded + preprocessed images in visiting order, in blocks of ``block`` consecutive positions.

    Worker i handles the blocks ``i, i + W, ...`` (``iter_images(worker_block=block)``); the DataLoader
    takes one block from each worker in turn, so blocks come out in position order. A block is one
    message: its readable images stacked in one tensor, and per record its position, index, key, path,
    label, and error/reason (unreadable ones included). One tensor per block instead of one per image
    spares the main process a shared-memory segment, a file descriptor and an unpickle per image.
    """

    def __init__(self, start: int, block: int, preprocess: Any, **image_kwargs: Any):
        super().__init__()
        self.start, self.block, self.preprocess = start, block, preprocess
        self.image_kwargs = image_kwargs  # iter_images' (listing: the main process's, workers do not list again)

    def _block(self, records: list[dict[str, Any]], pixels: list[torch.Tensor], jpegs: list[bytes]) -> dict[str, Any]:
        out = {"records": records, "pixels": torch.stack(pixels) if pixels else None}
        if jpegs:  # raw JPEGs for the device decoder: one byte tensor + offsets, not one tensor per image
            ends = torch.tensor([len(j) for j in jpegs]).cumsum(0).tolist()
            out["jpeg_bytes"] = torch.frombuffer(bytearray(b"".join(jpegs)), dtype=torch.uint8)
            out["jpeg_offsets"] = list(zip([0, *ends[:-1]], ends))
        return out

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker = (info.id, info.num_workers) if info is not None else (0, 1)
        records: list[dict[str, Any]] = []
        pixels: list[torch.Tensor] = []
        jpegs: list[bytes] = []
        block_id = None
        images = iter_images(
            start=self.start, yield_skipped=True, worker=worker, worker_block=self.block, **self.image_kwargs
        )
        for record in images:
            this_block = (record.pos - self.start) // self.block
            if records and this_block != block_id:
                yield self._block(records, pixels, jpegs)
                records, pixels, jpegs = [], [], []
            block_id = this_block
            error, reason, ok = record.error, record.reason, False
            if record.jpeg is not None:  # decoded by the main process on the device (BlockDecoder)
                jpegs.append(record.jpeg)
            elif record.image is not None:
                try:
                    pixels.append(self.preprocess(record.image))
                    ok = True
                except Exception as err:  # a decodable but unusable image (e.g. zero-sized) is skipped too
                    error, reason = f"{type(err).__name__}: {err}", "preprocess failed"
            records.append(
                {
                    "pos": record.pos,
                    "index": record.index,
                    "key": record.key,
                    "path": record.path,
                    "label": record.label,
                    "ok": ok,
                    "error": error,
                    "reason": reason,
                    "jpeg": record.jpeg is not None,
                }
            )
        if records:
            yield self._block(records, pixels, jpegs)


def _stack_rows(rows: list[tuple[torch.Tensor, int]]) -> torch.Tensor:
    """``[B, C, H, W]`` from (block tensor, row) pairs: a view when they are consecutive rows of one block
    (the usual case: batches and blocks are the same size), else one copy."""
    first, row0 = rows[0]
    if all(t is first and r == row0 + i for i, (t, r) in enumerate(rows)):
        return first[row0 : row0 + len(rows)]
    return torch.stack([t[r] for t, r in rows])


@dataclass(frozen=True)
class Ranks:
    """This process's place among the ``torchrun`` processes of one extraction (``WORLD_SIZE`` > 1).

    Ranks only exchange small control messages (the image-list check, two barriers), so the process
    group is always ``gloo``, also on GPUs; each rank runs its encoder on ``cuda:LOCAL_RANK``.
    """

    rank: int
    world: int

    @classmethod
    def from_env(cls) -> Ranks | None:
        """The torchrun ranks from the environment (joining the process group), or None without torchrun."""
        import os

        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return None
        from datetime import timedelta

        import torch.distributed as dist

        if torch.cuda.is_available():  # "auto"/"cuda" devices then mean this rank's own GPU
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        if not dist.is_initialized():
            dist.init_process_group("gloo", timeout=timedelta(hours=48))  # ranks wait for the slowest one
        return cls(rank=dist.get_rank(), world=dist.get_world_size())

    def gather(self, obj: Any) -> list[Any]:
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def agree(self, **values: Any) -> None:
        """Fail on every rank, before anything is written, when the ranks see different image lists."""
        seen = self.gather(values)
        if any(other != seen[0] for other in seen):
            detail = "; ".join(f"rank {r}: {v}" for r, v in enumerate(seen))
            raise ValueError(
                f"the {self.world} torchrun ranks disagree on the image list ({detail}): every rank must see the "
                "same data.root (a shared filesystem), data.max_images and order_seed; fix the per-node paths"
            )


def check_world_size(out_dpath: Path, world: int) -> None:
    """Refuse to continue a store begun with another number of processes (its rank folders say how many)."""
    parts = rank_dpaths(out_dpath)
    had = {int(p.name.rsplit("-", 1)[1]) for p in parts}
    if parts and had != {world}:
        raise ValueError(
            f"{out_dpath} was extracted by {sorted(had)} torchrun processes ({parts[0].name}, ...) but this run has "
            f"world size {world}: resume with the same --nnodes x --nproc_per_node, or choose a new out=<dir>"
        )
    if world > 1 and (out_dpath / PROGRESS_JSON).exists():
        raise ValueError(
            f"{out_dpath} holds a single-process extraction but this run has world size {world}: resume it "
            "without torchrun, or choose a new out=<dir>"
        )


def _identity(item: Any) -> Any:
    return item


def main_threads(device: torch.device, num_workers: int, n_cores: int | None = None) -> int | None:
    """torch threads for the main process's forward while ``num_workers`` workers decode, or None (keep).

    On a CPU device the workers (1 thread each: the DataLoader sets it) and the main process share the
    cores; a main process keeping all of torch's threads spins them waiting for cores the decoders hold
    (measured on 2 cores with 2 workers: the tiny model's forward used ~20x the CPU time). So it takes the
    cores the workers leave, at least 1. A GPU forward, or ``num_workers=0``, keeps the setting.
    """
    import os

    if device.type != "cpu" or num_workers <= 0:
        return None
    if n_cores is None:
        n_cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(torch.get_num_threads(), n_cores - num_workers))


@contextmanager
def _main_threads(device: torch.device, num_workers: int) -> Iterator[None]:
    """:func:`main_threads` torch threads inside the block, the previous setting after it."""
    before, threads = torch.get_num_threads(), main_threads(device, num_workers)
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _batch_generator(seed: int, first_pos: int) -> torch.Generator:
    """random_k's generator for the batch starting at image ``first_pos``: the same on a resumed run."""
    return torch.Generator().manual_seed((seed * 1_000_003 + first_pos) % (2**63))


def extraction_summary(out_dpath: Path, manifest: StoreManifest, seconds: float, n_new: int = 0) -> dict[str, Any]:
    """What the extract job returns: the store's size and what it holds, and this run's images/s."""
    fields = ("n_rows", "n_images", "n_shards", "n_skipped", "d", "layer", "tokens")
    return {
        "out": str(out_dpath),
        **{key: getattr(manifest, key) for key in fields},
        "seconds": seconds,
        "images_per_s": n_new / seconds if seconds > 0 else 0.0,
    }


class StoreExtraction:
    """One extraction of ``spec``'s activations into ``out_dpath`` as ``plan`` says.

    Construction checks the request, lists the images (cheap, no decoding), loads the tap and opens
    the shard writer, which reads the resume state of a partial store (and refuses a different one).
    ``finished`` is the summary when the store is already complete, else None; :meth:`run` writes it.
    """

    def __init__(
        self, spec: ModelSpec, plan: ExtractionPlan, out_dpath: Path, ranks: Ranks | None = None, sink: Any = None
    ):
        if sink is not None and ranks is not None:  # sink: out=<url>, out_dpath stages (vlmsae.data.sink.StoreSink)
            raise ValueError(
                f"out={sink.url}: torchrun ranks (world size {ranks.world}) cannot write to a URL yet: extract with "
                "one process, or extract to a shared folder and upload it (shards first, manifest.json last)"
            )
        if plan.tokens == "cls" and not spec.has_cls and str(plan.layer) != "last":
            raise ValueError(
                f"tokens=cls: model {spec.name} has no CLS token (e.g. SigLIP). Use tokens=mean (mean-pooled "
                "patches) or tokens=patches."
            )
        self.spec, self.plan, self.out_dpath, self.ranks = spec, plan, Path(out_dpath), ranks
        self.classes: list[str] = []
        self.total: int | None = None
        self.positions = (0, plan.max_images)  # this process's share of the visiting order: [start, stop)
        self.ignored: dict[str, int] = {}
        listing_digest = full_digest = None
        self.listing: ImageList | None = None  # wds streams: nothing listed
        if ranks is not None and plan.source == "wds":
            raise ValueError(
                "data.source=wds streams and cannot be split across torchrun ranks: extract it with one process, "
                "or list the images (data=folder / data=list)"
            )
        check_world_size(self.out_dpath, 1 if ranks is None else ranks.world)
        if plan.source != "wds":  # wds streams; the other sources are listed up front (cheap, no decoding)
            self.listing = listing = list_source(plan.source, plan.root, synthetic=plan.synthetic)
            order = image_order(len(listing.items), plan.order_seed)[: plan.max_images]  # max_images: a random subset
            self.classes, self.total = listing.classes, len(order)
            self.ignored = dict(listing.ignored)  # every listed file not used, by reason (the manifest counts them)
            if len(order) < len(listing.items):
                self.ignored["not in the max_images subset"] = len(listing.items) - len(order)
            listing_digest = image_list_digest(key for key, _, _ in listing.items)
            if ranks is not None:  # contiguous blocks of the (permuted) visiting order: each a uniform sample
                self.positions = (self.total * ranks.rank // ranks.world, self.total * (ranks.rank + 1) // ranks.world)
                full_digest = image_list_digest(listing.items[i][0] for i in order)
            image_idx_meaning = (
                "the image's index in the sorted listing of data.source (0-based; keys.json has its "
                "key), not its position in the visiting order"
            )
        else:  # only the tars' order can be permuted
            order = image_order(len(expand_urls(str(plan.root))), plan.order_seed) if plan.root is not None else []
            image_idx_meaning = (
                "the image's position in the streamed order (tars in the order_seed permutation, "
                "samples in tar order); keys.json has its __key__"
            )

        self.image_list_digest = full_digest
        if ranks is not None:  # before any shard: all ranks must visit the same images in the same order
            ranks.agree(listing_digest=listing_digest, order_seed=plan.order_seed, order_digest=order_digest(order))
        self.tap = tap = load_tap(spec)
        self.layer = layer = tap.resolve_layer(plan.layer)
        if plan.tokens == "cls" and layer != "last" and not tap.has_cls:
            raise ValueError(f"tokens=cls: model {spec.name} has no CLS token. Use tokens=mean or tokens=patches.")
        meta = {
            "model": spec.name,
            "backend": spec.backend,
            "arch": spec.arch,
            "pretrained": spec.pretrained,
            "local_path": spec.local_path,
            "model_seed": spec.seed if seed_decides_weights(spec) else None,  # a random model's weights
            "layer": layer,
            "tokens": plan.tokens,
            "k": plan.k if plan.tokens == "random_k" else None,
            "seed": plan.seed,
            "source": plan.source,
            "root": None if plan.root is None else str(plan.root),
            "synthetic": plan.synthetic,
            "max_images": plan.max_images,
            "batch_size": plan.batch_size,
            "image_size": tap.image_size,
            "has_cls": tap.has_cls,
            "model_dtype": spec.dtype,
            "rows_per_shard": plan.rows_per_shard,
            "listing_digest": listing_digest,  # a changed image folder is refused on resume, not silently mixed
            # the visiting order: a changed seed or order is refused on resume too (positions would mean other images)
            "order_seed": plan.order_seed,
            "order_unit": "shard" if plan.source == "wds" else "image",
            "order_digest": order_digest(order),
            "image_idx_meaning": image_idx_meaning,
            "exif_transpose": plan.exif_transpose,
            "alpha_background": "white",
        }
        if plan.fast_decode:  # only when on: a store begun before the option existed still resumes
            meta["fast_decode"] = True
        # cpu | cpu_draft | cuda_nvjpeg (vlmsae.models.gpu_decode); every manifest says it, and progress.json
        # pins cuda_nvjpeg so that a store is not continued with other pixels
        self.decode, self.gpu_preprocess = choose_decode(tap, plan.fast_decode, plan.gpu_decode)
        if self.decode == "cuda_nvjpeg":
            meta["decode"] = self.decode
        writer_dpath = self.out_dpath
        if ranks is not None:  # per-rank folder, shards and progress.json: ranks never touch each other's files
            writer_dpath = self.out_dpath / (RANK_DIR_PATTERN % (ranks.rank, ranks.world))
            meta.update(world_size=ranks.world, rank=ranks.rank, positions=list(self.positions))
            meta.update(dtype=plan.dtype, rows_per_chunk=plan.rows_per_chunk)
        self.writer = ShardWriter(
            writer_dpath,
            d=tap.embed_dim if layer == "last" else tap.width,
            dtype=plan.dtype,
            rows_per_chunk=plan.rows_per_chunk,
            rows_per_shard=plan.rows_per_shard,
            meta=meta,
            sink=sink,
        )

    @property
    def finished(self) -> dict[str, Any] | None:
        """The summary of an already complete store in ``out_dpath`` (a rerun), else None."""
        state = self.writer.state
        done = self.ranks is not None or (state is not None and state.get("done"))  # ranks: the merged manifest
        if not done or not (self.out_dpath / MANIFEST_JSON).exists():
            return None
        manifest = read_manifest(self.out_dpath)
        log.info("extraction in %s is already complete (%d rows)", self.out_dpath, manifest.n_rows)
        return extraction_summary(self.out_dpath, manifest, seconds=0.0)

    def run(self) -> dict[str, Any]:
        """Extract the remaining images, write the manifest; returns :func:`extraction_summary`'s dict."""
        from tqdm.auto import tqdm

        plan, tap, writer, layer = self.plan, self.tap, self.writer, self.layer
        state = writer.state or {
            "next_pos": self.positions[0],
            "n_images": 0,
            "skipped": [],
            "digest": ImageListDigest().state_dict(),
        }
        if state["next_pos"] > self.positions[0]:
            log.info(
                "resuming %s after %d shards (%d rows, image position %d)",
                self.out_dpath,
                writer.n_shards,
                writer.n_rows,
                state["next_pos"],
            )
        digest = ImageListDigest.from_state(state["digest"])
        draft_size = tap.image_size if plan.fast_decode else None
        skipped = SkipLog(list(state["skipped"]))
        n_images = int(state["n_images"])
        stream = _ImageStream(
            state["next_pos"],
            plan.batch_size,
            tap.preprocess,
            source=plan.source,
            root=plan.root,
            max_images=self.positions[1],
            synthetic=plan.synthetic,
            order_seed=plan.order_seed,
            exif_transpose=plan.exif_transpose,
            draft_size=draft_size,
            raw_jpeg=self.gpu_preprocess is not None,
            listing=self.listing,
        )
        finish = _identity
        if self.gpu_preprocess is not None:
            finish = BlockDecoder(self.gpu_preprocess, tap.device, tap.preprocess, plan.exif_transpose, draft_size)
        loader = torch.utils.data.DataLoader(
            stream,
            batch_size=None,
            num_workers=plan.num_workers,
            collate_fn=_identity,
            prefetch_factor=2 if plan.num_workers else None,  # blocks of batch_size images: 2 per worker suffice
        )
        batch: list[dict[str, Any]] = []
        rows: list[tuple[torch.Tensor, int]] = []  # (block tensor, row) of each image in ``batch``
        next_pos = state["next_pos"]
        t0 = time.perf_counter()
        n_new = 0

        def current_state(done: bool = False) -> dict[str, Any]:
            return {
                "next_pos": next_pos,
                "n_images": n_images,
                "skipped": skipped.to_list(),
                "digest": digest.state_dict(),
                "done": done,
            }

        def process(batch: list[dict[str, Any]]) -> None:
            x_BCHW = _stack_rows(rows)
            acts = tap.forward_to(x_BCHW, layer)
            generator = _batch_generator(plan.seed, batch[0]["pos"]) if plan.tokens == "random_k" else None
            rows_ND, token_idx_N, in_batch_N = select_tokens(
                acts, plan.tokens, k=plan.k, generator=generator, has_cls=tap.has_cls
            )
            index_B = torch.tensor([item["index"] for item in batch], dtype=torch.long)  # image_idx: the listing index
            label_B = torch.tensor([item["label"] for item in batch], dtype=torch.long)
            keys = [batch[i]["key"] for i in in_batch_N.tolist()]
            writer.add(rows_ND, token_idx_N, index_B[in_batch_N], label_B[in_batch_N], keys)

        desc = f"extract {self.spec.name} L{layer} {plan.tokens}"
        with (
            _main_threads(tap.device, plan.num_workers),
            tqdm(
                total=None if self.total is None else (self.positions[1] or self.total) - self.positions[0],
                initial=next_pos - self.positions[0],
                unit="img",
                desc=desc,
                disable=not plan.progress,
                dynamic_ncols=True,
                mininterval=1.0,
            ) as bar,
        ):
            for block in loader:
                block = finish(block)  # cuda_nvjpeg: decode + preprocess the block's raw JPEGs on the device
                bar.update(len(block["records"]))
                row = 0
                for item in block["records"]:
                    next_pos = item["pos"] + 1
                    digest.update(item["key"])
                    if not item["ok"]:
                        skipped.add(item["key"], item["path"], item["error"] or "unreadable", item["reason"] or "other")
                        log.warning("skipped unreadable image %s: %s", item["key"], item["error"])
                        continue
                    batch.append(item)
                    rows.append((block["pixels"], row))
                    row += 1
                    n_images += 1
                    n_new += 1
                    if len(batch) == plan.batch_size:
                        process(batch)
                        batch, rows = [], []
                        if writer.buffered_rows >= writer.rows_per_shard:
                            writer.flush(current_state())
            if batch:
                process(batch)
            writer.flush(current_state(done=True))
        seconds = time.perf_counter() - t0
        if self.ranks is not None:
            return self._merge(seconds, n_new)
        manifest = writer.write_manifest(**self._manifest_fields(n_images, next_pos, skipped, digest.hexdigest()))
        summary = extraction_summary(self.out_dpath, manifest, seconds=seconds, n_new=n_new)
        log.info(
            "wrote %d rows from %d images to %s (%.1f images/s)",
            manifest.n_rows,
            n_images,
            self.out_dpath,
            summary["images_per_s"],
        )
        return summary

    def _merge(self, seconds: float, n_new: int) -> dict[str, Any]:
        """After every rank's last shard: rank 0 writes the store's manifest from the rank folders' progress."""
        import torch.distributed as dist

        dist.barrier()  # every rank's progress.json says done
        error = None
        if self.ranks.rank == 0:
            try:
                self._write_merged_manifest()
            except Exception as err:  # reported on every rank below, so that none waits forever
                error = f"{type(err).__name__}: {err}"
        errors = [e for e in self.ranks.gather(error) if e]
        if errors:
            raise ValueError(f"merging the ranks' parts of {self.out_dpath} failed: {errors[0]}")
        manifest = read_manifest(self.out_dpath)
        return extraction_summary(self.out_dpath, manifest, seconds=seconds, n_new=n_new)

    def _write_merged_manifest(self) -> None:
        parts = rank_dpaths(self.out_dpath)
        states = [read_progress(p).state for p in parts]
        if len(parts) != self.ranks.world or not all(s and s.get("done") for s in states):
            raise RuntimeError(f"{self.out_dpath}: not every rank folder is complete ({[p.name for p in parts]})")
        skipped = SkipLog([entry for s in states for entry in s["skipped"]])
        n_images = sum(int(s["n_images"]) for s in states)
        fields = self._manifest_fields(n_images, self.total, skipped, self.image_list_digest)
        write_merged_manifest(self.out_dpath, parts, **fields)

    def _manifest_fields(self, n_images: int, n_listed: int, skipped: SkipLog, digest: str) -> dict[str, Any]:
        """The manifest's fields of a finished extraction (one process, or the ranks merged); refuses a store
        without a single readable image."""
        if n_images == 0:
            raise ValueError(
                f"No readable images in data.source={self.plan.source} data.root={self.plan.root} "
                f"({len(skipped)} skipped)."
            )
        tap = self.tap
        return dict(
            n_images=n_images,
            n_listed=n_listed,
            n_skipped=len(skipped),
            skipped_by_reason=skipped.by_reason(),
            skipped=skipped.to_list(),
            ignored_by_reason=dict(sorted(self.ignored.items())),
            image_list_digest=digest,
            classes=self.classes,
            n_tokens_per_image=tap.n_tokens,
            embed_dim=tap.embed_dim,
            width=tap.width,
            n_layers=tap.n_layers,
            decode=self.decode,
            complete=True,
        )

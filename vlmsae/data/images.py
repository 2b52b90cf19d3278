"""Image sources: ImageFolder trees (iNaturalist 2021 included), WebDataset shards, list files, synthetic.

``iter_images(source, root)`` yields :class:`ImageRecord` in a fixed order; ``pos`` numbers every
record of the source (unreadable ones included), so a store's ``image_idx`` stays the same image
even when some files are corrupt, and a resumed extraction can skip ``start`` records without
decoding them. Unreadable images never stop a run: they are skipped and recorded in a
:class:`SkipLog` (and in the activation manifest).

- ``folder``: class sub-folders -> labels 0..C-1 in sorted order (``classes``); the class names are
  kept whole, e.g. iNat 2021's ``00000_Animalia_Annelida_Clitellata_..._terrestris``. A folder
  without sub-folders gives unlabelled images (label -1). Keys are paths relative to ``root``.
- ``list``: a text file, one ``path`` or ``path<TAB>label`` per line (relative paths are taken from
  the list file's folder; ``#`` lines are comments); labels are ints or class names.
- ``wds``: WebDataset tars (``root`` may be a brace pattern ``train-{000000..000099}.tar`` or several
  separated by ``::``); the image is the jpg/jpeg/png/webp member, the label ``cls`` or ``json``
  (``label``/``cls`` field). Keys are the samples' ``__key__``.
- ``synthetic``: planted-concept images (:mod:`vlmsae.data.concepts`) written once to a cache folder.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm")
WDS_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
SOURCES = ("folder", "list", "wds", "synthetic")


@dataclass
class ImageRecord:
    """One image of a source. ``image`` is None (and ``error`` set) for an unreadable one."""

    key: str
    path: str | None
    label: int
    image: Any  # PIL.Image.Image (RGB) or None
    pos: int = 0
    error: str | None = None


@dataclass
class SkipLog:
    """Images that could not be read: key, path and the error, in order."""

    entries: list[dict[str, Any]] = field(default_factory=list)

    def add(self, key: str, path: str | None, error: str) -> None:
        self.entries.append({"key": key, "path": path, "error": error})

    def __len__(self) -> int:
        return len(self.entries)

    def to_list(self) -> list[dict[str, Any]]:
        return list(self.entries)


@dataclass
class ImageList:
    """A listed (not yet decoded) image source: ``items`` are ``(key, path, label)``."""

    items: list[tuple[str, str, int]]
    classes: list[str]


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def list_folder(root: str | Path) -> ImageList:
    """List an ImageFolder tree (labels from sorted class folders) or a flat folder (label -1)."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"data.root={root} is not a folder (data=folder needs an image folder).")
    class_dpaths = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    items: list[tuple[str, str, int]] = []
    classes: list[str] = []
    if class_dpaths:
        classes = [p.name for p in class_dpaths]
        for label, dpath in enumerate(class_dpaths):
            for fpath in sorted(p for p in dpath.rglob("*") if p.is_file() and _is_image(p)):
                items.append((fpath.relative_to(root).as_posix(), str(fpath), label))
    flat = sorted(p for p in root.iterdir() if p.is_file() and _is_image(p))
    items = [(p.name, str(p), -1) for p in flat] + items
    if not items:
        raise FileNotFoundError(f"No images ({', '.join(IMAGE_EXTENSIONS)}) under data.root={root}.")
    return ImageList(items, classes)


def list_file(list_fpath: str | Path) -> ImageList:
    """Read a list file: ``path`` or ``path<TAB>label`` per line; labels are ints or class names."""
    list_fpath = Path(list_fpath).expanduser()
    if not list_fpath.is_file():
        raise FileNotFoundError(f"data.root={list_fpath} is not a file (data=list needs a text file of image paths).")
    rows = []
    for line in list_fpath.read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        path_text, _, label_text = line.partition("\t")
        path = Path(path_text.strip()).expanduser()
        if not path.is_absolute():
            path = list_fpath.parent / path
        rows.append((path_text.strip(), str(path), label_text.strip()))
    names = sorted({lab for _, _, lab in rows if lab and not lab.lstrip("-").isdigit()})
    index = {name: i for i, name in enumerate(names)}
    items = [(key, path, int(lab) if lab.lstrip("-").isdigit() else index[lab] if lab else -1) for key, path, lab in rows]
    return ImageList(items, names)


def expand_urls(root: str) -> list[str]:
    """``a-{000..002}.tar::b.tar`` -> the list of tar paths (brace expansion as WebDataset does)."""
    import braceexpand

    urls: list[str] = []
    for part in str(root).split("::"):
        urls.extend(braceexpand.braceexpand(part.strip()))
    return urls


def _decode(data_or_path: Any):
    from PIL import Image

    with Image.open(io.BytesIO(data_or_path) if isinstance(data_or_path, bytes) else data_or_path) as img:
        img.load()
        return img.convert("RGB")


def _wds_label(sample: dict[str, bytes]) -> int:
    if "cls" in sample:
        return int(sample["cls"].decode().strip())
    if "json" in sample:
        meta = json.loads(sample["json"])
        for name in ("label", "cls", "class", "target"):
            if isinstance(meta.get(name), int):
                return meta[name]
    return -1


def _iter_wds_samples(root: str) -> Iterator[tuple[str, dict[str, bytes], str]]:
    """``(key, {ext: bytes}, tar path)`` for each sample of the tars, in order."""
    for url in expand_urls(root):
        if not Path(url).exists():
            raise FileNotFoundError(f"WebDataset shard {url} not found (data.root={root}).")
        current_key, sample = None, {}
        with tarfile.open(url, "r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                dirname, _, base = member.name.rpartition("/")
                stem, _, ext = base.partition(".")
                key = f"{dirname}/{stem}" if dirname else stem
                if key != current_key:
                    if current_key is not None:
                        yield current_key, sample, url
                    current_key, sample = key, {}
                sample[ext.lower()] = tar.extractfile(member).read()
            if current_key is not None:
                yield current_key, sample, url


def iter_images(
    source: str,
    root: str | Path | None = None,
    *,
    start: int = 0,
    max_images: int | None = None,
    skip_log: SkipLog | None = None,
    decode: bool = True,
    yield_skipped: bool = False,
    worker: tuple[int, int] = (0, 1),
    synthetic: dict[str, Any] | None = None,
) -> Iterator[ImageRecord]:
    """Yield the images of a source in order (see the module docstring for the sources).

    ``start``: skip the first ``start`` records without decoding (resume). ``max_images``: stop at
    position ``max_images``. ``worker=(i, n)``: decode only positions ``(pos - start) % n == i``
    (DataLoader workers; taking one record from each worker in turn restores the order). Unreadable images go to ``skip_log`` and are yielded with ``image=None`` only if
    ``yield_skipped``. ``synthetic``: options of :func:`vlmsae.data.concepts.ensure_concept_images`.
    """
    if source not in SOURCES:
        raise ValueError(f"Unknown image source {source!r}: use one of {list(SOURCES)}.")
    wid, n_workers = worker

    def wanted(pos: int) -> bool:
        # offsets from ``start`` so that worker 0 always holds the first record: round-robin keeps order
        return pos >= start and (pos - start) % n_workers == wid

    def finish(key: str, path: str | None, label: int, payload: Any, pos: int) -> ImageRecord | None:
        if not decode:
            return ImageRecord(key, path, label, None, pos)
        try:
            return ImageRecord(key, path, label, _decode(payload), pos)
        except Exception as err:  # any unreadable file is skipped, never fatal
            message = f"{type(err).__name__}: {err}"
            if skip_log is not None:
                skip_log.add(key, path, message)
            return ImageRecord(key, path, label, None, pos, error=message) if yield_skipped else None

    if source == "wds":
        if root is None:
            raise ValueError("data=wds needs data.root=<tar path or brace pattern>.")
        for pos, (key, sample, url) in enumerate(_iter_wds_samples(str(root))):
            if max_images is not None and pos >= max_images:
                return
            if not wanted(pos):
                continue
            image_ext = next((ext for ext in WDS_IMAGE_EXTS if ext in sample), None)
            try:
                label = _wds_label(sample)
            except (ValueError, json.JSONDecodeError):
                label = -1
            if image_ext is None:
                message = f"no image member ({'/'.join(WDS_IMAGE_EXTS)}) in sample, found {sorted(sample)}"
                if skip_log is not None:
                    skip_log.add(key, url, message)
                if yield_skipped:
                    yield ImageRecord(key, url, label, None, pos, error=message)
                continue
            record = finish(key, url, label, sample[image_ext], pos)
            if record is not None:
                yield record
        return

    listing = list_source(source, root, synthetic=synthetic)
    items = listing.items if max_images is None else listing.items[:max_images]
    for pos, (key, path, label) in enumerate(items):
        if not wanted(pos):
            continue
        record = finish(key, path, label, path, pos)
        if record is not None:
            yield record


def synthetic_options(source: str, extra: Mapping[str, Any] | None, seed: int) -> dict[str, Any] | None:
    """The ``synthetic`` options of ``data.source=synthetic`` (``data.extra`` over the defaults of
    :func:`vlmsae.data.concepts.ensure_concept_images`, plus ``data.seed``); None for other sources."""
    if source != "synthetic":
        return None
    opts = {"n_per_class": 8, "size": 64, **dict(extra or {}), "seed": int(seed)}
    return {k: opts[k] for k in ("n_per_class", "size", "seed")}


def list_source(source: str, root: str | Path | None, synthetic: dict[str, Any] | None = None) -> ImageList:
    """List a folder, list-file or synthetic source without decoding (``wds`` streams and cannot be listed)."""
    if source == "folder":
        if root is None:
            raise ValueError("data=folder needs data.root=<image folder>.")
        return list_folder(root)
    if source == "list":
        if root is None:
            raise ValueError("data=list needs data.root=<list file>.")
        return list_file(root)
    if source == "synthetic":
        from vlmsae.data.concepts import ensure_concept_images

        return list_folder(ensure_concept_images(root=root, **(synthetic or {})))
    raise ValueError(f"Source {source!r} cannot be listed up front: use one of folder, list, synthetic.")

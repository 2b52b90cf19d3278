"""Image sources: ImageFolder trees (iNaturalist 2021 included), WebDataset shards, list files, synthetic.

``iter_images(source, root)`` yields :class:`ImageRecord` in a fixed order: ``index`` is the image's position
in the source's listing (the stable image id), ``pos`` its position in the visiting order, which ``start``,
``max_images`` and the ``worker`` split count. ``order_seed`` visits a folder / list / synthetic source in a
seeded permutation (:func:`image_order`: any stretch is a uniform sample, not a few classes); a ``wds`` source
streams, so it shuffles only the order of its tars. Unreadable images are skipped and recorded in a
:class:`SkipLog` with a stable reason (:data:`SKIP_REASONS`).

- ``folder``: class sub-folders -> labels 0..C-1 in sorted order, names kept whole (iNat 2021's
  ``00000_Animalia_..._terrestris``); no sub-folders: label -1. Keys are paths relative to ``root``.
- ``list``: one ``path`` or ``path<TAB>label`` per line (relative to the list file; ``#`` comments).
- ``wds``: WebDataset tars (``root`` a brace pattern, several joined by ``::``); the jpg/jpeg/png/webp member,
  the label from ``cls`` or ``json``. Keys are the samples' ``__key__``.
- ``synthetic``: planted-concept images (:mod:`vlmsae.data.concepts`) written once to a cache folder.

Decoding (:func:`load_image`, :func:`to_rgb`; every model input goes through them) gives 8-bit RGB:

- EXIF orientation is applied (``exif_transpose=True``, the default): the pixels are those a viewer,
  a browser and the HTML report show, and what a human labeller saw. ``data.exif_transpose=false``
  keeps the stored pixel grid (what a bare ``PIL.Image.open`` gives, e.g. to match another tool).
- 16-bit greyscale (``I;16``, ``I;16B``, ``I;16L``, and ``I`` holding values in 0..65535, as 16-bit
  PNG/TIFF open) is scaled to 8 bit by ``round(v / 257)`` (65535 -> 255), never clipped. ``I`` with
  values outside 0..65535 and 32-bit float ``F`` are stretched: ``F`` in [0, 1] is taken as
  normalised (x 255), any other range is min-max stretched to 0..255 (NaN / inf -> 0).
- Transparency (``RGBA``, ``LA``, ``PA``, ``P`` with a transparent index or an RGBA palette, ``L`` /
  ``RGB`` with a ``transparency`` colour) is composited over opaque white, :data:`ALPHA_BACKGROUND`:
  transparent images are mostly logos, icons and cut-out objects made to be seen on a white page,
  white is what the report's thumbnails show, and a fixed colour never exposes whatever RGB happens
  to sit under alpha 0 (often black, or an arbitrary palette entry), which a bare ``convert("RGB")``
  would feed the model.
- ``CMYK`` goes through its embedded ICC profile to sRGB when it has one, else through the naive
  ``(1 - C)(1 - K)`` formula (Pillow's; Adobe's inverted JPEG CMYK is undone by the decoder).
- Everything else (``L``, ``1``, ``P``, ``YCbCr``, ...) is Pillow's ``convert("RGB")``; a mode it cannot
  convert is skipped as ``unsupported mode``.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlmsae.data.concepts import ensure_concept_images
from vlmsae.data.remote import is_remote, open_stream

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm")
WDS_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
SOURCES = ("folder", "list", "wds", "synthetic")
ALPHA_BACKGROUND = (255, 255, 255)  # transparent pixels are composited over opaque white (module docstring)
# Why an image was skipped: stable names, counted in a store's manifest (``skipped_by_reason``).
SKIP_REASONS = (
    "missing file",  # the listed path does not exist
    "unreadable file",  # it exists but cannot be read (permissions, a folder, an I/O error)
    "not an image",  # no image format recognises the bytes (e.g. a text file named .jpg)
    "truncated",  # the file ends before the image data does
    "corrupt",  # the decoder failed on the data (broken stream, bad header)
    "too large",  # over Pillow's decompression-bomb limit
    "unsupported mode",  # decoded, but its pixel mode has no conversion to RGB
    "no image member",  # a WebDataset sample without a jpg/jpeg/png/webp member
    "preprocess failed",  # decoded, but the model's preprocessing refused it (e.g. zero-sized)
    "other",
)


@dataclass
class ImageRecord:
    """One image of a source. ``image`` is None (and ``error``, ``reason`` set) for an unreadable one.

    ``pos``: position in the visiting order; ``index``: position in the source's listing (the stable
    image id; equal to ``pos`` without ``order_seed``). See the module docstring.
    """

    key: str
    path: str | None
    label: int
    image: Any  # PIL.Image.Image (RGB) or None
    pos: int = 0
    error: str | None = None
    index: int = 0
    reason: str | None = None  # one of SKIP_REASONS when image is None because it could not be read
    jpeg: bytes | None = None  # iter_images(raw_jpeg=True): the undecoded JPEG for the device decoder (image None)


@dataclass
class SkipLog:
    """Images that could not be read: key, path, the error and its reason (:data:`SKIP_REASONS`), in order."""

    entries: list[dict[str, Any]] = field(default_factory=list)

    def add(self, key: str, path: str | None, error: str, reason: str = "other") -> None:
        if reason not in SKIP_REASONS:
            raise ValueError(f"Unknown skip reason {reason!r}: use one of {list(SKIP_REASONS)}.")
        self.entries.append({"key": key, "path": path, "error": error, "reason": reason})

    def __len__(self) -> int:
        return len(self.entries)

    def to_list(self) -> list[dict[str, Any]]:
        return list(self.entries)

    def by_reason(self) -> dict[str, int]:
        """``{reason: count}`` in :data:`SKIP_REASONS` order, reasons that occurred only."""
        from collections import Counter

        counts = Counter(entry.get("reason") or "other" for entry in self.entries)  # pre-reason entries: other
        return {reason: counts[reason] for reason in SKIP_REASONS if counts[reason]}


def skip_reason(err: BaseException) -> str:
    """The :data:`SKIP_REASONS` name of an exception raised while reading or decoding an image."""
    import struct
    import zlib

    from PIL import Image, UnidentifiedImageError

    message = str(err).lower()
    if isinstance(err, FileNotFoundError):
        return "missing file"
    if isinstance(err, UnidentifiedImageError):  # before OSError: it is one
        return "not an image"
    if isinstance(err, Image.DecompressionBombError):
        return "too large"
    if isinstance(err, EOFError) or "truncated" in message:
        return "truncated"
    if isinstance(err, (PermissionError, IsADirectoryError, NotADirectoryError)):
        return "unreadable file"
    if isinstance(err, (OSError, SyntaxError, struct.error, zlib.error)):
        return "corrupt"
    if isinstance(err, ValueError) and ("mode" in message or "conversion" in message):
        return "unsupported mode"
    return "other"


def image_order(n: int, order_seed: int | None) -> Any:
    """The listing indices ``0..n-1`` in visiting order (numpy int64 array).

    ``numpy.random.default_rng(order_seed).permutation(n)``; ``0..n-1`` when ``order_seed`` is None.
    """
    import numpy as np

    if order_seed is None:
        return np.arange(n, dtype=np.int64)
    return np.random.default_rng(int(order_seed)).permutation(n).astype(np.int64)


def order_digest(order: Any) -> str:
    """sha256 of a visiting order (the listing indices as little-endian int64), to pin it on resume."""
    import hashlib

    import numpy as np

    return hashlib.sha256(b"vlmsae-order-v1" + np.asarray(order, dtype="<i8").tobytes()).hexdigest()


@dataclass
class ImageList:
    """A listed (not yet decoded) image source: ``items`` are ``(key, path, label)``."""

    items: list[tuple[str, str, int]]
    classes: list[str]
    # files under the root that the listing left out, by reason (``not an image extension: .txt``, ``hidden file``)
    ignored: dict[str, int] = field(default_factory=dict)


def _split_files(fpaths: list[Path], ignored: dict[str, int]) -> list[Path]:
    """The image files of ``fpaths``, sorted; the others counted into ``ignored`` by reason."""
    images = []
    for fpath in sorted(fpaths):
        if fpath.name.startswith("."):
            reason = "hidden file"
        elif fpath.suffix.lower() not in IMAGE_EXTENSIONS:
            reason = f"not an image extension: {fpath.suffix.lower() or '(none)'}"
        else:
            images.append(fpath)
            continue
        ignored[reason] = ignored.get(reason, 0) + 1
    return images


def list_folder(root: str | Path) -> ImageList:
    """List an ImageFolder tree (labels from sorted class folders) or a flat folder (label -1)."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"data.root={root} is not a folder (data=folder needs an image folder).")
    class_dpaths = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    ignored: dict[str, int] = {}
    items = [
        (fpath.relative_to(root).as_posix(), str(fpath), label)
        for label, dpath in enumerate(class_dpaths)
        for fpath in _split_files([p for p in dpath.rglob("*") if p.is_file()], ignored)
    ]
    flat = _split_files([p for p in root.iterdir() if p.is_file()], ignored)
    items = [(p.name, str(p), -1) for p in flat] + items
    if not items:
        raise FileNotFoundError(f"No images ({', '.join(IMAGE_EXTENSIONS)}) under data.root={root}.")
    return ImageList(items, [p.name for p in class_dpaths], ignored)


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
    items = [
        (key, path, int(lab) if lab.lstrip("-").isdigit() else index[lab] if lab else -1) for key, path, lab in rows
    ]
    return ImageList(items, names)


def expand_urls(root: str) -> list[str]:
    """``a-{000..002}.tar::b.tar`` -> the list of tar paths (brace expansion as WebDataset does)."""
    import braceexpand

    return [url for part in str(root).split("::") for url in braceexpand.braceexpand(part.strip())]


def _has_alpha(img: Any) -> bool:
    if img.mode in ("RGBA", "RGBa", "LA", "La", "PA"):
        return True
    if img.info.get("transparency") is not None:  # P: a transparent index; L / RGB: a transparent colour
        return True
    return img.mode == "P" and img.palette is not None and img.palette.mode == "RGBA"


def _stretch_to_uint8(values: Any, mode: str) -> Any:
    """8-bit levels of a 16/32-bit int or float image (rules in the module docstring)."""
    import numpy as np

    x = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(x)
    x = np.where(finite, x, 0.0)
    lo, hi = (float(x[finite].min()), float(x[finite].max())) if finite.any() else (0.0, 0.0)
    if mode.startswith("I;16") or (mode == "I" and lo >= 0 and hi <= 65535):
        x = x / 257.0  # the nominal 16-bit range: 65535 -> 255, so dark images stay dark
    elif mode == "F" and lo >= 0 and hi <= 1:
        x = x * 255.0  # normalised floats
    elif hi > lo:
        x = (x - lo) / (hi - lo) * 255.0
    return np.where(finite, np.clip(np.rint(x), 0, 255), 0).astype(np.uint8)  # NaN / inf -> 0 (black)


def to_rgb(img: Any, background: tuple[int, int, int] = ALPHA_BACKGROUND) -> Any:
    """A new 8-bit RGB ``PIL.Image`` from a decoded image of any mode (rules in the module docstring)."""
    from PIL import Image

    mode = img.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        # Pillow's convert("RGB") clips these to 0..255: a 16-bit photo comes out all white
        import numpy as np

        return Image.fromarray(_stretch_to_uint8(np.asarray(img), mode), mode="L").convert("RGB")
    if _has_alpha(img):
        rgba = img.convert("RGBA")
        backdrop = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(backdrop, rgba).convert("RGB")
    if mode == "CMYK" and img.info.get("icc_profile"):
        from PIL import ImageCms

        try:
            profile = ImageCms.ImageCmsProfile(io.BytesIO(img.info["icc_profile"]))
            return ImageCms.profileToProfile(img, profile, ImageCms.createProfile("sRGB"), outputMode="RGB")
        except (ImageCms.PyCMSError, OSError, ValueError):
            pass  # an unusable profile: the naive conversion below is still a faithful approximation
    return img.convert("RGB")


_EXIF_ORIENTATION = 0x0112  # the EXIF tag of the camera's rotation / mirror (1 = upright)


def load_image(data_or_path: Any, exif_transpose: bool = True, draft_size: int | None = None) -> Any:
    """Decode a file path or encoded bytes to 8-bit RGB (module docstring: EXIF, 16-bit, alpha, CMYK).

    Raises on an unreadable file (:func:`skip_reason` names why). Use it wherever an image is decoded
    for a model, so every tool sees the same pixels as extraction.

    ``draft_size=S`` (``data.fast_decode``, S = the model's input side) trades exactness for speed
    (:func:`_fast_shrink`): a JPEG is decoded by libjpeg at the smallest of 1/8, 1/4, 1/2 scale whose sides stay
    >= 2 S (``Image.draft``), and the result is resampled to cover exactly the original's area. None (the
    default) decodes every pixel, exactly as before.
    """
    from PIL import Image, ImageOps

    img = Image.open(io.BytesIO(data_or_path) if isinstance(data_or_path, bytes) else data_or_path)
    rgb = None
    try:
        full_size = img.size
        if draft_size is not None and img.format == "JPEG":
            side = _DRAFT_GAP * int(draft_size)
            img.draft("RGB", (side, side))  # before load(): libjpeg scales while decoding
        img.load()
        pixels = img
        if draft_size is not None:  # before any EXIF rotation: the partial blocks lie at the file's right and bottom
            pixels = _fast_shrink(img if img.mode == "RGB" else to_rgb(img), full_size, int(draft_size))
        out = pixels
        if exif_transpose:
            try:
                if img.getexif().get(_EXIF_ORIENTATION, 1) != 1:  # exif_transpose copies even when upright
                    out = ImageOps.exif_transpose(pixels)
            except Exception:
                out = pixels
        # An upright RGB image whose file load() already closed (single-frame JPEG, PNG) is returned as it is:
        # close() would free its pixels, and a copy costs ~4% of the decode (the decode limit's hot path).
        keep = out is img and img.mode == "RGB" and getattr(img, "fp", None) is None
        rgb = img if keep else out if out is not img and out.mode == "RGB" else to_rgb(out)
    finally:
        if rgb is not img:
            img.close()
    return rgb


_DRAFT_GAP = 2  # fast_decode keeps >= 2 S pixels a side for the model's own antialiased resize to S


def _fast_shrink(rgb: Any, full_size: tuple[int, int], draft_size: int) -> Any:
    """The drafted image (1/k of ``full_size``: ``ceil(w / k)`` pixels, the last one a partial block) shrunk
    by a further integer factor while it keeps >= 2 ``draft_size`` a side, then resampled so that it covers
    exactly the original's area.

    Why the last step: the model's resize maps the whole image onto its input, so a drafted image that covers
    ``k * ceil(w / k)`` source pixels instead of ``w`` shifts and stretches every pixel by up to ``(k - 1) / w``;
    on real photographs that, not the blur of libjpeg's DCT scaling, made most of fast_decode's error
    (issue 23 §9: 1.2% -> 0.2% relative error of the tiny model's block-2 activations). Called before any EXIF
    rotation, on an RGB image.
    """
    from PIL import Image

    full_w, full_h = full_size
    scales = [d for d in (1, 2, 4, 8) if -(-full_w // d) == rgb.width and -(-full_h // d) == rgb.height]
    if not scales:  # not a size libjpeg's scaling gives: nothing to correct
        return rgb
    scale = scales[0]
    factor = min(rgb.size) // (_DRAFT_GAP * draft_size)
    if factor >= 2:  # still >= 4 S after libjpeg's 1/8: box-average further (its last pixel partial as well)
        rgb, scale = rgb.reduce(factor), scale * factor
    size = (max(1, round(full_w / scale)), max(1, round(full_h / scale)))
    box = (0.0, 0.0, full_w / scale, full_h / scale)  # the original's area, in the shrunk image's pixels
    if size == rgb.size and box[2:] == rgb.size:
        return rgb  # sides divisible by the scale: the pixels already cover exactly the original's area
    return rgb.resize(size, Image.Resampling.BICUBIC, box=box)


def jpeg_for_device(data: bytes, exif_transpose: bool) -> bool:
    """Whether a file's bytes can go to the GPU JPEG decoder (:mod:`vlmsae.models.gpu_decode`) undecoded: a
    JPEG in RGB or L (not CMYK) with its end-of-image marker (a truncated file stays with Pillow, which
    names it), and, while EXIF orientation is applied, orientation 1 (nvjpeg does not apply it). Reads
    the header only."""
    if data[:3] != b"\xff\xd8\xff" or b"\xff\xd9" not in data[-64:]:
        return False
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:  # lazy: parses the header, decodes nothing
            if img.format != "JPEG" or img.mode not in ("RGB", "L"):
                return False
            return not exif_transpose or img.getexif().get(0x0112, 1) == 1
    except Exception:  # Pillow says why when it decodes the file on the CPU path
        return False


def _wds_label(sample: dict[str, bytes]) -> int:
    if "cls" in sample:
        return int(sample["cls"].decode().strip())
    if "json" in sample:
        meta = json.loads(sample["json"])
        for name in ("label", "cls", "class", "target"):
            if isinstance(meta.get(name), int):
                return meta[name]
    return -1


def _iter_wds_samples(root: str, urls: list[str] | None = None) -> Iterator[tuple[str, dict[str, bytes], str]]:
    """``(key, {ext: bytes}, tar path)`` for each sample of the tars (``urls``, default all of ``root``), in order."""
    for url in expand_urls(root) if urls is None else urls:
        if not is_remote(url) and not Path(url).exists():
            raise FileNotFoundError(f"WebDataset shard {url} not found (data.root={root}).")
        current_key, sample = None, {}
        # a URL or pipe: command streams (fsspec / gopen); its errors name it
        opened = open_stream(url, f"WebDataset shard of data.root={root}") if is_remote(url) else open(url, "rb")  # noqa: SIM115
        with opened as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
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
    order_seed: int | None = None,
    exif_transpose: bool = True,
    worker_block: int = 1,
    draft_size: int | None = None,
    raw_jpeg: bool = False,
    listing: ImageList | None = None,
) -> Iterator[ImageRecord]:
    """Yield the images of a source in visiting order (see the module docstring for sources and order).

    ``order_seed``: visit a folder / list / synthetic source in the permutation
    :func:`image_order` gives (a wds source: its tars in that order); None = listing order.
    ``start``: skip the first ``start`` records of the visiting order without decoding (resume).
    ``max_images``: stop at position ``max_images`` (with ``order_seed``: a uniform random subset).
    ``worker=(i, n)``: decode only positions ``(pos - start) // worker_block % n == i`` (DataLoader
    workers; taking ``worker_block`` records from each worker in turn restores the order). Unreadable
    images go to ``skip_log`` and are yielded with ``image=None`` only if ``yield_skipped``.
    ``exif_transpose``, ``draft_size``: see :func:`load_image`.
    ``raw_jpeg``: a file :func:`jpeg_for_device` accepts is not decoded: its record has ``jpeg`` (the
    bytes) and ``image=None``; every other file is decoded (or skipped) as without it.
    ``synthetic``: options of :func:`vlmsae.data.concepts.ensure_concept_images`.
    ``listing``: the source's :func:`list_source`, already made (extraction lists once in its main process
    instead of once per DataLoader worker: a stat per file, 4% of a worker's time with ``fast_decode``).
    """
    if source not in SOURCES:
        raise ValueError(f"Unknown image source {source!r}: use one of {list(SOURCES)}.")
    wid, n_workers = worker
    if worker_block < 1:
        raise ValueError(f"worker_block={worker_block} must be >= 1 (consecutive positions per worker turn).")

    def wanted(pos: int) -> bool:
        # offsets from ``start`` so that worker 0 always holds the first record: round-robin keeps order
        return pos >= start and (pos - start) // worker_block % n_workers == wid

    def finish(key: str, path: str | None, label: int, payload: Any, pos: int, index: int) -> ImageRecord | None:
        if not decode:
            return ImageRecord(key, path, label, None, pos, index=index)
        if raw_jpeg:
            try:
                data = payload if isinstance(payload, bytes) else Path(payload).read_bytes()
            except Exception:  # load_image below fails the same way and names the reason
                data = None
            if data is not None and jpeg_for_device(data, exif_transpose):
                return ImageRecord(key, path, label, None, pos, index=index, jpeg=data)
            payload = payload if data is None else data  # read once: Pillow decodes the bytes
        try:
            image = load_image(payload, exif_transpose, draft_size=draft_size)
            return ImageRecord(key, path, label, image, pos, index=index)
        except Exception as err:  # any unreadable file is skipped, never fatal
            return skipped(key, path, label, pos, index, f"{type(err).__name__}: {err}", skip_reason(err))

    def skipped(key: str, path: str | None, label: int, pos: int, index: int, message: str, reason: str):
        if skip_log is not None:
            skip_log.add(key, path, message, reason)
        return (
            ImageRecord(key, path, label, None, pos, error=message, index=index, reason=reason)
            if yield_skipped
            else None
        )

    if source == "wds":
        if root is None:
            raise ValueError("data=wds needs data.root=<tar path or brace pattern>.")
        urls = expand_urls(str(root))
        urls = [urls[i] for i in image_order(len(urls), order_seed).tolist()]
        for pos, (key, sample, url) in enumerate(_iter_wds_samples(str(root), urls)):
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
                record = skipped(key, url, label, pos, pos, message, "no image member")
            else:
                record = finish(key, url, label, sample[image_ext], pos, pos)
            if record is not None:
                yield record
        return

    listing = listing if listing is not None else list_source(source, root, synthetic=synthetic)
    order = image_order(len(listing.items), order_seed)
    if max_images is not None:
        order = order[:max_images]
    for pos, index in enumerate(order.tolist()):
        if not wanted(pos):
            continue
        key, path, label = listing.items[index]
        record = finish(key, path, label, path, pos, index)
        if record is not None:
            yield record


def synthetic_options(source: str, n_per_class: int = 8, size: int = 64, seed: int = 0) -> dict[str, Any] | None:
    """The ``synthetic`` options of ``data.source=synthetic`` (``data.n_per_class``, ``data.size``,
    ``data.synthetic_seed``: the arguments of :func:`vlmsae.data.concepts.ensure_concept_images`); None for other
    sources."""
    if source != "synthetic":
        return None
    return {"n_per_class": int(n_per_class), "size": int(size), "seed": int(seed)}


def synthetic_options_of(data: Mapping[str, Any]) -> dict[str, Any] | None:
    """:func:`synthetic_options` of a ``data`` node (a dict or DictConfig). A node recorded in an older run's
    ``run_info.json`` kept ``n_per_class`` / ``size`` under ``extra``, and the images' seed in ``seed`` (now
    ``synthetic_seed``); those still name the same images."""
    legacy = dict(data.get("extra") or {})
    opts = {"n_per_class": 8, "size": 64, **legacy, **{k: data[k] for k in ("n_per_class", "size") if k in data}}
    seed = data["synthetic_seed"] if "synthetic_seed" in data else data.get("seed")
    return synthetic_options(str(data.get("source")), opts["n_per_class"], opts["size"], seed or 0)


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
        return list_folder(ensure_concept_images(root=root, **(synthetic or {})))
    raise ValueError(f"Source {source!r} cannot be listed up front: use one of folder, list, synthetic.")

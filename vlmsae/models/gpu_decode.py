"""Batched JPEG decoding and preprocessing on the GPU for extraction (issue 18, ``data.fast_decode=true``).

The decode paths (``cpu``, ``cpu_draft``, ``cuda_nvjpeg``), when each is taken and how its pixels differ from
Pillow's are in docs/outputs.md (``extract``). On ``cuda_nvjpeg`` workers only read each JPEG's bytes and the
main process decodes a block in one ``decode_jpeg(list, device="cuda")`` call, then resizes, crops and
normalises there (:class:`GpuPreprocess`); any file or JPEG nvjpeg refuses goes through ``cpu_draft`` instead,
so unreadable files are skipped and counted by the same reasons as on the CPU.
"""

from __future__ import annotations

import functools
import inspect
import io
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from vlmsae.data.images import load_image, skip_reason

DECODE_PATHS = ("cpu", "cpu_draft", "cuda_nvjpeg")
FILE_KINDS = ("jpeg", "other")


def decode_path(device_type: str, fast_decode: bool, gpu_jpeg: bool, file_kind: str = "jpeg") -> str:
    """The decode path (:data:`DECODE_PATHS`) of one file of ``file_kind`` (``jpeg`` | ``other``).

    ``gpu_jpeg``: torchvision decodes JPEGs on the device and the model's preprocessing has a
    :class:`GpuPreprocess`. With ``file_kind="jpeg"`` it is the path of the run (recorded in the manifest).
    """
    if file_kind not in FILE_KINDS:
        raise ValueError(f"file_kind={file_kind!r}: use one of {list(FILE_KINDS)}.")
    if not fast_decode:
        return "cpu"
    if device_type == "cuda" and gpu_jpeg and file_kind == "jpeg":
        return "cuda_nvjpeg"
    return "cpu_draft"


def _decode_jpeg(datas: list[torch.Tensor], device: Any) -> list[torch.Tensor]:
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():  # torchvision 0.2x warns that torchvision.io's decoders move to torchcodec
        warnings.simplefilter("ignore")
        return decode_jpeg(datas, mode=ImageReadMode.RGB, device=device)


def tiny_jpeg() -> bytes:
    """A 1 x 1 JPEG (the probe of :func:`gpu_jpeg_supported`)."""
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (1, 1), (128, 64, 32)).save(out, format="JPEG")
    return out.getvalue()


def gpu_jpeg_supported(device: Any) -> bool:
    """Whether ``torchvision.io.decode_jpeg`` decodes on ``device`` (a CUDA device): its signature takes a
    ``device`` and a 1 x 1 JPEG decodes there. Probed once per device; False on any failure."""
    device = torch.device(device)
    return device.type == "cuda" and torch.cuda.is_available() and _decodes_on(str(device))


@functools.cache
def _decodes_on(device: str) -> bool:
    try:
        from torchvision.io import decode_jpeg

        if "device" not in inspect.signature(decode_jpeg).parameters:
            return False
        out = _decode_jpeg([torch.frombuffer(bytearray(tiny_jpeg()), dtype=torch.uint8)], device)[0]
    except Exception:  # an old torchvision, no nvjpeg, a driver problem: the CPU paths still work
        return False
    return out.device.type == "cuda" and tuple(out.shape) == (3, 1, 1)


class UnsupportedPreprocess(ValueError):
    """The model's preprocessing has a step :class:`GpuPreprocess` does not reproduce."""


_INTERP = {"bicubic": 3, "bilinear": 2}  # PIL resample numbers (HF processors store these)


@dataclass(frozen=True)
class GpuPreprocess:
    """The model's eval preprocessing as tensor ops on a batch of decoded uint8 ``[3, H, W]`` images.

    ``size``: an int resizes the shortest side to it (the other keeps the aspect ratio, truncated as
    torchvision and transformers do), ``(h, w)`` squashes. ``crop``: centre crop ``(h, w)`` or None;
    ``crop_style``: ``torchvision`` (offset ``round((H - h) / 2)``) or ``floor`` (``(H - h) // 2``,
    transformers' CLIPImageProcessor). The resized pixels are rounded to 0..255 (Pillow resizes uint8),
    then scaled by ``scale`` and normalised with ``mean`` / ``std``.
    """

    size: int | tuple[int, int]
    interpolation: str  # bicubic | bilinear, antialiased
    crop: tuple[int, int] | None
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    scale: float = 1 / 255
    crop_style: str = "torchvision"

    def _resize_crop(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms.v2 import functional as F

        size = [self.size] if isinstance(self.size, int) else list(self.size)
        mode = InterpolationMode.BICUBIC if self.interpolation == "bicubic" else InterpolationMode.BILINEAR
        x_BCHW = F.resize(x_BCHW, size, interpolation=mode, antialias=True).round_().clamp_(0, 255)
        if self.crop is None:
            return x_BCHW
        if self.crop_style == "torchvision":
            return F.center_crop(x_BCHW, list(self.crop))
        h, w = x_BCHW.shape[-2:]
        if h < self.crop[0] or w < self.crop[1]:  # transformers pads too; the sizes here never need it
            return F.center_crop(x_BCHW, list(self.crop))
        top, left = (h - self.crop[0]) // 2, (w - self.crop[1]) // 2
        return x_BCHW[..., top : top + self.crop[0], left : left + self.crop[1]]

    def __call__(self, images: Sequence[torch.Tensor]) -> torch.Tensor:
        """``[B, 3, S, S]`` float32 on the images' device; images of one size are resized together."""
        out: list[torch.Tensor | None] = [None] * len(images)
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, image in enumerate(images):
            groups.setdefault(tuple(image.shape), []).append(i)
        for idx in groups.values():
            x_BCHW = torch.stack([images[i] for i in idx]).float()
            for i, y in zip(idx, self._resize_crop(x_BCHW)):
                out[i] = y
        x_BCHW = torch.stack(out)  # type: ignore[arg-type]
        mean = torch.tensor(self.mean, device=x_BCHW.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x_BCHW.device).view(1, 3, 1, 1)
        return (x_BCHW * self.scale - mean) / std


def _interp_name(value: Any, where: str) -> str:
    name = getattr(value, "value", value)  # torchvision InterpolationMode / PILImageResampling enums
    if isinstance(name, str) and name.lower() in _INTERP:
        return name.lower()
    by_number = {v: k for k, v in _INTERP.items()}
    if isinstance(name, int) and name in by_number:
        return by_number[name]
    raise UnsupportedPreprocess(f"{where}: interpolation {value!r} (only bicubic and bilinear are reproduced)")


def _from_compose(compose: Any) -> GpuPreprocess:
    """A torchvision ``Compose`` as open_clip builds it: Resize, [CenterCrop], to-RGB, ToTensor, Normalize."""
    size = crop = mean = std = interp = None
    to_tensor = False
    for step in compose.transforms:
        name = getattr(step, "__name__", type(step).__name__)
        if name == "Resize" and size is None and crop is None and not to_tensor:
            if getattr(step, "max_size", None) is not None or getattr(step, "antialias", True) is False:
                raise UnsupportedPreprocess(f"{step!r}: max_size / antialias=False are not reproduced")
            size = step.size if isinstance(step.size, int) else tuple(int(s) for s in step.size)
            if isinstance(size, tuple) and len(size) == 1:
                size = size[0]
            interp = _interp_name(step.interpolation, repr(step))
        elif name == "CenterCrop" and size is not None and crop is None and not to_tensor:
            crop = (int(step.size[0]), int(step.size[1]))
        elif name in ("MaybeConvertMode", "_convert_to_rgb", "convert_to_rgb"):
            continue  # the decoded images are RGB already
        elif name in ("ToTensor", "MaybeToTensor") and size is not None:
            to_tensor = True
        elif name == "Normalize" and to_tensor and mean is None:
            mean, std = tuple(float(m) for m in step.mean), tuple(float(s) for s in step.std)
        else:
            raise UnsupportedPreprocess(f"step {step!r} of the model's preprocessing is not reproduced on the GPU")
    if size is None or not to_tensor or mean is None:
        raise UnsupportedPreprocess(f"{compose!r} lacks a Resize, ToTensor or Normalize step")
    return GpuPreprocess(size=size, interpolation=interp, crop=crop, mean=mean, std=std)  # type: ignore[arg-type]


def _from_hf_processor(proc: Any) -> GpuPreprocess:
    """A transformers ``CLIPImageProcessor`` (slow or fast): resize, centre crop, rescale, normalise."""
    kind = type(proc).__name__
    if kind not in ("CLIPImageProcessor", "CLIPImageProcessorFast"):
        raise UnsupportedPreprocess(f"image processor {kind} is not reproduced on the GPU")
    for flag in ("do_pad", "do_reduce_labels", "do_flip_channel_order"):
        if getattr(proc, flag, False):
            raise UnsupportedPreprocess(f"{kind}.{flag}=True is not reproduced on the GPU")
    if not (proc.do_resize and proc.do_rescale and proc.do_normalize):
        raise UnsupportedPreprocess(f"{kind} without resize, rescale or normalise is not reproduced")
    size_cfg = dict(proc.size)
    if "shortest_edge" in size_cfg:
        size: int | tuple[int, int] = int(size_cfg["shortest_edge"])
    elif "height" in size_cfg and "width" in size_cfg:
        size = (int(size_cfg["height"]), int(size_cfg["width"]))
    else:
        raise UnsupportedPreprocess(f"{kind}.size={size_cfg} is not reproduced on the GPU")
    crop = None
    if proc.do_center_crop:
        crop = (int(proc.crop_size["height"]), int(proc.crop_size["width"]))
    return GpuPreprocess(
        size=size,
        interpolation=_interp_name(proc.resample, f"{kind}.resample"),
        crop=crop,
        mean=tuple(float(m) for m in proc.image_mean),  # type: ignore[arg-type]
        std=tuple(float(s) for s in proc.image_std),  # type: ignore[arg-type]
        scale=float(proc.rescale_factor),
        crop_style="torchvision" if kind.endswith("Fast") else "floor",
    )


def gpu_preprocess_of(preprocess: Any) -> GpuPreprocess:
    """:class:`GpuPreprocess` of a model's preprocessing config: open_clip's torchvision ``Compose`` or a
    transformers image processor. Raises :class:`UnsupportedPreprocess` naming the step it cannot reproduce."""
    if hasattr(preprocess, "transforms"):
        return _from_compose(preprocess)
    if hasattr(preprocess, "image_mean"):
        return _from_hf_processor(preprocess)
    raise UnsupportedPreprocess(f"preprocessing {type(preprocess).__name__} is not reproduced on the GPU")


def gpu_preprocess_of_tap(tap: Any) -> GpuPreprocess:
    """The tap's preprocessing config (open_clip: its transform; transformers: its image processor)."""
    for name in ("_preprocess", "image_processor"):
        if getattr(tap, name, None) is not None:
            return gpu_preprocess_of(getattr(tap, name))
    raise UnsupportedPreprocess(f"{type(tap).__name__} exposes no preprocessing config")


@dataclass
class BlockDecoder:
    """Finishes a worker block on the device: decodes its raw JPEGs in one batch, preprocesses them there,
    and decodes the ones the device refuses with Pillow (``cpu_draft``) instead. ``decode`` is injectable
    (tests decode on the CPU device as a stand-in for nvjpeg)."""

    preprocess: GpuPreprocess
    device: Any
    cpu_preprocess: Callable[[Any], torch.Tensor]  # the model's own preprocessing of a PIL image
    exif_transpose: bool
    draft_size: int | None
    decode: Callable[[list[torch.Tensor], Any], list[torch.Tensor]] = _decode_jpeg

    def _decode_all(self, datas: list[torch.Tensor]) -> list[torch.Tensor | None]:
        try:
            return list(self.decode(datas, self.device))
        except Exception:  # one bad file fails the batch call: decode one by one to find it
            out: list[torch.Tensor | None] = []
            for data in datas:
                try:
                    out.append(self.decode([data], self.device)[0])
                except Exception:
                    out.append(None)
            return out

    def __call__(self, block: dict[str, Any]) -> dict[str, Any]:
        """The block with ``pixels`` on the device (its readable images in record order) and the records of
        raw JPEGs marked ``ok`` or skipped (error + reason of the Pillow decode, as on the CPU path)."""
        records, offsets = block["records"], block.get("jpeg_offsets") or []
        if not offsets:
            return block
        raw = block["jpeg_bytes"]
        datas = [raw[a:b] for a, b in offsets]
        decoded = self._decode_all(datas)
        on_device = (
            self.preprocess([d for d in decoded if d is not None]) if any(d is not None for d in decoded) else None
        )
        cpu_pixels = block["pixels"]
        out: list[torch.Tensor] = []
        n_cpu = n_dev = n_raw = 0
        for item in records:
            if item.get("jpeg"):
                pixels = decoded[n_raw]
                if pixels is not None:
                    out.append(on_device[n_dev])  # type: ignore[index]
                    n_dev += 1
                    item["ok"] = True
                else:  # nvjpeg refused it: Pillow decides (a corrupt file is skipped with Pillow's reason)
                    try:
                        image = load_image(bytes(datas[n_raw].numpy()), self.exif_transpose, self.draft_size)
                    except Exception as err:
                        item["error"], item["reason"] = f"{type(err).__name__}: {err}", skip_reason(err)
                    else:
                        try:
                            out.append(self.cpu_preprocess(image).to(self.device))
                            item["ok"] = True
                        except Exception as err:
                            item["error"], item["reason"] = f"{type(err).__name__}: {err}", "preprocess failed"
                n_raw += 1
            elif item["ok"]:
                out.append(cpu_pixels[n_cpu].to(self.device))
                n_cpu += 1
        pixels_BCHW = torch.stack(out).to(torch.float32) if out else None
        return {"records": records, "pixels": pixels_BCHW}


def choose_decode(tap: Any, fast_decode: bool, allow_gpu: bool = True) -> tuple[str, GpuPreprocess | None]:
    """``(decode path of the run, its GpuPreprocess or None)`` for ``tap``'s device (:func:`decode_path`).

    The GPU path needs the device decoder (:func:`gpu_jpeg_supported`) and a :class:`GpuPreprocess` of the
    model's preprocessing; a preprocessing it cannot reproduce is logged and the run stays on ``cpu_draft``.
    """
    import logging

    device = torch.device(tap.device)
    gpu = bool(fast_decode and allow_gpu and device.type == "cuda" and gpu_jpeg_supported(device))
    preprocess = None
    if gpu:
        try:
            preprocess = gpu_preprocess_of_tap(tap)
        except UnsupportedPreprocess as err:
            logging.getLogger(__name__).warning(
                "data.fast_decode: decoding on the CPU (cpu_draft), not on %s: %s", device, err
            )
            gpu = False
    return decode_path(device.type, fast_decode, gpu, "jpeg"), preprocess

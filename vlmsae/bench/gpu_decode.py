"""``python -m vlmsae.bench.gpu_decode --smoke``: the ``cuda_nvjpeg`` decode path (issue 18) on a CUDA machine.

Extracts generated photo-like JPEGs (:func:`vlmsae.bench.decode.make_photo_jpegs`) with ``data.fast_decode``
twice, on the GPU decode path (nvjpeg + preprocessing on the device) and on the CPU one (``cpu_draft``), and
prints the images/s of each and the mean cosine of their activations (same images, same rows). Without
CUDA it prints a skip line and exits 0. ``--smoke``: 64 images, the tiny model (well under a minute).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from vlmsae.bench.decode import folder_plan, make_photo_jpegs
from vlmsae.data.shards import read_rows
from vlmsae.models import get_model_spec
from vlmsae.models.extraction import StoreExtraction


def run(n_images: int, model: str, workers: int, batch: int) -> dict[str, float | str]:
    """``{decode_<path>_images_per_s, act_cosine, gpu_decode}`` of the two extractions."""
    import torch

    spec = get_model_spec(model, device="cuda")
    out: dict[str, float | str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = make_photo_jpegs(Path(tmp) / "jpegs", n_images, seed=0)
        rows = {}
        for gpu in (True, False):
            plan = folder_plan(
                root, dtype="float32", rows_per_shard=4096, rows_per_chunk=256, order_seed=None, batch_size=batch,
                num_workers=workers, fast_decode=True, gpu_decode=gpu,
            )  # fmt: skip
            dpath = Path(tmp) / ("gpu" if gpu else "cpu")
            extraction = StoreExtraction(spec, plan, dpath)
            t0 = time.perf_counter()
            extraction.run()
            torch.cuda.synchronize()
            out[f"decode_{extraction.decode}_images_per_s"] = n_images / (time.perf_counter() - t0)
            if gpu:
                out["gpu_decode"] = extraction.decode
            rows[gpu] = read_rows(dpath)["acts"]
    cos = torch.nn.functional.cosine_similarity(rows[True].flatten(1), rows[False].flatten(1), dim=1)
    out["act_cosine"] = float(cos.mean())
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vlmsae.bench.gpu_decode", description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="64 images, tiny model")
    parser.add_argument("--n", type=int, default=None, help="images (default 64 with --smoke, else 2048)")
    parser.add_argument("--model", default="tiny", help="a conf/model name (default tiny: no download)")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("gpu_decode: skipped (no CUDA device): the cuda_nvjpeg path needs one")
        return 0
    n = args.n or (64 if args.smoke else 2048)
    result = run(n, args.model, args.workers, args.batch)
    if result.get("gpu_decode") != "cuda_nvjpeg":
        print(f"gpu_decode: torchvision cannot decode JPEGs on this CUDA device; the run used {result['gpu_decode']}")
    for key, value in result.items():
        print(f"{key}: {value:.4f}" if isinstance(value, float) else f"{key}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

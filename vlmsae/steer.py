"""Steer LLaVA through SAE latents: answers with and without the intervention, side by side (SPEC 5).

    python -m vlmsae.steer model=llava15_7b sae_path=<sae dir> latent=123 alpha=100 \
        prompt="Write me a short love poem" image=white

Writes ``steer.json`` (``steered``, ``baseline``, ``settings``; plus ``activation_steering`` and
``sweep`` when asked) and ``run_info.json`` into the Hydra run directory.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from vlmsae.config import conf_dir, register_configs
from vlmsae.formats import SteerResult, write_steer
from vlmsae.utils.paths import run_dir
from vlmsae.utils.provenance import write_run_info


def load_images(spec: Any, size: int) -> tuple[list[Any], list[str]]:
    """``white`` | ``skimage:<name>`` | a path | a list of those -> (RGB PIL images, their names)."""
    from PIL import Image

    from vlmsae.data.images import load_image
    from vlmsae.steering import white_image

    items = list(spec) if isinstance(spec, (list, tuple)) or OmegaConf.is_list(spec) else [spec]
    images, names = [], []
    for item in items:
        item = str(item)
        if item == "white":
            images.append(white_image(size))
        elif item.startswith("skimage:"):
            import skimage.data

            loader = getattr(skimage.data, item.split(":", 1)[1], None)
            if loader is None:
                raise ValueError(f"image={item!r}: skimage.data has no image of that name (try skimage:astronaut).")
            images.append(Image.fromarray(loader()).convert("RGB"))
        else:
            fpath = Path(item).expanduser()
            if not fpath.is_file():
                raise FileNotFoundError(f"image={item!r} is not a file: pass an image path, `white` or `skimage:<name>`.")
            images.append(load_image(fpath))  # EXIF, 16-bit, alpha: as extraction decodes
        names.append(item)
    return images, names


def latent_alphas(latent: Any, alpha: Any) -> dict[int, float]:
    """``latent=3 alpha=100`` or ``latent=[3,7] alpha=[100,50]`` (or one alpha for all) -> {3: 100.0, ...}."""
    as_list = lambda v: list(v) if isinstance(v, (list, tuple)) or OmegaConf.is_list(v) else [v]  # noqa: E731
    latents, alphas = [int(j) for j in as_list(latent)], [float(a) for a in as_list(alpha)]
    if len(alphas) == 1:
        alphas = alphas * len(latents)
    if len(alphas) != len(latents):
        raise ValueError(f"latent={latents} and alpha={alphas}: give one alpha, or one per latent.")
    return dict(zip(latents, alphas))


def _side_by_side(names: list[str], rows: dict[str, list[str]], width: int = 40) -> str:
    """The answers in columns (one per condition), wrapped to ``width``, one block per image."""
    import itertools
    import textwrap

    lines = [" | ".join(f"{k:<{width}}" for k in rows), "-+-".join("-" * width for _ in rows)]
    for i, name in enumerate(names):
        lines.append(f"[image: {name}]")
        cols = [textwrap.wrap(v[i].replace("\n", " / "), width) or [""] for v in rows.values()]
        for parts in itertools.zip_longest(*cols, fillvalue=""):
            lines.append(" | ".join(f"{p:<{width}}" for p in parts))
    return "\n".join(lines)


def model_spec(cfg: DictConfig) -> dict:
    """``cfg.model`` as a dict, with the job-level ``device_map`` (``device_map=auto`` on the command
    line) set as its ``device_map``, where :func:`vlmsae.models.llava.load_llava_spec` reads it."""
    spec = OmegaConf.to_container(cfg.model, resolve=True)
    if cfg.get("device_map") is not None:
        spec["device_map"] = cfg.device_map
    return spec


def run(cfg: DictConfig, out_dpath: str | Path | None = None) -> dict:
    import torch

    from vlmsae.models.llava import load_llava_spec, vision_tower
    from vlmsae.sae import load_sae
    from vlmsae.steering import alpha_sweep, generate_answers, sae_layer, steer

    out_dpath = run_dir(out_dpath)
    if cfg.sae_path is None or not Path(str(cfg.sae_path)).is_dir():
        raise FileNotFoundError(f"sae_path={cfg.sae_path!r} is not a folder: pass an SAE checkpoint dir (save_sae output).")
    torch.manual_seed(int(cfg.seed))
    model, processor = load_llava_spec(model_spec(cfg))
    device = next(vision_tower(model).parameters()).device
    sae = load_sae(str(cfg.sae_path), device=str(device))
    layer = cfg.layer if cfg.layer is not None else sae_layer(sae)
    latents = latent_alphas(cfg.latent, cfg.alpha)
    patches = OmegaConf.to_container(cfg.patches) if OmegaConf.is_list(cfg.patches) else cfg.patches
    size = int(model.config.vision_config.image_size)
    images, names = load_images(cfg.image, size)

    def answers() -> list[str]:
        return generate_answers(model, processor, images, cfg.prompt, int(cfg.max_new_tokens), int(cfg.batch_size))

    baseline = answers()
    with steer(model, sae, latents, mode=cfg.mode, patches=patches, layer=layer) as handle:
        steered = answers()
    rows = {"baseline": baseline, f"steered ({cfg.mode})": steered}
    result: dict[str, Any] = {"steered": steered, "baseline": baseline}
    if cfg.compare_add and cfg.mode != "add":
        with steer(model, sae, latents, mode="add", patches=patches, layer=layer):
            result["activation_steering"] = answers()
        rows["activation steering (add)"] = result["activation_steering"]
    if cfg.sweep:
        if len(latents) != 1:
            raise ValueError(f"sweep needs a single latent, got latent={list(latents)}.")
        (j,) = latents
        sweep = alpha_sweep(answers, model, sae, j, [float(a) for a in cfg.sweep], mode=cfg.mode, patches=patches, layer=layer)
        result["sweep"] = {str(a): v for a, v in sweep.items()}
    result["settings"] = {
        "model": cfg.model.name, "dtype": str(cfg.model.dtype), "device_map": cfg.get("device_map"),
        "sae_path": str(cfg.sae_path), "layer": handle.layer,
        "latents": {str(j): a for j, a in latents.items()}, "mode": cfg.mode, "patches": patches,
        "prompt": cfg.prompt, "images": names, "max_new_tokens": int(cfg.max_new_tokens),
        "greedy": True,
    }
    print(_side_by_side(names, rows))
    if "sweep" in result:
        for a, v in result["sweep"].items():
            print(f"alpha={a}: {v}")
    write_steer(out_dpath, SteerResult(**result))
    write_run_info(out_dpath, OmegaConf.to_container(cfg, resolve=True))
    return {**result, "out_dpath": str(out_dpath)}


def _main(cfg: DictConfig) -> None:
    out = run(cfg)
    print(json.dumps({"out_dpath": out["out_dpath"]}))


def main() -> None:
    register_configs()
    hydra.main(config_path=str(conf_dir()), config_name="steer", version_base="1.3")(_main)()


if __name__ == "__main__":
    main()

"""The steering score of SPEC 5: clamp latent j, ask LLaVA for one word, compare it with j's concept.

    python -m vlmsae.steer_eval model=llava15_7b sae_path=<sae dir> top_images=<ms run>/top_images \
        images=white latents=1000 alpha=100 embedder=clip_b32

For each steered latent j: concept = mean CLIP image embedding of its top-16 images (the top-images
index of the monosemanticity run); for each evaluation image LLaVA answers "What is shown in this
image? Use exactly one word!" (5 new tokens, greedy) with and without j clamped to alpha; the first
word's CLIP text embedding is compared (cosine) with the concept. Bounds: the class names of j's
top images (upper) and the same names shuffled across latents (lower).

Writes ``steer_eval.json`` (summary + per latent + settings), ``steer_eval.md`` (the table),
``answers.csv`` (every latent x image answer) and ``run_info.json`` into the run directory.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from vlmsae.config import conf_dir, register_configs
from vlmsae.formats import SteerEvalResult, write_steer_eval
from vlmsae.utils.io import atomic_write_text
from vlmsae.utils.paths import run_dir
from vlmsae.utils.provenance import write_run_info

PAPER = {  # SPEC 5, alpha = 100 (ImageNet images / white image)
    "imagenet": {"steered": 0.263, "not steered": 0.211, "upper bound (true class names)": 0.283,
                 "lower bound (shuffled names)": 0.185},
    "white": {"steered": 0.259, "not steered": 0.212, "upper bound (true class names)": 0.283,
              "lower bound (shuffled names)": 0.185},
}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".JPEG", ".JPG", ".PNG")


def latent_list(spec: Any) -> list[int]:
    """``10`` -> latents 0..9 (the paper's 0-9 / 0-999); a list -> those latents."""
    if isinstance(spec, int):
        return list(range(spec))
    if isinstance(spec, (list, tuple)) or OmegaConf.is_list(spec):
        return [int(j) for j in spec]
    raise ValueError(f"latents={spec!r}: give a count (10 = latents 0..9) or a list of latent indices.")


def open_image(path: str | Path) -> Any:
    """Decode one image file to 8-bit RGB as extraction does (:func:`vlmsae.data.images.load_image`)."""
    from vlmsae.data.images import load_image

    return load_image(path)


def latent_concepts(top: Any, latents: Sequence[int], top_n: int, embed_images: Any) -> tuple[Any, list, list]:
    """``(concepts_LE, top_paths, top_labels)``: each latent's concept from its top-``top_n`` images.

    The images are decoded latent by latent (:func:`~vlmsae.steering.score.streamed_concept_embeddings`),
    so memory does not grow with the number of latents.
    """
    from vlmsae.steering.score import streamed_concept_embeddings

    top_paths, top_labels = _top_lists(top, latents, top_n)
    concepts_LE = streamed_concept_embeddings(top_paths, open_image, embed_images)
    return concepts_LE, top_paths, top_labels


def eval_images(spec: str, n_images: int | None, size: int, seed: int) -> tuple[list[Any], list[str]]:
    """``white`` (one white image) | a folder of images | a text file listing image paths."""
    import random

    from vlmsae.steering import white_image

    if spec == "white":
        return [white_image(size)], ["white"]
    src = Path(spec).expanduser()
    if src.is_dir():
        fpaths = sorted(p for p in src.rglob("*") if p.suffix in IMAGE_SUFFIXES)
    elif src.is_file():
        fpaths = [Path(line.strip()) for line in src.read_text().splitlines() if line.strip()]
    else:
        raise FileNotFoundError(f"images={spec!r}: pass `white`, a folder of images, or a file listing image paths.")
    if not fpaths:
        raise FileNotFoundError(f"images={spec!r} holds no images ({', '.join(IMAGE_SUFFIXES)}).")
    if n_images is not None and len(fpaths) > n_images:
        fpaths = sorted(random.Random(seed).sample(fpaths, n_images))  # a fixed random subset
    return [open_image(p) for p in fpaths], [str(p) for p in fpaths]


def load_class_names(fpath: str | None) -> dict[int, str] | None:
    """Label id -> class name from a .txt (one name per line, line i = label i) or .json (list or dict)."""
    if fpath is None:
        return None
    path = Path(fpath).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"class_names={fpath!r} is not a file (a .txt with one name per line, or a .json).")
    if path.suffix == ".json":
        data = json.loads(path.read_text())
        return {int(k): str(v) for k, v in (data.items() if isinstance(data, dict) else enumerate(data))}
    return {i: line.strip() for i, line in enumerate(path.read_text().splitlines())}


def _top_lists(top: Any, latents: Sequence[int], top_n: int) -> tuple[list[list[str]], list[list[int]]]:
    """Paths and labels of each latent's top-``top_n`` images (slots with -1 or a zero activation dropped)."""
    image_idx, acts = top.image_idx, top.acts
    paths, labels = top.paths, top.labels
    n_latents = image_idx.shape[0]
    if paths is None:
        raise ValueError(
            "The top-images index has no image paths (images.json paths is null): the concept embedding needs the "
            "images; rerun the monosemanticity job on an image source with files."
        )
    out_paths, out_labels = [], []
    for j in latents:
        if not 0 <= j < n_latents:
            raise ValueError(f"Latent {j} is not in the top-images index ({n_latents} latents).")
        rows = [int(i) for i, a in zip(image_idx[j, :top_n].tolist(), acts[j, :top_n].tolist()) if i >= 0 and a > 0]
        out_paths.append([paths[i] for i in rows])
        out_labels.append([int(labels[i]) if labels is not None and labels[i] is not None else -1 for i in rows])
    return out_paths, out_labels


def _text_embed_fn(embedder: Any):
    for name in ("embed_text", "embed_texts", "encode_text"):
        if callable(getattr(embedder, name, None)):
            return getattr(embedder, name)
    raise TypeError(
        f"The embedder {type(embedder).__name__} has no text tower (embed_text): the steering score needs a CLIP "
        "embedder (embedder=clip_b32, or the tiny CLIP in tests)."
    )


def run(cfg: DictConfig, out_dpath: str | Path | None = None) -> dict:
    import torch
    from tqdm import tqdm

    from vlmsae.data.images import load_image
    from vlmsae.metrics.topimages import TopImages
    from vlmsae.models.embedders import load_embedder
    from vlmsae.models.llava import load_llava_spec, vision_tower
    from vlmsae.steer import model_spec
    from vlmsae.sae import load_sae
    from vlmsae.steering import first_word, generate_answers, sae_layer, steer
    from vlmsae.steering.score import ScoreSummary, markdown_table, shuffled, word_scores

    out_dpath = run_dir(out_dpath)
    for key in ("sae_path", "top_images"):
        if cfg[key] is None or not Path(str(cfg[key])).is_dir():
            raise FileNotFoundError(f"{key}={cfg[key]!r} is not a folder.")
    torch.manual_seed(int(cfg.seed))
    latents = latent_list(cfg.latents)
    model, processor = load_llava_spec(model_spec(cfg))
    device = next(vision_tower(model).parameters()).device
    sae = load_sae(str(cfg.sae_path), device=str(device))
    layer = cfg.layer if cfg.layer is not None else sae_layer(sae)
    embedder = load_embedder(cfg.embedder)
    embed_texts = _text_embed_fn(embedder)

    # Concepts: mean image embedding of each latent's top images, decoded latent by latent.
    top = TopImages.load(str(cfg.top_images))
    concepts_LE, top_paths, top_labels = latent_concepts(top, latents, int(cfg.top_n), embedder.embed)

    # Answers, not steered (once per image) and steered (once per latent x image).
    size = int(model.config.vision_config.image_size)
    images, image_names = eval_images(str(cfg.images), cfg.n_images, size, int(cfg.seed))
    gen = lambda ims: generate_answers(model, processor, ims, cfg.prompt, int(cfg.max_new_tokens), len(ims))  # noqa: E731
    bs = int(cfg.batch_size)
    plain = []
    for s in tqdm(range(0, len(images), bs), desc="not steered"):
        plain += gen(images[s:s + bs])
    jobs = [(li, ii) for li in range(len(latents)) for ii in range(len(images))]

    def steered_answers(mode: str) -> list[str]:
        answers: list[str] = []
        for s in tqdm(range(0, len(jobs), bs), desc=f"steered ({mode})"):
            batch = jobs[s:s + bs]
            # One generate call steers a different latent per sample: NaN alpha = leave that latent as encoded.
            alphas = {}
            for li in sorted({li for li, _ in batch}):
                a_B1 = torch.full((len(batch), 1), float("nan"))
                a_B1[[b for b, (lj, _) in enumerate(batch) if lj == li]] = float(cfg.alpha)
                alphas[latents[li]] = a_B1
            with steer(model, sae, alphas, mode=mode, layer=layer):
                answers += gen([images[ii] for _, ii in batch])
        return answers

    steered = steered_answers(cfg.mode)
    steered_words = [first_word(a) for a in steered]
    plain_words = [first_word(plain[ii]) for _, ii in jobs]
    concept_of_job = [li for li, _ in jobs]
    scores = {
        "steered": word_scores(steered_words, concept_of_job, concepts_LE, embed_texts),
        "not steered": word_scores(plain_words, concept_of_job, concepts_LE, embed_texts),
    }
    if cfg.compare_add and cfg.mode != "add":  # plain activation steering along the same decoder directions
        add_words = [first_word(a) for a in steered_answers("add")]
        scores["activation steering (add)"] = word_scores(add_words, concept_of_job, concepts_LE, embed_texts)
    # Bounds: the class names of each latent's top images, then the same names shuffled across latents.
    names = load_class_names(cfg.class_names)
    bound_note = None
    if names is not None and any(lbl >= 0 for lbls in top_labels for lbl in lbls):
        pairs = [(li, names.get(lbl, "")) for li, lbls in enumerate(top_labels) for lbl in lbls if lbl >= 0]
        true_words = [w.lower() for _, w in pairs]
        owner = [li for li, _ in pairs]
        scores["upper bound (true class names)"] = word_scores(true_words, owner, concepts_LE, embed_texts)
        scores["lower bound (shuffled names)"] = word_scores(shuffled(true_words, int(cfg.seed)), owner, concepts_LE, embed_texts)
    else:
        bound_note = "bounds need labels in the top-images index and class_names=<file>; skipped"

    summary = {k: ScoreSummary.of(v) for k, v in scores.items()}
    setting = "white" if str(cfg.images) == "white" else "imagenet"
    table = markdown_table(summary, PAPER[setting])
    per_latent = []
    n_img = len(images)
    for li, j in enumerate(latents):
        sl = slice(li * n_img, (li + 1) * n_img)
        per_latent.append({
            "latent": j, "n_top_images": len(top_paths[li]),
            "steered": ScoreSummary.of(scores["steered"][sl]).mean,
            "not_steered": ScoreSummary.of(scores["not steered"][sl]).mean,
            "steered_words": sorted(set(steered_words[sl])),
        })
    result = {
        "summary": {k: vars(v) for k, v in summary.items()},
        "paper": PAPER[setting],
        "per_latent": per_latent,
        "settings": {
            "model": cfg.model.name, "sae_path": str(cfg.sae_path), "top_images": str(cfg.top_images),
            "layer": layer, "latents": latents, "alpha": float(cfg.alpha), "mode": cfg.mode,
            "images": str(cfg.images), "n_images": n_img, "top_n": int(cfg.top_n), "prompt": cfg.prompt,
            "max_new_tokens": int(cfg.max_new_tokens), "embedder": OmegaConf.to_container(cfg.embedder, resolve=True),
            "bounds": bound_note or "class names of top images (upper), shuffled across latents (lower)",
        },
    }
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["latent", "image", "steered_answer", "steered_word", "steered_score", "plain_answer",
                     "plain_word", "plain_score"])
    for k, (li, ii) in enumerate(jobs):
        writer.writerow([latents[li], image_names[ii], steered[k], steered_words[k], f"{scores['steered'][k]:.4f}",
                         plain[ii], plain_words[k], f"{scores['not steered'][k]:.4f}"])
    atomic_write_text(out_dpath / "answers.csv", buf.getvalue())
    title = f"# Steering score: {len(latents)} latents x {n_img} images ({cfg.images}), alpha={cfg.alpha}, {cfg.mode}\n\n"
    note = f"The paper column is SPEC 5's {'white-image' if setting == 'white' else 'ImageNet-image'} setting.\n"
    atomic_write_text(out_dpath / "steer_eval.md", title + table + "\n" + note)
    write_steer_eval(out_dpath, SteerEvalResult(**result))
    write_run_info(out_dpath, OmegaConf.to_container(cfg, resolve=True))
    print(table)
    return {**result, "table": table, "out_dpath": str(out_dpath)}


def _main(cfg: DictConfig) -> None:
    run(cfg)


def main() -> None:
    register_configs()
    hydra.main(config_path=str(conf_dir()), config_name="steer_eval", version_base="1.3")(_main)()


if __name__ == "__main__":
    main()

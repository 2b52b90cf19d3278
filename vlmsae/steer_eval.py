"""The steering score of METHOD §5: clamp latent j, ask LLaVA for one word, compare it with j's concept.

    python -m vlmsae.steer_eval model=llava15_7b sae_path=<sae dir> top_images=<ms run>/top_images \
        images=white latents=1000 alpha=100 embedder=clip_b32

For each steered latent j: concept = mean CLIP image embedding of its top-16 images (the top-images
index of the monosemanticity run); for each evaluation image LLaVA answers "What is shown in this
image? Use exactly one word!" (5 new tokens, greedy) with and without j clamped to alpha; the first
word's CLIP text embedding is compared (cosine) with the concept. Bounds: the class names of j's
top images (upper) and the same names shuffled across latents (lower).

Writes ``steer_eval.json`` (summary + per latent + settings), ``steer_eval.md`` (the table),
``answers.csv`` (every latent x image answer) and ``run_info.json`` into the run directory.
Keys: ``SteerEvalJob`` (:mod:`vlmsae.config.jobs.steer_eval`); library: :mod:`vlmsae.steering.evaluate`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from vlmsae.config import conf_dir, register_configs
from vlmsae.config.jobs.steer_eval import SteerEvalJob
from vlmsae.formats import TOP_IMAGES_DIR, write_steer_eval
from vlmsae.metrics.topimages import TopImages
from vlmsae.models.embedders import EmbedderSpec, load_embedder
from vlmsae.models.spec import ModelSpec
from vlmsae.report.job_log import log_job
from vlmsae.report.steering import write_score_report
from vlmsae.report.tables import steer_table
from vlmsae.steering import evaluate
from vlmsae.steering.hooks import steer_block
from vlmsae.steering.setup import load_steering, require_folder
from vlmsae.studies import sweep
from vlmsae.studies.sweep import sweep_paths
from vlmsae.utils.paths import run_dir
from vlmsae.utils.provenance import write_run_info


def run(cfg: DictConfig, out_dpath: str | Path | None = None) -> dict:
    """Score steering as ``cfg`` says (keys: :class:`SteerEvalJob`); outputs in ``out_dpath``."""
    job: SteerEvalJob = OmegaConf.to_object(cfg)
    out_dpath = run_dir(out_dpath)
    if (paths := sweep_paths(str(job.sae_path))) is not None:  # a sweep folder or a comma list
        return _run_sweep(cfg, job, out_dpath, paths)
    require_folder("top_images", job.top_images)
    setup = load_steering(ModelSpec.from_cfg(cfg.model), job.sae_path, job.layer, job.device_map, job.sae_format)
    embedder = load_embedder(EmbedderSpec.from_cfg(cfg.embedder))
    images = evaluate.eval_images(job.images, job.n_images, setup.image_size, job.seed)
    result, table = _score(cfg, job, setup, embedder, images, job.sae_path, job.top_images, out_dpath)
    print(table)
    log_job(cfg, "steer_eval", out_dpath, result.to_dict(), sae_path=job.sae_path)  # after the files
    return {**result.to_dict(), "table": table, "out_dpath": str(out_dpath)}


def _score(cfg: DictConfig, job: SteerEvalJob, setup, embedder, images, sae_path: str, top_images, out_dpath: Path):
    """The steering score of ``setup``'s SAE (its concepts from ``top_images``), written into ``out_dpath``."""
    torch.manual_seed(job.seed)
    request = evaluate.ScoreRequest(
        evaluate.latent_list(job.latents), job.alpha, job.mode, job.prompt, job.max_new_tokens, job.batch_size,
        job.top_n, job.compare_add, evaluate.load_class_names(job.class_names), job.seed,
    )  # fmt: skip
    scores = evaluate.score_steering(setup, embedder, TopImages.load(top_images), *images, request)
    embedder_node = OmegaConf.to_container(cfg.embedder, resolve=True)
    settings = {"model": cfg.model.name, "sae_path": sae_path, "top_images": str(top_images), "images": job.images}
    result = scores.result(evaluate.paper_setting(job.images), {**settings, "embedder": embedder_node})
    table = write_score_report(out_dpath, scores, job.images)
    write_steer_eval(out_dpath, result)
    write_run_info(out_dpath, {**OmegaConf.to_container(cfg, resolve=True), "sae_path": sae_path})
    return result, table


def _run_sweep(cfg: DictConfig, job: SteerEvalJob, out_dpath: Path, paths: list[str]) -> dict:
    """Every SAE of a sweep, each with ``top_images=<MS sweep run>/<its name>/top_images``: LLaVA, the embedder
    and the evaluation images loaded once; outputs in ``out_dpath/<name>/``, and ``steer_table.md/.csv``."""
    members = sweep.load_sweep(paths, job.sae_format)
    tops = {m.name: Path(job.top_images) / m.name / TOP_IMAGES_DIR for m in members}
    for m in members:  # every index first: a missing one fails before LLaVA loads
        require_folder("top_images", str(tops[m.name]), " (for a sweep, top_images= is the MS sweep's run dir)")
    setup = load_steering(ModelSpec.from_cfg(cfg.model), members[0].sae_path, job.layer, job.device_map,
                          job.sae_format)  # fmt: skip
    embedder = load_embedder(EmbedderSpec.from_cfg(cfg.embedder))
    images = evaluate.eval_images(job.images, job.n_images, setup.image_size, job.seed)

    def score(m: sweep.SweepMember, shared: sweep.SweepCache, sub_dpath: Path) -> tuple[dict, int]:
        sae = m.sae.to(setup.sae.W_dec.device).eval()  # the same model and device: only the SAE changes
        one = dataclasses.replace(setup, sae=sae, layer=steer_block(setup.model, sae, job.layer))
        result, _ = _score(cfg, job, one, embedder, images, m.sae_path, tops[m.name], sub_dpath)
        return result.summary, one.layer

    result = sweep.run_sweep(members, out_dpath, score, steer_table, OmegaConf.to_container(cfg, resolve=True))
    print(Path(result["tables"]["steer_table"]["md"]).read_text())
    log_job(cfg, "steer_eval", out_dpath, result)  # one sweep-level run holding the table
    return result


def _main(cfg: DictConfig) -> None:
    run(cfg)


def main() -> None:
    register_configs()
    hydra.main(config_path=str(conf_dir()), config_name="steer_eval", version_base="1.3")(_main)()


if __name__ == "__main__":
    main()

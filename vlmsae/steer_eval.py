"""The steering score of METHOD §5: clamp latent j, ask LLaVA for one word, compare it with j's concept.

    python -m vlmsae.steer_eval model=llava15_7b sae_path=<sae dir> top_images=<ms run>/top_images \
        images=white latents=1000 alpha=100 embedder=clip_b32

For each steered latent j, LLaVA answers with and without j clamped to alpha; the first word's CLIP text embedding
is compared (cosine) with j's concept, the mean image embedding of its top images (the monosemanticity run's
index). Bounds: the class names of j's top images (upper) and the same names shuffled across latents (lower).

Writes ``steer_eval.json`` (summary + per latent + settings), ``steer_eval.md`` (the table),
``answers.csv`` (every latent x image answer) and ``run_info.json`` into the run directory.
Keys: ``SteerEvalJob`` (:mod:`vlmsae.config.jobs.steer_eval`); library: :mod:`vlmsae.steering.evaluate`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from omegaconf import DictConfig

from vlmsae.config import launch, typed_job
from vlmsae.config.jobs.steer_eval import SteerEvalJob
from vlmsae.formats import TOP_IMAGES_DIR, write_steer_eval
from vlmsae.utils.paths import run_dir
from vlmsae.utils.provenance import write_run_info


def run(cfg: DictConfig, out_dpath: str | Path | None = None) -> dict:
    """Score steering as ``cfg`` says (keys: :class:`SteerEvalJob`); outputs in ``out_dpath``. A sweep (a folder of
    SAEs or a comma list), each SAE with ``top_images=<MS sweep run>/<its name>/top_images``: LLaVA, the embedder
    and the evaluation images loaded once; outputs in ``out_dpath/<name>/``, and ``steer_table.md/.csv``."""
    import torch

    from vlmsae.metrics.topimages import TopImages
    from vlmsae.models.embedders import load_embedder
    from vlmsae.report.job_log import log_job
    from vlmsae.report.steering import write_score_report
    from vlmsae.report.tables import steer_table
    from vlmsae.steering import evaluate
    from vlmsae.steering.hooks import steer_block
    from vlmsae.steering.setup import load_steering, require_folder
    from vlmsae.studies import sweep

    job, config = typed_job(cfg, SteerEvalJob)  # below, every node is its dataclass; config: run_info.json
    out_dpath = run_dir(out_dpath)
    members, is_sweep = sweep.open_members(str(job.sae_path), job.sae_format)
    top_dpath = Path(str(job.top_images))  # a sweep: the MS sweep's run dir, one folder per SAE
    tops = {m.name: str(top_dpath / m.name / TOP_IMAGES_DIR) if is_sweep else job.top_images for m in members}
    hint = " (for a sweep, top_images= is the MS sweep's run dir)" if is_sweep else ""
    for m in members:  # every index first: a missing one fails before LLaVA loads
        require_folder("top_images", tops[m.name], hint)
    setup = load_steering(job.model, members[0].sae_path, job.layer, job.device_map, job.sae_format, job.check_fit)
    embedder = load_embedder(job.embedder)
    images = evaluate.eval_images(job.images, job.n_images, setup.image_size, job.seed)
    request = evaluate.ScoreRequest(
        evaluate.latent_list(job.latents), job.alpha, job.mode, job.prompt, job.max_new_tokens, job.batch_size,
        job.top_n, job.compare_add, evaluate.load_class_names(job.class_names), job.seed,
    )  # fmt: skip
    settings = {"model": job.model.name, "images": job.images, "embedder": config["embedder"]}

    def score(m: sweep.SweepMember, shared: sweep.SweepCache, sub_dpath: Path) -> tuple[dict, int]:
        """One SAE: LLaVA steered through it, scored against its top images; its outputs in its folder."""
        torch.manual_seed(job.seed)
        sae = m.sae.to(setup.sae.W_dec.device).eval()  # the same model and device: only the SAE changes
        one = dataclasses.replace(setup, sae=sae, layer=steer_block(setup.model, sae, job.layer))
        scores = evaluate.score_steering(one, embedder, TopImages.load(tops[m.name]), *images, request)
        paths = {"sae_path": m.sae_path, "top_images": tops[m.name]}
        result = scores.result(evaluate.paper_setting(job.images), {**settings, **paths})
        table = write_score_report(sub_dpath, scores, job.images)
        write_steer_eval(sub_dpath, result)
        write_run_info(sub_dpath, {**config, "sae_path": m.sae_path})
        print(table)
        return {**result.to_dict(), "table": table}, one.layer

    result = sweep.run_study(members, is_sweep, out_dpath, score, steer_table, config)
    # after the files (W&B may fail); a sweep logs one sweep-level run holding the table
    log_job(job, "steer_eval", out_dpath, result, sae_path=None if is_sweep else job.sae_path)
    return result


def _main(cfg: DictConfig) -> None:
    out = run(cfg)
    if "tables" in out:  # a sweep: the table over its SAEs
        print(Path(out["tables"]["steer_table"]["md"]).read_text())


main = launch("steer_eval", _main, __name__)

"""Train an SAE on vision-encoder activations (SPEC section 2) with Lightning.

    python -m vlmsae.train model=clip_l14 sae=batchtopk sae.k=64 sae.expansion=16 \\
        data=acts data.acts=/acts/layer22 trainer=gpu trainer.max_steps=110000 logger=wandb
    python -m vlmsae.train -m layer=11,17,22,23 sae.expansion=1,2,4,8,16,64 sae.k=20 \\
        data=acts 'data.acts=/acts/layer${layer}'          # a sweep; summary in the sweep dir
    python -m vlmsae.train <same overrides> resume=true    # continue a killed run

Outputs (the Hydra run dir): ``sae/`` (vlmsae.sae checkpoint: takes raw activations, ``source``
says model/layer/tokens), ``metrics.json`` (final validation metrics), ``run_info.json``
(resolved config + provenance), ``checkpoints/last.ckpt`` (Lightning, for resume), ``csv/``
(logger=csv, and logger=wandb's scalar mirror) and ``wandb/`` (logger=wandb). On resume the
logger history is the checkpointed run's up to the checkpoint's step, then this run's
(vlmsae.lit.loggers): each logged step appears once.

``layer`` and ``tokens`` (top level) say what to train on. With ``data=acts`` they default to the
store's manifest and, when set, must agree with it (so a layer sweep whose ``data.acts`` forgot
the ``${layer}`` interpolation fails instead of training four times on one layer). With image
sources (``data=images``, ``data=tiny``) the activations are computed on the fly at that layer.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from vlmsae.utils.io import atomic_write_json, atomic_write_text
from vlmsae.utils.provenance import write_run_info

log = logging.getLogger(__name__)

IMAGE_SOURCES = ("images", "folder", "wds", "list", "synthetic")


# ------------------------------------------------------------------------------ helpers
def _container(node) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def _node(cfg: DictConfig, key: str) -> dict:
    value = _container(cfg[key])
    value = dict(value or {})
    value.pop("defaults", None)
    return value


def _parse_tokens(tokens: str | None, tokens_k: int = 2) -> tuple[str, int]:
    """(selection, k) for select_tokens: ``random_k`` takes ``tokens_k``; ``random_2`` is read as k = 2."""
    if tokens is None:
        return "cls", int(tokens_k)
    text = str(tokens)
    if text.startswith("random_"):
        tail = text.split("_", 1)[1]
        return "random_k", int(tail) if tail.isdigit() else int(tokens_k)
    return text, int(tokens_k)


def _same_layer(a, b) -> bool:
    return str(a).strip().lower() == str(b).strip().lower()


def config_fingerprint(config: dict) -> dict:
    """The parts of a resolved config that define a run (what resume=true matches on)."""
    config = dict(config)
    for key in ("resume", "hydra"):
        config.pop(key, None)
    logger = dict(config.get("logger") or {})
    config["logger"] = {k: v for k, v in logger.items() if k == "kind"}
    trainer = dict(config.get("trainer") or {})
    trainer.pop("enable_progress_bar", None)
    config["trainer"] = trainer
    return config


def _run_checkpoint(run_dpath: Path) -> Path | None:
    """A run dir's ``checkpoints/last.ckpt``, else its newest ``step*.ckpt``, else None.

    Lightning replaces the last.ckpt link by unlinking then linking: a kill in between leaves
    only the step files.
    """
    last = run_dpath / "checkpoints" / "last.ckpt"
    if last.is_file():
        return last
    steps = sorted((run_dpath / "checkpoints").glob("step*.ckpt"))  # zero-padded step numbers sort
    if steps:
        log.warning("%s has no checkpoints/last.ckpt (killed while relinking it?): using %s", run_dpath, steps[-1].name)
        return steps[-1]
    return None


def find_resume_checkpoint(resume: Any, out_dpath: Path, config: dict) -> Path | None:
    """The Lightning checkpoint to continue from, or None for a fresh run.

    ``resume=true``: this run dir's own ``checkpoints/last.ckpt`` if any, else the newest one among
    sibling runs (and sibling multirun jobs) whose saved config matches this one except for
    ``resume``: Hydra gives the repeated command a new timestamped dir, the checkpoint lives in the
    old one. ``resume=<path>``: a run dir or a ``.ckpt`` file.
    """
    if resume in (None, False) or str(resume).lower() in ("false", "no", "0", "none", ""):
        return None
    if str(resume).lower() not in ("true", "yes", "1"):
        path = Path(str(resume)).expanduser()
        ckpt = _run_checkpoint(path) if path.is_dir() else path
        if ckpt is None or not ckpt.is_file():
            where = path / "checkpoints" if path.is_dir() else path
            raise FileNotFoundError(f"resume={resume!r}: no checkpoint at {where} "
                                    "(give a train run dir with checkpoints/last.ckpt or a .ckpt file)")
        return ckpt
    own = _run_checkpoint(out_dpath)
    if own is not None:
        return own
    want = config_fingerprint(config)
    roots = [out_dpath.parent]
    if out_dpath.name.startswith("job_") or (out_dpath.parent / "multirun.yaml").exists():
        roots.append(out_dpath.parent.parent)
    candidates = []
    for root in roots:
        for info_fpath in list(root.glob("*/run_info.json")) + list(root.glob("*/*/run_info.json")):
            run_dpath = info_fpath.parent
            ckpt = _run_checkpoint(run_dpath)
            if run_dpath.resolve() == out_dpath.resolve() or ckpt is None:
                continue
            try:
                import json

                previous = json.loads(info_fpath.read_text(encoding="utf-8")).get("config", {})
            except (OSError, ValueError):
                continue
            if config_fingerprint(previous) == want:
                candidates.append(ckpt)
    if not candidates:
        log.warning("resume=true but no earlier run with this config has a checkpoint under %s: starting fresh",
                    [str(r) for r in roots])
        return None
    return max(candidates, key=lambda p: p.stat().st_mtime)


def resolve_data(cfg: DictConfig) -> dict:
    """What the run trains on: the store (or image source), its width, layer and tokens; checked early."""
    data = _node(cfg, "data")
    model = _node(cfg, "model")
    source = data.get("source")
    layer, tokens = cfg.get("layer"), cfg.get("tokens")
    if source == "acts":
        from vlmsae.data.store import open_store

        acts_dpath, manifest, shard_fpaths = open_store(data.get("acts"))
        d = int(manifest.d)
        store_layer = manifest.layer
        if layer is not None:
            from vlmsae.models.tap import resolve_layer

            layer = resolve_layer(layer, int(model.get("n_layers", 24)), model.get("name", "model"))  # -2 -> 22
        if layer is not None and store_layer is not None and not _same_layer(layer, store_layer):
            raise ValueError(
                f"layer={layer} but the activation store {acts_dpath} holds layer {store_layer}: point data.acts at "
                "that layer's store (for a sweep over layers: data.acts='/acts/layer${layer}') or drop the layer override"
            )
        if tokens is not None and manifest.tokens is not None and str(tokens) != str(manifest.tokens):
            log.warning("tokens=%s but the store was extracted with tokens=%s: using the store's", tokens,
                        manifest.tokens)
        layer = store_layer if store_layer is not None else layer
        expected = model.get("embed_dim") if _same_layer(layer, "last") else model.get("width")
        if expected is not None and int(expected) != d:
            raise ValueError(
                f"width mismatch: the activation store {acts_dpath} has d={d} (model {manifest.model!r}, "
                f"layer {store_layer}) but model={model.get('name')} has {'embed_dim' if _same_layer(layer, 'last') else 'width'} "
                f"{expected}: pass the model the store was extracted with (model=...), or the matching store"
            )
        if manifest.model not in (None, model.get("name")):
            log.warning("model=%s but the store was extracted from %s: the SAE records the store's model",
                        model.get("name"), manifest.model)
        return {
            "source": "acts", "d": d, "acts_dpath": str(acts_dpath), "manifest": manifest, "n_shards": len(shard_fpaths),
            "model": manifest.model if manifest.model is not None else model.get("name"),
            "pretrained": manifest.pretrained if manifest.model is not None else model.get("pretrained"),
            "layer": layer, "tokens": manifest.tokens if manifest.tokens is not None else tokens,
            "tokens_k": manifest.k,
        }
    if source in IMAGE_SOURCES:
        from vlmsae.models.tap import resolve_layer

        n_layers = int(model.get("n_layers", 24))
        layer = resolve_layer(layer if layer is not None else n_layers - 2, n_layers, model.get("name", "model"))
        d = int(model["embed_dim"] if layer == "last" else model["width"])
        selection, tokens_k = _parse_tokens(tokens, cfg.get("tokens_k", 2))
        return {
            "source": source, "d": d, "model": model.get("name"), "pretrained": model.get("pretrained"),
            "layer": layer, "tokens": selection, "tokens_k": tokens_k if selection == "random_k" else None,
            "manifest": {"model": model.get("name"), "layer": layer, "d": d, "tokens": selection},
        }
    raise ValueError(f"data.source={source!r} cannot feed training: use data=acts (a store) or data=images / data=tiny")


def build_sae_config(cfg: DictConfig, d: int) -> dict:
    from vlmsae.sae import SAEConfig

    return SAEConfig.from_schema(_node(cfg, "sae"), d_in=d).to_dict()


def build_datamodule(cfg: DictConfig, info: dict):
    from vlmsae.data.stream import StreamConfig
    from vlmsae.lit.datamodule import ActsDataModule, ImageActsDataModule
    from vlmsae.models.image_rows import ImageChunkMaker

    data, trainer = _node(cfg, "data"), _node(cfg, "trainer")
    stream = StreamConfig(
        batch_size=int(data["batch_size"]), shuffle_buffer=int(data["shuffle_buffer"]),
        num_workers=int(data["num_workers"]), val_fraction=float(data["val_fraction"]),
        val_batches=int(trainer["limit_val_batches"]), seed=int(cfg.get("seed", 0)) + int(data.get("seed", 0)),
    )
    if info["source"] == "acts":
        return ActsDataModule(info["acts_dpath"], stream)
    from vlmsae.models.spec import ModelSpec

    spec = ModelSpec.from_cfg(_node(cfg, "model"))
    image_source = data.get("image_source") if info["source"] == "images" else info["source"]
    image_kwargs = {"source": image_source, "root": data.get("root")}
    if data.get("max_images") is not None:
        image_kwargs["max_images"] = data["max_images"]
    extra = dict(data.get("extra") or {})
    if image_source == "synthetic":  # the same generated images the extract job uses for these options
        image_kwargs["synthetic"] = {k: extra[k] for k in ("n_per_class", "size", "seed") if k in extra}
    tokens, k_tokens = _parse_tokens(info["tokens"], info.get("tokens_k") or 2)
    period = max(2, round(1.0 / stream.val_fraction)) if stream.val_fraction > 0 else 10**9
    per_forward = int(extra.get("images_per_forward", 32))  # images per encoder forward
    common = dict(model_spec=spec, image_kwargs=image_kwargs, layer=info["layer"], tokens=tokens, k_tokens=k_tokens,
                  images_per_forward=per_forward, seed=stream.seed, holdout_every=period)
    return ImageActsDataModule(ImageChunkMaker(split="train", **common), ImageChunkMaker(split="val", **common),
                               info["d"], stream, info["manifest"])


def build_logger(cfg: DictConfig, out_dpath: Path, resume_ckpt: Path | None):
    """Lightning logger(s) for logger.kind (none | csv | wandb: W&B plus a CSV mirror) and the W&B run id."""
    lg = _node(cfg, "logger")
    kind = lg.get("kind", "none")
    if kind == "none":
        return False, None
    from vlmsae.lit.loggers import ResumableCSVLogger

    # On resume metrics.csv continues the checkpoint's run's history (RestoreLogHistory trims it).
    history_fpath = _history_dpath(resume_ckpt) / "csv" / "metrics.csv" if resume_ckpt is not None else None
    csv_logger = ResumableCSVLogger(save_dir=str(out_dpath), name="csv", version="", history_fpath=history_fpath)
    if kind == "csv":
        return csv_logger, None
    if kind == "wandb":
        from lightning.pytorch.loggers import WandbLogger

        run_id = None
        if resume_ckpt is not None:
            id_fpath = _history_dpath(resume_ckpt) / "wandb_id.txt"
            if id_fpath.is_file():
                run_id = id_fpath.read_text().strip()
        import uuid

        run_id = run_id or uuid.uuid4().hex[:8]  # W&B run ids: 8 lowercase alphanumerics
        mode = os.environ.get("WANDB_MODE") or lg.get("mode", "online")
        name = out_dpath.name if not out_dpath.name.startswith("job_") else f"{out_dpath.parent.name}/{out_dpath.name}"
        logger = WandbLogger(
            project=lg.get("project", "vlmsae"), entity=lg.get("entity"), group=lg.get("group"), tags=list(lg.get("tags") or []),
            save_dir=str(out_dpath), name=name, id=run_id, resume="allow", mode=mode,
            config=OmegaConf.to_container(cfg, resolve=True),
        )
        # csv/metrics.csv mirrors the scalars: written at every log, it survives kill -9 (W&B's offline
        # log is flushed every 15 s), and a resumed offline run replays it (vlmsae.lit.loggers).
        return [logger, csv_logger], run_id
    raise ValueError(f"logger.kind={kind!r}: use none, csv or wandb")


def _history_dpath(resume_ckpt: Path) -> Path:
    """The run dir a checkpoint belongs to (``<run dir>/checkpoints/<name>.ckpt``): its logs are the history."""
    return resume_ckpt.parent.parent


def run(cfg: DictConfig, out_dpath: str | Path | None = None, callbacks: list | None = None) -> dict:
    """Train one SAE as ``cfg`` says; returns the final validation metrics (also in metrics.json).

    ``callbacks``: extra Lightning callbacks (tests use them to interrupt a run or record steps).
    """
    import warnings

    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from vlmsae.lit.module import NonFiniteLossError, SAELitModule
    from vlmsae.sae import default_lr, save_sae
    from vlmsae.sae.precision import check_trainer_precision
    from vlmsae.utils.paths import run_dir

    out_dpath = run_dir(out_dpath)
    # Manual optimisation checkpoints hold the state after the step: exactly what resume needs.
    warnings.filterwarnings("ignore", message=".*pre-optimization state.*")
    warnings.filterwarnings("ignore", message=".*litlogger.*")
    warnings.filterwarnings("ignore", message=".*dirpath has changed from.*")  # resume writes to the new run dir
    config = OmegaConf.to_container(cfg, resolve=True)
    t = _node(cfg, "trainer")
    seed = int(cfg.get("seed", 0))

    # Everything that can be wrong with the input is checked before any training starts.
    check_trainer_precision(t["precision"])  # the SAE trains in float32 only (vlmsae.sae.precision)
    info = resolve_data(cfg)
    sae_config = build_sae_config(cfg, info["d"])
    resume_ckpt = find_resume_checkpoint(cfg.get("resume", False), out_dpath, config)
    lr = float(t["lr"]) if t.get("lr") is not None else default_lr(sae_config["n_latents"])
    from lightning.pytorch.utilities import rank_zero_only

    is_rank_zero = rank_zero_only.rank == 0  # DDP: every rank runs this function; one writes the files
    if is_rank_zero:
        write_run_info(out_dpath, config, status="running", resumed_from=str(resume_ckpt) if resume_ckpt else None,
                       sae_config=sae_config, lr=lr)

    L.seed_everything(seed, workers=True, verbose=False)
    datamodule = build_datamodule(cfg, info)
    module = SAELitModule(sae_config, lr=lr, warmup_steps=int(t["warmup_steps"]), grad_clip=float(t["gradient_clip_val"]),
                          log_every_n_steps=int(t["log_every_n_steps"]), seed=seed)
    logger, wandb_id = build_logger(cfg, out_dpath, resume_ckpt)
    if wandb_id and is_rank_zero:
        atomic_write_text(out_dpath / "wandb_id.txt", wandb_id)  # resume=true continues this W&B run

    callbacks = list(callbacks or [])
    if resume_ckpt is not None and logger:
        from vlmsae.lit.loggers import RestoreLogHistory

        # The killed run logged steps past its checkpoint: keep its history up to there, then continue it.
        callbacks.append(RestoreLogHistory(_history_dpath(resume_ckpt), wandb_id=wandb_id))

    ckpt_dpath = out_dpath / "checkpoints"
    checkpoint = ModelCheckpoint(dirpath=str(ckpt_dpath), filename="step{step:07d}", auto_insert_metric_name=False,
                                 every_n_train_steps=int(t["checkpoint_every_n_steps"]), save_top_k=1, monitor=None,
                                 save_last="link", save_on_train_epoch_end=False)
    trainer = L.Trainer(
        accelerator=t["accelerator"], devices=t["devices"], strategy=t["strategy"], num_nodes=int(t["num_nodes"]),
        precision=t["precision"], max_steps=int(t["max_steps"]), max_epochs=-1,
        val_check_interval=int(t["val_check_interval"]), check_val_every_n_epoch=None,
        limit_val_batches=int(t["limit_val_batches"]), log_every_n_steps=int(t["log_every_n_steps"]),
        enable_progress_bar=bool(t["enable_progress_bar"]), enable_model_summary=False, num_sanity_val_steps=0,
        logger=logger, callbacks=[checkpoint, *callbacks], default_root_dir=str(out_dpath),
        use_distributed_sampler=False,
    )
    init = {}
    try:
        if resume_ckpt is None:
            # b_dec and the input scale come from the data before step 0 (they are in the checkpoint on resume).
            n_init = max(1, int(t["scale_batches"]))
            from tqdm import tqdm

            batches = tqdm(datamodule.first_batches(n_init), total=n_init, desc="input scale + b_dec init",
                           unit="batch", disable=not (is_rank_zero and bool(t["enable_progress_bar"])))
            init = module.init_from_batches(batches)
            log.info("input scale %.4g from %d rows", init["input_scale"], init["init_rows"])
        else:
            log.info("resuming from %s", resume_ckpt)
        trainer.fit(module, datamodule=datamodule, ckpt_path=str(resume_ckpt) if resume_ckpt else None)
        if trainer.interrupted:
            raise KeyboardInterrupt(f"training interrupted at step {trainer.global_step}; resume with resume=true")
        _final_checkpoint(trainer, checkpoint, ckpt_dpath)
        trainer.validate(module, datamodule=datamodule, verbose=False)
    except NonFiniteLossError as err:
        if trainer.is_global_zero:
            write_run_info(out_dpath, config, status="failed", error=str(err), sae_config=sae_config, lr=lr)
        raise
    finally:
        if any(type(lg).__name__ == "WandbLogger" for lg in trainer.loggers):
            import wandb

            wandb.finish()  # one W&B run per job: a multirun starts the next job with a fresh run

    optimizer_steps = _adam_steps(trainer)
    metrics = {k: v for k, v in module.val_metrics.items() if k != "density_hist"}
    metrics.update({"step": int(trainer.global_step), "optimizer_steps": optimizer_steps, "lr": lr,
                    "n_latents": sae_config["n_latents"], "k": sae_config["k"], "arch": sae_config["arch"],
                    "layer": info["layer"], "input_scale": float(module.sae.input_scale)})
    if trainer.is_global_zero:
        source = {"model": info["model"], "pretrained": info.get("pretrained"), "layer": info["layer"],
                  "tokens": info["tokens"], "tokens_k": info.get("tokens_k"), "data": info.get("acts_dpath") or _node(cfg, "data").get("root"),
                  "data_source": info["source"], "train_steps": int(trainer.global_step),
                  "train_rows": int(trainer.global_step) * int(_node(cfg, "data")["batch_size"])}
        module.sae.cpu()
        save_sae(module.sae, out_dpath / "sae", source=source)
        atomic_write_json(out_dpath / "metrics.json", metrics)
        atomic_write_json(out_dpath / "latent_density.json", module.val_metrics.get("density_hist", {}))
        write_run_info(out_dpath, config, status="done", resumed_from=str(resume_ckpt) if resume_ckpt else None,
                       sae_config=sae_config, lr=lr, metrics=metrics, init=init)
        write_run_info(out_dpath / "sae", config, metrics=metrics)
        log.info("SAE saved to %s (fve %.3f, l0 %.1f, step %d)", out_dpath / "sae", metrics.get("fve", math.nan),
                 metrics.get("l0", math.nan), metrics["step"])
    return metrics


def _final_checkpoint(trainer, checkpoint, ckpt_dpath: Path) -> None:
    """Save the end state (so resume=true on a finished run is a no-op) and point last.ckpt at it.

    Whether to save is decided from the callback's state, the same on every rank: saving is a
    collective call under DDP, and a rank that skipped it would leave the others waiting.
    """
    final = ckpt_dpath / f"step{int(trainer.global_step):07d}.ckpt"
    if getattr(checkpoint, "_last_global_step_saved", -1) != trainer.global_step:
        trainer.save_checkpoint(str(final))
    if trainer.is_global_zero:
        tmp = ckpt_dpath / ".last.ckpt.tmp"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(final.name)
        os.replace(tmp, ckpt_dpath / "last.ckpt")
        for old in ckpt_dpath.glob("step*.ckpt"):
            if old != final:
                old.unlink()


def _adam_steps(trainer) -> int:
    """Optimizer steps recorded in Adam's state: equals the run's steps iff no step was repeated or lost."""
    try:
        state = trainer.optimizers[0].state
        steps = [int(s["step"]) for s in state.values() if "step" in s]
        return max(steps) if steps else 0
    except (AttributeError, IndexError):
        return -1


def _main(cfg: DictConfig) -> dict:
    return run(cfg)


def main() -> None:
    import hydra

    from vlmsae.config import conf_dir, register_configs

    register_configs()
    hydra.main(config_path=str(conf_dir()), config_name="train", version_base="1.3")(_main)()


if __name__ == "__main__":
    main()

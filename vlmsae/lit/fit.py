"""One SAE training run with Lightning, from typed inputs (the ``train`` job composes these).

```python
source = resolve_train_source(data, model_spec, layer=None, tokens=None, tokens_k=2)    # checked early
sae_config = SAEConfig.from_schema(sae_node, d_in=source.d).to_dict()
plan = FitPlan(model_spec, source, sae_config, data, trainer, logger, seed=0,
               resume_ckpt=find_resume_checkpoint(resume, out_dpath, config), config=config)
metrics = fit_sae(plan, out_dpath)
```

:func:`fit_sae` writes the run dir: ``sae/`` (vlmsae.sae checkpoint: takes raw activations, ``source``
says model, pretrained, layer, tokens, tokens_k, data), ``metrics.json`` (the final validation metrics:
fve, mse, nmse, l0, dead and dense fractions; plus step, optimizer_steps, lr, the SAE's size and layer),
``latent_density.json``, ``run_info.json`` (status running -> done | failed), ``checkpoints/last.ckpt``
(for resume), ``csv/`` and ``wandb/`` + ``wandb_id.txt`` (loggers; the id lets ``resume`` continue the W&B run).
On resume the logger history is the checkpointed run's up to the checkpoint's step, then this run's
(:mod:`vlmsae.lit.loggers`).
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlmsae.config.nodes import DataSchema, LoggerSchema, TrainerSchema
from vlmsae.data.images import synthetic_options
from vlmsae.data.store import open_store
from vlmsae.data.stream import StreamConfig
from vlmsae.formats import StoreManifest
from vlmsae.lit.datamodule import ActsDataModule, ImageActsDataModule, image_holdout_every
from vlmsae.lit.loggers import RestoreLogHistory, ResumableCSVLogger
from vlmsae.lit.module import NonFiniteLossError, SAELitModule
from vlmsae.lit.resume import history_dpath
from vlmsae.models.image_rows import ImageChunkMaker
from vlmsae.models.spec import ModelSpec
from vlmsae.models.tap import resolve_layer
from vlmsae.sae import default_lr, save_sae
from vlmsae.utils.io import atomic_write_json, atomic_write_text
from vlmsae.utils.provenance import write_run_info

log = logging.getLogger(__name__)

IMAGE_SOURCES = ("images", "folder", "wds", "list", "synthetic")


def parse_tokens(tokens: str | None, tokens_k: int = 2) -> tuple[str, int]:
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


@dataclass(frozen=True)
class TrainSource:
    """What a run trains on: a store (``source="acts"``) or an image source, its width, layer and tokens."""

    source: str
    d: int
    model: str | None  # the model the rows come from (a store's own record wins)
    pretrained: str | None
    layer: Any  # resolved block index or "last"
    tokens: str | None
    tokens_k: int | None  # random_k's tokens per image, else None
    manifest: dict[str, Any]  # the store's manifest (image sources: the same keys, made up)
    acts_dpath: str | None = None
    n_shards: int | None = None


def resolve_train_source(
    data: DataSchema, model: ModelSpec, layer: Any, tokens: str | None, tokens_k: int
) -> TrainSource:
    """The store (or image source) ``data`` names, checked against ``model``, ``layer`` and ``tokens``.

    With a store, ``layer``/``tokens`` default to its manifest and a set ``layer`` must match it (so a
    layer sweep whose ``data.acts`` forgot the ``${layer}`` interpolation fails instead of training four
    times on one layer). With image sources the activations are computed at ``layer`` (None: n_layers - 2).
    """
    if data.source == "acts":
        acts_dpath, manifest, shard_fpaths = open_store(data.acts)
        d = int(manifest.d)
        store_layer = manifest.layer
        if layer is not None:
            layer = resolve_layer(layer, model.n_layers, model.name)  # -2 -> 22
        if layer is not None and store_layer is not None and not _same_layer(layer, store_layer):
            raise ValueError(
                f"layer={layer} but the activation store {acts_dpath} holds layer {store_layer}: point data.acts at "
                "that layer's store (for a sweep over layers: data.acts='/acts/layer${layer}') or drop the layer "
                "override"
            )
        if tokens is not None and manifest.tokens is not None and str(tokens) != str(manifest.tokens):
            log.warning(
                "tokens=%s but the store was extracted with tokens=%s: using the store's", tokens, manifest.tokens
            )
        layer = store_layer if store_layer is not None else layer
        width_name = "embed_dim" if _same_layer(layer, "last") else "width"
        expected = getattr(model, width_name)
        if expected is not None and int(expected) != d:
            raise ValueError(
                f"width mismatch: the activation store {acts_dpath} has d={d} (model {manifest.model!r}, "
                f"layer {store_layer}) but model={model.name} has {width_name} {expected}: pass the model the store "
                "was extracted with (model=...), or the matching store"
            )
        if manifest.model not in (None, model.name):
            log.warning(
                "model=%s but the store was extracted from %s: the SAE records the store's model",
                model.name,
                manifest.model,
            )
        return TrainSource(
            source="acts",
            d=d,
            acts_dpath=str(acts_dpath),
            manifest=manifest,
            n_shards=len(shard_fpaths),
            # a store that names its model also names its pretrained weights (None included)
            model=manifest.model if manifest.model is not None else model.name,
            pretrained=manifest.pretrained if manifest.model is not None else model.pretrained,
            layer=layer,
            tokens=manifest.tokens if manifest.tokens is not None else tokens,
            tokens_k=manifest.k,
        )
    if data.source in IMAGE_SOURCES:
        layer = resolve_layer(layer if layer is not None else model.n_layers - 2, model.n_layers, model.name)
        d = int(model.embed_dim if layer == "last" else model.width)
        selection, k = parse_tokens(tokens, tokens_k)
        return TrainSource(
            source=data.source,
            d=d,
            model=model.name,
            pretrained=model.pretrained,
            layer=layer,
            tokens=selection,
            tokens_k=k if selection == "random_k" else None,
            manifest=StoreManifest(model=model.name, layer=layer, d=d, tokens=selection),
        )
    raise ValueError(
        f"data.source={data.source!r} cannot feed training: use data=acts (a store) or data=images / data=tiny"
    )


def build_datamodule(source: TrainSource, data: DataSchema, model: ModelSpec, val_batches: int, seed: int):
    """The Lightning datamodule: rows streamed from the store, or computed from images on the fly."""
    stream = StreamConfig(
        batch_size=int(data.batch_size),
        shuffle_buffer=int(data.shuffle_buffer),
        num_workers=int(data.num_workers),
        val_fraction=float(data.val_fraction),
        val_batches=int(val_batches),
        seed=int(seed) + int(data.seed),
    )
    if source.source == "acts":
        return ActsDataModule(source.acts_dpath, stream)
    image_source = data.image_source if source.source == "images" else source.source
    image_kwargs: dict[str, Any] = {"source": image_source, "root": data.root}
    if data.max_images is not None:
        image_kwargs["max_images"] = data.max_images
    if image_source == "synthetic":  # the same generated images the extract job uses for these options
        image_kwargs["synthetic"] = synthetic_options(image_source, data.n_per_class, data.size, data.seed)
    tokens, k_tokens = parse_tokens(source.tokens, source.tokens_k or 2)
    period = image_holdout_every(image_kwargs, tokens, k_tokens, model, stream)  # held-out images
    per_forward = int(data.images_per_forward)  # images per encoder forward
    common = dict(
        model_spec=model,
        image_kwargs=image_kwargs,
        layer=source.layer,
        tokens=tokens,
        k_tokens=k_tokens,
        images_per_forward=per_forward,
        seed=stream.seed,
        holdout_every=period,
    )
    return ImageActsDataModule(
        ImageChunkMaker(split="train", **common),
        ImageChunkMaker(split="val", **common),
        source.d,
        stream,
        source.manifest,
    )


def build_logger(
    lg: LoggerSchema,
    out_dpath: Path,
    resume_ckpt: Path | None,
    config: dict,
    *,
    history: Path | None = None,
    name: str | None = None,
    **wandb_kwargs,
):
    """Lightning logger(s) for ``lg.kind`` (none | csv | wandb: W&B plus a CSV mirror) and the W&B run id.

    ``history``: the folder with the resumed run's ``csv/`` and ``wandb_id.txt`` (default: the checkpoint's run dir);
    ``name`` and ``wandb_kwargs`` (e.g. ``group``, ``reinit``) go to the W&B run (vlmsae.lit.many: one run per SAE).
    """
    if lg.kind == "none":
        return False, None
    if history is None and resume_ckpt is not None:
        history = history_dpath(resume_ckpt)
    # On resume metrics.csv continues the checkpoint's run's history (RestoreLogHistory trims it).
    history_fpath = history / "csv" / "metrics.csv" if history is not None else None
    csv_logger = ResumableCSVLogger(save_dir=str(out_dpath), name="csv", version="", history_fpath=history_fpath)
    if lg.kind == "csv":
        return csv_logger, None
    if lg.kind == "wandb":
        import uuid

        from lightning.pytorch.loggers import WandbLogger

        run_id = None
        if history is not None:
            id_fpath = history / "wandb_id.txt"
            if id_fpath.is_file():
                run_id = id_fpath.read_text().strip()
        run_id = run_id or uuid.uuid4().hex[:8]  # W&B run ids: 8 lowercase alphanumerics
        mode = os.environ.get("WANDB_MODE") or lg.mode
        if name is None:
            name = (
                out_dpath.name if not out_dpath.name.startswith("job_") else f"{out_dpath.parent.name}/{out_dpath.name}"
            )
        wandb_kwargs.setdefault("group", lg.group)
        logger = WandbLogger(
            project=lg.project,
            entity=lg.entity,
            tags=list(lg.tags or []),
            save_dir=str(out_dpath),
            name=name,
            id=run_id,
            resume="allow",
            mode=mode,
            config=config,
            **wandb_kwargs,
        )
        # csv/metrics.csv mirrors the scalars: written at every log, it survives kill -9 (W&B's offline
        # log is flushed every 15 s), and a resumed offline run replays it (vlmsae.lit.loggers).
        return [logger, csv_logger], run_id
    raise ValueError(f"logger.kind={lg.kind!r}: use none, csv or wandb")


@dataclass(frozen=True)
class FitPlan:
    """Everything :func:`fit_sae` needs, typed; ``config`` (the resolved job config) goes to run_info.json and W&B."""

    model: ModelSpec
    source: TrainSource
    sae_config: dict[str, Any]  # vlmsae.sae.SAEConfig.to_dict()
    data: DataSchema
    trainer: TrainerSchema
    logger: LoggerSchema
    seed: int
    resume_ckpt: Path | None
    config: dict[str, Any]


def fit_sae(plan: FitPlan, out_dpath: Path, callbacks: list | None = None) -> dict[str, Any]:
    """Train the SAE ``plan`` describes into ``out_dpath``; returns the final validation metrics.

    ``callbacks``: extra Lightning callbacks (tests use them to interrupt a run or record steps).
    """
    import lightning as L
    from lightning.pytorch.utilities import rank_zero_only

    # Manual optimisation checkpoints hold the state after the step: exactly what resume needs.
    warnings.filterwarnings("ignore", message=".*pre-optimization state.*")
    warnings.filterwarnings("ignore", message=".*litlogger.*")
    warnings.filterwarnings("ignore", message=".*dirpath has changed from.*")  # resume writes to the new run dir
    t, config, sae_config, resume_ckpt = plan.trainer, plan.config, plan.sae_config, plan.resume_ckpt
    lr = float(t.lr) if t.lr is not None else default_lr(sae_config["n_latents"])
    resumed_from = str(resume_ckpt) if resume_ckpt else None
    is_rank_zero = rank_zero_only.rank == 0  # DDP: every rank runs this function; one writes the files
    if is_rank_zero:
        write_run_info(out_dpath, config, status="running", resumed_from=resumed_from, sae_config=sae_config, lr=lr)

    L.seed_everything(plan.seed, workers=True, verbose=False)
    datamodule = build_datamodule(plan.source, plan.data, plan.model, t.limit_val_batches, plan.seed)
    module = SAELitModule(
        sae_config,
        lr=lr,
        warmup_steps=int(t.warmup_steps),
        grad_clip=float(t.gradient_clip_val),
        log_every_n_steps=int(t.log_every_n_steps),
        seed=plan.seed,
    )
    logger, wandb_id = build_logger(plan.logger, out_dpath, resume_ckpt, config)
    if wandb_id and is_rank_zero:
        atomic_write_text(out_dpath / "wandb_id.txt", wandb_id)  # resume=true continues this W&B run

    callbacks = list(callbacks or [])
    if resume_ckpt is not None and logger:
        # The killed run logged steps past its checkpoint: keep its history up to there, then continue it.
        callbacks.append(RestoreLogHistory(history_dpath(resume_ckpt), wandb_id=wandb_id))

    trainer, checkpoint, ckpt_dpath = build_trainer(t, logger, callbacks, out_dpath)
    init = {}
    try:
        if resume_ckpt is None:
            # b_dec and the input scale come from the data before step 0 (they are in the checkpoint on resume).
            n_init = max(1, int(t.scale_batches))
            from tqdm import tqdm

            batches = tqdm(
                datamodule.first_batches(n_init),
                total=n_init,
                desc="input scale + b_dec init",
                unit="batch",
                disable=not (is_rank_zero and bool(t.enable_progress_bar)),
            )
            init = module.init_from_batches(batches)
            log.info("input scale %.4g from %d rows", init["input_scale"], init["init_rows"])
        else:
            log.info("resuming from %s", resume_ckpt)
        fit_to_end(trainer, module, datamodule, resumed_from, checkpoint, ckpt_dpath)
    except NonFiniteLossError as err:
        if trainer.is_global_zero:
            write_run_info(out_dpath, config, status="failed", error=str(err), sae_config=sae_config, lr=lr)
        raise
    finally:
        if any(type(lg).__name__ == "WandbLogger" for lg in trainer.loggers):
            import wandb

            wandb.finish()  # one W&B run per job: a multirun starts the next job with a fresh run

    metrics = {k: v for k, v in module.val_metrics.items() if k != "density_hist"}
    metrics.update(
        {
            "step": int(trainer.global_step),
            "optimizer_steps": adam_steps(trainer.optimizers[0]) if trainer.optimizers else -1,
            "lr": lr,
            "n_latents": sae_config["n_latents"],
            "k": sae_config["k"],
            "arch": sae_config["arch"],
            "layer": plan.source.layer,
            "input_scale": float(module.sae.input_scale),
        }
    )
    if trainer.is_global_zero:
        source = training_source(plan, int(trainer.global_step))
        module.sae.cpu()
        save_sae(module.sae, out_dpath / "sae", source=source)
        atomic_write_json(out_dpath / "metrics.json", metrics)
        atomic_write_json(out_dpath / "latent_density.json", module.val_metrics.get("density_hist", {}))
        write_run_info(
            out_dpath,
            config,
            status="done",
            resumed_from=resumed_from,
            sae_config=sae_config,
            lr=lr,
            metrics=metrics,
            init=init,
        )
        write_run_info(out_dpath / "sae", config, metrics=metrics)
        log.info(
            "SAE saved to %s (held-out validation fve %.3f over %d rows, l0 %.1f, step %d)",
            out_dpath / "sae",
            metrics.get("fve", math.nan),
            metrics.get("n_val_rows", 0),
            metrics.get("l0", math.nan),
            metrics["step"],
        )
    return metrics


def check_accelerator(accelerator: str) -> None:
    """A ValueError naming the fix when ``trainer.accelerator`` asks for a GPU that this machine does not show."""
    import torch

    wants = str(accelerator).lower()
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if (wants == "cuda" and not torch.cuda.is_available()) or (
        wants == "gpu" and not (torch.cuda.is_available() or mps)
    ):
        raise ValueError(
            f"trainer.accelerator={accelerator} but no GPU is visible to torch (torch.cuda.is_available() is False; "
            "check the driver and CUDA_VISIBLE_DEVICES): train on the CPU with trainer=cpu"
        )


def build_trainer(t: TrainerSchema, logger, callbacks: list, out_dpath: Path):
    """The Lightning trainer of a training run, its checkpoint callback and checkpoint folder."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    ckpt_dpath = out_dpath / "checkpoints"
    checkpoint = ModelCheckpoint(
        dirpath=str(ckpt_dpath),
        filename="step{step:07d}",
        auto_insert_metric_name=False,
        every_n_train_steps=int(t.checkpoint_every_n_steps),
        save_top_k=1,
        monitor=None,
        save_last="link",
        save_on_train_epoch_end=False,
    )
    trainer = L.Trainer(
        accelerator=t.accelerator,
        devices=t.devices,
        strategy=t.strategy,
        num_nodes=int(t.num_nodes),
        precision=t.precision,
        max_steps=int(t.max_steps),
        max_epochs=-1,
        val_check_interval=int(t.val_check_interval),
        check_val_every_n_epoch=None,
        limit_val_batches=int(t.limit_val_batches),
        log_every_n_steps=int(t.log_every_n_steps),
        enable_progress_bar=bool(t.enable_progress_bar),
        enable_model_summary=False,
        num_sanity_val_steps=0,
        logger=logger,
        callbacks=[checkpoint, *callbacks],
        default_root_dir=str(out_dpath),
        use_distributed_sampler=False,
    )
    return trainer, checkpoint, ckpt_dpath


def fit_to_end(trainer, module, datamodule, resumed_from: Any, checkpoint, ckpt_dpath: Path) -> None:
    """``trainer.fit`` (from ``resumed_from``, or fresh when None), then the end checkpoint and a last
    validation; an interrupted fit raises instead, so no half-trained SAE is saved as final."""
    trainer.fit(module, datamodule=datamodule, ckpt_path=resumed_from)
    if trainer.interrupted:
        raise KeyboardInterrupt(f"training interrupted at step {trainer.global_step}; resume with resume=true")
    final_checkpoint(trainer, checkpoint, ckpt_dpath)
    trainer.validate(module, datamodule=datamodule, verbose=False)


def final_checkpoint(trainer, checkpoint, ckpt_dpath: Path) -> None:
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


def adam_steps(optimizer) -> int:
    """Optimizer steps recorded in Adam's state: equals the run's steps iff no step was repeated or lost."""
    try:
        steps = [int(s["step"]) for s in optimizer.state.values() if "step" in s]
    except AttributeError:
        return -1
    return max(steps) if steps else 0


def training_source(plan: FitPlan, step: int) -> dict[str, Any]:
    """What an SAE trained by ``plan`` read, for its checkpoint's ``source``: model, tap, data and how much."""
    src = plan.source
    return {
        "model": src.model,
        "pretrained": src.pretrained,
        "layer": src.layer,
        "tokens": src.tokens,
        "tokens_k": src.tokens_k,
        "data": src.acts_dpath or plan.data.root,
        "data_source": src.source,
        "train_steps": step,
        "train_rows": step * int(plan.data.batch_size),
    }

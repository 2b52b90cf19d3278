"""SAE training with Lightning, from typed inputs (the ``train`` job composes these): one SAE, or a grid of
SAEs trained in one pass over the data (``sae_grid=``); one SAE is a grid of one.

```python
rows = resolve_train_input(data, model_spec, layer=None, tokens=None, tokens_k=2)      # checked early
plan = FitPlan(model_spec, rows, sae.resolved(rows.d), data, trainer, logger, seed=0,
               resume_ckpt=find_resume_checkpoint(resume, out_dpath, config), config=config)
metrics = fit_sae(plan, out_dpath)                                                        # one SAE
metrics = fit_sae(plan, out_dpath, grid=resolve_grid(sae_grid, sae, rows.d, lr))          # a grid: {name: metrics}
```

Each SAE gets its folder (the run dir for one SAE, ``sae_<i>/`` for a grid's) with ``sae/``, ``metrics.json``,
``latent_density.json`` and its logger run; the run dir holds ``run_info.json`` and ``checkpoints/last.ckpt``
(every SAE and optimizer); a grid's ``metrics.json`` has every SAE's metrics by name (docs/outputs.md). On
resume each logger history is the checkpointed run's up to the checkpoint's step, then this run's
(:mod:`vlmsae.lit.loggers`). With the same seed and data order each grid SAE ends with exactly the weights a
separate run would; its logger run has a single run's metric names (:class:`OneSAELogger`), the W&B group
``logger.group`` (default: the pass's run dir name), and the job's config with its own ``sae``, ``trainer.lr``
and ``grid``. ``sae_devices`` places each grid SAE on a device (:func:`place_saes`).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.loggers.logger import Logger

from vlmsae.config.nodes import DataSchema, LoggerSchema, TrainerSchema, check_known
from vlmsae.data.images import synthetic_options
from vlmsae.data.store import open_store
from vlmsae.data.stream import StreamConfig
from vlmsae.formats import StoreManifest
from vlmsae.lit.datamodule import ActsDataModule, ImageActsDataModule, image_holdout_every
from vlmsae.lit.loggers import RestoreLogHistory, ResumableCSVLogger
from vlmsae.lit.module import NonFiniteLossError, SAELitModule
from vlmsae.lit.resume import history_dpath
from vlmsae.models.image_rows import ImageChunkMaker
from vlmsae.models.spec import ModelSpec, seed_decides_weights
from vlmsae.models.tap import resolve_layer
from vlmsae.sae import SAEConfig, default_lr, save_sae
from vlmsae.sae.mechanics import init_from_batches_
from vlmsae.utils.io import atomic_write_json, atomic_write_text
from vlmsae.utils.paths import run_name
from vlmsae.utils.provenance import write_run_info

log = logging.getLogger(__name__)

IMAGE_SOURCES = ("images", "folder", "wds", "list", "synthetic")


def parse_tokens(tokens: str | None, tokens_k: int = 2) -> tuple[str, int]:
    """(selection, k) for select_tokens: ``random_k`` takes ``tokens_k``; ``random_2`` is read as k = 2."""
    text = "cls" if tokens is None else str(tokens)
    if text.startswith("random_"):
        tail = text.removeprefix("random_")
        return "random_k", int(tail) if tail.isdigit() else int(tokens_k)
    return text, int(tokens_k)


def _same_layer(a, b) -> bool:
    return str(a).strip().lower() == str(b).strip().lower()


@dataclass(frozen=True)
class TrainInput:
    """What a run trains on: a store (``data_source="acts"``) or an image source, its width, layer and tokens."""

    data_source: str  # data.source: acts | images | synthetic
    d: int
    model: str | None  # the model the rows come from (a store's own record wins)
    pretrained: str | None
    layer: Any  # resolved block index or "last"
    tokens: str | None
    tokens_k: int | None  # random_k's tokens per image, else None
    manifest: dict[str, Any]  # the store's manifest (image sources: the same keys, made up)
    acts_dpath: str | None = None


def resolve_train_input(
    data: DataSchema, model: ModelSpec, layer: Any, tokens: str | None, tokens_k: int
) -> TrainInput:
    """The store (or image source) ``data`` names, checked against ``model``, ``layer`` and ``tokens``.

    With a store, ``layer``/``tokens`` default to its manifest and a set ``layer`` must match it (so a
    layer sweep whose ``data.acts`` forgot the ``${layer}`` interpolation fails instead of training four
    times on one layer). With image sources the activations are computed at ``layer`` (None: n_layers - 2).
    """
    if data.source == "acts":
        acts_dpath, manifest, _ = open_store(data.acts)
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
        return TrainInput(
            data_source="acts",
            d=d,
            acts_dpath=str(acts_dpath),
            manifest=manifest,
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
        return TrainInput(
            data_source=data.source,
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


def build_datamodule(rows: TrainInput, data: DataSchema, model: ModelSpec, seed: int):
    """The Lightning datamodule: rows streamed from the store, or computed from images on the fly."""
    stream = StreamConfig(
        batch_size=int(data.batch_size),
        shuffle_buffer=int(data.shuffle_buffer),
        num_workers=int(data.num_workers),
        val_fraction=float(data.val_fraction),
        seed=int(seed) + int(data.shuffle_seed),
    )
    if rows.data_source == "acts":
        return ActsDataModule(rows.acts_dpath, stream)
    image_source = data.image_source if rows.data_source == "images" else rows.data_source
    image_kwargs: dict[str, Any] = {"source": image_source, "root": data.root}
    if data.max_images is not None:
        image_kwargs["max_images"] = data.max_images
    if image_source == "synthetic":  # the same generated images the extract job uses for these options
        image_kwargs["synthetic"] = synthetic_options(image_source, data.n_per_class, data.size, data.synthetic_seed)
    tokens, k_tokens = parse_tokens(rows.tokens, rows.tokens_k or 2)
    period = image_holdout_every(image_kwargs, tokens, k_tokens, model, stream)  # held-out images
    common = dict(
        model_spec=model,
        image_kwargs=image_kwargs,
        layer=rows.layer,
        tokens=tokens,
        k_tokens=k_tokens,
        images_per_forward=int(data.images_per_forward),
        seed=stream.seed,
        holdout_every=period,
    )
    return ImageActsDataModule(
        ImageChunkMaker(split="train", **common),
        ImageChunkMaker(split="val", **common),
        rows.d,
        stream,
        rows.manifest,
    )


def build_logger(
    lg: LoggerSchema, out_dpath: Path, config: dict, history: Path | None, name: str | None = None, **wandb_kwargs
):
    """Lightning logger(s) for ``lg.kind`` (none | csv | wandb: W&B plus a CSV mirror) and the W&B run id.

    ``history``: the folder with the resumed run's ``csv/`` and ``wandb_id.txt`` (None: a fresh run);
    ``name`` and ``wandb_kwargs`` (e.g. ``group``, ``reinit``) go to the W&B run (a grid: one run per SAE).
    """
    if lg.kind == "none":
        return [], None
    # On resume metrics.csv continues the checkpoint's run's history (RestoreLogHistory trims it).
    history_fpath = history / "csv" / "metrics.csv" if history is not None else None
    csv_logger = ResumableCSVLogger(save_dir=str(out_dpath), name="csv", version="", history_fpath=history_fpath)
    if lg.kind == "csv":
        return [csv_logger], None
    if lg.kind == "wandb":
        import uuid

        from lightning.pytorch.loggers import WandbLogger

        id_fpath = history / "wandb_id.txt" if history is not None else None
        run_id = id_fpath.read_text().strip() if id_fpath is not None and id_fpath.is_file() else None
        run_id = run_id or uuid.uuid4().hex[:8]  # W&B run ids: 8 lowercase alphanumerics
        wandb_kwargs.setdefault("group", lg.group)
        logger = WandbLogger(
            project=lg.project,
            entity=lg.entity,
            tags=list(lg.tags or []),
            save_dir=str(out_dpath),
            name=name or run_name(out_dpath),
            id=run_id,
            resume="allow",
            mode=os.environ.get("WANDB_MODE") or lg.mode,
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
    rows: TrainInput
    sae_config: SAEConfig  # resolved for the rows' width (d_in, n_latents set)
    data: DataSchema
    trainer: TrainerSchema
    logger: LoggerSchema
    seed: int
    resume_ckpt: Path | None
    config: dict[str, Any]


@dataclass(frozen=True)
class GridSAE:
    """One SAE of a grid: its folder name, the overrides it came from, resolved config and learning rate."""

    name: str
    overrides: dict[str, Any]
    sae_config: SAEConfig  # resolved
    lr: float
    sae_node: SAEConfig  # the job's sae node with this entry's overrides, unresolved (its logger run's config)


def resolve_grid(grid: Any, sae: SAEConfig, d_in: int, lr: float | None) -> list[GridSAE]:
    """``sae_grid`` (a list of overrides of the ``sae`` node ``sae``, each with an optional ``lr``) as resolved
    SAEs."""
    if not isinstance(grid, (list, tuple)) or not grid or not all(isinstance(e, dict) for e in grid):
        raise ValueError(
            f"sae_grid={grid!r}: expected a non-empty list of overrides of the sae node, e.g. "
            "sae_grid='[{expansion:4,k:8},{expansion:8,k:8,arch:topk,lr:1e-4}]'"
        )
    out = []
    for i, entry in enumerate(grid):
        overrides = dict(entry)
        entry_lr = overrides.pop("lr", None)
        if "expansion" in overrides and "n_latents" not in overrides:
            overrides["n_latents"] = None  # a grid expansion wins over the node's explicit width
        try:
            check_known(SAEConfig, overrides)
            node = dataclasses.replace(sae, **overrides)
            cfg = node.resolved(d_in)
        except (ValueError, TypeError) as err:
            raise ValueError(f"sae_grid entry {i} {dict(entry)}: {err}") from err
        lr_i = entry_lr if entry_lr is not None else lr
        out.append(GridSAE(f"sae_{i}", dict(entry), cfg, _lr(lr_i, cfg.n_latents), node))
    return out


def _lr(lr: float | None, n_latents: int) -> float:
    return float(lr) if lr is not None else default_lr(n_latents)  # METHOD §2: 2e-4 / sqrt(F / 2^14)


def place_saes(n_saes: int, sae_devices: Any, n_cuda: int) -> list[str]:
    """The device of each of ``n_saes`` SAEs: ``auto`` = round-robin over ``n_cuda`` CUDA devices (CPU when 0),
    or a list with one entry per SAE (an int or ``cuda:<i>`` = that CUDA device, ``cpu``).

    ``n_cuda``: for ``auto``, the CUDA devices the trainer may use (0 when it runs on CPU); for a list, the
    visible ones (an index past them fails, naming it).
    """
    if sae_devices in (None, "auto"):
        return [f"cuda:{i % n_cuda}" if n_cuda else "cpu" for i in range(n_saes)]
    if not isinstance(sae_devices, (list, tuple)) or len(sae_devices) != n_saes:
        raise ValueError(
            f"sae_devices={sae_devices!r}: expected auto or a list of {n_saes} devices (one per sae_grid entry), "
            "e.g. sae_devices='[0,1]' or sae_devices='[cuda:0,cpu]'"
        )
    out = []
    for i, dev in enumerate(sae_devices):
        text = str(dev).strip().lower()
        if text == "cpu":
            out.append("cpu")
            continue
        index = text.removeprefix("cuda:").removeprefix("gpu:")
        if not index.isdigit():
            raise ValueError(f"sae_devices[{i}]={dev!r}: expected cpu, a CUDA index (0) or cuda:<index>")
        if int(index) >= n_cuda:
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            raise ValueError(
                f"sae_devices[{i}]={dev!r}: there is no CUDA device {index} ({n_cuda} visible"
                f"{', CUDA_VISIBLE_DEVICES=' + repr(visible) if visible is not None else ''}); "
                f"use an index below {n_cuda}, cpu, or sae_devices=auto"
            )
        out.append(f"cuda:{int(index)}")
    return out


class OneSAELogger(Logger):
    """Forwards one grid SAE's metrics (``sae_<i>/...``, prefix stripped) and the shared ones (``epoch``) to
    that SAE's own logger; the hyperparameters are not forwarded (the run's config was set at its creation)."""

    def __init__(self, name: str, inner: Logger):
        super().__init__()
        self.sae_name, self.prefix, self.inner = name, f"{name}/", inner

    @property
    def name(self):
        return self.inner.name

    @property
    def version(self):
        return self.inner.version

    @property
    def save_dir(self):
        return self.inner.save_dir

    @property
    def log_dir(self):
        return getattr(self.inner, "log_dir", self.inner.save_dir)

    @property
    def experiment(self):
        return self.inner.experiment

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        own = {k[len(self.prefix) :]: v for k, v in metrics.items() if k.startswith(self.prefix)}
        if own:
            own.update({k: v for k, v in metrics.items() if "/" not in k})
            self.inner.log_metrics(own, step)

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass  # the module's hyperparameters list every SAE; each run's config is its own SAE's

    def save(self) -> None:
        self.inner.save()

    def finalize(self, status: str) -> None:
        self.inner.finalize(status)

    def after_save_checkpoint(self, checkpoint_callback) -> None:
        self.inner.after_save_checkpoint(checkpoint_callback)


def fit_sae(
    plan: FitPlan,
    out_dpath: Path,
    callbacks: list | None = None,
    grid: list[GridSAE] | None = None,
    sae_devices: Any = "auto",
) -> dict[str, Any]:
    """Train the SAE ``plan`` describes, or every SAE of ``grid`` in one pass over ``plan``'s data, into
    ``out_dpath``; returns the final validation metrics (a grid: {name: metrics}).

    ``callbacks``: extra Lightning callbacks (tests use them to interrupt a run or record steps).
    ``sae_devices``: where each grid SAE trains (:func:`place_saes`).
    """
    import lightning as L
    from lightning.pytorch.utilities import rank_zero_only
    from tqdm import tqdm

    # Manual optimisation checkpoints hold the state after the step (exactly what resume needs); resume writes
    # to the new run dir.
    warnings.filterwarnings("ignore", message=".*(pre-optimization state|litlogger|dirpath has changed from).*")
    t, config, resume_ckpt = plan.trainer, plan.config, plan.resume_ckpt
    single = grid is None
    if single:  # a grid of one, in the run dir itself
        grid = [GridSAE("", {}, plan.sae_config, _lr(t.lr, plan.sae_config.n_latents), plan.sae_config)]
    devices = None if single else _grid_devices(t, len(grid), sae_devices)
    run_extra = {"sae_config": plan.sae_config.to_dict(), "lr": grid[0].lr} if single else {}  # its run_info.json
    resumed_from = str(resume_ckpt) if resume_ckpt else None
    is_rank_zero = rank_zero_only.rank == 0  # DDP: every rank runs this function; one writes the files
    if is_rank_zero:
        write_run_info(out_dpath, config, status="running", resumed_from=resumed_from, **run_extra)

    L.seed_everything(plan.seed, workers=True, verbose=False)
    datamodule = build_datamodule(plan.rows, plan.data, plan.model, plan.seed)
    module = SAELitModule(
        [g.sae_config for g in grid],
        [g.lr for g in grid],
        [g.name for g in grid],
        warmup_steps=int(t.warmup_steps),
        grad_clip=float(t.gradient_clip_val),
        log_every_n_steps=int(t.log_every_n_steps),
        seed=plan.seed,
        devices=devices,
    )
    logger, restores, inner = _sae_loggers(plan, grid, out_dpath, is_rank_zero)
    trainer, checkpoint, ckpt_dpath = build_trainer(t, logger, [*(callbacks or []), *restores], out_dpath)
    inits = []
    try:
        if resume_ckpt is None:
            # b_dec and the input scale come from the data before step 0 (they are in the checkpoint on resume);
            # each SAE reads the same first batches a separate run would.
            n_init = max(1, int(t.scale_batches))
            for g, sae in zip(grid, module.saes):
                batches = tqdm(
                    datamodule.first_batches(n_init),
                    total=n_init,
                    desc=f"input scale + b_dec init {g.name}".strip(),
                    unit="batch",
                    disable=not (is_rank_zero and bool(t.enable_progress_bar)),
                )
                inits.append(init_from_batches_(sae, batches))
                log.info("%s input scale %.4g from %d rows", g.name or "SAE", *inits[-1].values())
        else:
            log.info("resuming from %s", resume_ckpt)
        fit_to_end(trainer, module, datamodule, resumed_from, checkpoint, ckpt_dpath)
    except NonFiniteLossError as err:
        if trainer.is_global_zero:
            write_run_info(out_dpath, config, status="failed", error=str(err), **run_extra)
        raise
    finally:
        for lg in inner:  # each W&B run: one per SAE (a grid's live at once), and a multirun's next job starts afresh
            if type(lg).__name__ == "WandbLogger" and lg._experiment is not None:
                lg._experiment.finish()
    if single:
        run_extra["init"] = inits[0] if inits else {}
    return _write_outputs(plan, grid, module, trainer, out_dpath, resumed_from, run_extra)


def _grid_devices(t: TrainerSchema, n_saes: int, sae_devices: Any) -> list[str]:
    """The device of each grid SAE; a grid trains in one process on one trainer device."""
    if int(t.num_nodes) != 1 or str(t.devices) != "1":
        raise ValueError(
            f"sae_grid trains on one device; got trainer.devices={t.devices}, num_nodes={t.num_nodes}: "
            "use trainer.devices=1 (or a multirun of single SAEs to spread over GPUs)"
        )
    on_gpu = t.accelerator in ("gpu", "cuda") or (t.accelerator == "auto" and torch.cuda.is_available())
    n_cuda = torch.cuda.device_count() if on_gpu or sae_devices not in (None, "auto") else 0
    devices = place_saes(n_saes, sae_devices, n_cuda)
    log.info("sae_grid devices: %s", devices)
    return devices


def _sae_loggers(plan: FitPlan, grid: list[GridSAE], out_dpath: Path, is_rank_zero: bool = True):
    """One logger run per SAE in its folder: (the trainer's loggers, the resume callbacks, the SAEs' own loggers)."""
    if plan.logger.kind == "none":
        return False, [], []
    group = plan.logger.group or run_name(out_dpath)
    wrapped, restores, inner = [], [], []
    for i, g in enumerate(grid):
        history = history_dpath(plan.resume_ckpt) / g.name if plan.resume_ckpt is not None else None
        if g.name:  # a grid SAE: one W&B run each, several alive in this process at once
            label = ",".join(f"{k}={v}" for k, v in g.overrides.items())
            run = dict(name=f"{run_name(out_dpath)}/{g.name} ({label})", group=group, reinit="create_new")
            run_config = sae_run_config(plan.config, g, i, group)
        else:
            run, run_config = {}, plan.config
        loggers, wandb_id = build_logger(plan.logger, out_dpath / g.name, run_config, history, **run)
        if wandb_id and is_rank_zero:
            atomic_write_text(out_dpath / g.name / "wandb_id.txt", wandb_id)  # resume continues this W&B run
        if history is not None:  # the killed run logged steps past its checkpoint: keep them up to there
            restores.append(RestoreLogHistory(history, wandb_id=wandb_id, loggers=loggers))
        wrapped += [OneSAELogger(g.name, lg) for lg in loggers] if g.name else loggers
        inner += loggers
    return wrapped, restores, inner


def sae_run_config(config: dict[str, Any], g: GridSAE, index: int, group: str) -> dict[str, Any]:
    """The config of one grid SAE's logger run: the job's, with ``sae`` and ``trainer.lr`` as this SAE's."""
    out = copy.deepcopy(config)
    out["sae"] = g.sae_node.to_dict()
    out["trainer"] = {**out.get("trainer", {}), "lr": g.lr}
    out["grid"] = {"name": g.name, "index": index, "group": group, "overrides": dict(g.overrides)}
    return out


def _write_outputs(plan, grid, module, trainer, out_dpath: Path, resumed_from, run_extra: dict) -> dict[str, Any]:
    """Each SAE's checkpoint, metrics and density into its folder, then the run's run_info.json (rank 0)."""
    step = int(trainer.global_step)
    results = {}
    optimizers = trainer.optimizers or [None] * len(grid)
    for g, sae, record, optimizer in zip(grid, module.saes, module.val_metrics, optimizers):
        results[g.name] = {
            **{k: v for k, v in record.items() if k != "density_hist"},
            "step": step,
            "optimizer_steps": adam_steps(optimizer),
            "lr": g.lr,
            "n_latents": g.sae_config.n_latents,
            "k": g.sae_config.k,
            "arch": g.sae_config.arch,
            "layer": plan.rows.layer,
            "input_scale": float(sae.input_scale),
            **({"overrides": g.overrides} if g.name else {}),
        }
    summary = results.get("", results)  # one SAE: its metrics
    if not trainer.is_global_zero:
        return summary
    trained_on = trained_on_record(plan, step)
    for g, sae, record in zip(grid, module.saes, module.val_metrics):
        sae_dpath, metrics = out_dpath / g.name, results[g.name]
        sae.cpu()
        save_sae(sae, sae_dpath / "sae", trained_on=trained_on)
        atomic_write_json(sae_dpath / "metrics.json", metrics)
        atomic_write_json(sae_dpath / "latent_density.json", record.get("density_hist", {}))
        write_run_info(sae_dpath / "sae", plan.config, metrics=metrics, sae_config=g.sae_config.to_dict(), lr=g.lr)
        log.info(
            "SAE saved to %s (held-out validation fve %.3f over %d rows, l0 %.1f, step %d)",
            sae_dpath / "sae",
            metrics.get("fve", math.nan),
            metrics.get("n_val_rows", 0),
            metrics.get("l0", math.nan),
            step,
        )
    if summary is results:
        atomic_write_json(out_dpath / "metrics.json", results)
    write_run_info(out_dpath, plan.config, status="done", resumed_from=resumed_from, metrics=summary, **run_extra)
    return summary


def check_accelerator(accelerator: str) -> None:
    """A ValueError naming the fix when ``trainer.accelerator`` asks for a GPU that this machine does not show."""
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


def trained_on_record(plan: FitPlan, step: int) -> dict[str, Any]:
    """What an SAE trained by ``plan`` read, for its checkpoint's ``trained_on``: model, tap, data and how much."""
    src = plan.rows
    return {
        "model": src.model,
        "pretrained": src.pretrained,
        "model_seed": _model_seed(plan),
        "layer": src.layer,
        "tokens": src.tokens,
        "tokens_k": src.tokens_k,
        "data": src.acts_dpath or plan.data.root,
        "data_source": src.data_source,
        "train_steps": step,
        "train_rows": step * int(plan.data.batch_size),
    }


def _model_seed(plan: FitPlan) -> int | None:
    """The seed of the random model the rows come from (None: loaded weights), so jobs rebuild that network."""
    if plan.rows.acts_dpath is not None:  # a store: its manifest says (extraction records model_seed)
        return (plan.rows.manifest.extra or {}).get("model_seed")
    return plan.model.seed if seed_decides_weights(plan.model) else None

"""One logger for every job that is not ``train``: headline figures, plots and tables of a finished job.

Every job (``extract``, ``monosemanticity``, ``hierarchy``, ``steer``, ``steer_eval``, ...) has the
``logger`` group train has (``conf/logger/{none,csv,wandb}.yaml``, :class:`vlmsae.config.nodes.LoggerSchema`)
and logs AFTER its own files are written, so a logging failure never costs an output:

    log_job(job, "monosemanticity", out_dpath, result, sae_path=sae_dpath)   # one line in a job's run()

or, for a job that picks what to log itself (the API is these five calls):

    with JobLog.open(job.logger, job="stability", out_dpath=out, config=job, sae_path=p) as jl:
        jl.summary({"stability/mean": 0.8})             # headline numbers (nested dicts -> "a/b" keys)
        jl.image("ms_hist", out / "ms_hist.png")         # a plot the job wrote
        jl.table("latents", rows_or_csv_fpath, image_columns=("top_0",), max_rows=2000)
    # finish() on leaving the block (also on an error)

What each logger kind writes (``none``: nothing; ``csv``: ``<run>/csv/summary.json`` and tables given as rows as
``<run>/csv/<name>.csv``; ``wandb``: those, plus one W&B run joined to the SAE's training run) is in
docs/wandb.md, "Dashboards". If W&B cannot start a run the job fails AFTER writing its outputs, with
:class:`JobLogError` saying to rerun with ``logger.mode=offline``.

Under torchrun only rank 0 logs.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from vlmsae import formats
from vlmsae.config import to_typed
from vlmsae.config.nodes import LoggerSchema
from vlmsae.utils.io import atomic_write_json, write_csv_rows
from vlmsae.utils.paths import run_name

log = logging.getLogger(__name__)

CSV_DIR = "csv"  # as train's csv logger: <run>/csv/
SUMMARY_JSON = "summary.json"
THUMB_PX = 96  # table thumbnails: the longer side in pixels
TABLE_IMAGES = 4  # top images shown per latent in the latents table
KINDS = ("none", "csv", "wandb")


class JobLogError(RuntimeError):
    """W&B could not start (or finish) the job's run; the job's own files are already written."""


def _plain(config: Any) -> dict[str, Any]:
    if config is None:
        return {}
    if isinstance(config, Mapping) and not hasattr(config, "_metadata"):
        return dict(config)
    if dataclasses.is_dataclass(config):  # a job's typed config
        return json.loads(json.dumps(dataclasses.asdict(config), default=str))
    from omegaconf import OmegaConf

    return OmegaConf.to_container(config, resolve=True)


def flatten(values: Mapping[str, Any], prefix: str = "", sep: str = "/") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a/b": 1}``: the keys W&B groups into panels by their first part."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, name + sep, sep))
        else:
            out[name] = value
    return out


def training_run(sae_path: str | Path | None) -> dict[str, Any]:
    """What is known of the run that trained the SAE at ``sae_path``: ``sae`` (its config.json), ``train`` (the
    training run's config from ``<run>/run_info.json``), ``wandb_id`` (``<run>/wandb_id.txt``) and ``name``
    (the training run's W&B run name). Empty for an SAE from elsewhere (hf://, another library's format)."""
    if not sae_path or "://" in str(sae_path):
        return {}
    sae_dpath = Path(os.path.expanduser(str(sae_path)))
    out: dict[str, Any] = {}
    try:
        out["sae"] = formats.read_sae_config(sae_dpath).to_dict()
    except (OSError, ValueError):
        return {}  # not a vlmsae checkpoint: nothing to link
    run_dpath = sae_dpath.parent  # a training run keeps its SAE in <run>/sae/
    if (run_dpath / formats.RUN_INFO_JSON).is_file():
        try:
            out["train"] = formats.read_run_info(run_dpath).config
        except (OSError, ValueError) as err:
            log.warning("job log: cannot read the training run's run_info.json (%s); logged without it", err)
        out["name"] = run_name(run_dpath)
    id_fpath = run_dpath / "wandb_id.txt"
    if id_fpath.is_file():
        out["wandb_id"] = id_fpath.read_text(encoding="utf-8").strip()
    return out


class JobLog:
    """The logger run of one job; make it with :meth:`open` (a context manager: ``finish`` on leaving)."""

    def __init__(self, lg: LoggerSchema, job: str, out_dpath: Path, run: Any = None):
        self.logger, self.job, self.out_dpath, self.run = lg, job, Path(out_dpath), run
        self._summary: dict[str, Any] = {}

    @classmethod
    def open(
        cls,
        logger: Any,
        *,
        job: str,
        out_dpath: str | Path,
        config: Any = None,
        sae_path: str | Path | None = None,
    ) -> JobLog:
        """Start the job's logger run. ``logger``: the job's ``logger`` node (DictConfig, mapping or
        LoggerSchema); ``config``: the job's config (recorded by W&B); ``sae_path``: the SAE the job read (links
        the run to its training run). Raises :class:`JobLogError` if W&B cannot start."""
        lg = LoggerSchema(kind="none") if logger is None else to_typed(logger, LoggerSchema)
        if lg.kind not in KINDS:
            raise ValueError(f"logger.kind={lg.kind!r}: use logger=none, logger=csv or logger=wandb")
        if os.environ.get("RANK", "0") != "0":  # torchrun: one log per job
            lg = LoggerSchema(kind="none")
        out_dpath = Path(out_dpath)
        run = None
        mode = os.environ.get("WANDB_MODE") or lg.mode
        if lg.kind == "wandb" and mode != "disabled":
            run = init_wandb(lg, mode, job, out_dpath, _plain(config), training_run(sae_path))
        return cls(lg, job, out_dpath, run)

    # -------------------------------------------------------------------------------------------- the API
    def summary(self, values: Mapping[str, Any]) -> None:
        """Add headline figures (numbers; nested dicts become ``a/b`` keys) to the run summary."""
        flat = flatten(values)
        if self.logger.kind == "none" or not flat:
            return
        self._summary.update(flat)
        atomic_write_json(self.out_dpath / CSV_DIR / SUMMARY_JSON, self._summary)
        if self.run is not None:
            self.run.summary.update(flat)

    def image(self, name: str, png_fpath: str | Path) -> None:
        """Log a plot the job wrote (W&B: a ``wandb.Image`` under ``plots/<name>``; csv: the file is the log)."""
        if self.run is None or not Path(png_fpath).is_file():
            return
        import wandb

        self.run.log({f"plots/{name}": wandb.Image(str(png_fpath))})

    def table(
        self,
        name: str,
        rows_or_csv: str | Path | Sequence[Mapping[str, Any]],
        image_columns: Iterable[str] = (),
        max_rows: int | None = None,
    ) -> None:
        """Log a table: ``rows_or_csv`` is a CSV file or rows (dicts); cells of ``image_columns`` are image paths
        (W&B: thumbnails; empty cells stay empty). At most ``max_rows`` rows (default ``logger.table_rows``)."""
        if self.logger.kind == "none":
            return
        limit = self.logger.table_rows if max_rows is None else max_rows
        if isinstance(rows_or_csv, (str, Path)):
            with Path(rows_or_csv).open(newline="", encoding="utf-8") as fh:  # "#" lines: latents.csv's version
                rows = list(csv.DictReader(line for line in fh if not line.startswith("#")))
        else:
            rows = [dict(r) for r in rows_or_csv]
            if rows:
                write_csv_rows(self.out_dpath / CSV_DIR / f"{name}.csv", rows)
        if self.run is None or not rows:
            return
        import wandb

        if len(rows) > limit:
            log.info("job log: table %s keeps the first %d of %d rows (logger.table_rows)", name, limit, len(rows))
        columns = list(dict.fromkeys(c for row in rows for c in row))
        images = set(image_columns)
        data = [[_thumb(row.get(c)) if c in images else _cell(row.get(c)) for c in columns] for row in rows[:limit]]
        self.run.log({name: wandb.Table(columns=columns, data=data)})

    def finish(self, failed: bool = False) -> None:
        """End the W&B run (a no-op for csv and none); ``failed`` marks it as crashed."""
        if self.run is None:
            return
        run, self.run = self.run, None
        try:
            run.finish(exit_code=1 if failed else 0)
        except Exception as err:  # W&B's upload failing at the end: the outputs are all written
            raise JobLogError(f"W&B could not finish the {self.job} run ({type(err).__name__}: {err}).") from err

    def __enter__(self) -> JobLog:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.finish(failed=exc_type is not None)


def init_wandb(lg: LoggerSchema, mode: str, job: str, out_dpath: Path, config: dict, trained: dict) -> Any:
    """The W&B run of ``job`` (``trained``: :func:`training_run` of the SAE it read, which it joins), or
    :class:`JobLogError` saying how to log offline."""
    import wandb

    train_logger = (trained.get("train") or {}).get("logger") or {}
    project = lg.project
    if project == LoggerSchema().project and train_logger.get("kind") == "wandb" and train_logger.get("project"):
        project = train_logger["project"]  # the training run's project, unless logger.project says otherwise
    extra = {k: trained[k] for k in ("sae", "train") if k in trained}
    if "wandb_id" in trained:
        extra["train_wandb_id"] = trained["wandb_id"]
    try:
        return wandb.init(
            project=project,
            entity=lg.entity or train_logger.get("entity"),
            group=lg.group or train_logger.get("group") or trained.get("name"),
            job_type=job,
            name=run_name(out_dpath),
            tags=list(lg.tags or []),
            dir=str(out_dpath),
            mode=mode,
            config={**config, **extra},
            reinit="finish_previous",  # one run per job, also for in-process multiruns
        )
    except Exception as err:
        raise JobLogError(
            f"logger=wandb: W&B could not start a {mode} run in project {project!r} "
            f"({type(err).__name__}: {err}). The {job} outputs are all written in {out_dpath}; only the W&B run "
            "is missing. To log without network rerun with logger.mode=offline (or WANDB_MODE=offline) and upload "
            "later with `wandb sync <run dir>/wandb/offline-run-*`; logger=csv skips W&B."
        ) from err


def _cell(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def _thumb(value: Any) -> Any:
    """A W&B image of the file at ``value`` (a thumbnail: tables of thousands of images stay small)."""
    if not value or not Path(str(value)).is_file():
        return None
    import wandb
    from PIL import Image

    try:
        with Image.open(str(value)) as img:
            img = img.convert("RGB")
            img.thumbnail((THUMB_PX, THUMB_PX))
            return wandb.Image(img, caption=Path(str(value)).name)
    except OSError as err:
        log.warning("job log: thumbnail of %s skipped (%s)", value, err)
        return None


# ------------------------------------------------------------------------------------------------ per job
def _number(value: Any) -> float | int | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return value


def _pick(src: Mapping[str, Any] | None, keys: Iterable[str], prefix: str) -> dict[str, Any]:
    src = src or {}
    return {f"{prefix}/{k}": src[k] for k in keys if _number(src.get(k)) is not None}


def _ms_figures(result: Mapping[str, Any]) -> dict[str, Any]:
    stats = ("mean", "std", "min", "max", "dead", "n_latents", "n_images")
    return {
        **_pick(result, stats, "ms"),
        **_pick(result.get("baseline"), stats, "neurons"),  # the raw neurons of the same layer
        **_pick(result.get("reconstruction"), ("fve", "l0", "normalized_mse", "dead_fraction"), "recon"),
    }


def _hierarchy_figures(result: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for i, group in enumerate(result.get("groups") or []):
        out.update(_pick(group, ("depth_mean", "depth_std", "ms_mean", "n_scored"), f"group_{group.get('group', i)}"))
    return {**out, **_pick(result, ("n_latents", "n_scored", "n_images"), "hierarchy")}


def _slug(condition: str) -> str:
    """``"upper bound (true class names)"`` -> ``upper_bound``; ``"activation steering (add)"`` ->
    ``activation_steering``: short summary keys for the steering-score conditions."""
    return re.sub(r"[^a-z0-9]+", "_", condition.split(" (")[0].lower()).strip("_")


def _steer_eval_figures(result: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for condition, stats in (result.get("summary") or {}).items():
        out.update({f"score/{_slug(condition)}{'' if k == 'mean' else '_' + k}": v for k, v in stats.items()})
    return out


def _steer_figures(result: Mapping[str, Any]) -> dict[str, Any]:
    steered, baseline = result.get("steered") or [], result.get("baseline") or []
    changed = sum(s != b for s, b in zip(steered, baseline))
    latents = (result.get("settings") or {}).get("latents") or {}
    return {
        "steer/n_images": len(baseline),
        "steer/changed": changed,  # images whose answer steering changed
        "steer/changed_fraction": changed / len(baseline) if baseline else math.nan,
        "steer/n_latents": len(latents),
    }


def _numbers(prefix: str):
    """Every top-level number of a job's flat result, as ``<prefix>/<key>`` (the jobs that return only figures)."""
    return lambda result: {f"{prefix}/{k}": v for k, v in result.items() if _number(v) is not None}


FIGURES = {
    "splice_eval": _numbers("splice"),
    "stability": _numbers("stability"),
    "names": _numbers("names"),
    "inspect": _numbers("inspect"),
    "extract": lambda r: _pick(
        r, ("images_per_s", "n_rows", "n_shards", "n_images", "n_skipped", "seconds", "d"), "extract"
    ),
    "monosemanticity": _ms_figures,
    "hierarchy": _hierarchy_figures,
    "steer": _steer_figures,
    "steer_eval": _steer_eval_figures,
}


def latents_table_rows(out_dpath: str | Path, max_rows: int) -> list[dict[str, Any]]:
    """The rows of a monosemanticity run's ``latents.csv`` with the highest MS first (unscored ones last), at
    most ``max_rows``, each with ``top_0 .. top_3``: the paths of its first top images (empty if unknown)."""
    out_dpath = Path(out_dpath)
    table = formats.read_latents_csv(out_dpath)
    paths: dict[str, str] = {}
    if (out_dpath / formats.TOP_IMAGES_DIR).is_dir():
        index = formats.read_top_images(out_dpath / formats.TOP_IMAGES_DIR)
        paths = dict(zip(index.keys, index.paths or []))
    ranked = sorted(table.rows, key=lambda r: (math.isnan(r.ms), -r.ms if not math.isnan(r.ms) else 0.0))
    rows = []
    for r in ranked[:max_rows]:
        row = {"latent": r.latent, "ms": r.ms, "freq": r.freq, "max_act": r.max_act, "group": r.group}
        if r.name is not None:  # automatic feature names (names=...)
            row.update(name=r.name, name_score=r.name_score, names="|".join(r.names))
        keys = list(r.top_keys[:TABLE_IMAGES]) + [None] * (TABLE_IMAGES - len(r.top_keys[:TABLE_IMAGES]))
        row.update({f"top_{i}": paths.get(key) if key else None for i, key in enumerate(keys)})
        rows.append(row)
    return rows


def log_job(cfg: Any, job: str, out_dpath: str | Path, result: Mapping[str, Any], sae_path: Any = None) -> None:
    """Log a finished job with ``cfg.logger`` (``cfg``: the job's typed config, from ``config.to_typed``): its
    headline figures (:data:`FIGURES`), every ``*.png`` in ``out_dpath`` and its tables (monosemanticity:
    ``latents``, with top-image thumbnails; steer: ``answers``). Call it after the job wrote its files."""
    out_dpath = Path(out_dpath)
    figures = FIGURES[job](result) if job in FIGURES else {}
    try:
        jl = JobLog.open(cfg.logger, job=job, out_dpath=out_dpath, config=cfg, sae_path=sae_path)
    except JobLogError:
        JobLog(LoggerSchema(kind="csv"), job, out_dpath).summary(figures)  # W&B failed: the csv mirror still
        raise
    with jl:
        if jl.logger.kind == "none":
            return
        jl.summary(figures)
        for png_fpath in sorted(out_dpath.glob("*.png")):
            jl.image(png_fpath.stem, png_fpath)
        ms_dpath = Path(result["latents_csv"]).parent if job == "names" else out_dpath  # names rewrites an MS run
        if job in ("monosemanticity", "names") and jl.run is not None and (ms_dpath / formats.LATENTS_CSV).is_file():
            rows = latents_table_rows(ms_dpath, jl.logger.table_rows)
            jl.table("latents", rows, image_columns=[f"top_{i}" for i in range(TABLE_IMAGES)])
        for name, table in (result.get("tables") or {}).items():  # a sweep's ms_table, hierarchy_table, ...
            jl.table(name, Path(table["csv"]), image_columns=table.get("image_columns", ()))
        if job == "steer":
            names = (result.get("settings") or {}).get("images") or []
            answers = zip(result.get("baseline") or [], result.get("steered") or [])
            jl.table("answers", [{"image": str(n), "baseline": b, "steered": s} for n, (b, s) in zip(names, answers)])

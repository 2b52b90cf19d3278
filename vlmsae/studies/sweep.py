"""Evaluating a sweep of SAEs in one job: find them, name them, open their source models once, score each.

``sae_path=`` of the evaluation jobs also takes a sweep folder (every ``sae/`` folder under it, e.g. a Hydra
multirun dir) or a comma-separated list of SAE paths (:func:`sweep_paths`). :class:`SweepCache` holds what
the SAEs share (source models, per-batch source activations, image embeddings) and counts the model passes
and embedded images; :func:`run_study` is the one loop every evaluation job (monosemanticity, hierarchy,
steer_eval) runs, then the job's table (:mod:`vlmsae.report.tables`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vlmsae.formats import RUN_INFO_JSON, SAE_CONFIG_JSON, read_run_info
from vlmsae.models import load_tap
from vlmsae.models.open_sae import load_job_sae, open_tapped_sae
from vlmsae.sae.interop import available_formats
from vlmsae.utils.provenance import write_run_info

log = logging.getLogger(__name__)

SAE_DIRNAME = "sae"  # a training run keeps its SAE in <run>/sae/


@dataclass
class SweepMember:
    """One SAE of a sweep: its loaded SAE, where it was found and the name of its output subfolder."""

    sae_path: str
    sae: Any  # vlmsae.sae.base.SAE (on the CPU until opened)
    name: str = ""

    @property
    def arch(self) -> str:
        return str(self.sae.arch)

    @property
    def expansion(self) -> float:
        return self.sae.n_latents / self.sae.d_in

    @property
    def trained_on_model(self) -> str:
        trained_on = self.sae.trained_on or {}
        return str(trained_on.get("model") or trained_on.get("pretrained") or "unknown")

    @property
    def trained_on_layer(self) -> Any:
        return (self.sae.trained_on or {}).get("layer")


def training_seed(sae_path: str) -> int | None:
    """The seed the SAE was trained with: ``seed`` of the training config that ``python -m vlmsae.train``
    records in ``<run>/sae/run_info.json`` (else the run folder's run_info.json, for a folder named ``sae``);
    None when no such record exists (e.g. a published or hand-saved SAE). config.json holds no seed."""
    dpath = Path(os.path.expanduser(sae_path))
    for cand in (dpath, dpath.parent) if dpath.name == SAE_DIRNAME else (dpath,):
        if (cand / RUN_INFO_JSON).is_file():
            seed = read_run_info(cand).config.get("seed")
            if isinstance(seed, int) and not isinstance(seed, bool):
                return seed
    return None


# Files that make a folder an SAE checkpoint of some format (vlmsae's config.json, foreign weights).
_CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt", ".npz", ".npy", ".pkl", ".gz")


def _is_sweep_folder(dpath: Path) -> bool:
    """A folder that is no SAE checkpoint itself (no config.json, no weights file): a run or multirun dir."""
    if not dpath.is_dir() or (dpath / SAE_CONFIG_JSON).is_file():
        return False
    return not any(p.is_file() and (p.suffix in _CHECKPOINT_SUFFIXES or p.name == "cfg.json") for p in dpath.iterdir())


def sweep_paths(sae_path: str) -> list[str] | None:
    """The SAE paths ``sae_path`` names when it is a sweep (a comma list, or a folder with ``sae/`` folders
    under it and no checkpoint of its own); None when it is one SAE. Missing entries are refused, naming them."""
    if "," in sae_path:
        paths = [os.path.expanduser(p.strip()) for p in sae_path.split(",") if p.strip()]
        missing = [p for p in paths if "://" not in p and not Path(p).exists()]
        if missing:
            raise FileNotFoundError(
                f"sae_path lists {len(paths)} SAEs but {', '.join(missing)} does not exist: fix or drop "
                "that entry (a comma list names SAE folders, e.g. sae_path=runs/a/sae,runs/b/sae)."
            )
        return paths
    root = Path(os.path.expanduser(sae_path))
    if "://" in sae_path or not _is_sweep_folder(root):
        return None
    found = [p for p in root.rglob(SAE_DIRNAME) if p.is_dir() and (p / SAE_CONFIG_JSON).is_file()]
    found.sort(key=lambda p: [int(s) if s.isdigit() else s for s in p.relative_to(root).parts])  # 2 before 10
    if not found and any(module.detect(root) for module in available_formats().values()):
        return None  # a published SAE of another format, e.g. sparsify or saev with per-layer subfolders
    if not found:
        raise FileNotFoundError(
            f"sae_path={sae_path} is a folder with no SAE in it: looked for {SAE_DIRNAME}/ folders holding "
            f"{SAE_CONFIG_JSON} (a training run's <run>/{SAE_DIRNAME}, e.g. multirun/<date>/<time>/<n>/"
            f"{SAE_DIRNAME}) anywhere under it and found none. Pass a training run or multirun dir, or one SAE folder."
        )
    return [str(p) for p in found]


def _model_key(spec: Any) -> str:
    return repr((spec.name, spec.pretrained, spec.local_path, spec.seed, spec.device))  # the seed: random weights


class SharedTap:
    """A tap that keeps ``forward_to``'s activations of each batch (keyed by the pixels and layer), so the next
    SAE of the sweep on the same images and layer reuses them instead of running the model again.

    With ``cls_only`` only the CLS token is kept (all that ``pool=cls`` reads)."""

    def __init__(self, tap: Any, cls_only: bool, counter: SweepCache):
        self.tap, self.cls_only, self.counter = tap, cls_only, counter
        self.kept: dict[tuple[str, str], torch.Tensor] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self.tap, name)

    def forward_to(self, images_BCHW: torch.Tensor, layer: Any) -> torch.Tensor:
        key = (str(layer), hashlib.sha1(images_BCHW.detach().cpu().contiguous().numpy().tobytes()).hexdigest())
        if key not in self.kept:
            acts = self.tap.forward_to(images_BCHW, layer)
            self.kept[key] = acts[:, :1] if self.cls_only and acts.dim() == 3 else acts
            self.counter.n_model_batches += 1
        return self.kept[key]


@dataclass
class SweepCache:
    """What the SAEs of one sweep share: loaded taps, kept activations, embeddings; and the counts."""

    taps: dict[str, Any] = field(default_factory=dict)  # model spec -> loaded tap
    shared: dict[tuple, SharedTap] = field(default_factory=dict)  # (model, layer, pool) -> its kept activations
    embeddings: dict[str, torch.Tensor] = field(default_factory=dict)  # image key -> E(x)
    n_embedded: int = 0  # images the embedder ran on over the whole sweep
    n_model_batches: int = 0  # batches of images the source models ran on over the whole sweep
    keep: bool = True  # False: one SAE alone (a job's usual run): nothing is kept for a next SAE

    def _tap(self, spec: Any) -> Any:
        """The loaded tap of ``spec``'s model (loaded once per model, weights and device)."""
        if _model_key(spec) not in self.taps:
            self.taps[_model_key(spec)] = load_tap(spec)
        return self.taps[_model_key(spec)]

    def open(
        self,
        member: SweepMember,
        model: Any = None,
        layer: Any = None,
        pool: Any = None,
        device: Any = None,
        check_fit: bool = True,
    ):
        """The member's :class:`TappedSAE` on a tap shared with every SAE of the same model (loaded once), whose
        activations are shared with every SAE of the same model, layer and pooling. ``check_fit``: its first
        batch is checked (:func:`vlmsae.models.open_sae.check_fit`)."""
        src = open_tapped_sae(
            member.sae, None, model, layer, pool, device, member.sae_path, tap_of=self._tap, check_fit=check_fit
        )
        if not self.keep:
            return src
        group = (_model_key(src.spec), str(src.layer), src.pool)
        if group not in self.shared:
            self.shared = {k: v for k, v in self.shared.items() if k[:2] != group[:2]}
            self.shared[group] = SharedTap(src.tap, src.pool == "cls" and src.tap.has_cls, self)
        return dataclasses.replace(src, tap=self.shared[group])

    def counts(self) -> dict[str, int]:
        """What the sweep computed: images embedded by E and batches run through a source model."""
        return {"images_embedded": self.n_embedded, "model_batches": self.n_model_batches}


def grouped(members: list[SweepMember]) -> Iterator[SweepMember]:
    """The members ordered so SAEs of the same model, layer and tokens are next to each other (their kept
    activations are dropped when the next group starts)."""
    yield from sorted(
        members,
        key=lambda m: (m.trained_on_model, str(m.trained_on_layer), str((m.sae.trained_on or {}).get("tokens"))),
    )


@dataclass
class SweepRow:
    """One SAE of a sweep and the result of a job on it (``ms_summary``, ``hierarchy.json`` or the steer
    summary, as a dict)."""

    name: str
    arch: str
    expansion: float
    layer: Any
    result: dict[str, Any]
    seed: int | None = None  # the training seed, when the SAE's run records it (training_seed)


# Scores one SAE of the sweep and writes its outputs into the folder given: (its result, the layer it read).
ScoreOne = Callable[[SweepMember, SweepCache, Path], tuple[dict[str, Any], Any]]
# Writes the sweep's table from its rows into the folder given: {"md": path, "csv": path, ...}.
WriteTable = Callable[[Path, list[SweepRow]], dict[str, Any]]


def open_members(
    sae_path: str, sae_format: str | None, table: str | None = None, model_override: Any = None
) -> tuple[list[SweepMember], bool]:
    """The SAEs ``sae_path`` names, loaded on the CPU, and whether they are a sweep. A sweep folder or a comma list
    (:func:`sweep_paths`) gives its SAEs, each named for its output folder and, when ``table`` names the sweep's table,
    refused unless they read one model; one SAE gives itself, named by its folder."""
    paths = sweep_paths(sae_path)
    if paths is None:
        return [SweepMember(sae_path, load_job_sae(sae_path, sae_format), Path(sae_path).name)], False
    members = [SweepMember(p, load_job_sae(p, sae_format)) for p in paths]
    for m in members:  # {arch}_x{expansion}_L{layer}, a folder name
        m.name = f"{m.arch}_x{m.expansion:g}_L{m.trained_on_layer}".replace("/", "-").replace(" ", "")
    counts = Counter(m.name for m in members)
    for m in members:  # a name two SAEs share gets the run folder (e.g. the multirun job number): no overwrite
        if counts[m.name] > 1:
            run = Path(m.sae_path).parent.name if Path(m.sae_path).name == SAE_DIRNAME else Path(m.sae_path).name
            m.name = f"{m.name}_{run}"
    names = [m.name for m in members]
    if len(set(names)) != len(names):  # same config and same run folder name: fall back to the position
        for i, m in enumerate(members):
            m.name = f"{m.name}_{i}"
    log.info("sweep of %d SAEs: %s", len(members), ", ".join(names))
    models: dict[str, list[str]] = {}
    for m in members:
        models.setdefault(m.trained_on_model, []).append(m.sae_path)
    if table is not None and model_override is None and len(models) > 1:  # a table compares SAEs of one model
        listing = "; ".join(f"{model}: {', '.join(paths)}" for model, paths in models.items())
        raise ValueError(
            f"The sweep mixes SAEs of {len(models)} source models ({listing}): one {table} compares SAEs of "
            "one model. Split the sweep: run the job once per model with sae_path=<that model's SAEs>."
        )
    return members, True


def run_study(
    members: list[SweepMember],
    is_sweep: bool,
    out_dpath: Path,
    score: ScoreOne,
    write_table: WriteTable,
    config: dict[str, Any],
    cache: SweepCache | None = None,
) -> dict[str, Any]:
    """Run a study (``score``) on the SAEs of :func:`open_members`: the one SAE into ``out_dpath`` (returns its
    result and ``out_dpath``), or every SAE of a sweep (grouped by model, layer and tokens, so kept activations are
    reused) into ``out_dpath/<name>/``, then the sweep's table and ``run_info.json`` (``config``: the resolved job
    config) in ``out_dpath``. ``cache``: what the SAEs share (a new :class:`SweepCache` if None; ``keep=False``
    for one SAE). A sweep returns the run folder, the SAE names, ``tables`` ({table stem: what ``write_table``
    returned}) and the cache's counts."""
    cache = SweepCache(keep=is_sweep) if cache is None else cache
    if not is_sweep:
        return {**score(members[0], cache, out_dpath)[0], "out_dpath": str(out_dpath)}
    rows = []
    for m in grouped(members):
        (out_dpath / m.name).mkdir(parents=True, exist_ok=True)
        result, layer = score(m, cache, out_dpath / m.name)
        rows.append(SweepRow(m.name, m.arch, m.expansion, layer, result, training_seed(m.sae_path)))
        m.sae.cpu()
    table = write_table(out_dpath, rows)
    stem = Path(table["md"]).stem
    write_run_info(out_dpath, config, outputs=[f"{stem}.md", f"{stem}.csv"])
    log.info("sweep of %d SAEs: %s; %s", len(rows), table["md"], cache.counts())
    return {"out_dpath": str(out_dpath), "sweep": [r.name for r in rows], "tables": {stem: table}, **cache.counts()}

"""Opening an SAE for a job: load it from ``sae_path=``, then load the model and layer it reads.

A loaded SAE records what it reads (``sae.trained_on``: model, pretrained, layer, tokens; set by
:func:`vlmsae.sae.load` from vlmsae's ``config.json`` or a foreign format's own files).
:func:`load_job_sae` loads the SAE a job names (every job and the steering setup load it here);
:func:`open_tapped_sae` resolves its trained_on, plus the caller's overrides, to a loaded tap, a layer and a
token pooling (:data:`vlmsae.metrics.pooling.POOLS`), and checks the SAE's width against them before any
image is encoded. The studies (:mod:`vlmsae.studies`) and the steering jobs (:mod:`vlmsae.steering`) both
sit above this module.

:func:`check_fit` is the one check that an SAE fits the activations a job feeds it: on the first batch, an
SAE that ``vlmsae.train`` trained but whose reconstruction is worse than the batch mean (FVE < 0), or which leaves
nearly every row without an active latent, stops the job, naming what the SAE records it reads against what the
job reads and the overrides that fix it (``check_fit=false`` skips it). The studies call it through
:meth:`TappedSAE.check_first_batch`, the steering jobs from their setup.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vlmsae import sae as sae_lib
from vlmsae.config import to_typed
from vlmsae.metrics.pooling import POOLS
from vlmsae.models import get_model_spec, list_models, load_tap
from vlmsae.models.spec import ModelSpec, seed_decides_weights
from vlmsae.models.tap import Tap, resolve_layer

log = logging.getLogger(__name__)


def trained_on_model_spec(
    trained_on: dict[str, Any], model: ModelSpec | None = None, sae_dpath: str | Path | None = None
) -> ModelSpec:
    """The model an SAE reads: ``model`` if given, else the registered model its ``trained_on`` names (or the one
    registered model whose ``pretrained`` equals the trained_on's); an error naming ``model=`` when neither."""
    if model is not None:
        return to_typed(model, ModelSpec)
    name = trained_on.get("model")
    if not name and trained_on.get("pretrained"):  # the one model with exactly this pretrained (e.g. an HF id)
        names = [n for n in list_models() if get_model_spec(n).pretrained == trained_on["pretrained"]]
        name = names[0] if len(names) == 1 else None  # a bare tag like "openai" fits several: no guess
    if not name:
        known = (
            f" (pretrained={trained_on['pretrained']!r} matches no single model)"
            if trained_on.get("pretrained")
            else ""
        )
        raise ValueError(
            f"The SAE at {sae_dpath} does not say which model it reads (trained_on.model is None{known}): "
            f"pass model=<name> (one of: {', '.join(list_models())})."
        )
    if isinstance(name, dict):
        return to_typed(name, ModelSpec)
    try:
        spec = get_model_spec(str(name))
    except ValueError as err:
        raise ValueError(f"The SAE at {sae_dpath} says it reads model {name!r}. {err} Pass model=<name>.") from None
    # A vlmsae SAE may have been trained with other weights of the same architecture (model.pretrained=...);
    # a foreign format's `pretrained` is in that library's own naming, so the registered model's is kept.
    # A recorded None is a random network (model.pretrained=null): rebuild that one, not a download.
    native = trained_on.get("format") in (None, "vlmsae")
    pretrained = trained_on.get("pretrained", spec.pretrained)
    if native and (pretrained or pretrained is None):
        spec.pretrained = pretrained
    if native and trained_on.get("model_seed") is not None:
        spec.seed = int(trained_on["model_seed"])  # the random network's seed (tiny, or pretrained=null)
    return spec


def default_pool(trained_on: dict[str, Any], has_cls: bool = True) -> str:
    """``cls`` for an SAE trained on CLS tokens, else ``mean`` over the patch tokens. Unknown tokens
    (``trained_on.tokens`` None): ``cls`` (``mean`` on a model without one), with a logged note."""
    tokens = trained_on.get("tokens")
    if tokens is None:
        pool = "cls" if has_cls else "mean"
        log.warning(
            "The SAE does not say which tokens it was trained on (trained_on.tokens is None): using pool=%s; "
            "pass pool=cls|mean|max to choose.",
            pool,
        )
        return pool
    return "cls" if tokens == "cls" else "mean"


def _width_error(sae, spec_name: str, layer: int | str, width: int | None, trained_on: dict[str, Any]) -> ValueError:
    where = "the projected image embedding (layer=last)" if layer == "last" else f"layer {layer}'s residual stream"
    said = {k: trained_on.get(k) for k in ("model", "layer", "tokens")}
    return ValueError(
        f"The SAE reads {sae.d_in}-d activations (d_in={sae.d_in}) but {spec_name}'s {where} is {width}-d: "
        f"this SAE was not trained on this model/layer. Pass the model and layer it reads (model=<name> "
        f"layer=<L|last>); its trained_on says {said}."
    )


def resolve_sae_inputs(
    sae,
    trained_on: dict[str, Any],
    model: ModelSpec | None = None,
    layer: int | str | None = None,
    pool: str | None = None,
    sae_dpath: str | Path | None = None,
) -> tuple[ModelSpec, int | str, str]:
    """(model spec, layer, pool) an SAE is run on, checked against the model's registered shape (blocks,
    width, embedding) before any weights or images are loaded. Overrides win over ``trained_on``; what is
    neither given nor recorded is an error naming the one option still needed."""
    spec = trained_on_model_spec(trained_on, model, sae_dpath)
    from_sae = layer is None
    layer = trained_on.get("layer") if from_sae else layer
    if layer is None:
        raise ValueError(
            f"The SAE at {sae_dpath} does not say which layer it reads (trained_on.layer is None): pass layer=<L> "
            f"(a block index 0..{spec.n_layers - 1} of {spec.name}, or last for the projected embedding)."
        )
    try:
        layer = resolve_layer(layer, spec.n_layers, spec.name)
    except ValueError as err:
        said = "the SAE's trained_on.layer" if from_sae else "layer="
        raise ValueError(f"{err} (the layer came from {said}; pass layer=<L> or the SAE's model=<name>)") from None
    width = spec.embed_dim if layer == "last" else spec.width
    if width is None:
        raise ValueError(f"{spec.name} has no projected image embedding (layer=last): pass layer=<L>, a block index.")
    if sae.d_in != width:
        raise _width_error(sae, spec.name, layer, width, trained_on)
    pool = pool or default_pool(trained_on, spec.has_cls)
    if pool not in POOLS:
        raise ValueError(f"Unknown pool={pool!r}: use one of {list(POOLS)}.")
    if pool == "cls" and layer != "last" and not spec.has_cls:
        raise ValueError(f"pool=cls: {spec.name} has no CLS token (e.g. SigLIP); use pool=mean or pool=max.")
    return spec, layer, pool


@dataclass
class TappedSAE:
    """Where an SAE reads: the loaded tap, its spec, the resolved layer and the token pooling."""

    sae: Any  # vlmsae.sae.base.SAE, on the tap's device, in eval mode
    tap: Any  # a vlmsae.models Tap (or a sweep's SharedTap around one)
    spec: ModelSpec
    layer: int | str
    pool: str
    trained_on: dict[str, Any] = field(default_factory=dict)  # what the loaded SAE records it reads (sae.trained_on)
    sae_path: str | None = None  # for messages
    check_fit: bool = True  # check the first batch's reconstruction (check_fit=false: score it anyway)
    fit_checked: bool = False  # the first batch was checked

    def check_first_batch(self, acts_RD: torch.Tensor) -> None:
        """:func:`check_fit` on the first batch of rows the SAE reads (once; nothing with ``check_fit`` False)."""
        if self.fit_checked or not self.check_fit:
            return
        self.fit_checked = True
        reads = {**model_reads(self.spec), "layer": self.layer, "pool": self.pool}
        check_fit(self.sae, acts_RD, self.trained_on, reads, self.sae_path)


def open_tapped_sae(
    sae,
    trained_on: dict[str, Any] | None = None,
    model: ModelSpec | None = None,
    layer: int | str | None = None,
    pool: str | None = None,
    device: str | None = None,
    sae_dpath: str | Path | None = None,
    tap_of: Callable[[ModelSpec], Tap] | None = None,
    check_fit: bool = True,
) -> TappedSAE:
    """Load the tap the SAE reads (``trained_on`` defaults to ``sae.trained_on``; ``model`` / ``layer`` / ``pool``
    override it; ``device`` overrides the model's unless None or "auto") and move the SAE to it.
    Bad combinations are refused by :func:`resolve_sae_inputs` before the model loads; errors name the fix.
    ``tap_of``: what loads the tap of a model spec (None: :func:`vlmsae.models.load_tap`; a sweep passes one
    that loads each model once). ``check_fit``: the first batch encoded is checked (:func:`check_fit`)."""
    # JSON-safe (a loader may record a Path): jobs write it to run_info.json for the browser
    trained_on = json.loads(json.dumps(dict(sae.trained_on if trained_on is None else trained_on), default=str))
    spec, layer, pool = resolve_sae_inputs(sae, trained_on, model, layer, pool, sae_dpath)
    if device not in (None, "auto"):
        spec.device = str(device)
    tap = (tap_of or load_tap)(spec)
    layer = tap.resolve_layer(layer)
    width = tap.embed_dim if layer == "last" else tap.width
    if sae.d_in != width:  # the loaded weights disagree with the registered shape (e.g. an overridden model)
        raise _width_error(sae, spec.name, layer, width, trained_on)
    sae = sae.to(tap.device).eval()
    path = None if sae_dpath is None else str(sae_dpath)
    return TappedSAE(sae, tap, spec, layer, pool, trained_on, sae_path=path, check_fit=check_fit)


def load_job_sae(sae_path: str | Path, sae_format: str | None = None, device: str = "cpu"):
    """The SAE a job's ``sae_path=`` names, loaded by :func:`vlmsae.sae.load` (every job loads its SAE here);
    a missing or unreadable SAE is refused with the job key named."""
    try:
        return sae_lib.load(sae_path, sae_format=sae_format, device=device)
    except (FileNotFoundError, ValueError) as err:
        if type(err) not in (FileNotFoundError, ValueError):  # e.g. JSONDecodeError: its own constructor
            raise
        raise type(err)(f"sae_path={str(sae_path)!r} (sae_format={sae_format}): {err}") from err


# A first batch below these stops the job (check_fit): worse than predicting the batch mean, or nearly every row
# without an active latent. A fitting SAE is far from both (FVE ~0.6-0.99, a few dozen latents per row).
MIN_FIT_FVE = 0.0
MAX_SILENT_ROWS = 0.9


def model_reads(spec: ModelSpec) -> dict[str, Any]:
    """What decides a model's activations, for fit messages: its name and weights (or the seed of random ones)."""
    reads = {"model": spec.name, "pretrained": spec.local_path or spec.pretrained}
    if seed_decides_weights(spec):
        reads["seed"] = spec.seed
    return reads


@torch.no_grad()
def fit_on_batch(sae, acts_RD: torch.Tensor) -> tuple[float, float]:
    """(FVE against the batch mean, fraction of rows with no active latent) of ``sae`` on rows ``acts_RD``."""
    W = sae.W_dec
    x = acts_RD.reshape(-1, acts_RD.shape[-1]).to(W.device, W.dtype)
    codes = sae.encode(x)
    codes = codes.to_dense() if codes.is_sparse else codes
    err = (x - sae.decode(codes)).float().pow(2).sum()
    total = (x.float() - x.float().mean(0)).pow(2).sum()
    fve = float(1 - err / total) if total > 0 else float("nan")
    silent = float((codes == 0).all(dim=1).float().mean())
    return fve, silent


def check_fit(
    sae, acts_RD: torch.Tensor, records: dict[str, Any], reads: dict[str, Any], sae_path: str | None = None
) -> tuple[float, float]:
    """Stop a job whose SAE does not fit the activations it reads (see the module docstring); (fve, silent) else.

    ``records``: what the SAE records it reads (``sae.trained_on``); ``reads``: what the job reads (model, weights or
    seed, layer, pool or tokens). Only an SAE that records its training (``trained_on.train_steps``, written by
    ``vlmsae.train``) is judged: an untrained or hand-built one (tests, random baselines) has nothing to fit. Fewer
    than 2 rows cannot be judged either and pass."""
    n_rows = acts_RD.reshape(-1, acts_RD.shape[-1]).shape[0]
    if not records.get("train_steps") or n_rows < 2:
        return float("nan"), float("nan")
    fve, silent = fit_on_batch(sae, acts_RD)
    if fve >= MIN_FIT_FVE and silent <= MAX_SILENT_ROWS:
        return fve, silent
    said = {k: records.get(k) for k in ("model", "pretrained", "model_seed", "layer", "tokens") if k in records}
    what = f"FVE {fve:.3f}" if fve < MIN_FIT_FVE else f"{silent:.0%} of rows with no active latent"
    raise ValueError(
        f"The SAE{f' at {sae_path}' if sae_path else ''} does not fit the activations it is fed: {what} on the first "
        f"batch ({n_rows} rows; FVE {fve:.3f}, {silent:.0%} of rows silent). It records it reads {said}; this job "
        f"reads {reads}. Likely another model, layer, token set or weights (a random network rebuilt with another "
        "seed, or pretrained weights instead of random ones). Pass what the SAE was trained on (model=<name> "
        "model.pretrained=<weights or null> model.seed=<seed> layer=<L>), or check_fit=false to score it anyway."
    )

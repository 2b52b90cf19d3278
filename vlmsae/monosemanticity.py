"""Monosemanticity of an SAE's latents vs the raw neurons of the layer it reads (SPEC 3).

    python -m vlmsae.monosemanticity sae_path=<checkpoint dir> data=folder data.root=<images> embedder=clip_b32

1. Embeds the images with the embedder E (cached under ``embed_cache``, keyed by the image list's
   digest and the embedder), and runs the source model (the SAE's ``config.json`` ``source`` says
   model, layer, tokens; ``model=<name>`` / ``layer=<L>`` override) and the SAE (inference
   encoder, thresholded) on the same images; codes stay sparse. One vector per image: the CLS
   token (``pool=cls``), or the SAE codes / raw activations pooled over the patch tokens
   (``pool=mean`` or ``pool=max``).
2. Scores every SAE latent and every raw neuron with the exact linear-time MS
   (:func:`vlmsae.metrics.monosemanticity_scores`).
3. Writes ``latents.csv`` (latent, ms, freq, max_act, group, top_keys), ``ms_summary.json``
   (mean, std, min, max, dead, n_latents, n_images and the same under ``baseline`` for the raw
   neurons, plus reconstruction metrics and top-image uniqueness), ``top_images/`` (the index the
   hierarchy study, steering and the browser reuse), ``ms_hist.png``, ``ms_vs_freq.png`` and
   ``run_info.json`` into the Hydra run dir.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from vlmsae.config import conf_dir, register_configs

log = logging.getLogger(__name__)

def _cache_fpath(cache_dpath: Path, embedder_spec, digest: str, where: str) -> Path:
    """Cached embeddings are valid for one embedder, one image list (digest of the keys) and one place the
    images come from (``where``: source, absolute root, synthetic options), since keys are relative paths."""
    key = hashlib.sha256(f"{embedder_spec.cache_id()}|{digest}|{where}".encode()).hexdigest()[:20]
    return cache_dpath / f"{embedder_spec.name}-{key}.safetensors"


def _load_cache(fpath: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    if not fpath.exists():
        return {}
    try:
        with safe_open(str(fpath), framework="pt") as f:
            keys = json.loads(f.metadata()["keys"])
            emb = f.get_tensor("embeddings")
    except Exception as err:  # noqa: BLE001  a damaged cache is recomputed, never fatal
        log.warning("ignoring unreadable embedding cache %s (%s); recomputing", fpath, err)
        return {}
    return {k: emb[i] for i, k in enumerate(keys)}


def _save_cache(fpath: Path, keys: list[str], emb_NE: torch.Tensor, embedder_id: str) -> None:
    from safetensors.torch import save_file

    from vlmsae.utils.io import atomic_write

    meta = {"keys": json.dumps(keys), "embedder": embedder_id}
    atomic_write(fpath, lambda tmp: save_file({"embeddings": emb_NE.contiguous()}, str(tmp), metadata=meta))


def _plots(out_dpath: Path, ms_sae: torch.Tensor, ms_raw: torch.Tensor | None, freq_F: torch.Tensor) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from vlmsae.utils.io import atomic_write

    sae_vals = ms_sae[~torch.isnan(ms_sae)].numpy()
    raw_vals = ms_raw[~torch.isnan(ms_raw)].numpy() if ms_raw is not None else None
    fig, ax = plt.subplots(figsize=(6, 4))
    both = [v for v in (sae_vals, raw_vals) if v is not None and len(v)]
    lo = min(float(v.min()) for v in both) if both else 0.0
    hi = max(float(v.max()) for v in both) if both else 1.0
    bins = torch.linspace(min(lo, 0.0), max(hi, 1.0), 41).numpy()
    if len(sae_vals):
        ax.hist(sae_vals, bins=bins, density=True, alpha=0.6, label=f"SAE latents (mean {sae_vals.mean():.3f})")
    if raw_vals is not None and len(raw_vals):
        ax.hist(raw_vals, bins=bins, density=True, alpha=0.6, label=f"raw neurons (mean {raw_vals.mean():.3f})")
    ax.set_xlabel("monosemanticity score")
    ax.set_ylabel("density")
    ax.legend()
    fig.tight_layout()
    atomic_write(out_dpath / "ms_hist.png", lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    alive = ~torch.isnan(ms_sae) & (freq_F > 0)
    ax.scatter(freq_F[alive].numpy(), ms_sae[alive].numpy(), s=4, alpha=0.5)
    ax.set_xscale("log")
    ax.set_xlabel("firing frequency (fraction of images)")
    ax.set_ylabel("monosemanticity score")
    ax.set_title("SAE latents: MS vs firing frequency")
    fig.tight_layout()
    atomic_write(out_dpath / "ms_vs_freq.png", lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)


def _latents_table(ms_K, freq_K, max_K, group_K, top):
    """The rows of ``latents.csv`` (:class:`vlmsae.formats.LatentsTable`), one per latent."""
    from vlmsae.formats import LatentRow, LatentsTable

    return LatentsTable([LatentRow(latent=k, ms=float(ms_K[k]), freq=float(freq_K[k]), max_act=float(max_K[k]),
                                   group=int(group_K[k]), top_keys=tuple(top.keys_of(k))) for k in range(ms_K.numel())])


def _ms_summary_format(summary: dict[str, Any]):
    """``summary`` as the ``ms_summary.json`` format (the headline statistics typed, the rest in ``extra``)."""
    from vlmsae.formats import MsSummary

    named = ("mean", "std", "min", "max", "dead", "n_latents", "n_images", "baseline")
    return MsSummary(**{k: summary[k] for k in named if k in summary},
                     extra={k: v for k, v in summary.items() if k not in named})


def _zero_shot(cfg: DictConfig, spec, sae, layer, source: dict, data, synthetic, classes: list[str]) -> dict[str, Any]:
    """Zero-shot fidelity with the SAE spliced into the source CLIP (open_clip models with a text tower)."""
    from vlmsae.data.images import iter_images
    from vlmsae.metrics.reconstruction import zero_shot_fidelity

    if spec.backend != "open_clip":
        return {"skipped": f"backend {spec.backend} has no text tower here (zero-shot needs an open_clip CLIP)"}
    if not classes:
        return {"skipped": "the images have no class folders / labels, so there are no zero-shot classes"}
    import open_clip

    from vlmsae.models.open_clip_backend import create_open_clip, spec_source

    weights = spec_source(spec)  # the tap's weights, activation and preprocessing
    model_name = weights.model_name
    model, preprocess = create_open_clip(weights, spec.cache_dir)
    model = model.to(sae.W_dec.device).eval()
    if getattr(model, "transformer", None) is None and getattr(model, "text", None) is None:
        return {"skipped": f"{spec.name} has no text tower"}
    template = str(cfg.get("zero_shot_template", "a photo of a {}."))
    prompts = [template.format(c.replace("_", " ")) for c in classes]
    try:
        tokenizer = open_clip.get_tokenizer(model_name)
        text = tokenizer(prompts)
    except Exception:  # noqa: BLE001  local-dir models: CLIP's BPE tokenizer at the model's context length
        text = open_clip.tokenize(prompts, context_length=getattr(model, "context_length", 77))
    max_images = int(cfg.get("zero_shot_max_images", 1000))
    if data.max_images is not None:
        max_images = min(max_images, int(data.max_images))
    records = [r for r in iter_images(str(data.source), data.root, max_images=max_images, synthetic=synthetic)
               if r.label >= 0]
    if not records:
        return {"skipped": "no labelled images"}
    bs = int(data.batch_size)
    batches = [torch.stack([preprocess(r.image) for r in records[i : i + bs]]) for i in range(0, len(records), bs)]
    tokens = "cls" if source.get("tokens", "cls") == "cls" else "all"
    with torch.no_grad():
        out = zero_shot_fidelity(model, sae, layer, batches, text.to(sae.W_dec.device),
                                 labels=[r.label for r in records], tokens=tokens)
    return {**out, "spliced_tokens": tokens, "n_classes": len(classes), "template": template}


def run(cfg: DictConfig, out_dpath: str | Path | None = None) -> dict[str, Any]:
    """Score ``cfg.sae_path``'s latents and the raw neurons on ``cfg.data``; outputs in ``out_dpath``."""
    from vlmsae.data.images import SkipLog, iter_images, list_source, synthetic_options
    from vlmsae.data.shards import image_list_digest
    from vlmsae.metrics.codes import encode_images, open_sae_source
    from vlmsae.metrics.monosemanticity import column_min_max, monosemanticity_scores, ms_summary
    from vlmsae.metrics.reconstruction import ReconstructionAccumulator
    from vlmsae.metrics.topimages import top_set_jaccard
    from vlmsae.models import ModelSpec
    from vlmsae.models.embedders import EmbedderSpec, load_embedder
    from vlmsae.models.tiny import vlmsae_home
    from vlmsae import formats
    from vlmsae.sae import load_sae
    from vlmsae.utils.paths import run_dir
    from vlmsae.utils.provenance import write_run_info

    if cfg.get("sae_path") in (None, "???"):
        raise ValueError("Pass sae_path=<SAE checkpoint folder> (a training run keeps it in <run>/sae/).")
    out_dpath = run_dir(out_dpath)
    sae_dpath = Path(str(cfg.sae_path)).expanduser()
    info = formats.read_sae_config(sae_dpath)
    source = dict(info.source)
    progress = bool(cfg.get("progress", True))
    model = ModelSpec.from_cfg(cfg.model) if cfg.get("model") is not None else None
    src = open_sae_source(load_sae(sae_dpath), source, model=model, layer=cfg.get("layer"), pool=cfg.get("pool"),
                          device=cfg.get("device"), sae_dpath=sae_dpath)
    sae, spec, layer, pool = src.sae, src.spec, src.layer, src.pool
    embedder_spec = EmbedderSpec.from_cfg(cfg.embedder)
    embedder = None  # loaded on first use: a fully cached run needs no embedder weights

    data = cfg.data
    synthetic = synthetic_options(str(data.source), data.get("extra"), data.get("seed", 0))
    if data.source not in ("folder", "list", "wds", "synthetic"):
        raise ValueError(f"monosemanticity reads images: data.source={data.source!r} must be folder, list, wds or synthetic.")
    n_total = None
    cache_dpath = Path(str(cfg.embed_cache)).expanduser() if cfg.get("embed_cache") else vlmsae_home() / "embeddings"
    cached: dict[str, torch.Tensor] = {}
    listing_digest = None
    root_id = str(Path(str(data.root)).expanduser().resolve()) if data.root is not None else None
    where = json.dumps({"source": str(data.source), "root": root_id, "synthetic": synthetic}, sort_keys=True)
    if data.source != "wds":
        listing = list_source(str(data.source), data.root, synthetic=synthetic)
        items = listing.items if data.max_images is None else listing.items[: int(data.max_images)]
        n_total = len(items)
        listing_digest = image_list_digest(key for key, _, _ in items)
        cached = _load_cache(_cache_fpath(cache_dpath, embedder_spec, listing_digest, where))

    skip_log = SkipLog()
    records = iter_images(str(data.source), data.root, max_images=data.max_images, skip_log=skip_log, synthetic=synthetic)
    emb_rows: list[torch.Tensor] = []
    recon = ReconstructionAccumulator(sae.n_latents, dense_threshold=float(cfg.get("dense_threshold", 0.1)))
    n_embedded = 0

    def embed(batch: list) -> None:
        nonlocal n_embedded, embedder
        batch_keys = [r.key for r in batch]
        if all(k in cached for k in batch_keys):
            emb_rows.append(torch.stack([cached[k] for k in batch_keys]).float())
        else:
            if embedder is None:
                embedder = load_embedder(embedder_spec)
            emb_rows.append(embedder.embed([r.image for r in batch]))
            n_embedded += len(batch)

    images = encode_images(src, records, int(data.batch_size), recon=recon, keep_raw=True, on_batch=embed,
                           progress=progress, total=n_total)
    keys, codes_NF, raw_ND = images.keys, images.codes_NF, images.raw_ND
    n_images = images.n_images
    if n_images < 2:
        raise ValueError(
            f"Only {n_images} readable image(s) in data.source={data.source} root={data.root} "
            f"({len(skip_log)} skipped): MS needs at least 2."
        )
    emb_NE = torch.cat(emb_rows)
    digest = listing_digest if listing_digest is not None else image_list_digest(keys)
    if n_embedded:
        _save_cache(_cache_fpath(cache_dpath, embedder_spec, digest, where), keys, emb_NE, embedder_spec.cache_id())

    log.info("scoring %d SAE latents and %d raw neurons on %d images", sae.n_latents, raw_ND.shape[1], n_images)
    chunk = int(cfg.get("chunk_size", 4096))
    ms_sae = monosemanticity_scores(codes_NF, emb_NE, chunk_size=chunk, progress=progress)
    lo_K, hi_K = column_min_max(codes_NF)
    summary = ms_summary(ms_sae, n_images, dead_K=hi_K == lo_K)
    ms_raw = None
    if cfg.get("baseline", True):
        ms_raw = monosemanticity_scores(raw_ND, emb_NE, chunk_size=chunk, progress=progress)
        lo_raw, hi_raw = column_min_max(raw_ND)
        summary["baseline"] = ms_summary(ms_raw, n_images, dead_K=hi_raw == lo_raw)

    top_k = int(cfg.get("top_k", 16))
    top = images.top_images(top_k, meta={
        "what": "top-activating images of SAE latents", "sae_path": str(sae_dpath), "model": spec.name,
        "layer": layer, "pool": pool, "data_source": str(data.source), "data_root": str(data.root),
        "image_list_digest": digest})
    top.save(out_dpath / "top_images")
    uniq = top_set_jaccard(top.image_idx)
    summary["uniqueness"] = {
        "mean_jaccard": uniq["mean"], "max_jaccard": uniq["max"], "mean_nearest_jaccard": uniq["mean_nearest"],
        "n_duplicate_sets": uniq["n_duplicates"], "top_k": top_k,
    }
    rec = recon.result()
    freq_F = (torch.bincount(codes_NF.indices()[1], minlength=sae.n_latents).double() / n_images)
    max_F = torch.zeros(sae.n_latents).scatter_reduce(0, codes_NF.indices()[1], codes_NF.values().float(), "amax")
    summary["reconstruction"] = {k: v for k, v in rec.items() if k != "freq_F"}
    summary.update({
        "embedder": embedder_spec.name, "model": spec.name, "layer": layer, "pool": pool, "sae_path": str(sae_dpath),
        "n_latents_sae": sae.n_latents, "skipped_images": len(skip_log), "embeddings_cached": n_embedded == 0,
    })

    if cfg.get("zero_shot", False):
        classes = list(listing.classes) if data.source != "wds" else []
        summary["zero_shot"] = _zero_shot(cfg, spec, sae, layer, source, data, synthetic, classes)

    group_F = sae.group_of_latent.cpu()
    formats.write_latents_csv(out_dpath, _latents_table(ms_sae, freq_F, max_F, group_F, top))
    formats.write_ms_summary(out_dpath, _ms_summary_format(summary))
    _plots(out_dpath, ms_sae, ms_raw, freq_F)
    write_run_info(
        out_dpath, OmegaConf.to_container(cfg, resolve=True), sae_path=str(sae_dpath), data_root=str(data.root),
        skipped=skip_log.to_list(), image_list_digest=digest,
    )
    log.info("mean MS: SAE %.4f, raw neurons %s", summary["mean"], summary.get("baseline", {}).get("mean"))
    return {"out_dpath": str(out_dpath), **summary}


def _main(cfg: DictConfig) -> None:
    summary = run(cfg)
    brief = {k: summary[k] for k in ("mean", "std", "min", "max", "dead", "n_latents", "n_images", "out_dpath")}
    if "baseline" in summary:
        brief["baseline_mean"] = summary["baseline"]["mean"]
    print(json.dumps(brief, indent=2))


def main() -> None:
    register_configs()
    hydra.main(config_path=str(conf_dir()), config_name="monosemanticity", version_base="1.3")(_main)()


if __name__ == "__main__":
    main()

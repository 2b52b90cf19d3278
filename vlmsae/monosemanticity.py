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

import csv
import hashlib
import io
import json
import logging
import math
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from vlmsae.config import register_configs

log = logging.getLogger(__name__)

POOLS = ("cls", "mean", "max")
# SAE input rows encoded at once when pooling over tokens: bounds the dense [rows, F] code block.
_TOKEN_ROWS = 1024


def _model_spec(cfg: DictConfig, source: dict[str, Any], sae_path: Path):
    """The source model: ``cfg.model`` if given, else the registered model the SAE was trained on."""
    from vlmsae.models import ModelSpec, get_model_spec

    if cfg.get("model") is not None:
        return ModelSpec.from_cfg(cfg.model)
    name = source.get("model")
    if not name:
        raise ValueError(
            f"The SAE at {sae_path} does not record its source model (config.json 'source.model'); "
            "pass model=<name> (one of conf/model/*.yaml) and layer=<L>."
        )
    if isinstance(name, dict):
        return ModelSpec.from_cfg(name)
    spec = get_model_spec(str(name))
    if source.get("pretrained") and source["pretrained"] != spec.pretrained:
        spec.pretrained = source["pretrained"]
    return spec


def _pool_rows(acts_BTD: torch.Tensor, pool: str, has_cls: bool) -> tuple[torch.Tensor, int]:
    """The rows the SAE reads for a batch: [B, D] for cls / projected embeddings, else [B*T', D]
    of the patch tokens (T' per image) for mean / max pooling."""
    if acts_BTD.dim() == 2:
        return acts_BTD, 1
    if pool == "cls":
        if not has_cls:
            raise ValueError("pool=cls: this model has no CLS token (e.g. SigLIP); use pool=mean or pool=max.")
        return acts_BTD[:, 0], 1
    patches = acts_BTD[:, 1:] if has_cls else acts_BTD
    B, T, D = patches.shape
    return patches.reshape(B * T, D), T


def _pool_sparse(codes_RF: torch.Tensor, per_image: int, pool: str, n_images: int) -> torch.Tensor:
    """Pool sparse token codes [B*T, F] to per-image codes [B, F] (mean counts zeros; max of nonzeros)."""
    codes_RF = codes_RF.coalesce()
    rows, cols = codes_RF.indices()
    vals = codes_RF.values()
    n_latents = codes_RF.shape[1]
    if per_image == 1:
        return codes_RF
    image = rows // per_image
    keys, inverse = torch.unique(image * n_latents + cols, return_inverse=True)
    if pool == "mean":
        pooled = torch.zeros(keys.numel(), dtype=vals.dtype).index_add_(0, inverse, vals) / per_image
    else:
        pooled = torch.full((keys.numel(),), -math.inf, dtype=vals.dtype).scatter_reduce(0, inverse, vals, "amax")
        # a latent that is positive on one token and negative (or 0) elsewhere: max is the positive value;
        # an all-negative latent on some tokens and 0 on others has max 0, which we keep as an implicit zero.
        pooled = torch.where(pooled < 0, torch.zeros_like(pooled), pooled)
    idx = torch.stack([keys // n_latents, keys % n_latents])
    return torch.sparse_coo_tensor(idx, pooled, (n_images, n_latents), check_invariants=False).coalesce()


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


def _latents_csv(ms_K, freq_K, max_K, group_K, top) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["latent", "ms", "freq", "max_act", "group", "top_keys"])
    for k in range(ms_K.numel()):
        ms = float(ms_K[k])
        writer.writerow([k, "nan" if math.isnan(ms) else f"{ms:.6f}", f"{float(freq_K[k]):.6g}",
                         f"{float(max_K[k]):.6g}", int(group_K[k]), "|".join(top.keys_of(k))])
    return buf.getvalue()


def _zero_shot(cfg: DictConfig, spec, sae, layer, source: dict, data, synthetic, classes: list[str]) -> dict[str, Any]:
    """Zero-shot fidelity with the SAE spliced into the source CLIP (open_clip models with a text tower)."""
    from vlmsae.data.images import iter_images
    from vlmsae.metrics.reconstruction import zero_shot_fidelity

    if spec.backend != "open_clip":
        return {"skipped": f"backend {spec.backend} has no text tower here (zero-shot needs an open_clip CLIP)"}
    if not classes:
        return {"skipped": "the images have no class folders / labels, so there are no zero-shot classes"}
    import open_clip

    from vlmsae.models.open_clip_backend import _resolve_source

    model_name, pretrained = _resolve_source(spec)
    quick_gelu = bool(spec.extra.get("quick_gelu", spec.pretrained == "openai"))
    model, _, preprocess = open_clip.create_model_and_transforms(
        model_name, pretrained=pretrained, cache_dir=spec.cache_dir, force_quick_gelu=quick_gelu
    )
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
    from tqdm.auto import tqdm

    from vlmsae.data.images import SkipLog, iter_images, list_source
    from vlmsae.data.shards import image_list_digest
    from vlmsae.metrics.monosemanticity import column_min_max, monosemanticity_scores, ms_summary
    from vlmsae.metrics.reconstruction import ReconstructionAccumulator
    from vlmsae.metrics.topimages import TopImages, top_images, top_set_jaccard
    from vlmsae.models import load_tap
    from vlmsae.models.embedders import EmbedderSpec, load_embedder
    from vlmsae.models.tiny import vlmsae_home
    from vlmsae.sae import load_sae, read_sae_config
    from vlmsae.utils.io import atomic_write_json, atomic_write_text
    from vlmsae.utils.paths import run_dir
    from vlmsae.utils.provenance import write_run_info

    if cfg.get("sae_path") in (None, "???"):
        raise ValueError("Pass sae_path=<SAE checkpoint folder> (a training run keeps it in <run>/sae/).")
    out_dpath = run_dir(out_dpath)
    sae_dpath = Path(str(cfg.sae_path)).expanduser()
    info = read_sae_config(sae_dpath)
    source = dict(info.get("source") or {})
    spec = _model_spec(cfg, source, sae_dpath)
    layer = cfg.get("layer") if cfg.get("layer") is not None else source.get("layer")
    if layer is None:
        raise ValueError(f"The SAE at {sae_dpath} does not record its layer (source.layer); pass layer=<L|last>.")
    pool = cfg.get("pool") or ("cls" if source.get("tokens", "cls") == "cls" else "mean")
    if pool not in POOLS:
        raise ValueError(f"Unknown pool={pool!r}: use one of {list(POOLS)}.")
    progress = bool(cfg.get("progress", True))

    if cfg.get("device") not in (None, "auto"):
        spec.device = str(cfg.device)
    tap = load_tap(spec)
    layer = tap.resolve_layer(layer)
    sae = load_sae(sae_dpath, device=tap.device)
    width = tap.embed_dim if layer == "last" else tap.width
    if sae.d_in != width:
        raise ValueError(
            f"The SAE reads {sae.d_in}-d activations but {spec.name} layer {layer} is {width}-d: "
            f"wrong model/layer for this SAE (its source says {source})."
        )
    embedder_spec = EmbedderSpec.from_cfg(cfg.embedder)
    embedder = None  # loaded on first use: a fully cached run needs no embedder weights

    data = cfg.data
    synthetic = None
    if data.source == "synthetic":
        opts = {"n_per_class": 8, "size": 64, **dict(data.get("extra") or {}), "seed": int(data.seed)}
        synthetic = {k: opts[k] for k in ("n_per_class", "size", "seed")}
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
    batch_size = int(data.batch_size)
    keys: list[str] = []
    paths: list[str | None] = []
    labels: list[int] = []
    emb_rows: list[torch.Tensor] = []
    raw_rows: list[torch.Tensor] = []
    code_parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    recon = ReconstructionAccumulator(sae.n_latents, dense_threshold=float(cfg.get("dense_threshold", 0.1)))
    n_embedded = 0

    def flush(batch: list) -> None:
        nonlocal n_embedded, embedder
        images = [r.image for r in batch]
        x_BCHW = torch.stack([tap.preprocess(im) for im in images])
        acts = tap.forward_to(x_BCHW, layer)
        rows_RD, per_image = _pool_rows(acts, pool, tap.has_cls)
        n_b = len(batch)
        parts = []
        with torch.no_grad():
            for r0 in range(0, rows_RD.shape[0], _TOKEN_ROWS):
                x_rd = rows_RD[r0 : r0 + _TOKEN_ROWS].to(sae.W_dec.device, torch.float32)
                codes = sae.encode(x_rd, sparse=True)
                recon.update(x_rd, sae.decode(codes), codes)
                c = codes.cpu().coalesce()
                parts.append((c.indices()[0] + r0, c.indices()[1], c.values()))
        rows = torch.cat([p[0] for p in parts])
        cols = torch.cat([p[1] for p in parts])
        vals = torch.cat([p[2] for p in parts]).float()
        token_codes = torch.sparse_coo_tensor(torch.stack([rows, cols]), vals, (rows_RD.shape[0], sae.n_latents),
                                              check_invariants=False)
        pooled = _pool_sparse(token_codes, per_image, pool, n_b)
        code_parts.append((pooled.indices()[0] + len(keys), pooled.indices()[1], pooled.values()))
        if per_image == 1:
            raw_rows.append(rows_RD.float().cpu())
        else:
            tok = rows_RD.float().cpu().reshape(n_b, per_image, -1)
            raw_rows.append(tok.mean(1) if pool == "mean" else tok.amax(1))
        batch_keys = [r.key for r in batch]
        if all(k in cached for k in batch_keys):
            emb_rows.append(torch.stack([cached[k] for k in batch_keys]).float())
        else:
            if embedder is None:
                embedder = load_embedder(embedder_spec)
            emb_rows.append(embedder.embed(images))
            n_embedded += n_b
        keys.extend(batch_keys)
        paths.extend(r.path for r in batch)
        labels.extend(int(r.label) for r in batch)

    batch: list = []
    bar = tqdm(total=n_total, desc="images", unit="img", disable=not progress)
    for record in records:
        batch.append(record)
        if len(batch) == batch_size:
            flush(batch)
            bar.update(len(batch))
            batch = []
    if batch:
        flush(batch)
        bar.update(len(batch))
    bar.close()
    n_images = len(keys)
    if n_images < 2:
        raise ValueError(
            f"Only {n_images} readable image(s) in data.source={data.source} root={data.root} "
            f"({len(skip_log)} skipped): MS needs at least 2."
        )
    emb_NE = torch.cat(emb_rows)
    raw_ND = torch.cat(raw_rows)
    codes_NF = torch.sparse_coo_tensor(
        torch.stack([torch.cat([p[0] for p in code_parts]), torch.cat([p[1] for p in code_parts])]),
        torch.cat([p[2] for p in code_parts]), (n_images, sae.n_latents), check_invariants=False,
    ).coalesce()
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
    idx_KT, acts_KT = top_images(codes_NF, top_k=top_k)
    top = TopImages(
        idx_KT, acts_KT, keys, paths=paths if all(p is not None for p in paths) else None, labels=labels,
        meta={"what": "top-activating images of SAE latents", "sae_path": str(sae_dpath), "model": spec.name,
              "layer": layer, "pool": pool, "data_source": str(data.source), "data_root": str(data.root),
              "image_list_digest": digest},
    )
    top.save(out_dpath / "top_images")
    uniq = top_set_jaccard(idx_KT)
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
    atomic_write_text(out_dpath / "latents.csv", _latents_csv(ms_sae, freq_F, max_F, group_F, top))
    atomic_write_json(out_dpath / "ms_summary.json", summary)
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
    hydra.main(config_path="../conf", config_name="monosemanticity", version_base="1.3")(_main)()


if __name__ == "__main__":
    main()

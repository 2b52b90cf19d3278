"""The monosemanticity study of one SAE over a set of images (METHOD §3): what ``vlmsae.monosemanticity`` runs.

:func:`score_sae` scores every SAE latent and raw neuron with the exact MS over the images (sparse codes,
embeddings through :mod:`vlmsae.studies.embedding_cache`), with the same pass's reconstruction metrics and
top images; :func:`zero_shot_check` splices the SAE into its source CLIP; :class:`MSStudy` holds the result.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vlmsae.data.image_set import ImageSet
from vlmsae.data.images import SkipLog
from vlmsae.data.shards import image_list_digest
from vlmsae.formats import MS_SUMMARY_JSON, LatentRow, LatentsTable, MsSummary
from vlmsae.metrics.monosemanticity import column_min_max, monosemanticity_scores, ms_summary
from vlmsae.metrics.reconstruction import ReconstructionAccumulator, zero_shot_fidelity
from vlmsae.metrics.topimages import TopImages, top_set_jaccard
from vlmsae.models.embedders import EmbedderSpec
from vlmsae.models.open_clip_backend import create_open_clip, spec_weights
from vlmsae.models.open_sae import TappedSAE, open_tapped_sae, trained_on_model_spec
from vlmsae.studies.codes import encode_images, top_images_meta
from vlmsae.studies.embedding_cache import CachedEmbedder
from vlmsae.studies.naming import LABELS, LatentNamer, LatentNames, label_namer, with_names

log = logging.getLogger(__name__)


@dataclass
class MSStudy:
    """The scores of one run: per latent (K = the SAE's latents) and the summary ``ms_summary.json`` holds."""

    summary: dict[str, Any]  # ms_summary of the SAE, "baseline" (raw neurons), reconstruction, uniqueness, ...
    ms_K: torch.Tensor  # MS per SAE latent (NaN: dead or undefined)
    ms_raw_D: torch.Tensor | None  # MS per raw neuron; None without the baseline
    freq_K: torch.Tensor  # fraction of images each latent fires on
    max_K: torch.Tensor  # largest activation of each latent
    group_K: torch.Tensor  # Matryoshka group of each latent (0 for other SAEs)
    top: TopImages  # top-activating images per latent
    image_list_digest: str
    classes: list[str]  # class names of a listed source (zero-shot classes); [] for a stream
    skip_log: SkipLog = field(default_factory=SkipLog)
    n_embedded: int = 0  # images the embedder ran on (0: every embedding came from the cache or the memo)
    names: LatentNames | None = None  # automatic feature names (names=...); None = not computed

    def latents_table(self) -> LatentsTable:
        """The rows of ``latents.csv``, one per latent (with the name columns when the latents were named)."""
        table = LatentsTable(
            [
                LatentRow(
                    latent=k,
                    ms=float(self.ms_K[k]),
                    freq=float(self.freq_K[k]),
                    max_act=float(self.max_K[k]),
                    group=int(self.group_K[k]),
                    top_keys=tuple(self.top.keys_of(k)),
                )
                for k in range(self.ms_K.numel())
            ]
        )
        return table if self.names is None else with_names(table, self.names)

    def summary_format(self) -> MsSummary:
        """``summary`` as the ``ms_summary.json`` format (the headline statistics typed, the rest in ``extra``)."""
        return MsSummary.from_json({**self.summary, "format_version": MsSummary.VERSIONS[-1]}, MS_SUMMARY_JSON)


def score_sae(
    src: TappedSAE,
    images: ImageSet,
    embedder_spec: EmbedderSpec,
    cache_dpath: Path,
    *,
    top_k: int,
    baseline: bool,
    chunk_size: int,
    dense_threshold: float,
    progress: bool,
    sae_path: str | Path,
    embed_memo: dict[str, torch.Tensor] | None = None,
    namer: LatentNamer | None = None,
) -> MSStudy:
    """MS of every latent of ``src.sae`` (and of every raw neuron when ``baseline``) over ``images``.

    top_k: top images kept per latent; chunk_size: images per block of the dense MS path;
    dense_threshold: reconstruction's "dense latent" firing fraction; sae_path: recorded in the index;
    embed_memo: image embeddings shared by the SAEs of a sweep (see :class:`CachedEmbedder`).
    namer: names every latent from its top images' embeddings (:mod:`vlmsae.studies.naming`) when given.
    """
    sae = src.sae
    classes: list[str] = []
    listing_digest, n_total = None, None
    if images.listable:
        listing = images.listing()
        items = images.items(listing)
        classes, n_total, listing_digest = list(listing.classes), len(items), image_list_digest(k for k, _, _ in items)
    embed = CachedEmbedder(embedder_spec, cache_dpath, images.where(), listing_digest, memo=embed_memo)

    skip_log = SkipLog()
    recon = ReconstructionAccumulator(sae.n_latents, dense_threshold=dense_threshold)
    encoded = encode_images(
        src,
        images.records(skip_log),
        images.batch_size,
        recon=recon,
        keep_raw=True,
        on_batch=embed,
        progress=progress,
        total=n_total,
    )
    codes_NF, raw_ND, n_images = encoded.codes_NF, encoded.raw_ND, len(encoded.keys)
    if n_images < 2:
        raise ValueError(
            f"Only {n_images} readable image(s) in data.source={images.source} root={images.root} "
            f"({len(skip_log)} skipped): MS needs at least 2."
        )
    emb_NE, digest = embed.finish(encoded.keys)

    log.info("scoring %d SAE latents and %d raw neurons on %d images", sae.n_latents, raw_ND.shape[1], n_images)
    ms_K = monosemanticity_scores(codes_NF, emb_NE, chunk_size=chunk_size, progress=progress)
    lo_K, hi_K = column_min_max(codes_NF)
    summary = ms_summary(ms_K, n_images, dead_K=hi_K == lo_K)
    ms_raw_D = None
    if baseline:
        ms_raw_D = monosemanticity_scores(raw_ND, emb_NE, chunk_size=chunk_size, progress=progress)
        lo_D, hi_D = column_min_max(raw_ND)
        summary["baseline"] = ms_summary(ms_raw_D, n_images, dead_K=hi_D == lo_D)

    top = encoded.top_images(top_k, top_images_meta(src, images, sae_path, image_list_digest=digest))
    uniq = top_set_jaccard(top.image_idx)
    summary["uniqueness"] = {f"{k}_jaccard": uniq[k] for k in ("mean", "max", "mean_nearest")}
    summary["uniqueness"].update(n_duplicate_sets=uniq["n_duplicates"], top_k=top_k)
    names = None
    if namer is not None and namer.vocabulary == LABELS:  # names=labels: the class means of these very images
        labelled = label_namer(emb_NE, encoded.labels, classes, namer.top)
        namer = dataclasses.replace(labelled, autointerp=namer.autointerp)
    if namer is not None:  # the top images' rows of emb_NE: the concept of the steering score, nothing re-embedded
        names = namer.name_from_embeddings(emb_NE, top.image_idx, top.paths, ms_K)
        summary["names"] = namer.study_summary(names, ms_K)
    latent_N = codes_NF.indices()[1]
    freq_K = torch.bincount(latent_N, minlength=sae.n_latents).double() / n_images
    max_K = torch.zeros(sae.n_latents).scatter_reduce(0, latent_N, codes_NF.values().float(), "amax")
    summary["reconstruction"] = {k: v for k, v in recon.result().items() if k != "freq_F"}
    summary.update(embedder=embedder_spec.name, model=src.spec.name, layer=src.layer, pool=src.pool)
    summary.update(sae_path=str(sae_path), n_latents_sae=sae.n_latents, skipped_images=len(skip_log))
    summary["embeddings_cached"] = embed.n_embedded == 0
    return MSStudy(
        summary=summary,
        ms_K=ms_K,
        ms_raw_D=ms_raw_D,
        freq_K=freq_K,
        max_K=max_K,
        group_K=sae.group_of_latent.cpu(),
        top=top,
        image_list_digest=digest,
        classes=classes,
        skip_log=skip_log,
        n_embedded=embed.n_embedded,
        names=names,
    )


def zero_shot_check(
    src: TappedSAE, images: ImageSet, classes: list[str], *, template: str, max_images: int
) -> dict[str, Any]:
    """Zero-shot fidelity with the SAE spliced into the source CLIP (open_clip models with a text tower).

    classes: the class names of the images' labels; template: the prompt, ``{}`` = a class name
    ("_" read as " "); max_images: labelled images read (also capped by ``images.max_images``).
    Returns {"skipped": why} where the check does not apply.
    """

    spec, sae = src.spec, src.sae
    if spec.backend != "open_clip":
        return {"skipped": f"backend {spec.backend} has no text tower here (zero-shot needs an open_clip CLIP)"}
    if not classes:
        return {"skipped": "the images have no class folders / labels, so there are no zero-shot classes"}
    import open_clip

    weights = spec_weights(spec)  # the tap's weights, activation and preprocessing
    model, preprocess = create_open_clip(weights, spec.cache_dir)
    model = model.to(sae.W_dec.device).eval()
    if getattr(model, "transformer", None) is None and getattr(model, "text", None) is None:
        return {"skipped": f"{spec.name} has no text tower"}
    prompts = [template.format(c.replace("_", " ")) for c in classes]
    try:
        text = open_clip.get_tokenizer(weights.model_name)(prompts)
    except Exception:
        text = open_clip.tokenize(prompts, context_length=getattr(model, "context_length", 77))
    records = [r for r in images.records(max_images=max_images) if r.label >= 0]
    if not records:
        return {"skipped": "no labelled images"}
    bs = images.batch_size
    batches = [torch.stack([preprocess(r.image) for r in records[i : i + bs]]) for i in range(0, len(records), bs)]
    tokens = "cls" if src.trained_on.get("tokens", "cls") == "cls" else "all"
    with torch.no_grad():
        out = zero_shot_fidelity(
            model, sae, src.layer, batches, text.to(sae.W_dec.device), labels=[r.label for r in records], tokens=tokens
        )
    return {**out, "spliced_tokens": tokens, "n_classes": len(classes), "template": template}


def clip_zero_shot(sae: Any, images: str | None, template: str, max_images: int, batch_size: int) -> dict[str, Any]:
    """:func:`zero_shot_check` for ``sae`` (its own source CLIP) on a class-folder tree,
    or ``{"skipped": why}``: the source is not an open_clip model, or no class folders were given."""
    try:
        spec = trained_on_model_spec(dict(getattr(sae, "trained_on", {}) or {}), None, None)
    except (ValueError, KeyError, FileNotFoundError) as err:
        return {"skipped": f"the SAE's source model is unknown ({err})"}
    if spec.backend != "open_clip":
        return {"skipped": f"the SAE's source {spec.name} is a {spec.backend} model; zero-shot needs an open_clip CLIP"}
    if images is None:
        return {"skipped": "no class folders: pass zero_shot_images=<ImageFolder tree>"}
    image_set = ImageSet(source="folder", root=str(images), max_images=max_images, batch_size=batch_size)
    classes = image_set.listing().classes
    src = open_tapped_sae(sae)
    return zero_shot_check(src, image_set, classes, template=template, max_images=max_images)

"""Automatic feature names: each latent's concept embedding against CLIP text embeddings of a vocabulary.

A latent's concept is the unit mean of the unit embeddings of its top images (the steering score's concept,
from the embeddings the MS run already holds); a name's text embedding is the unit mean of its unit embeddings
over the prompt templates; a latent's names are the vocabulary entries of highest cosine, best first ("" and
NaN without top images). ``names=labels`` (:func:`label_namer`) needs no text side: each class of the images is
embedded as the unit mean of its images' unit embeddings. ``autointerp=llava`` adds LLaVA's word per latent
(:mod:`vlmsae.studies.autointerp`), scored against the same concept.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vlmsae.config import to_typed
from vlmsae.data.images import load_image
from vlmsae.data.taxonomy import find_wordnet_noun_file, load_wordnet_synsets
from vlmsae.formats import TOP_IMAGES_DIR, LatentsTable, read_latents_csv, read_run_info
from vlmsae.metrics.topimages import TopImages
from vlmsae.models import embedders
from vlmsae.steering.score import streamed_concept_embeddings, unit
from vlmsae.studies.autointerp import AutoInterp, build_autointerp

# A few of CLIP's ImageNet prompt templates: enough to smooth one prompt's quirks, cheap for 29k names.
DEFAULT_TEMPLATES = ("a photo of a {}.", "a blurry photo of a {}.", "a close-up photo of a {}.", "a photo of many {}.")
LABELS = "labels"  # names=labels: the class names of the scored images, embedded by their images (label_namer)
_PHYSICAL_ENTITY = 1930  # WordNet 3.0 synset n00001930 "physical entity": the root of concrete nouns
_WORDNET_LEMMA_RE = re.compile(r"[a-z]+(?:[ -][a-z]+)?")  # lowercase, one or two words: no proper nouns
_VOCAB_FIX = "pass names=imagenet, names=wordnet, or names=<text file with one name per line>"


def wordnet_nouns(wordnet_dpath: str | Path | None = None) -> list[str]:
    """Concrete WordNet nouns: the first lemma of every noun synset below "physical entity", kept when it is
    lowercase and one or two words (no proper nouns, no long phrases), de-duplicated, sorted (29,401 names
    on WordNet 3.0). WordNet is found as the hierarchy taxonomy finds it (:mod:`vlmsae.data.taxonomy`)."""
    synsets = load_wordnet_synsets(*find_wordnet_noun_file(wordnet_dpath))
    concrete: dict[int, bool] = {_PHYSICAL_ENTITY: True}

    def below(offset: int) -> bool:  # walk up the first hypernyms (as wordnet_path does), memoised
        path = []
        while offset not in concrete:
            path.append(offset)
            hypers = synsets.get(offset, ("", []))[1]
            if not hypers or hypers[0] in path:  # another root, or a cycle: not concrete
                concrete[offset] = False
                break
            offset = hypers[0]
        for o in path:
            concrete[o] = concrete[offset]
        return concrete[offset]

    return sorted({lemma for o, (lemma, _) in synsets.items() if _WORDNET_LEMMA_RE.fullmatch(lemma) and below(o)})


def load_vocabulary(spec: str) -> list[str]:
    """The names to choose from: ``imagenet``, ``wordnet`` or a file (one name per line, ``#`` lines and blank
    lines skipped, duplicates dropped, "_" read as " "). An empty or missing file is refused."""
    if spec == "imagenet":
        from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

        return list(IMAGENET_CLASSNAMES)
    if spec == "wordnet":
        return wordnet_nouns()
    fpath = Path(spec).expanduser()
    if not fpath.is_file():
        raise FileNotFoundError(f"names={spec!r}: {fpath} is not a file (and not a built-in vocabulary); {_VOCAB_FIX}.")
    lines = [line.strip().replace("_", " ") for line in fpath.read_text(encoding="utf-8").splitlines()]
    names = list(dict.fromkeys(line for line in lines if line and not line.startswith("#")))
    if not names:
        raise ValueError(f"names={spec!r}: {fpath} holds no names (only blank or # lines); write one name per line.")
    bad = [n for n in names if "|" in n]
    if bad:
        raise ValueError(
            f"names={spec!r}: {fpath} has names containing '|' ({bad[0]!r}); latents.csv joins names "
            "with '|', so remove it from the name."
        )
    return names


def name_embeddings(
    names: Sequence[str],
    templates: Sequence[str],
    embed_text: Callable[[list[str]], torch.Tensor],
    batch_size: int = 256,
) -> torch.Tensor:
    """[V, E] unit text embeddings: per name, the unit embeddings of every template averaged, then renormalised."""
    if not templates:
        raise ValueError(
            "names_templates is empty: give at least one prompt with {} for the name, e.g. ['a photo of a {}.']."
        )
    bad = [t for t in templates if t.count("{}") != 1]
    if bad:
        raise ValueError(f"names_templates entry {bad[0]!r} must contain exactly one {{}} (where the name goes).")
    prompts_T = [[template.format(n) for n in names] for template in templates]
    total = sum(
        torch.cat([unit(embed_text(p[i : i + batch_size])) for i in range(0, len(p), batch_size)]) for p in prompts_T
    )
    return unit(total / len(templates))


def concepts_from_embeddings(emb_NE: torch.Tensor, image_idx_KX: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """[K, E] concepts: the unit mean of the unit embeddings of each latent's top images (``image_idx_KX`` rows,
    -1 = padding); NaN rows for latents without images. In chunks of latents, so K x X x E never materialises."""
    unit_NE = unit(emb_NE)
    out = torch.full((image_idx_KX.shape[0], unit_NE.shape[1]), float("nan"))
    for k0 in range(0, image_idx_KX.shape[0], chunk):
        idx = image_idx_KX[k0 : k0 + chunk].long()
        valid = (idx >= 0).float()
        summed = (unit_NE[idx.clamp_min(0)] * valid[..., None]).sum(1)
        count = valid.sum(1, keepdim=True)
        out[k0 : k0 + chunk] = torch.where(count > 0, unit(summed / count.clamp_min(1)), out[k0 : k0 + chunk])
    return out


@dataclass
class LatentNames:
    """Per latent: the best name, its cosine, the top names (best first); optionally LLaVA's word and its cosine."""

    name: list[str]
    score: list[float]
    names: list[tuple[str, ...]]
    autointerp: list[str] | None = None
    autointerp_score: list[float] | None = None

    def columns(self, k: int) -> dict[str, Any]:
        """Latent ``k``'s name columns of latents.csv (with LLaVA's word and its score when asked)."""
        out: dict[str, Any] = {"name": self.name[k], "name_score": self.score[k], "names": self.names[k]}
        if self.autointerp is not None and self.autointerp_score is not None:
            out.update(autointerp=self.autointerp[k], autointerp_score=self.autointerp_score[k])
        return out

    def summary(self, ms_K: torch.Tensor | None = None, n: int = 10) -> dict[str, Any]:
        """For the job's summary: how many latents got a name, the mean cosine, and the names of the ``n`` latents
        with the highest MS (or the first ``n``)."""
        named = [k for k, s in enumerate(self.score) if s == s]
        order = named
        if ms_K is not None:
            order = sorted(named, key=lambda k: -float(ms_K[k]) if ms_K[k] == ms_K[k] else float("inf"))
        out = {
            "n_named": len(named),
            "mean_name_score": sum(self.score[k] for k in named) / len(named) if named else float("nan"),
            "top_latents": [{"latent": k, **self.columns(k), "names": "|".join(self.names[k])} for k in order[:n]],
        }
        if self.autointerp is not None and self.autointerp_score is not None:
            asked = [k for k, w in enumerate(self.autointerp) if w]
            scored = [self.autointerp_score[k] for k in asked if self.autointerp_score[k] == self.autointerp_score[k]]
            out["n_autointerp"] = len(asked)
            out["mean_autointerp_score"] = sum(scored) / len(scored) if scored else float("nan")
        return out


def top_names(concepts_KE: torch.Tensor, names_VE: torch.Tensor, vocab: Sequence[str], top: int = 3) -> LatentNames:
    """The ``top`` vocabulary entries with the highest cosine to each concept, best first (ties: earlier entry)."""
    if len(vocab) != names_VE.shape[0]:
        raise ValueError(f"{len(vocab)} names but {names_VE.shape[0]} text embeddings: they must align.")
    if top < 1:
        raise ValueError(f"names_top={top}: keep at least 1 name per latent.")
    sims_KV = concepts_KE.float() @ unit(names_VE).T
    t = min(top, len(vocab))
    # a stable descending sort keeps the earlier vocabulary entry first on a tie (topk does not promise it)
    order_KV = torch.sort(sims_KV.nan_to_num(-2.0), dim=1, descending=True, stable=True).indices[:, :t]
    no_concept_K = torch.isnan(concepts_KE).any(1).tolist()
    picked_K = [[] if no_concept_K[k] else row for k, row in enumerate(order_KV.tolist())]
    return LatentNames(
        [vocab[p[0]] if p else "" for p in picked_K],
        [float(sims_KV[k, p[0]]) if p else float("nan") for k, p in enumerate(picked_K)],
        [tuple(vocab[v] for v in p) for p in picked_K],
    )


def with_names(table: LatentsTable, names: LatentNames) -> LatentsTable:
    """``table`` with the name (and autointerp) columns of ``names`` filled in, row by latent id."""
    return LatentsTable([dataclasses.replace(r, **names.columns(r.latent)) for r in table.rows])


def text_side(embedder: Any, embedder_name: str) -> Callable[[list[str]], torch.Tensor]:
    """The embedder's ``embed_text``, or an error saying which embedders have one."""
    fn = getattr(embedder, "embed_text", None)
    if not callable(fn):
        raise ValueError(
            f"embedder={embedder_name} has no text side ({type(embedder).__name__} embeds images only), so it cannot "
            "name features: names= needs a CLIP embedder (embedder=clip_b32, or embedder=tiny offline). Use one, "
            "or drop names= (names=null)."
        )
    return fn


@dataclass
class LatentNamer:
    """A vocabulary embedded once with the embedder's text side; :meth:`name` names concept vectors."""

    vocab: list[str]
    names_VE: torch.Tensor
    top: int
    vocabulary: str  # the names= it came from: imagenet | wordnet | the file
    embedder: Any = None  # the embedder whose text side embedded the vocabulary (its image side names a run)
    templates: tuple[str, ...] = DEFAULT_TEMPLATES  # the prompts the vocabulary was embedded with
    autointerp: AutoInterp | None = None  # the optional LLaVA pass (autointerp=llava)

    @classmethod
    def build(
        cls,
        names: str,
        templates: Sequence[str],
        top: int,
        embedder: Any,
        embedder_name: str,
        autointerp: AutoInterp | None = None,
    ) -> LatentNamer:
        """Load the vocabulary and embed it (the embedder checked for a text side first: the cheap errors first)."""
        embed_text = text_side(embedder, embedder_name)
        if top < 1:
            raise ValueError(f"names_top={top}: keep at least 1 name per latent.")
        vocab = load_vocabulary(str(names))
        names_VE = name_embeddings(vocab, list(templates), embed_text)
        return cls(vocab, names_VE, top, str(names), embedder, tuple(templates), autointerp)

    def name(
        self,
        concepts_KE: torch.Tensor,
        paths_K: Sequence[Sequence[Any]] | None = None,
        ms_K: torch.Tensor | None = None,
    ) -> LatentNames:
        """Names of the concepts; with the LLaVA pass also its word and score per latent (``paths_K[k]``: latent
        k's top images, best first; ``ms_K``: which latents go first under the cap)."""
        names = top_names(concepts_KE, self.names_VE, self.vocab, self.top)
        if self.autointerp is not None:
            if paths_K is None:
                raise ValueError(
                    "autointerp=llava needs the top images' files, but this image source records no paths "
                    "(a stream): use data=folder or data=list, or autointerp=null."
                )
            embed_text = text_side(self.embedder, "the names embedder")
            words, scores = self.autointerp.interpret(
                paths_K, concepts_KE, ms_K, lambda w: name_embeddings(w, self.templates, embed_text)
            )
            names.autointerp, names.autointerp_score = words, scores
        return names

    def study_summary(self, names: LatentNames, ms_K: torch.Tensor | None = None) -> dict[str, Any]:
        """The ``names`` entry of ``ms_summary.json``: the vocabulary, its size, and :meth:`LatentNames.summary`."""
        return {"vocabulary": self.vocabulary, "n_names": len(self.vocab), "top": self.top, **names.summary(ms_K)}

    def name_from_embeddings(
        self,
        emb_NE: torch.Tensor,
        image_idx_KX: torch.Tensor,
        paths: Sequence[Any] | None = None,
        ms_K: torch.Tensor | None = None,
    ) -> LatentNames:
        """Names of every latent of a top-images index whose rows index ``emb_NE`` (and ``paths``, the images'
        files, which the LLaVA pass opens)."""
        paths_K = None if paths is None else [[paths[i] for i in row if i >= 0] for row in image_idx_KX.tolist()]
        return self.name(concepts_from_embeddings(emb_NE, image_idx_KX), paths_K, ms_K)


def label_namer(emb_NE: torch.Tensor, labels_N: Sequence[int], classes: Sequence[str], top: int = 3) -> LatentNamer:
    """``names=labels``: a namer whose vocabulary is ``classes`` (those with at least one image) and whose name
    embeddings are each class's unit mean of unit image embeddings (``labels_N[i]`` = class of row i, -1 = none)."""
    labels = torch.as_tensor(list(labels_N), dtype=torch.long)
    if labels.numel() != emb_NE.shape[0]:
        raise ValueError(f"{labels.numel()} labels for {emb_NE.shape[0]} embeddings: they must align.")
    unit_NE = unit(emb_NE)
    present = [c for c in range(len(classes)) if bool((labels == c).any())]
    if not present:
        raise ValueError(
            "names=labels needs labelled images (class sub-folders, or labels in a list file / WebDataset), and "
            "these have none: use a labelled image set or a vocabulary (names=imagenet, names=<file>)."
        )
    means_YE = torch.stack([unit(unit_NE[labels == c].mean(0)) for c in present])
    return LatentNamer([classes[c] for c in present], means_YE, top, LABELS)


def build_namer(
    names: str | None,
    templates: Sequence[str],
    top: int,
    embedder_cfg: Any,
    autointerp: AutoInterp | None = None,
) -> LatentNamer | None:
    """The namer of a job's ``names`` / ``names_templates`` / ``names_top`` keys (None when ``names`` is null),
    with the embedder of ``embedder_cfg`` (an :class:`~vlmsae.models.embedders.EmbedderSpec` or its node) and
    the optional LLaVA pass."""
    if names is None:
        return None
    if str(names) == LABELS:  # filled from the scored images' labels and embeddings (label_namer)
        if top < 1:
            raise ValueError(f"names_top={top}: keep at least 1 name per latent.")
        return LatentNamer([], torch.zeros(0, 0), top, LABELS, autointerp=autointerp)
    spec = to_typed(embedder_cfg, embedders.EmbedderSpec)
    if not str(names).strip():
        raise ValueError(f"names={names!r} is empty; {_VOCAB_FIX}, or names=null for no names.")
    embedder = embedders.load_embedder(spec)  # looked up at call time (tests replace it)
    return LatentNamer.build(str(names), list(templates), top, embedder, spec.name, autointerp)


def namer_for(options: Any, embedder: Any) -> LatentNamer | None:
    """:func:`build_namer` from the ``names*`` and ``autointerp*`` fields of ``options`` (a job's typed config:
    ``names`` and :class:`vlmsae.config.nodes.NamingOptions`); the LLaVA pass is checked first (choice, model,
    cap: nothing loads), then the vocabulary is embedded."""
    autointerp = build_autointerp(
        options.autointerp, options.autointerp_model, options.autointerp_max_latents, options.names
    )
    return build_namer(options.names, options.names_templates, options.names_top, embedder, autointerp=autointerp)


def ms_run_embedder(ms_dpath: str | Path, embedder_cfg: Any = None) -> Any:
    """The embedder node to name a finished MS run with: ``embedder_cfg`` when given, else the run's own
    (``run_info.json``'s config), so names live in the space the run's MS was measured in."""
    if embedder_cfg:
        return embedder_cfg
    node = (read_run_info(Path(ms_dpath)).config or {}).get("embedder")
    if not node:
        raise ValueError(f"{ms_dpath}/run_info.json records no embedder: pass embedder=clip_b32 (or another CLIP).")
    return node


def name_ms_run(ms_dpath: str | Path, namer: LatentNamer) -> tuple[LatentsTable, LatentNames]:
    """Name the latents of a finished monosemanticity run: its ``top_images/`` images embedded again with the
    namer's embedder (latent by latent, as the steering score does) into concepts; returns ``latents.csv`` with
    the name columns filled in, and the names. Nothing is written here."""
    if namer.vocabulary == LABELS:
        raise ValueError(
            "names=labels names latents from the labelled images a monosemanticity run scores: rerun "
            "monosemanticity with names=labels (or name this run with a vocabulary, names=imagenet)."
        )
    ms_dpath = Path(ms_dpath)
    table = read_latents_csv(ms_dpath)
    top = TopImages.load(ms_dpath / TOP_IMAGES_DIR)
    if top.paths is None:
        raise ValueError(
            f"{ms_dpath / TOP_IMAGES_DIR} has no image paths (images.json paths is null), so its images cannot be "
            "embedded again: rerun the monosemanticity job with names=... instead."
        )
    paths = [[top.paths[i] for i in row if i >= 0] for row in top.image_idx.tolist()]
    concepts_KE = streamed_concept_embeddings(paths, load_image, namer.embedder.embed)
    names = namer.name(concepts_KE, paths, table.ms_K(len(paths)))
    return with_names(table, names), names

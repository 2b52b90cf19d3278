"""Taxonomies: map an image (or its class) to a path of ranks, root first.

METHOD §4 scores a latent by how deep in a taxonomy its top images agree. Every loader here
returns a :class:`Taxonomy`: the rank names plus a dict from a *taxon key* (an iNat directory name,
an ImageNet wnid, a class name, an image key) to the path of taxa from the root down, e.g.
``("Animalia", "Chordata", "Aves", "Passeriformes", "Corvidae", "Corvus", "Corvus corax")``.

Sources:
- iNaturalist 2021 directory names (``00000_Animalia_Chordata_Aves_..._Corvus_corax``);
- the iNat categories JSON (``kingdom ... genus, specific_epithet``);
- WordNet hypernym paths of ImageNet wnids (``n01440764``), read straight from WordNet's
  ``data.noun`` (Debian ``wordnet-base`` or nltk's ``wordnet`` corpus; never downloaded here);
- a CSV with a key column and one column per rank;
- the generated concept images of ``data=tiny`` (shape, then shape + colour).

Images are matched to taxa by :meth:`Taxonomy.match` (exact key, class label, any folder of the key /
path, then the file name, its stem or its wnid prefix), so ImageFolder layouts work without a mapping
file. Taxon paths become integer codes per rank with :func:`encode_paths` for the vectorised metric.
"""

from __future__ import annotations

import csv
import json
import os
import re
import sys
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from vlmsae.data.concepts import concept_classes

INAT_RANKS: tuple[str, ...] = ("kingdom", "phylum", "class", "order", "family", "genus", "species")

# 00000_Animalia_Chordata_Aves_Passeriformes_Corvidae_Corvus_corax: an id, six ranks, the epithet.
# Everything after the genus is the epithet (a trinomial's subspecies word included).
_INAT_DIRNAME_RE = re.compile(r"^(\d+)_([^_]+)_([^_]+)_([^_]+)_([^_]+)_([^_]+)_([^_]+)_(.+)$")
_WNID_RE = re.compile(r"n\d{8}")


class TaxonomyError(ValueError):
    """A taxonomy file is malformed, missing, or does not cover the images asked about."""


@dataclass
class Taxonomy:
    """Rank names and, per taxon key, the path of taxa from the root (``len(path) <= len(ranks)``)."""

    ranks: tuple[str, ...]
    paths: dict[str, tuple[str, ...]]
    origin: str = ""  # where it came from, for run_info and error messages

    def __post_init__(self) -> None:
        if not self.paths:
            raise TaxonomyError(f"Taxonomy from {self.origin or '?'} is empty: no taxon was parsed.")
        too_long = [k for k, p in self.paths.items() if len(p) > len(self.ranks)]
        if too_long:
            raise TaxonomyError(
                f"Taxonomy from {self.origin}: {len(too_long)} paths are longer than the {len(self.ranks)} ranks "
                f"{list(self.ranks)}, e.g. {too_long[0]!r} -> {self.paths[too_long[0]]}."
            )

    @property
    def n_ranks(self) -> int:
        return len(self.ranks)

    def __len__(self) -> int:
        return len(self.paths)

    def _lookup_one(self, key: str, path: str | None, label: object) -> tuple[str, ...] | None:
        """The path of one image, trying the most specific evidence first."""
        if key in self.paths:
            return self.paths[key]
        if isinstance(label, str) and label in self.paths:
            return self.paths[label]
        # Folder names of the key and the file path, innermost first, then the file name and its
        # stem: root/train/00000_Animalia_.../x.jpg, root/n01440764/x.JPEG, then val/n01440764_123.JPEG.
        # Folders come before the file name so an image called "5.jpg" never matches a taxon "5".
        for candidate in (key, path):
            if not candidate:
                continue
            *folders, fname = str(candidate).replace("\\", "/").split("/")
            for part in reversed(folders):
                if part in self.paths:
                    return self.paths[part]
            stem = os.path.splitext(fname)[0]
            for name in (fname, stem):
                if name in self.paths:
                    return self.paths[name]
            wnid = _WNID_RE.match(stem)
            if wnid and wnid.group(0) in self.paths:
                return self.paths[wnid.group(0)]
        return None

    def match(
        self,
        keys: Sequence[str],
        paths: Sequence[str | None] | None = None,
        labels: Sequence[object] | None = None,
        max_examples: int = 5,
    ) -> list[tuple[str, ...]]:
        """The taxon path of every image; a :class:`TaxonomyError` listing examples if any is unmatched."""
        out: list[tuple[str, ...]] = []
        failed: list[str] = []
        for i, key in enumerate(keys):
            p = self._lookup_one(str(key), None if paths is None else paths[i], None if labels is None else labels[i])
            if p is None:
                failed.append(str(key) if paths is None or paths[i] is None else f"{key} ({paths[i]})")
            out.append(p or ())
        if failed:
            examples = ", ".join(repr(f) for f in failed[:max_examples])
            known = ", ".join(repr(k) for k in list(self.paths)[:3])
            raise TaxonomyError(
                f"{len(failed)} of {len(keys)} images match no taxon in {self.origin}: {examples}"
                f"{' ...' if len(failed) > max_examples else ''}. An image matches when its key, its label, or "
                f"one of its folder names / file-name stems is a taxon key; taxon keys look like {known}. "
                "Point taxonomy.path at the taxonomy of these images, or use a CSV keyed by image key."
            )
        return out


def encode_paths(paths: Sequence[Sequence[str]], n_ranks: int) -> tuple[torch.Tensor, list[list[str]]]:
    """Integer codes ``[N, n_ranks]`` for taxon paths; 0 = the path stops above this rank.

    The code at rank r identifies the whole prefix ``path[: r + 1]``, not the name alone, so two
    genera called alike under different families, or one epithet in two genera, never compare equal.
    Returns the codes and, per rank, the display name of each code (index 0 = "").
    """
    # Images share few distinct paths (2.7M iNat images, 10k species): encode each distinct path once.
    unique: dict[tuple[str, ...], int] = {}
    inverse_N = torch.tensor([unique.setdefault(tuple(p), len(unique)) for p in paths], dtype=torch.long)
    codes_UO = torch.zeros(len(unique), n_ranks, dtype=torch.long)
    ids: list[dict[tuple[str, ...], int]] = [{} for _ in range(n_ranks)]
    names: list[list[str]] = [[""] for _ in range(n_ranks)]
    for u, path in enumerate(unique):
        for r in range(min(len(path), n_ranks)):
            prefix = path[: r + 1]
            code = ids[r].get(prefix)
            if code is None:
                code = ids[r][prefix] = len(names[r])
                names[r].append(path[r])
            codes_UO[u, r] = code
    codes_NO = codes_UO[inverse_N] if len(paths) else codes_UO
    return codes_NO, names


# ----------------------------------------------------------------------------------------------
# iNaturalist 2021
# ----------------------------------------------------------------------------------------------


def parse_inat_dirname(name: str) -> tuple[str, ...] | None:
    """``00000_Animalia_..._Corvus_corax`` -> 7 ranks (species as "Corvus corax"); None if not one."""
    m = _INAT_DIRNAME_RE.match(name)
    if m is None:
        return None
    kingdom, phylum, cls, order, family, genus, epithet = m.groups()[1:]
    return (kingdom, phylum, cls, order, family, genus, f"{genus} {epithet.replace('_', ' ')}")


def load_inat_dirnames(root_or_names: str | Path | Iterable[str]) -> Taxonomy:
    """Taxonomy from iNat 2021 class-folder names: a dataset root (class folders directly below it,
    or below ``train/``, ``val/``, ``train_mini/``), or an iterable of names.
    """
    if isinstance(root_or_names, (str, Path)):
        root = Path(root_or_names)
        if not root.is_dir():
            raise TaxonomyError(f"taxonomy=inat_dirnames: {root} is not a directory (expected the iNat 2021 root).")
        dpaths = [root] + [root / s for s in ("train", "val", "train_mini", "public_test")]
        names = [p.name for dpath in dpaths if dpath.is_dir() for p in dpath.iterdir() if p.is_dir()]
        label = str(root)
    else:
        names, label = list(root_or_names), "iNat directory names"
    paths = {name: p for name in names if (p := parse_inat_dirname(name)) is not None}
    if not paths:
        raise TaxonomyError(
            f"No iNat 2021 class folder (like 00000_Animalia_Chordata_Aves_Passeriformes_Corvidae_Corvus_corax) "
            f"found in {label}; saw e.g. {sorted(names)[:5]}."
        )
    return Taxonomy(INAT_RANKS, paths, origin=f"inat_dirnames:{label}")


def load_inat_json(fpath: str | Path) -> Taxonomy:
    """Taxonomy from the iNat 2021 categories JSON (``train.json`` / ``val.json`` or a bare list).

    Each category is reachable by its ``image_dir_name`` and its ``name`` (not its numeric id, which
    file names like ``5.jpg`` would hit); images listed in the file (``images`` + ``annotations``)
    are keyed by ``file_name`` too.
    """
    fpath = Path(fpath)
    if not fpath.is_file():
        raise TaxonomyError(f"taxonomy=inat_json: no such file {fpath} (the iNat 2021 train.json or val.json).")
    data = json.loads(fpath.read_text(encoding="utf-8"))
    cats = data["categories"] if isinstance(data, dict) and "categories" in data else data
    if not isinstance(cats, list):
        raise TaxonomyError(f"{fpath}: expected a list of categories or an object with key 'categories'.")
    fields = ("kingdom", "phylum", "class", "order", "family", "genus", "specific_epithet")
    paths: dict[str, tuple[str, ...]] = {}
    by_id: dict[object, tuple[str, ...]] = {}
    for i, cat in enumerate(cats):
        missing = [f for f in fields if f not in cat]
        if missing:
            raise TaxonomyError(f"{fpath}: category #{i} ({cat.get('name', '?')}) lacks the fields {missing}.")
        path = (*tuple(str(cat[f]) for f in fields[:-1]), f"{cat['genus']} {cat['specific_epithet']}")
        for key in (cat.get("image_dir_name"), cat.get("name")):
            if key is not None:
                paths[str(key)] = path
        by_id[cat.get("id")] = path
    if isinstance(data, dict) and "images" in data and "annotations" in data:
        cat_of_image = {a["image_id"]: a["category_id"] for a in data["annotations"]}
        for img in data["images"]:
            cid = cat_of_image.get(img["id"])
            if cid in by_id:
                paths[str(img["file_name"])] = by_id[cid]
    return Taxonomy(INAT_RANKS, paths, origin=f"inat_json:{fpath}")


# ----------------------------------------------------------------------------------------------
# CSV
# ----------------------------------------------------------------------------------------------


def load_csv(fpath: str | Path, key_column: str | None = None, ranks: Sequence[str] | None = None) -> Taxonomy:
    """Taxonomy from a CSV: one key column (image key, class name or wnid) and one column per rank,
    root first. Defaults: the first column is the key, all others are ranks. An empty cell ends the path.
    """
    fpath = Path(fpath)
    if not fpath.is_file():
        raise TaxonomyError(f"taxonomy=csv: no such file {fpath}.")
    with fpath.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        header = list(reader.fieldnames or [])
        if len(header) < 2:
            raise TaxonomyError(f"{fpath}: need a key column and at least one rank column, got header {header}.")
        key_column = key_column or header[0]
        ranks = list(ranks) if ranks else [h for h in header if h != key_column]
        missing = [c for c in [key_column, *ranks] if c not in header]
        if missing:
            raise TaxonomyError(f"{fpath}: columns {missing} not in the header {header}.")
        paths: dict[str, tuple[str, ...]] = {}
        for line_no, row in enumerate(reader, start=2):
            cells = [(row.get(r) or "").strip() for r in ranks]
            n = next((i for i, c in enumerate(cells) if not c), len(cells))
            if any(cells[n:]):
                raise TaxonomyError(f"{fpath}:{line_no}: a rank is empty but a deeper one is set: {cells}.")
            paths[(row.get(key_column) or "").strip()] = tuple(cells[:n])
    return Taxonomy(tuple(ranks), paths, origin=f"csv:{fpath}")


# ----------------------------------------------------------------------------------------------
# WordNet
# ----------------------------------------------------------------------------------------------

WORDNET_INSTALL_HINT = (
    "WordNet 3.0 is not installed on this machine (vlmsae never downloads it at run time). Install one of:\n"
    "  - Debian/Ubuntu: sudo apt-get install wordnet-base        (files in /usr/share/wordnet/)\n"
    "  - nltk: .venv/bin/python -m nltk.downloader -d ~/nltk_data wordnet\n"
    "or point taxonomy.wordnet_dpath (or $WORDNET_DIR) at a folder holding data.noun."
)


def _nltk_data_dirs() -> list[Path]:
    """nltk's search path, without requiring nltk to be importable."""
    try:
        import nltk

        dirs = list(nltk.data.path)
    except ImportError:
        dirs = [
            os.path.expanduser("~/nltk_data"),
            os.path.join(sys.prefix, "nltk_data"),
            os.path.join(sys.prefix, "share", "nltk_data"),
            os.path.join(sys.prefix, "lib", "nltk_data"),
            "/usr/share/nltk_data",
            "/usr/local/share/nltk_data",
            "/usr/lib/nltk_data",
            "/usr/local/lib/nltk_data",
        ]
        dirs = os.environ.get("NLTK_DATA", "").split(os.pathsep) + dirs
    return [Path(d) for d in dirs if d]


def find_wordnet_noun_file(wordnet_dpath: str | Path | None = None) -> tuple[Path, str | None]:
    """Locate WordNet's ``data.noun``: (file, member) where member is set when it sits inside a zip.

    An explicit ``wordnet_dpath`` is the only place looked at (a wrong path is an error, never a silent
    fall-back to another WordNet); otherwise $WORDNET_DIR, Debian's folders, then nltk's data folders.
    """
    candidates: list[Path] = []
    if wordnet_dpath:
        candidates.append(Path(wordnet_dpath))
    else:
        if os.environ.get("WORDNET_DIR"):
            candidates.append(Path(os.environ["WORDNET_DIR"]))
        candidates += [Path("/usr/share/wordnet"), Path("/usr/local/share/wordnet"), Path("/usr/share/wordnet/dict")]
        for d in _nltk_data_dirs():
            candidates += [d / "corpora" / "wordnet", d / "corpora" / "wordnet.zip"]
    for c in candidates:
        if c.is_file() and c.suffix == ".zip":
            with zipfile.ZipFile(c) as zf:
                member = next((n for n in zf.namelist() if n.endswith("data.noun")), None)
            if member:
                return c, member
        elif c.is_file() and c.name == "data.noun":
            return c, None
        elif (c / "data.noun").is_file():
            return c / "data.noun", None
        elif (c / "dict" / "data.noun").is_file():
            return c / "dict" / "data.noun", None
    if wordnet_dpath:
        raise TaxonomyError(
            f"No WordNet data.noun under taxonomy.wordnet_dpath={wordnet_dpath}.\n{WORDNET_INSTALL_HINT}"
        )
    raise TaxonomyError(WORDNET_INSTALL_HINT)


def parse_wordnet_data(lines: Iterable[str]) -> dict[int, tuple[str, list[int]]]:
    """Parse WordNet ``data.noun`` lines: offset -> (first lemma, hypernym offsets in file order).

    Format (wndb(5)): ``offset lex_filenum ss_type w_cnt(hex) [word lex_id]... p_cnt(dec)
    [symbol offset pos source/target]... | gloss``; lines starting with a space are the licence.
    Hypernyms are ``@`` pointers, then ``@i`` (instance) ones, as nltk orders them.
    """
    synsets: dict[int, tuple[str, list[int]]] = {}
    for line_no, line in enumerate(lines, start=1):
        if not line.strip() or line.startswith(" "):
            continue
        fields = line.split(" | ", 1)[0].split()
        try:
            offset = int(fields[0])
            w_cnt = int(fields[3], 16)
            lemma = fields[4].replace("_", " ")
            p_at = 4 + 2 * w_cnt
            p_cnt = int(fields[p_at])
            hyper, inst = [], []
            for j in range(p_cnt):
                symbol, target, pos = fields[p_at + 1 + 4 * j : p_at + 4 + 4 * j]
                if pos == "n" and symbol == "@":
                    hyper.append(int(target))
                elif pos == "n" and symbol == "@i":
                    inst.append(int(target))
        except (IndexError, ValueError) as e:
            raise TaxonomyError(f"WordNet data.noun line {line_no} is malformed ({e}): {line[:120]!r}") from e
        synsets[offset] = (lemma, hyper + inst)
    return synsets


def wordnet_path(synsets: dict[int, tuple[str, list[int]]], offset: int) -> tuple[str, ...]:
    """Root-first lemmas following the first hypernym at every step (nltk's ``hypernym_paths()[0]``)."""
    path, seen = [], set()
    while True:
        if offset not in synsets:
            raise TaxonomyError(f"WordNet synset n{offset:08d} is not in data.noun (is this WordNet 3.0?).")
        if offset in seen:
            raise TaxonomyError(f"WordNet hypernym cycle at n{offset:08d}.")
        seen.add(offset)
        lemma, hypers = synsets[offset]
        path.append(lemma)
        if not hypers:
            return tuple(reversed(path))
        offset = hypers[0]


def load_wordnet_synsets(fpath: str | Path, member: str | None = None) -> dict[int, tuple[str, list[int]]]:
    """:func:`parse_wordnet_data` of a ``data.noun`` file, or of ``member`` inside a zip (as nltk ships it)."""
    if member is None:
        with open(fpath, encoding="utf-8", errors="replace") as f:
            return parse_wordnet_data(f)
    with zipfile.ZipFile(fpath) as zf:
        return parse_wordnet_data(zf.read(member).decode("utf-8", errors="replace").splitlines())


def load_wordnet(wnids: Iterable[str] | None = None, wordnet_dpath: str | Path | None = None) -> Taxonomy:
    """Taxonomy of ImageNet wnids (``n01440764``) from their WordNet hypernym paths.

    ``wnids``: the classes to include (None = every noun synset). Ranks are ``depth_1 ... depth_D``,
    D the longest path; paths differ in length, so depth 1 is always ``entity``.
    """
    fpath, member = find_wordnet_noun_file(wordnet_dpath)
    synsets = load_wordnet_synsets(fpath, member)
    if wnids is None:
        wnids = [f"n{o:08d}" for o in synsets]
    paths = {}
    for wnid in wnids:
        if not _WNID_RE.fullmatch(wnid):
            raise TaxonomyError(f"{wnid!r} is not a WordNet noun id (expected n + 8 digits, e.g. n01440764).")
        paths[wnid] = wordnet_path(synsets, int(wnid[1:]))
    depth = max(len(p) for p in paths.values())
    return Taxonomy(
        tuple(f"depth_{i + 1}" for i in range(depth)), paths, origin=f"wordnet:{fpath}{'!' + member if member else ''}"
    )


def wnids_in(root: str | Path) -> list[str]:
    """The wnid class folders (ImageNet layout) under ``root`` or ``root/train`` / ``root/val``."""
    root = Path(root)
    found = set()
    for d in [root, root / "train", root / "val"]:
        if d.is_dir():
            found |= {p.name for p in d.iterdir() if p.is_dir() and _WNID_RE.fullmatch(p.name)}
    return sorted(found)


def load_concepts(root: str | Path | None = None) -> Taxonomy:
    """The two-rank taxonomy (shape, then shape + colour) of the generated concept images
    (:mod:`vlmsae.data.concepts`, ``data=tiny``): class folders ``<shape>_<colour>``.

    ``root``: a generated folder (its ``concepts.json`` lists the classes); None = every class.
    """
    classes = None
    if root is not None and (Path(root) / "concepts.json").is_file():
        meta = json.loads((Path(root) / "concepts.json").read_text())
        classes = [(c["name"], c["shape"], c["colour"]) for c in meta["classes"]]
    if classes is None:
        classes = [(name, *name.split("_", 1)) for name in concept_classes()]
    paths = {name: (shape, f"{colour} {shape}") for name, shape, colour in classes}
    return Taxonomy(("shape", "shape_colour"), paths, origin=f"concepts:{root or 'all classes'}")


def load_taxonomy(
    kind: str,
    path: str | Path | None = None,
    *,
    key_column: str | None = None,
    ranks: Sequence[str] | None = None,
    wordnet_dpath: str | Path | None = None,
    data_root: str | Path | None = None,
) -> Taxonomy:
    """Dispatch on ``kind`` (inat_dirnames | inat_json | wordnet | csv | concepts).

    ``path`` (a file or folder) defaults to ``data_root`` where the kind reads folders.
    """
    if kind == "inat_dirnames":
        return load_inat_dirnames(path or _need(data_root, kind))
    if kind == "inat_json":
        return load_inat_json(_need(path, kind))
    if kind == "csv":
        return load_csv(_need(path, kind), key_column=key_column, ranks=ranks)
    if kind == "wordnet":
        wnids = None
        if path and Path(path).is_file():  # a text file with one wnid per line
            wnids = [w.split()[0] for w in Path(path).read_text().splitlines() if w.strip()]
        elif path or data_root:
            wnids = wnids_in(path or data_root) or None
        return load_wordnet(wnids, wordnet_dpath=wordnet_dpath)
    if kind == "concepts":
        return load_concepts(path or data_root)
    raise TaxonomyError(
        f"Unknown taxonomy kind {kind!r}; choose one of inat_dirnames, inat_json, wordnet, csv, concepts."
    )


def _need(value, kind: str):
    if not value:
        raise TaxonomyError(f"taxonomy={kind} needs taxonomy.path (a file or folder); none was given.")
    return value

"""Taxonomy loaders: each format parses its fixture; images match taxa or fail with a clear error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from vlmsae.data import taxonomy as tx

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "taxonomy"
RAVEN = ("Animalia", "Chordata", "Aves", "Passeriformes", "Corvidae", "Corvus", "Corvus corax")


def test_parse_inat_dirname():
    assert tx.parse_inat_dirname("00000_Animalia_Chordata_Aves_Passeriformes_Corvidae_Corvus_corax") == RAVEN
    # a trinomial keeps everything after the genus as the epithet
    assert tx.parse_inat_dirname("09999_Animalia_Chordata_Aves_Passeriformes_Corvidae_Corvus_corax_varius")[-1] == (
        "Corvus corax varius"
    )
    assert tx.parse_inat_dirname("n01440764") is None
    assert tx.parse_inat_dirname("00000_Animalia_Chordata") is None


def test_inat_dirnames_from_names_and_folder(tmp_path):
    names = (FIX / "inat_dirnames.txt").read_text().split()
    t = tx.load_inat_dirnames(names)
    assert t.ranks == tx.INAT_RANKS and len(t) == 6
    assert t.paths[names[0]] == RAVEN
    assert t.paths[names[4]][:2] == ("Plantae", "Tracheophyta")
    # the dataset root layout: root/train/<class>/<image>
    for n in names[:3]:
        (tmp_path / "train" / n).mkdir(parents=True)
    (tmp_path / "train" / "not_a_class").mkdir()
    t2 = tx.load_inat_dirnames(tmp_path)
    assert set(t2.paths) == set(names[:3])
    key = f"train/{names[2]}/abc.jpg"
    assert t2.match([key]) == [("Animalia", "Chordata", "Aves", "Passeriformes", "Paridae", "Parus", "Parus major")]
    with pytest.raises(tx.TaxonomyError, match="not_a_class"):
        tx.load_inat_dirnames(["not_a_class"])


def test_inat_json():
    t = tx.load_inat_json(FIX / "inat_categories.json")
    assert t.ranks == tx.INAT_RANKS
    assert t.paths["00000_Animalia_Chordata_Aves_Passeriformes_Corvidae_Corvus_corax"] == RAVEN
    assert t.paths["Corvus corax"] == RAVEN and "0" not in t.paths  # by name, never by bare numeric id
    assert t.paths["train/00002_Plantae_Tracheophyta_Magnoliopsida_Rosales_Rosaceae_Rosa_canina/b7.jpg"][0] == "Plantae"
    # an image folder named after the class matches through its parent directory
    assert t.match(["x/00001_Animalia_Chordata_Aves_Passeriformes_Paridae_Parus_major/q.jpg"])[0][-1] == "Parus major"


def test_inat_json_missing_field(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"id": 0, "name": "x", "kingdom": "Animalia"}]))
    with pytest.raises(tx.TaxonomyError, match="lacks the fields"):
        tx.load_inat_json(bad)


def test_csv():
    t = tx.load_csv(FIX / "taxonomy.csv")
    assert t.ranks == tx.INAT_RANKS
    assert t.paths["raven"] == RAVEN
    assert t.paths["bird_sp"] == ("Animalia", "Chordata", "Aves")  # empty cells end the path
    t2 = tx.load_csv(FIX / "taxonomy.csv", ranks=["kingdom", "class"])
    assert t2.paths["wolf"] == ("Animalia", "Mammalia")


def test_csv_gap_is_refused(tmp_path):
    f = tmp_path / "gap.csv"
    f.write_text("key,a,b,c\nx,A,,C\n")
    with pytest.raises(tx.TaxonomyError, match="gap.csv:2"):
        tx.load_csv(f)


def test_wordnet_parser_on_fixture():
    lines = (FIX / "wordnet" / "data.noun").read_text().splitlines()
    syn = tx.parse_wordnet_data(lines)
    assert 1740 in syn and syn[1740] == ("entity", [])
    assert syn[2084071] == ("dog", [2083346, 1317541])  # two hypernyms, file order kept
    assert syn[9246464] == ("Sirius", [2512053])  # instance hypernym
    assert tx.wordnet_path(syn, 1440764) == (
        "entity",
        "physical entity",
        "object",
        "whole",
        "living thing",
        "organism",
        "animal",
        "vertebrate",
        "fish",
        "cyprinid",
        "tench",
    )
    # the first hypernym wins (nltk's hypernym_paths()[0]): dog -> canine, not domestic animal
    assert tx.wordnet_path(syn, 2085620)[-3:] == ("canine", "dog", "Chihuahua")


def test_wordnet_loader_on_fixture(tmp_path):
    t = tx.load_wordnet(["n01440764", "n01443537", "n02085620", "n02099601"], wordnet_dpath=FIX / "wordnet")
    assert t.ranks[0] == "depth_1" and len(t.ranks) == 11  # longest path: entity ... dog, Chihuahua
    assert t.paths["n01443537"][-2:] == ("cyprinid", "goldfish")
    # ImageNet layouts: root/n01440764/x.JPEG and val/n01440764_00001.JPEG
    got = t.match(["n01440764/ILSVRC2012_val_1.JPEG", "val/n02099601_77.JPEG"])
    assert got[0][-1] == "tench" and got[1][-1] == "golden retriever"
    # the zip form nltk's downloader may leave behind
    import zipfile

    with zipfile.ZipFile(tmp_path / "wordnet.zip", "w") as zf:
        zf.write(FIX / "wordnet" / "data.noun", "wordnet/data.noun")
    tz = tx.load_wordnet(["n01440764"], wordnet_dpath=tmp_path / "wordnet.zip")
    assert tz.paths["n01440764"] == t.paths["n01440764"]
    with pytest.raises(tx.TaxonomyError, match=r"n \+ 8 digits"):
        tx.load_wordnet(["tench"], wordnet_dpath=FIX / "wordnet")
    with pytest.raises(tx.TaxonomyError, match="n09999999"):
        tx.load_wordnet(["n09999999"], wordnet_dpath=FIX / "wordnet")


def test_wordnet_missing_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.delenv("WORDNET_DIR", raising=False)
    with pytest.raises(tx.TaxonomyError, match="apt-get install wordnet-base") as e:
        tx.load_wordnet(["n01440764"], wordnet_dpath=tmp_path / "nowhere")
    assert "nltk.downloader" in str(e.value) and "nowhere" in str(e.value)


def test_real_wordnet_if_installed():
    """On a machine with WordNet 3.0 (or WORDNET_DIR=<folder with data.noun>): nltk's hypernym_paths()[0]."""
    try:
        tx.find_wordnet_noun_file()
    except tx.TaxonomyError:
        pytest.skip("no WordNet on this machine (apt-get install wordnet-base, or nltk's wordnet corpus)")
    t = tx.load_wordnet(["n01440764", "n02085620"])
    assert t.paths["n01440764"] == (
        "entity",
        "physical entity",
        "object",
        "whole",
        "living thing",
        "organism",
        "animal",
        "chordate",
        "vertebrate",
        "aquatic vertebrate",
        "fish",
        "bony fish",
        "teleost fish",
        "soft-finned fish",
        "cypriniform fish",
        "cyprinid",
        "tench",
    )
    assert t.paths["n02085620"][-4:] == ("canine", "dog", "toy dog", "Chihuahua")


def test_unmatched_keys_error_lists_examples():
    t = tx.load_csv(FIX / "taxonomy.csv")
    with pytest.raises(tx.TaxonomyError) as e:
        t.match(["raven", "img/zebra_01.jpg", "img/okapi_02.jpg", "crow"])
    msg = str(e.value)
    assert "2 of 4 images match no taxon" in msg
    assert "zebra_01.jpg" in msg and "okapi_02.jpg" in msg and "'raven'" in msg  # examples of both sides


def test_match_by_label_and_folder():
    t = tx.load_csv(FIX / "taxonomy.csv")
    got = t.match(
        ["000001", "images/tit/1.png", "x.png", "crow/raven.jpg", "flat/raven.jpg"],
        paths=[None, None, "/data/wolf/x.png", None, None],
        labels=["raven", None, None, None, None],
    )
    # the folder wins over the file name; the file-name stem is the last resort
    assert [p[-1] for p in got] == [
        "Corvus corax",
        "Parus major",
        "Canis lupus",
        "Corvus brachyrhynchos",
        "Corvus corax",
    ]


def test_encode_paths_uses_whole_prefix():
    paths = [("A", "B", "C"), ("A", "B", "C"), ("A", "E", "C"), ("A",), ("X", "B", "C")]
    codes, names = tx.encode_paths(paths, 3)
    assert codes.shape == (5, 3) and codes.dtype == torch.long
    assert torch.equal(codes[0], codes[1])
    assert codes[0, 0] == codes[2, 0] and codes[0, 2] != codes[2, 2]  # same name "C", different parent
    assert codes[3, 1] == 0 and codes[3, 2] == 0  # path ends
    assert codes[4, 1] != codes[0, 1]
    assert names[2][int(codes[2, 2])] == "C"


def test_load_taxonomy_dispatch(tmp_path):
    assert len(tx.load_taxonomy("csv", FIX / "taxonomy.csv")) == 5
    assert len(tx.load_taxonomy("inat_json", FIX / "inat_categories.json")) > 3
    (tmp_path / "n01440764").mkdir()
    t = tx.load_taxonomy("wordnet", data_root=tmp_path, wordnet_dpath=FIX / "wordnet")
    assert list(t.paths) == ["n01440764"]
    with pytest.raises(tx.TaxonomyError, match="Unknown taxonomy kind 'bogus'"):
        tx.load_taxonomy("bogus")
    with pytest.raises(tx.TaxonomyError, match="needs taxonomy.path"):
        tx.load_taxonomy("csv")

"""The paper's claims, measured on a network that has learned something: the digits ViT (model=digits_vit).

Every SAE is trained through ``vlmsae.train.run`` on block 2 of 4 (every token and CLS) of the train split's
activations, and scored through ``vlmsae.monosemanticity.run`` on the 360 held-out digits it never saw, with
the independent digits CNN as E (embedder=digits_cnn) and names=labels. Intervals are 95% Student-t
intervals over training seeds. The figures are printed (``pytest -s``) and kept in ``FIGURES``.

Slow: one extraction per ViT and nine short SAE trainings, a few minutes on 2 cores together.
"""

from __future__ import annotations

import csv
import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from vlmsae.data.digits import ensure_digits

SEEDS = (0, 1, 2)
LAYER = 2  # the middle of the ViT's 4 blocks
SAE = ["sae=batchtopk", "sae.expansion=8", "sae.k=8", "sae.threshold_start_step=50", "sae.dead_after_samples=50000"]
MATRYOSHKA = ["sae=matryoshka", "sae.expansion=8", "sae.k=8", "sae.threshold_start_step=50"]
MATRYOSHKA += ["sae.dead_after_samples=50000"]
TRAIN = ["trainer=tiny", "trainer.max_steps=300", "data.batch_size=1024", "logger=none"]
TOP_LATENTS = 10  # the highest-MS latents whose top images are checked for one class

pytestmark = pytest.mark.slow


def _interval(values: list[float]) -> tuple[float, float, float]:
    """(mean, low, high) of the 95% Student-t interval of the mean."""
    from scipy import stats

    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def _latents(ms_dpath: Path) -> list[dict[str, str]]:
    with open(ms_dpath / "latents.csv") as f:
        f.readline()  # the format line
        return list(csv.DictReader(f))


def _compose(config_name: str, overrides: list[str]):
    """The real conf/ tree composed as the CLI composes it (module scope: conftest's compose_cfg is per test)."""
    from hydra import compose, initialize_config_dir

    from vlmsae.config import conf_dir, register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return compose(config_name=config_name, overrides=overrides)


class Pipeline:
    """Extract once per model, then train and score SAEs through the real jobs (configs composed as the CLI)."""

    def __init__(self, root: Path, compose: Any):
        self.root, self.compose = root, compose
        self.digits = ensure_digits()

    def extract(self, model: str) -> Path:
        from vlmsae.extract import run

        out = self.root / f"acts_{model}"
        over = [f"model={model}", "data=digits", f"data.root={self.digits / 'train'}", f"layer={LAYER}"]
        run(self.compose("extract", [*over, "tokens=all", "dtype=float32", "logger=none", "progress=false"]), out)
        return out

    def train(self, store: Path, model: str, sae: list[str], seed: int, name: str) -> Path:
        from vlmsae.train import run

        out = self.root / f"{name}_seed{seed}"
        run(
            self.compose("train", [f"model={model}", "data=acts", f"data.acts={store}", *sae, *TRAIN, f"seed={seed}"]),
            out,
        )
        return out / "sae"

    def score(self, sae_dpath: Path, name: str) -> Path:
        from vlmsae.monosemanticity import run

        out = self.root / f"ms_{name}"
        over = [f"sae_path={sae_dpath}", "data=folder", f"data.root={self.digits / 'heldout'}", "embedder=digits_cnn"]
        run(self.compose("monosemanticity", [*over, "names=labels", "logger=none", "progress=false"]), out)
        return out


@pytest.fixture(scope="module")
def figures(tmp_path_factory) -> dict[str, Any]:
    pipe = Pipeline(tmp_path_factory.mktemp("claims"), _compose)
    stores = {m: pipe.extract(m) for m in ("digits_vit", "digits_vit_random")}
    runs: dict[str, list[Path]] = {"trained": [], "random": [], "matryoshka": []}
    for seed in SEEDS:
        for kind, model, sae in (
            ("trained", "digits_vit", SAE),
            ("random", "digits_vit_random", SAE),
            ("matryoshka", "digits_vit", MATRYOSHKA),
        ):
            sae_dpath = pipe.train(stores[model], model, sae, seed, kind)
            runs[kind].append(pipe.score(sae_dpath, f"{kind}_seed{seed}"))
    summaries = {k: [json.loads((d / "ms_summary.json").read_text()) for d in v] for k, v in runs.items()}
    out: dict[str, Any] = {"runs": {k: [str(d) for d in v] for k, v in runs.items()}}
    out["sae_ms"] = _interval([s["mean"] for s in summaries["trained"]])
    out["raw_ms"] = _interval([s["baseline"]["mean"] for s in summaries["trained"]])
    out["sae_minus_raw"] = _interval([s["mean"] - s["baseline"]["mean"] for s in summaries["trained"]])
    out["random_sae_ms"] = _interval([s["mean"] for s in summaries["random"]])
    out["random_raw_ms"] = _interval([s["baseline"]["mean"] for s in summaries["random"]])
    out["trained_minus_random"] = _interval(
        [a["mean"] - b["mean"] for a, b in zip(summaries["trained"], summaries["random"])]
    )
    groups = []  # per seed: mean MS of each Matryoshka group (live latents)
    for d in runs["matryoshka"]:
        by_group: dict[int, list[float]] = {}
        for row in _latents(d):
            if row["ms"] != "nan":
                by_group.setdefault(int(row["group"]), []).append(float(row["ms"]))
        groups.append([sum(v) / len(v) for _, v in sorted(by_group.items())])
    out["matryoshka_groups"] = [_interval([g[i] for g in groups]) for i in range(len(groups[0]))]
    out["matryoshka_last_minus_first"] = _interval([g[-1] - g[0] for g in groups])
    purity, agree = [], []
    for d in runs["trained"]:
        rows = [r for r in _latents(d) if r["ms"] != "nan" and r["top_keys"]]
        for row in sorted(rows, key=lambda r: -float(r["ms"]))[:TOP_LATENTS]:
            classes = [key.split("/")[0] for key in row["top_keys"].split("|")]
            majority, count = Counter(classes).most_common(1)[0]
            purity.append(count / len(classes))
            agree.append(float(row["name"] == majority))
    out["top_latent_purity"] = _interval(purity)
    out["top_latent_name_is_majority_class"] = sum(agree) / len(agree)
    text = json.dumps({k: v for k, v in out.items() if k != "runs"}, default=float)
    (pipe.root / "figures.json").write_text(text)
    print("\nPAPER CLAIMS ON THE DIGITS VIT:", text)
    return out


def test_sae_latents_are_more_monosemantic_than_raw_neurons(figures):
    mean, low, high = figures["sae_minus_raw"]
    assert low > 0, f"SAE - raw neuron MS: {mean:.3f} [{low:.3f}, {high:.3f}] does not lie above 0"


def test_a_random_init_vit_gives_clearly_less_monosemantic_latents(figures):
    low = figures["trained_minus_random"][1]
    assert low > 0, f"trained - random-init SAE MS: {figures['trained_minus_random']} does not lie above 0"


def test_matryoshka_ms_rises_from_the_first_group_to_the_last(figures):
    low = figures["matryoshka_last_minus_first"][1]
    assert low > 0, f"last - first Matryoshka group MS: {figures['matryoshka_last_minus_first']}"


def test_top_latents_are_one_class_and_named_after_it(figures):
    low = figures["top_latent_purity"][1]
    assert low > 0.5, f"class purity of the top latents' top images: {figures['top_latent_purity']} (chance 0.1)"
    assert figures["top_latent_name_is_majority_class"] >= 0.8

"""``make demo``: the whole pipeline on the built-in tiny default, in under a minute on 2 CPU cores.

    python -m vlmsae.demo                      # -> outputs/demo/ (replaced on each run)
    python -m vlmsae.demo --out /tmp/demo --steps data,extract,train,monosemanticity,browse

Every step (:data:`STEPS`) calls a real job's ``run(cfg, out_dpath)`` with a config composed from ``conf/``
exactly as the CLI would compose it, only with tiny choices; docs/demo.md says what each step runs, writes and
shows. The tiny LLaVA is random, so steps 1-7 show the pipeline works and where the answer key is; step 8
(``digits``) shows what it finds on a trained encoder. A step whose job module is missing or fails is reported
and the steps that do not need its output still run; the exit status is non-zero if any step did not finish.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
import math
import os
import shutil
import sys
import time
import traceback
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vlmsae import formats

DEFAULT_OUT = Path("outputs") / "demo"  # under the working directory, like every job's outputs/<job>/

# The demo's one model: LLaVA's vision tower (tiny and random), so the SAE that is scored, aligned
# and browsed is also the one that steers LLaVA, and the browser shows steering on its cards.
MODEL = "tiny_llava"
TOKENS = "random_k"  # 2 random tokens per image, as the paper's steering SAE; patch tokens -> heatmaps
IMAGES_PER_CLASS = 32  # 16 shape x colour classes -> 512 generated images
IMAGE_PX = 64

STEPS = (
    "data", "extract", "train", "monosemanticity", "hierarchy", "steer", "splice_eval", "ground_truth", "digits",
    "inspect",
    "browse",
)  # fmt: skip
DIGITS_MODEL, DIGITS_EMBEDDER, DIGITS_LAYER = "digits_vit", "digits_cnn", 2  # step 8: a trained ViT, its middle
VOCAB_FILE = "concept_names.txt"  # the names= vocabulary of the monosemanticity step, in the demo folder


def compose(config_name: str, overrides: list[str]):
    """The real ``conf/<config_name>.yaml`` with ``overrides``, as the CLI composes it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from vlmsae.config import conf_dir, register_configs

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=overrides)


def call_job(job: str, overrides: list[str], out_dpath: Path) -> dict[str, Any]:
    """``vlmsae.<job>.run(compose(job, overrides), out_dpath)``."""
    module = importlib.import_module(f"vlmsae.{job}")
    cfg = compose(job, overrides)
    result = module.run(cfg, out_dpath=out_dpath)
    return result if isinstance(result, dict) else {"result": result}


@dataclass
class StepResult:
    """One step's record, as demo_summary.json holds it."""

    status: str = "pending"  # ok | failed | missing | skipped
    seconds: float = 0.0
    out: str = ""
    shows: list[str] = field(default_factory=list)  # the human summary
    error: str = ""


# --------------------------------------------------------------------------------------------
# Readers for what each step wrote (the documented formats, so the summary does not depend on
# a job's return value)
# --------------------------------------------------------------------------------------------
def _read_json(fpath: Path) -> Any:
    return json.loads(fpath.read_text()) if fpath.is_file() else None


def _fmt(x: Any, digits: int = 3) -> str:
    try:
        xf = float(x)
    except (TypeError, ValueError):
        return "n/a"
    return "n/a" if math.isnan(xf) else f"{xf:.{digits}f}"


def _sci(x: Any) -> str:
    """``x`` as 1.23e-05: the tiny LLaVA's KLs are far below what 3 decimals show."""
    text = _fmt(x)
    return text if text == "n/a" else f"{float(x):.2e}"


def best_latents(ms_dpath: Path, n: int = 1) -> list[formats.LatentRow]:
    """The ``n`` live latents with the highest MS (``latents.csv``)."""
    fpath = ms_dpath / formats.LATENTS_CSV
    rows = formats.read_latents_csv(fpath).rows if fpath.is_file() else []
    return sorted((r for r in rows if not math.isnan(r.ms)), key=lambda r: -r.ms)[:n]


def _read_format(read: Any, fpath: Path) -> dict[str, Any]:
    """A documented output as a dict (``{}`` when the step did not write it)."""
    return read(fpath).to_dict() if fpath.is_file() else {}


# --------------------------------------------------------------------------------------------
# The steps
# --------------------------------------------------------------------------------------------
class Demo:
    """Runs the steps in order into ``out_dpath``; each step records what it shows."""

    def __init__(self, out_dpath: Path, steps: tuple[str, ...] = STEPS, seed: int = 0):
        self.out = out_dpath
        self.steps = steps
        self.seed = seed
        self.results: dict[str, StepResult] = {}

    def d(self, name: str) -> Path:
        return self.out / name

    def ok(self, name: str) -> bool:
        return name in self.results and self.results[name].status == "ok"

    @property
    def data_overrides(self) -> list[str]:
        return ["data=folder", f"data.root={self.d('data') / 'concepts'}", "data.num_workers=0"]

    @property
    def sae_overrides(self) -> list[str]:
        """The trained SAE in the demo's model: what every step after ``train`` reads."""
        return [f"sae_path={self.d('train') / 'sae'}", f"model={MODEL}"]

    def data(self) -> list[str]:
        from vlmsae.data.concepts import make_concept_images

        root = make_concept_images(
            self.d("data") / "concepts", n_per_class=IMAGES_PER_CLASS, size=IMAGE_PX, seed=self.seed
        )
        meta = _read_json(root / "concepts.json") or {}
        classes = [c["name"] for c in meta.get("classes", [])]
        return [
            f"{len(classes) * IMAGES_PER_CLASS} images ({IMAGE_PX} px) in {len(classes)} classes "
            f"<shape>_<colour>: {', '.join(classes[:4])}, ...",
            "each class shares one shape and one colour and nothing else: the answer key for MS and hierarchy",
        ]

    def extract(self) -> list[str]:
        self.require("data")
        # Small shards, so there are several: training holds out whole shards for validation.
        call_job(
            "extract",
            [
                f"model={MODEL}",
                *self.data_overrides,
                f"tokens={TOKENS}",
                "k=2",
                "dtype=float32",
                "rows_per_shard=64",
                "rows_per_chunk=32",
                "progress=false",
                f"seed={self.seed}",
            ],
            self.d("extract"),
        )
        m = formats.read_manifest(self.d("extract"))
        return [
            f"{m.n_rows} activation rows (d={m.d}) from "
            f"{m.n_images} generated concept images, layer {m.layer} of {MODEL}, "
            f"tokens={m.tokens}, in {m.n_shards} WebDataset shards",
            f"manifest.json: per-dimension mean/var, mean squared norm {_fmt(m.mean_sq_norm, 2)}, "
            f"{m.n_skipped or 0} skipped images",
        ]

    def train(self) -> list[str]:
        self.require("extract")
        call_job(
            "train",
            [
                f"model={MODEL}",
                "sae=tiny",
                "sae.arch=matryoshka",
                "sae.group_fractions=[0.0625,0.125,0.25,0.5625]",
                "trainer=tiny",
                "trainer.max_steps=1000",
                "data=acts",
                f"data.acts={self.d('extract')}",
                "data.batch_size=64",
                "data.num_workers=0",
                "logger=none",
                f"seed={self.seed}",
            ],
            self.d("train"),
        )
        m = _read_json(self.d("train") / "metrics.json") or {}
        cfg = formats.read_sae_config(self.d("train") / "sae")
        return [
            f"{cfg.arch} SAE, {cfg.n_latents} latents in groups {cfg.group_sizes}, "
            f"k={cfg.k}, {m.get('step', '?')} steps",
            f"validation: FVE {_fmt(m.get('fve'))}, normalized MSE {_fmt(m.get('nmse'))}, L0 {_fmt(m.get('l0'), 1)}, "
            f"dead {_fmt(100 * float(m.get('dead_fraction', float('nan'))), 1)}%",
            f"checkpoint: {self.d('train') / 'sae'} (sae.safetensors + config.json)",
        ]

    def monosemanticity(self) -> list[str]:
        self.require("train")
        vocab_fpath = self._write_vocabulary()
        call_job(
            "monosemanticity",
            [
                *self.sae_overrides,
                *self.data_overrides,
                "embedder=tiny",  # it has a text side, so it can name the latents
                f"names={vocab_fpath}",
                "progress=false",
            ],
            self.d("monosemanticity"),
        )
        s = _read_format(formats.read_ms_summary, self.d("monosemanticity") / formats.MS_SUMMARY_JSON)
        b = s.get("baseline") or {}
        best = best_latents(self.d("monosemanticity"), 3)
        return [
            f"mean MS of SAE latents {_fmt(s.get('mean'))} +- {_fmt(s.get('std'))} vs raw neurons "
            f"{_fmt(b.get('mean'))} +- {_fmt(b.get('std'))} ({s.get('n_images')} images, "
            f"{s.get('dead')} of {s.get('n_latents')} latents dead)",
            "best latents: " + ", ".join(f"#{r.latent} MS {r.ms:.3f}" for r in best),
            f"feature names ({VOCAB_FILE}: the planted shapes, colours and classes, embedder=tiny's text side): "
            + ", ".join(f"#{r.latent} {r.name!r} (cos {_fmt(r.name_score)})" for r in best),
            "latents.csv (with name, name_score, names), ms_summary.json, top_images/ (the index the browser reads), "
            "ms_hist.png, ms_vs_freq.png",
        ]

    def _write_vocabulary(self) -> Path:
        """The planted concept names, one per line: every shape, every colour, every "<colour> <shape>" class."""
        from vlmsae.data.concepts import COLOURS, SHAPES, concept_classes
        from vlmsae.utils.io import atomic_write_text

        classes = [" ".join(reversed(c.split("_", 1))) for c in concept_classes()]  # circle_red -> red circle
        return atomic_write_text(self.out / VOCAB_FILE, "\n".join([*SHAPES, *COLOURS, *classes]) + "\n")

    def hierarchy(self) -> list[str]:
        self.require("train")
        # Reuse the MS run's top images (and its MS per latent) when it finished.
        ms_run = [f"ms_run={self.d('monosemanticity')}"] if self.ok("monosemanticity") else []
        call_job(
            "hierarchy",
            [
                *self.sae_overrides,
                *self.data_overrides,
                "taxonomy=tiny",
                *ms_run,
            ],
            self.d("hierarchy"),
        )
        h = _read_format(formats.read_hierarchy, self.d("hierarchy") / formats.HIERARCHY_JSON)
        groups = h.get("groups") or []
        lines = [
            "LCA depth of each latent's top images (0 = nothing shared, 1 = same shape, 2 = same shape and "
            "colour), by Matryoshka group:"
        ]
        lines += [
            f"  group {g.get('group')}: {g.get('n_latents')} latents, depth {_fmt(g.get('depth_mean'), 2)}, "
            f"MS {_fmt(g.get('ms_mean'))}"
            for g in groups
        ]
        chance = self._chance_depth()
        if chance is not None:
            lines.append(
                f"  chance (16 random images): depth {chance:.2f}; a random tiny encoder barely sees shapes, so "
                f"expect little above it here (the paper's Table 2 needs CLIP on iNaturalist)"
            )
        lines.append("hierarchy.json, hierarchy.md, hierarchy.png, latent_taxa.csv (labels in the browser)")
        return lines

    def _chance_depth(self) -> float | None:
        """Expected LCA depth of two distinct random images: P(same shape) + P(same shape and colour)."""
        meta = _read_json(self.d("data") / "concepts" / "concepts.json") or {}
        classes, n = meta.get("classes") or [], int(meta.get("n_per_class") or 0)
        total = len(classes) * n
        if total < 2:
            return None
        pairs = total * (total - 1) / 2
        per_shape = Counter(c["shape"] for c in classes)  # classes per shape, n images each
        same_shape = sum(m * n * (m * n - 1) / 2 for m in per_shape.values()) / pairs
        same_class = len(classes) * n * (n - 1) / 2 / pairs
        return same_shape + same_class

    def steer(self) -> list[str]:
        self.require("train")
        best = best_latents(self.d("monosemanticity"), 1) if self.ok("monosemanticity") else []
        latent = best[0].latent if best else 0
        # The paper clamps to alpha=100 on CLIP-L activations; tiny activations are ~100x smaller,
        # so clamp to a large multiple of the latent's own maximum instead.
        max_act = best[0].max_act if best and math.isfinite(best[0].max_act) else 1.0
        alpha = round(max(10.0, 20.0 * max_act), 2)
        res = call_job(
            "steer",
            [
                *self.sae_overrides,
                f"latent={latent}",
                f"alpha={alpha}",
                "image=[white,skimage:astronaut]",
                "max_new_tokens=6",
                f"seed={self.seed}",
                f"sweep=[0,{round(alpha / 4, 2)},{round(alpha / 2, 2)},{alpha}]",
            ],
            self.d("steer"),
        )
        s = _read_format(formats.read_steer, self.d("steer") / formats.STEER_JSON) or res
        settings, baseline, steered = s.get("settings", {}), s.get("baseline", []), s.get("steered", [])
        images = settings.get("images", ["?"] * 9)
        return [
            f"latent #{latent} clamped to alpha={alpha} in every token of the tapped vision block "
            f"(prompt {settings.get('prompt', '')!r})",
            *(f"  {img}: baseline {b!r} -> steered {st!r}" for img, b, st in zip(images, baseline, steered)),
            *(f"  alpha sweep {a}: {answers!r}" for a, answers in (s.get("sweep") or {}).items()),
            f"{sum(b != st for b, st in zip(baseline, steered))} of {len(steered)} answers changed (a random tiny "
            "LM: the words mean nothing, the change shows the hook reaches the language model)",
        ]

    def splice_eval(self) -> list[str]:
        self.require("train")
        call_job(
            "splice_eval",
            [
                *self.sae_overrides,
                "n_images=2",
                "max_new_tokens=6",
                f"seed={self.seed}",
            ],
            self.d("splice_eval"),
        )
        s = _read_format(formats.read_splice, self.d("splice_eval") / formats.SPLICE_JSON).get("summary") or {}
        return [
            f"the SAE's reconstruction in place of its vision block's output, LLaVA teacher-forced on its own clean "
            f"answers ({s.get('n_answers')} answers, {s.get('n_tokens')} tokens):",
            f"  KL(clean || spliced) per answer token {_sci(s.get('kl'))}; fraction of loss recovered "
            f"{_fmt(s.get('frac_recovered_zero'))} vs zero ablation, {_fmt(s.get('frac_recovered_mean'))} vs mean "
            "ablation (1 = as good as the clean model)",
            "splice.json, splice.md",
        ]

    def ground_truth(self) -> list[str]:
        from vlmsae.studies.ground_truth import ground_truth_check
        from vlmsae.utils.io import atomic_write_json

        res = ground_truth_check(seed=self.seed, train_steps=300)
        atomic_write_json(self.d("ground_truth") / "ground_truth.json", res)
        sae, trained, neurons, truth = (res.get(k) or {} for k in ("sae", "trained_sae", "neurons", "true_codes"))
        passed = sae.get("mean", 0) > neurons.get("mean", 1) and trained.get("mean", 0) > neurons.get("mean", 1)
        lines = [
            "activations that mix planted concepts (every neuron sees all of them), embeddings that see the concepts:",
            f"  mean MS: SAE with the planted dictionary {_fmt(sae.get('mean'))}, SAE trained 300 steps "
            f"{_fmt(trained.get('mean'))}, raw neurons {_fmt(neurons.get('mean'))}, true concept codes "
            f"{_fmt(truth.get('mean'))}",
            f"  SAE latents more monosemantic than the neurons they decompose: {'PASS' if passed else 'FAIL'}",
            f"details: {self.d('ground_truth') / 'ground_truth.json'}",
        ]
        if not passed:
            raise RuntimeError("planted-concept check failed: " + " ".join(x.strip() for x in lines[1:3]))
        return lines

    def digits(self) -> list[str]:
        from vlmsae.data.digits import ensure_digits
        from vlmsae.models.digits import read_trained_meta
        from vlmsae.models.tiny import tiny_model_dpath

        root, out = ensure_digits(), self.d("digits")
        data = ["data=folder", "data.num_workers=0"]
        tokens = ["tokens=all", "dtype=float32", "progress=false"]  # every token and CLS, as the paper's MS SAEs
        sae = ["data.batch_size=1024", "sae=batchtopk", "sae.expansion=8", "sae.k=8", "sae.threshold_start_step=50"]
        sae += ["trainer=tiny", "logger=none"]
        named = [f"embedder={DIGITS_EMBEDDER}", "names=labels", "progress=false"]
        call_job(
            "extract",
            [f"model={DIGITS_MODEL}", *data, f"data.root={root / 'train'}", f"layer={DIGITS_LAYER}", *tokens],
            out / "extract",
        )
        call_job(
            "train",
            [f"model={DIGITS_MODEL}", "data=acts", f"data.acts={out / 'extract'}", *sae, f"seed={self.seed}"],
            out / "train",
        )
        ms_dpath = out / "monosemanticity"
        call_job(
            "monosemanticity",
            [f"sae_path={out / 'train' / 'sae'}", *data, f"data.root={root / 'heldout'}", *named],
            ms_dpath,
        )
        browser = call_job("browse", [f"run={out}", f"out={out / 'browser'}"], out / "browser")
        vit = read_trained_meta(tiny_model_dpath(DIGITS_MODEL))
        cnn = read_trained_meta(tiny_model_dpath(f"embedder_{DIGITS_EMBEDDER}"))
        s = _read_format(formats.read_ms_summary, ms_dpath / formats.MS_SUMMARY_JSON)
        b = s.get("baseline") or {}
        best = best_latents(ms_dpath, 5)
        return [
            f"{DIGITS_MODEL}: open_clip ViT trained on 1,437 real digits, {100 * vit['heldout_accuracy']:.1f}% "
            f"held-out accuracy; E = {DIGITS_EMBEDDER}, a CNN trained apart, {100 * cnn['heldout_accuracy']:.1f}%",
            f"SAE on block {DIGITS_LAYER} (every token and CLS), scored on the 360 held-out digits: mean MS "
            f"{_fmt(s.get('mean'))} vs raw neurons {_fmt(b.get('mean'))}",
            "digit latents (names=labels: the class whose mean embedding is nearest each latent's top images): "
            + ", ".join(f"#{r.latent} {r.name!r} (MS {r.ms:.3f}, cos {_fmt(r.name_score)})" for r in best),
            f"open file://{Path(browser['index_html']).resolve()}",
        ]

    def inspect(self) -> list[str]:
        self.require("monosemanticity")
        image = sorted((self.d("data") / "concepts" / "circle_red").glob("*.png"))[0]
        over = [*self.sae_overrides, f"images={image}", "top_n=5"]
        over += [f"ms_run={self.d('monosemanticity')}", "query='red circle'"]
        call_job("inspect", over, self.d("inspect"))
        result = formats.read_inspect(self.d("inspect"))
        (im,) = result.images

        def named(latent: int) -> str:
            return f"#{latent} {result.latents[str(latent)].get('name')!r}"

        hits = (result.query or {}).get("hits") or []
        return [
            f"{im['key']} (a red circle): FVE of its {im['n_rows']} patch tokens {_fmt(im['fve'])}; top latents "
            + ", ".join(named(h["latent"]) for h in im["top_pooled"][:3])
            + ", each with a patch heatmap",
            f"query 'red circle' (the names' text side): {', '.join(named(h['latent']) for h in hits[:3])}",
            "inspect.json, inspect.html (+ img/, heat/); the browser's cards link to it",
        ]

    def browse(self) -> list[str]:
        self.require("monosemanticity")
        over = [f"run={self.out}", f"ms_run={self.d('monosemanticity')}", f"out={self.d('browser')}"]
        res = call_job("browse", over, self.d("browser"))
        return [
            f"{res['n_cards']} latent cards ({res['n_labelled']} with taxonomy labels, {res['n_heatmaps']} patch "
            f"heatmaps, {res['n_steering']} steering run(s)); {res['heatmap_note']}",
            f"open file://{Path(res['index_html']).resolve()}",
        ]

    def require(self, step: str) -> None:
        if not self.ok(step):
            raise _Skip(f"needs the {step} step, which did not finish")

    def run(self) -> dict[str, Any]:
        t_start = time.perf_counter()
        for i, name in enumerate(self.steps, 1):
            print(f"\n== [{i}/{len(self.steps)}] {name} ==", flush=True)
            res = StepResult(out=str(self.d("browser" if name == "browse" else name)))
            t0 = time.perf_counter()
            try:
                res.shows = getattr(self, name)()
                res.status = "ok"
            except _Skip as e:
                res.status, res.error = "skipped", str(e)
            except Exception as e:
                if isinstance(e, ModuleNotFoundError) and str(getattr(e, "name", "")).startswith("vlmsae"):
                    res.status, res.error = "missing", str(e)
                else:
                    res.status, res.error = "failed", f"{type(e).__name__}: {e}"
                    traceback.print_exc()
            res.seconds = time.perf_counter() - t0
            self.results[name] = res
            if res.status == "ok":
                print(f"   output: {res.out}  ({res.seconds:.1f} s)")
                for line in res.shows:
                    print(f"   {line}")
            else:
                print(f"   {res.status.upper()}: {res.error}  ({res.seconds:.1f} s)")
        wall = time.perf_counter() - t_start
        summary = {
            "out": str(self.out),
            "wall_seconds": round(wall, 1),
            "steps": {n: {**asdict(r), "seconds": round(r.seconds, 1)} for n, r in self.results.items()},
        }
        from vlmsae.utils.io import atomic_write_json, atomic_write_text

        atomic_write_json(self.out / "demo_summary.json", summary)
        atomic_write_text(self.out / "demo_summary.md", _markdown(summary))
        print("\n== summary ==")
        for n, r in self.results.items():
            print(f"   {n:<16} {r.status:<8} {r.seconds:6.1f} s")
        print(f"   wall time {wall:.1f} s; everything is under {self.out}/ (demo_summary.md lists it)")
        return summary


class _Skip(Exception):
    pass


def _markdown(summary: dict[str, Any]) -> str:
    lines = ["# vlmsae demo", "", f"Output folder: `{summary['out']}`; wall time {summary['wall_seconds']} s.", ""]
    for name, s in summary["steps"].items():
        lines += [f"## {name}: {s['status']} ({s['seconds']} s)", "", f"Output: `{s['out']}`", ""]
        lines += [f"- {line}" for line in [*s["shows"], *([s["error"]] if s["error"] else [])]] + [""]
    return "\n".join(lines)


def run(cfg: Any = None, out_dpath: str | Path | None = None) -> dict[str, Any]:
    """Run the demo into ``out_dpath`` (default ``outputs/demo``, replaced). ``cfg``: optional
    mapping with ``steps`` (list) and ``seed``."""
    cfg = dict(cfg or {})
    out = Path(out_dpath) if out_dpath is not None else DEFAULT_OUT
    steps = tuple(cfg.get("steps") or STEPS)
    unknown = [s for s in steps if s not in STEPS]
    if unknown:
        raise ValueError(f"Unknown demo step(s) {unknown}: choose from {list(STEPS)}.")
    if out.exists():
        if not (out / "demo_summary.json").exists() and any(out.iterdir()):
            raise FileExistsError(
                f"{out} exists and is not a demo folder (no demo_summary.json): pass another --out or remove it."
            )
        shutil.rmtree(out)
    out.mkdir(parents=True)
    # A marker first, so an interrupted demo folder is still recognised (and replaced) next time.
    (out / "demo_summary.json").write_text("{}\n")
    from vlmsae.utils.provenance import write_run_info

    write_run_info(
        out,
        {
            "steps": list(steps),
            "seed": int(cfg.get("seed", 0)),
            "model": MODEL,
            "tokens": TOKENS,
            "images_per_class": IMAGES_PER_CLASS,
        },
    )
    return Demo(out, steps, seed=int(cfg.get("seed", 0))).run()


def _quiet() -> None:
    """Keep the demo's output to what each step shows: no download bars, no known-harmless warnings."""
    os.environ.setdefault("WANDB_MODE", "disabled")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # read when transformers is imported
    for pattern in (
        ".*inference threshold is not estimated.*",
        ".*Sparse CSR tensor support is in beta.*",
        ".*LeafSpec.*",
        ".*litlogger.*",
    ):
        warnings.filterwarnings("ignore", message=pattern)
    with contextlib.suppress(ImportError):  # Lightning sets its loggers to INFO on import: import, then turn down
        import lightning.pytorch  # noqa: F401
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vlmsae.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="output folder (replaced), default outputs/demo")
    parser.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated subset of {','.join(STEPS)}")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    _quiet()
    summary = run({"steps": [s for s in args.steps.split(",") if s], "seed": args.seed}, args.out)
    return 0 if all(s["status"] == "ok" for s in summary["steps"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())

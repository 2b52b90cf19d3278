"""Run every benchmark module, collect one flat results dict, write JSON + markdown atomically."""

from __future__ import annotations

import importlib
import json
import math
import os
import platform
import time
import traceback
from pathlib import Path
from typing import Any

from vlmsae.report.job_log import flatten
from vlmsae.utils.io import atomic_write_json, atomic_write_text
from vlmsae.utils.provenance import provenance, write_run_info

# Fixed order: cheap ceilings first, then the SAE step, then the other issues' benchmarks
# (ms: monosemanticity at 50k images x 65k latents; extract: activation extraction; loader:
# shard reading vs the training step's consumption; browser: the feature browser at 65,536 latents; cli: seconds
# until a job's --help answers; gpu: the gpu_ keys, skipped without CUDA).
MODULES = ("gemm", "sae_step", "ms", "extract", "loader", "train_many", "browser", "cli", "gpu")
DEFAULT_OUT_DPATH = Path("outputs") / "bench"


def _flatten(obj: dict, prefix: str = "") -> dict[str, Any]:
    """Nested dicts become ``a_b`` keys; non-finite floats become null (strict JSON), lists one string."""
    return {key: _json_value(value) for key, value in flatten(obj, prefix, sep="_").items()}


def _json_value(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value)
    return value if value is None or isinstance(value, (bool, int, float, str)) else str(value)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on: CPU, cores, threads, memory, GPU, load at start."""
    import torch

    info: dict[str, Any] = {
        "machine_cpu": _cpu_model(),
        "machine_cpu_count": os.cpu_count(),
        "machine_torch_threads": torch.get_num_threads(),
        "machine_platform": platform.platform(),
        "machine_loadavg_1min_start": os.getloadavg()[0],
        "machine_gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "none",
    }
    try:
        pages, page_size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        info["machine_memory_gib"] = round(pages * page_size / 2**30, 1)
    except (ValueError, OSError):
        pass
    return info


def run_module(name: str, quick: bool) -> dict[str, Any]:
    """``vlmsae.bench.<name>.run(quick)`` as flat keys, or ``{<name>_error: why}`` if it is missing or fails."""
    start = time.perf_counter()
    try:
        module = importlib.import_module(f"vlmsae.bench.{name}")
    except Exception as err:
        if isinstance(err, ModuleNotFoundError) and err.name == f"vlmsae.bench.{name}":
            return {f"{name}_error": f"missing: vlmsae/bench/{name}.py does not exist yet"}
        return {f"{name}_error": f"import failed: {err!r}"}
    try:
        results = module.run(quick=quick)
        if not isinstance(results, dict):
            raise TypeError(f"vlmsae.bench.{name}.run returned {type(results).__name__}, expected a dict")
    except Exception as err:
        traceback.print_exc()
        return {f"{name}_error": f"{type(err).__name__}: {err}"}
    out = _flatten(results)
    out[f"{name}_bench_seconds"] = time.perf_counter() - start
    return out


def _previous_results(out_dpath: Path) -> dict[str, Any]:
    """The keys of an earlier ``results.json`` in ``out_dpath`` (``--merge``), or {} if there is none."""
    fpath = out_dpath / "results.json"
    if not fpath.exists():
        return {}
    try:
        previous = json.loads(fpath.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"--merge: cannot read {fpath} ({err}); move it away or run without --merge.") from err
    if not isinstance(previous, dict):
        raise ValueError(f"--merge: {fpath} holds a {type(previous).__name__}, expected a JSON object of results.")
    return previous


def run_all(
    quick: bool = False,
    out_dpath: str | Path = DEFAULT_OUT_DPATH,
    only: list[str] | None = None,
    merge: bool = False,
) -> dict:
    """Run the benchmarks (all of ``MODULES`` or ``only``), write results.json/.md + run_info.json.

    ``merge``: keep the keys of an existing results.json and overwrite only the ones measured now (so
    ``make bench-gpu`` on a GPU machine adds its ``gpu_`` keys next to a CPU run's); the machine keys
    of this run are stored under ``<module>_machine_*`` as well, so each figure keeps its machine.
    """
    out_dpath = Path(out_dpath)
    names = [n for n in MODULES if only is None or n in only]
    results: dict[str, Any] = _previous_results(out_dpath) if merge else {}
    machine = machine_info()
    results.update({"quick": quick, **machine})
    if merge:
        results.update({f"{name}_{key}": value for name in names for key, value in machine.items()})
    for name in names:
        print(f"[bench] {name} ...", flush=True)
        module_results = run_module(name, quick)
        results.pop(f"{name}_error", None)  # --merge: an earlier run's failure of this module is stale now
        if f"{name}_error" in module_results:
            print(f"[bench] {name} skipped: {module_results[f'{name}_error']}", flush=True)
        results.update(module_results)
    results["machine_loadavg_1min_end"] = os.getloadavg()[0]
    results.update(_flatten(provenance(), prefix="provenance_"))
    atomic_write_json(out_dpath / "results.json", results)
    atomic_write_text(out_dpath / "results.md", render_markdown(results))
    write_run_info(out_dpath, {"quick": quick, "modules": names, "merge": merge})
    return results


def _fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def _step_table(results: dict, prefix: str, title: str) -> list[str]:
    sizes = sorted({int(k.rsplit("_", 1)[1]) for k in results if k.startswith(f"{prefix}_sparse_tokens_per_s_")})
    if not sizes:
        return []
    rows = [
        ("sparse (vlmsae)", "sparse_tokens_per_s"),
        ("dense (vlmsae fallback)", "dense_tokens_per_s"),
        ("dense reference", "reference_tokens_per_s"),
        ("BatchTopK, sparse (vlmsae)", "sparse_batchtopk_tokens_per_s"),
        ("encoder matmul alone (bound)", "encoder_bound_tokens_per_s"),
        ("sparse, best round", "sparse_tokens_per_s_best"),
        ("dense reference, best round", "reference_tokens_per_s_best"),
        ("speedup sparse / reference", "speedup_vs_reference"),
        ("speedup sparse / dense", "speedup_vs_dense"),
        ("speedup BatchTopK sparse / reference", "batchtopk_speedup_vs_reference"),
        ("sparse / encoder bound", "fraction_of_encoder_bound"),
    ]
    lines = [
        "",
        f"## {title}",
        "",
        "| | " + " | ".join(f"F = {n:,}" for n in sizes) + " |",
        "|---|" + "---:|" * len(sizes),
    ]
    for label, key in rows:
        lines.append(f"| {label} | " + " | ".join(_fmt(results.get(f"{prefix}_{key}_{n}")) for n in sizes) + " |")
    return lines


def render_markdown(results: dict) -> str:
    """A readable summary (the SAE step table first), then every key."""
    lines = [
        "# vlmsae benchmarks",
        "",
        f"Machine: {results.get('machine_cpu')}, {results.get('machine_cpu_count')} cores, "
        f"{results.get('machine_torch_threads')} torch threads, GPU: {results.get('machine_gpu')}; "
        f"1-min load average {_fmt(results.get('machine_loadavg_1min_start'))} at start, "
        f"{_fmt(results.get('machine_loadavg_1min_end'))} at end (other processes share the cores: "
        f"compare paths within one run). Quick run: {results.get('quick')}. "
        f"Commit {results.get('provenance_git_commit')}, {results.get('provenance_created')}.",
    ]
    if "sae_step_batch_size" in results:
        shape = f"d = {results['sae_step_d_in']}, k = {results['sae_step_k']}, batch {results['sae_step_batch_size']:,}"
        lines += _step_table(results, "sae_step", f"SAE training step, tokens/s (CPU fp32, {shape})")
        lines += _step_table(results, "sae_step_gpu_bf16", f"SAE training step, tokens/s (GPU bf16 autocast, {shape})")
        lines += [
            "",
            "Each step: loss, backward, decoder-gradient projection, grad-norm clip, Adam (fused, the "
            "same for every path), unit-norm decoder rows. The paths share one set of weights and are "
            "timed interleaved (one step of each per round) after warmup; tokens/s from the median step "
            "time, speedups = median over rounds of the per-round time ratio (robust to load bursts). "
            "`dense reference` = top-k scattered into a dense B x F code and a dense decoder matmul "
            "(vlmsae/bench/sae_step.py); `encoder matmul alone` = the selecting B x F x D matmul, the bound "
            "for any exact TopK step.",
        ]
    if "sae_fve_sparse" in results:
        lines += [
            "",
            f"Learning curve ({results['sae_fve_steps']} steps, same data and seed): FVE sparse "
            f"{results['sae_fve_sparse']:.4f}, reference {results['sae_fve_reference']:.4f}, relative "
            f"difference {100 * results['sae_fve_rel_diff']:.3f}% (within 1%: {results['sae_fve_within_1pct']}).",
        ]
    if "gemm_gflops" in results:
        lines += ["", f"fp32 GEMM ceiling: {results['gemm_gflops']:.1f} GFLOP/s ({results.get('gemm_shape')})."]
    lines += ["", "## All results", "", "| key | value |", "|---|---|"]
    lines += [f"| {key} | {_fmt(value)} |" for key, value in results.items()]
    return "\n".join(lines) + "\n"

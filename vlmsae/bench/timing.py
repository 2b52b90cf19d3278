"""What every benchmark times with: a device sync, interleaved rounds, and a case's own peak CUDA memory."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from types import SimpleNamespace

import torch
from tqdm import tqdm


def sync(device: str | torch.device) -> None:
    """Wait for the queued CUDA work, so a timer stops when the work is done (nothing to wait for on CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_seconds(
    fns: dict[str, Callable[[], object]],
    rounds: int,
    warmup: int = 1,
    device: str | torch.device = "cpu",
    desc: str | None = None,
) -> dict[str, list[float]]:
    """Seconds of each call of ``fns`` per round, after ``warmup`` untimed rounds. Each round calls every
    function once (interleaved), so background load from other processes hits them alike."""
    seconds: dict[str, list[float]] = {name: [] for name in fns}
    for r in tqdm(range(warmup + rounds), desc=desc, leave=False, disable=desc is None):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            if r >= warmup:
                seconds[name].append(time.perf_counter() - start)
    return seconds


@contextlib.contextmanager
def peak_memory(device: torch.device) -> Iterator[SimpleNamespace]:
    """``with peak_memory(device) as peak: ...``; then ``peak.gib`` is its peak allocated memory (CUDA) or None."""
    peak = SimpleNamespace(gib=None)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    yield peak
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak.gib = torch.cuda.max_memory_allocated(device) / 2**30

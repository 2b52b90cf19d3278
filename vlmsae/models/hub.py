"""Is the Hugging Face Hub reachable? Asked once per process, answered in seconds (docs/offline.md).

Without a network, ``huggingface_hub`` retries every download for about a minute; instead the first loader
that needs the Hub calls :func:`offline_reason`, and offline it reads the cache and fails in one message.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
from urllib.parse import urlparse

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 3.0  # a reachable Hub answers a TCP connect in well under a second
_switched = False  # True once use_cache_only set HF_HUB_OFFLINE itself (the probe's reason stays the answer)


def _env_true(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() not in ("0", "", "false", "no", "off")


def _probe_address() -> tuple[str, int]:
    """Where a download would connect first: the HTTPS proxy if one is set, else the Hub's endpoint."""
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    url = urlparse(proxy or os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    return url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)


def hub_unreachable() -> str | None:
    """None when the Hub looks reachable; else why not (``HF_HUB_OFFLINE``, read at each call, or the one
    network probe of this process)."""
    if _env_true("HF_HUB_OFFLINE") and not _switched:
        return "HF_HUB_OFFLINE is set"
    return _probe()


@functools.cache
def _probe() -> str | None:
    host, port = _probe_address()
    try:
        socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S).close()
    except OSError as err:
        reason = f"no connection to {host}:{port} within {PROBE_TIMEOUT_S:g} s ({err})"
        log.warning("the Hugging Face Hub is unreachable: %s; loading weights from the local cache only", reason)
        return reason
    return None


def use_cache_only() -> None:
    """Make ``huggingface_hub`` (and open_clip, transformers through it) read its cache without retrying."""
    global _switched
    _switched = True
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        from huggingface_hub import constants
    except ImportError:
        return
    constants.HF_HUB_OFFLINE = True


def offline_reason() -> str | None:
    """:func:`hub_unreachable`, switching to the cache when the probe failed: what a loader calls first."""
    reason = hub_unreachable()
    if reason is not None and not _env_true("HF_HUB_OFFLINE"):
        use_cache_only()
    return reason

"""Benchmarks: ``python -m vlmsae.bench [--quick]`` (``make bench``) -> outputs/bench/.

Each benchmark is a module ``vlmsae.bench.<name>`` exposing ``run(quick: bool = False) -> dict``
of flat JSON keys.  The harness runs the modules in ``MODULES`` in order, skips one that is
missing or raises (recording ``<name>_error``), and writes ``results.json`` (one flat object:
every module's keys, machine info, provenance), ``results.md`` (tables) and ``run_info.json``.
"""

from __future__ import annotations

from vlmsae.bench.harness import MODULES, render_markdown, run_all

__all__ = ["MODULES", "render_markdown", "run_all"]

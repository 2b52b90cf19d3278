"""The package's layers, read from the source with ast (nothing is imported).

Layer order, lowest first (a module may import its own layer and the ones below, never above):
config, utils, formats <- sae <- metrics <- data <- models <- steering <- studies <- lit <- report <- jobs
<- bench, demo.
metrics/ is pure maths: it imports sae/ (and config, utils, formats), torch and numpy, never models, data, steering,
a study or a job schema. The studies open models, images and SAEs to run a metric end to end; opening an SAE for a
job is ``models.open_sae``, below both studies and steering.
Jobs (``vlmsae/<job>.py``) never import each other. No import cycle between project modules, counting
imports inside functions and under ``TYPE_CHECKING`` too (a cycle there is still a knot in the design).
Heavy third-party libraries are imported inside functions only (lit/ may import Lightning: it is that layer).
"""

from __future__ import annotations

import ast
from pathlib import Path

import vlmsae

PKG_DPATH = Path(vlmsae.__file__).parent
JOBS = (
    "extract",
    "train",
    "monosemanticity",
    "hierarchy",
    "steer",
    "steer_eval",
    "splice_eval",
    "browse",
    "export",
    "names",
    "stability",
    "inspect",
)
LAYERS = {
    "config": 0,
    "utils": 0,
    "formats": 0,
    "sae": 1,
    "metrics": 2,
    "data": 3,
    "models": 4,
    "steering": 5,
    "studies": 6,
    "lit": 7,
    "report": 8,
    **{job: 9 for job in JOBS},
    "bench": 10,
    "demo": 10,
}
HEAVY = ("open_clip", "transformers", "lightning", "wandb", "matplotlib")

# Imports another engineer's branch of issue 13 removes (steer_eval stops importing steer). Each entry must
# still be there (the test says when it is gone); delete the entry then.
KNOWN_JOB_IMPORTS: set[tuple[str, str]] = set()


def _modules() -> dict[str, Path]:
    mods = {}
    for fpath in sorted(PKG_DPATH.rglob("*.py")):
        parts = ("vlmsae", *fpath.relative_to(PKG_DPATH).with_suffix("").parts)
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = fpath
    return mods


MODULES = _modules()


def _imports(name: str, fpath: Path) -> list[tuple[str, ast.stmt, bool]]:
    """(imported module, node, at module level) for every import in the file, project or not."""
    tree = ast.parse(fpath.read_text(encoding="utf-8"))
    top_level = {id(node) for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.extend((alias.name, node, id(node) in top_level) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the package
                base = name.split(".") if fpath.name == "__init__.py" else name.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            for alias in node.names:  # `from vlmsae.models import llava` imports the submodule
                sub = f"{module}.{alias.name}"
                out.append((sub if sub in MODULES else module, node, id(node) in top_level))
    return out


def _project_graph() -> dict[str, set[str]]:
    return {
        name: {m for m, _, _ in _imports(name, fpath) if m in MODULES and m != name} for name, fpath in MODULES.items()
    }


def _layer(name: str) -> int:
    parts = name.split(".")
    if len(parts) == 1:  # vlmsae/__init__.py: the version only
        return 0
    assert parts[1] in LAYERS, f"{name}: a new top-level module or package; give it a layer in LAYERS"
    return LAYERS[parts[1]]


def test_no_module_imports_a_higher_layer():
    upward = sorted(
        f"{a} (layer {_layer(a)}) imports {b} (layer {_layer(b)})"
        for a, deps in _project_graph().items()
        for b in deps
        if _layer(b) > _layer(a)
    )
    assert not upward, "imports against the layer order:\n" + "\n".join(upward)


def test_metrics_is_pure_maths():
    """metrics/ imports only sae/ (and config, utils, formats) of the project, and no third-party library but
    torch, numpy, scipy (Hungarian matching, t quantiles) and tqdm: a module that opens models, images or SAEs
    for a job is a study (vlmsae/studies/)."""
    allowed_project = ("vlmsae.metrics", "vlmsae.sae", "vlmsae.config", "vlmsae.utils", "vlmsae.formats")
    allowed_other = ("torch", "numpy", "scipy", "tqdm", "__future__", "math", "warnings", "dataclasses", "typing",
                     "collections", "pathlib", "json", "itertools", "functools")  # fmt: skip
    bad = []
    for name, fpath in MODULES.items():
        if not name.startswith("vlmsae.metrics"):
            continue
        for module, node, _ in _imports(name, fpath):
            project = module == "vlmsae" or module.startswith("vlmsae.")
            ok = module.startswith(allowed_project) if project else module.split(".")[0] in allowed_other
            if not ok:
                bad.append(f"{name} line {node.lineno}: import {module}")
    assert not bad, "metrics/ is pure maths (no models, data, steering, studies or job schemas):\n" + "\n".join(bad)


def test_jobs_do_not_import_each_other():
    jobs = {f"vlmsae.{job}" for job in JOBS}
    found = {(a, b) for a, deps in _project_graph().items() if a in jobs for b in deps if b in jobs}
    assert found - KNOWN_JOB_IMPORTS == set(), f"a job imports another job: {sorted(found - KNOWN_JOB_IMPORTS)}"
    assert found >= KNOWN_JOB_IMPORTS, f"fixed: remove {sorted(KNOWN_JOB_IMPORTS - found)} from KNOWN_JOB_IMPORTS"


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    # A package's own __init__ importing its submodules is not an edge back from them: only explicit imports count.
    assert _cycles(_project_graph()) == []


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_heavy_libraries_are_imported_inside_functions():
    bad = []
    for name, fpath in MODULES.items():
        for module, node, top in _imports(name, fpath):
            root = module.split(".")[0]
            if top and root in HEAVY and not (root == "lightning" and name.startswith("vlmsae.lit.")):
                bad.append(f"{name} line {node.lineno}: import {module}")
    assert not bad, "heavy imports at module level (move them into the function that needs them):\n" + "\n".join(bad)


# Library modules whose function-level project imports belong to another engineer's files in issue 13
# (they move them up when they next edit the file); each must still have one, so the list only shrinks.
PENDING_LAZY = {
    "vlmsae.config",  # register_configs: the job schemas are registered there
    "vlmsae.metrics.topimages",
    "vlmsae.models.embedders",
    "vlmsae.models.spec",
    "vlmsae.report.browser",
}


def test_library_modules_import_project_modules_at_module_level():
    """A project import inside a function hides a dependency from the reader and from the layer tests above."""
    jobs = {f"vlmsae.{job}" for job in JOBS} | {"vlmsae.demo"}
    lazy = {
        name
        for name, fpath in MODULES.items()
        if name not in jobs
        for module, _, top in _imports(name, fpath)
        if module in MODULES and not top
    }
    assert lazy - PENDING_LAZY == set(), f"import these at module level: {sorted(lazy - PENDING_LAZY)}"
    assert lazy >= PENDING_LAZY, f"done: remove {sorted(PENDING_LAZY - lazy)} from PENDING_LAZY"


def test_no_base_name_is_used_by_three_modules():
    """A file name says what its module holds: at most two modules share one (e.g. a job and the one library
    module it runs). A job's schema, ``config/jobs/<job>.py``, is the job's own name and is not counted."""
    by_name: dict[str, list[str]] = {}
    for name, fpath in MODULES.items():
        if fpath.name == "__init__.py" or name.startswith("vlmsae.config.jobs."):
            continue
        by_name.setdefault(fpath.name, []).append(name)
    crowded = {base: names for base, names in by_name.items() if len(names) > 2}
    assert not crowded, f"base names used by three or more modules (rename all but two): {crowded}"

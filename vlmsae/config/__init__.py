"""Structured-config schemas, and the command line and the one conversion from config to objects around them.

Import-light on purpose: only dataclasses and Hydra's ConfigStore, so ``--help`` stays instant. Each core node is
one dataclass in :mod:`vlmsae.config.nodes` (also the library's typed argument), each job's schema one in
:mod:`vlmsae.config.jobs`; YAML files in ``conf/<group>/`` list their schema first in ``defaults``, so an unknown
key (``sae.kk=3``) or a wrong type (``sae.k=abc``) fails at compose time with the key named.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

_REGISTERED: set[str] = set()  # "nodes" and the jobs whose schema is in the ConfigStore


def conf_dir() -> Path:
    """The Hydra config tree (``conf/``); the only place that knows where it lives.

    It is ``<vlmsae package>/conf``: in a checkout the symlink ``vlmsae/conf -> ../conf`` (edits show at once), in a
    wheel a real copy (setuptools follows the symlink). The repo-root ``conf/`` is the fallback for a checkout
    without symlinks (git on Windows with ``core.symlinks=false`` writes the link as a small text file).
    """
    package_dpath = Path(__file__).resolve().parents[1]
    candidates = (package_dpath / "conf", package_dpath.parent / "conf")
    for dpath in candidates:
        if (dpath / "train.yaml").is_file():
            return dpath.resolve()
    raise FileNotFoundError(
        f"vlmsae's config tree was not found: looked for train.yaml in {[str(d) for d in candidates]}. "
        "Reinstall vlmsae (`pip install .` ships conf/ inside the package), or in a checkout restore the "
        "symlink with `ln -s ../conf vlmsae/conf`."
    )


def register_configs(job: str | None = None) -> None:
    """Store the node schemas and ``job``'s schema (every job's when None) in Hydra's ConfigStore (idempotent).

    A job's ``main()`` names itself: Hydra deep-copies the whole store for each config group it lists (``--help``
    lists them all), so a store holding only what the job composes answers faster."""
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    from vlmsae.config import jobs
    from vlmsae.config.nodes import SCHEMAS

    if "nodes" not in _REGISTERED:
        for _group, name, schema in SCHEMAS:
            # OmegaConf makes the node of a frozen dataclass (SAEConfig) read-only, and then Hydra cannot merge the
            # group YAML or an override into it. The node keeps its type, so unknown keys and wrong types still fail
            # at compose time; the frozen instance is built from it later (to_typed).
            node = OmegaConf.structured(schema)
            OmegaConf.set_readonly(node, None)
            ConfigStore.instance().store(name=name, node=node)
        _REGISTERED.add("nodes")
    for name in [m.name for m in pkgutil.iter_modules(jobs.__path__)] if job is None else [job]:
        if name not in _REGISTERED:  # vlmsae.config.jobs.<job>.<Job>Job is stored as <job>_schema
            schema = "".join(part.title() for part in name.split("_")) + "Job"
            node = getattr(importlib.import_module(f"vlmsae.config.jobs.{name}"), schema)
            ConfigStore.instance().store(name=f"{name}_schema", node=node)
            _REGISTERED.add(name)


def to_typed(cfg: Any, cls: type[T]) -> T:
    """The one conversion from config to objects: ``cfg`` as an instance of the dataclass ``cls``.

    A job calls it once, at the top of ``run()`` (``job = to_typed(cfg, TrainJob)``); below, every node is its own
    dataclass. ``cfg`` is a composed ``DictConfig`` typed by ``cls``'s schema, or a node or mapping read some other
    way (a ``conf/model/<name>.yaml``, a ``config.json``): interpolations are resolved, a ``defaults`` entry is
    dropped, an unknown key is an error listing the valid ones, and ``cls``'s own checks run.
    """
    from omegaconf import DictConfig, OmegaConf

    from vlmsae.config.nodes import check_known

    if isinstance(cfg, cls):
        return cfg
    if isinstance(cfg, DictConfig):
        if OmegaConf.get_type(cfg) is cls:  # composed with cls's schema: typed and checked by Hydra already
            return OmegaConf.to_object(cfg)
        cfg = OmegaConf.to_container(cfg, resolve=True)
    values = {str(key): value for key, value in dict(cfg or {}).items() if key != "defaults"}
    check_known(cls, values)
    return cls(**values)


def typed_job(cfg: Any, cls: type[T], **required: str) -> tuple[T, dict[str, Any]]:
    """A job's config as its schema ``cls`` (:func:`to_typed`, the one conversion) and as the resolved dict that
    run_info.json records; a ``required`` key left unset (``???``) stops the job with its message."""
    from omegaconf import OmegaConf

    for key, message in required.items():
        if OmegaConf.is_missing(cfg, key):
            raise ValueError(message)
    return to_typed(cfg, cls), OmegaConf.to_container(cfg, resolve=True)


def pick(obj: Any, *names: str) -> dict[str, Any]:
    """``{name: obj.<name>}``: a job's keys passed on to a library call that names them alike."""
    return {name: getattr(obj, name) for name in names}


# Hydra flags whose value is the next argument (hydra/_internal/utils.py get_args_parser): not overrides.
_FLAGS_WITH_VALUE = frozenset({
    "-cp", "--config-path", "-cn", "--config-name", "-cd", "--config-dir", "-c", "--cfg", "-p", "--package",
    "-i", "--info", "-sc", "--shell-completion", "--experimental-rerun",
})  # fmt: skip


def readable_overrides(argv: list[str]) -> list[str]:
    """The command-line arguments ``argv`` with every ``key=value`` override made readable by Hydra's grammar.

    An override Hydra cannot parse whose value starts with ``~`` (or has a comma-separated part that does) gets
    that home folder expanded, as a shell expands ``key=~/x`` (Hydra's grammar reserves ``~``). Any other
    unreadable override stops the job with :class:`SystemExit`, naming the argument and the quoted form that
    Hydra reads, e.g. ``'sae_path="/data/run(1)/sae"'``. Flags (``-m``, ``--cfg job``) pass through unchanged.
    """
    overrides = [
        i
        for i, arg in enumerate(argv)
        if "=" in arg and not arg.startswith("-") and not (i > 0 and argv[i - 1] in _FLAGS_WITH_VALUE)
    ]
    if not overrides:  # e.g. --help: no parser needed
        return list(argv)
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    return [_readable_override(arg, parser) if i in overrides else arg for i, arg in enumerate(argv)]


def _parse_error(parser: Any, override: str) -> str | None:
    """Hydra's reason (first line) for refusing ``override``; None when it parses."""
    from hydra.errors import HydraException

    try:
        parser.parse_override(override)
    except HydraException as err:
        return str(err).strip().splitlines()[0]
    return None


def _readable_override(arg: str, parser: Any) -> str:
    reason = _parse_error(parser, arg)
    if reason is None:
        return arg
    key, _, value = arg.partition("=")
    expanded = ",".join(os.path.expanduser(part) for part in value.split(","))  # only a leading ~ is expanded
    if expanded != value:
        if _parse_error(parser, f"{key}={expanded}") is None:
            return f"{key}={expanded}"
        value = expanded
    suggestion = ""
    for quoted in (f'"{value}"', f"'{value}'", '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'):
        candidate = f"{key}={quoted}"
        if _parse_error(parser, candidate) is None and parser.parse_override(candidate).value() == value:
            shell_arg = shlex.quote(candidate)
            suggestion = f" Quote the value for Hydra, and the whole argument for the shell:\n    {shell_arg}"
            break
    raise SystemExit(
        f"Hydra cannot read the command-line argument {arg!r}: its override grammar reserves characters such as "
        f"( ) [ ] {{ }} = ' # ~ and non-ASCII letters in an unquoted value (Hydra: {reason}).{suggestion}"
    )


def launch(job: str, main_fn: Callable[[Any], Any], module: str) -> Callable[[], None]:
    """The ``main()`` of ``python -m vlmsae.<job>``, run at once when ``module`` (the job module's ``__name__``) is
    ``"__main__"``: the job's schemas, ``sys.argv`` made readable (:func:`readable_overrides`), then Hydra with
    ``conf/<job>.yaml`` calling ``main_fn(cfg)``."""

    def main() -> None:
        import hydra

        register_configs(job)
        sys.argv[1:] = readable_overrides(sys.argv[1:])
        hydra.main(config_path=str(conf_dir()), config_name=job, version_base="1.3")(main_fn)()

    if module == "__main__":
        main()
    return main

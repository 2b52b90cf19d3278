"""The ``vlmsae`` command: ``vlmsae <job> [overrides]`` runs a job as ``python -m vlmsae.<job> [overrides]`` does.

    vlmsae --help                           # every job, one line each
    vlmsae train model=tiny trainer=tiny    # the same run as python -m vlmsae.train model=tiny trainer=tiny
    vlmsae train --help                     # a job's own help: Hydra's, with its config groups and keys
    vlmsae train --cfg job                  # Hydra's flags (-m, --cfg, --info, hydra.run.dir=...) pass unchanged

Import-light on purpose, so that both answer at once: the job list below is the only one (the layer
tests read it too), each job's line is the first line of its module docstring, read with ``ast``
(no job is imported to list them), and a job module is imported only when it is asked for (at module
level it imports no torch: tests/test_layers.py).
"""

from __future__ import annotations

import ast
import difflib
import importlib
import sys
from pathlib import Path

# Every Hydra job: vlmsae/<job>.py with run(cfg, out_dpath) and a main() around @hydra.main.
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
COMMANDS = (*JOBS, "demo")  # demo takes argparse flags (--out, --steps), not Hydra overrides


def summary(command: str) -> str:
    """The first line of ``vlmsae/<command>.py``'s docstring, read from the source (nothing is imported)."""
    fpath = Path(__file__).with_name(f"{command}.py")
    doc = ast.get_docstring(ast.parse(fpath.read_text(encoding="utf-8"))) or ""
    return doc.split("\n", 1)[0].replace("``", "")


def usage() -> str:
    width = max(len(c) for c in COMMANDS)
    lines = [
        "usage: vlmsae <job> [key=value ...] [Hydra flags]    (the same as python -m vlmsae.<job> ...)",
        "",
        "jobs:",
        *(f"  {c:<{width}}  {summary(c)}" for c in COMMANDS),
        "",
        "vlmsae <job> --help shows a job's config groups and keys; vlmsae <job> --cfg job prints its config.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run ``vlmsae <job> ...`` (``argv`` defaults to ``sys.argv[1:]``); returns the exit status."""
    args = sys.argv[1:] if argv is None else list(argv)
    if args and args[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if not args:
        print(usage(), file=sys.stderr)
        return 2
    command, rest = args[0], args[1:]
    if command not in COMMANDS:
        close = difflib.get_close_matches(command, COMMANDS, n=1)
        hint = f" Did you mean `vlmsae {close[0]}`?" if close else ""
        print(f"vlmsae: no job named {command!r}.{hint} The jobs are: {', '.join(COMMANDS)}.", file=sys.stderr)
        return 2
    module = importlib.import_module(f"vlmsae.{command}")
    if command == "demo":
        return module.main(rest)
    sys.argv = [module.__file__, *rest]  # Hydra parses sys.argv; argv[0] as `python -m vlmsae.<job>` sets it
    module.main()
    return 0

"""The ``vlmsae`` command (vlmsae/cli.py) and a CLI that answers at once (issue 22 §6).

A job's ``--help`` and ``--cfg job`` must not load torch or the heavy libraries: the checks read
``sys.modules`` in a fresh interpreter (never the clock), so they hold on any machine.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib

import pytest

from vlmsae import cli

HEAVY = ("torch", "lightning", "open_clip", "transformers", "wandb", "matplotlib")

# One fresh interpreter runs every job's main() with --help (Hydra's exit caught, its global state cleared
# between jobs) and prints which heavy libraries got imported. --help composes the job's config as --cfg job
# does, and lists every config group; neither runs the job.
_PROBE = """
import contextlib, io, json, sys
from hydra.core.global_hydra import GlobalHydra
import importlib
heavy, loaded, failed = json.loads(sys.argv[1]), {}, {}
for job in json.loads(sys.argv[2]):
    sys.argv, out = [job, "--help"], io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            importlib.import_module("vlmsae." + job).main()
    except SystemExit as exit:
        if exit.code not in (0, None):
            failed[job] = f"exit {exit.code}"
    if "== Configuration groups ==" not in out.getvalue():
        failed[job] = "printed no Hydra help"
    GlobalHydra.instance().clear()
    loaded[job] = sorted(m for m in heavy if m in sys.modules)
print(json.dumps({"loaded": loaded, "failed": failed}))
"""


def _run(args: list[str], repo_root) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    return subprocess.run(args, cwd=repo_root, env=env, capture_output=True, text=True, timeout=300)


def test_help_of_every_job_imports_no_heavy_library(repo_root):
    proc = _run([sys.executable, "-c", _PROBE, json.dumps(HEAVY), json.dumps(cli.JOBS)], repo_root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["failed"] == {}, report["failed"]
    assert set(report["loaded"]) == set(cli.JOBS)
    loaded = {job: mods for job, mods in report["loaded"].items() if mods}
    assert loaded == {}, f"--help imported {loaded}: move those imports into run() (tests/test_layers.py)"


def test_the_probe_sees_a_heavy_import(repo_root):
    """The check above can fail: the same probe, with a (stand-in) torch in sys.modules, reports it."""
    probe = "import sys, types\nsys.modules['torch'] = types.ModuleType('torch')\n" + _PROBE
    proc = _run([sys.executable, "-c", probe, json.dumps(HEAVY), json.dumps(["browse"])], repo_root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["loaded"] == {"browse": ["torch"]}


def test_every_hydra_job_is_listed(repo_root):
    """A new vlmsae/<job>.py launched through Hydra (``config.launch``) belongs in cli.JOBS (and so in `vlmsae --help`
    and the layer tests)."""
    hydra_jobs = {p.stem for p in (repo_root / "vlmsae").glob("*.py") if re.search(r"\blaunch\(\"", p.read_text())}
    assert hydra_jobs == set(cli.JOBS)


def test_vlmsae_help_lists_every_job_with_its_line(repo_root):
    proc = _run([sys.executable, "-m", "vlmsae", "--help"], repo_root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    listed = dict(re.findall(r"^  (\w+) +(\S.*)$", proc.stdout, re.M))
    assert list(listed) == list(cli.COMMANDS)
    assert listed["train"] == "Train an SAE on vision-encoder activations (METHOD §2) with Lightning."
    assert all(len(line) > 20 and not line.startswith("python") for line in listed.values()), listed


def test_vlmsae_without_a_job_lists_the_jobs_and_fails(capsys):
    assert cli.main([]) == 2
    assert "  train  " in capsys.readouterr().err


def test_an_unknown_job_is_named_with_the_closest_one(capsys):
    assert cli.main(["trian", "seed=1"]) == 2
    err = capsys.readouterr().err
    assert "no job named 'trian'" in err and "vlmsae train" in err and "stability" in err


@pytest.mark.parametrize("flags", [["seed=7", "--cfg", "job"], ["--help"]])
def test_vlmsae_train_prints_what_python_m_vlmsae_train_prints(repo_root, flags):
    direct = _run([sys.executable, "-m", "vlmsae.train", *flags], repo_root)
    via_cli = _run([sys.executable, "-m", "vlmsae", "train", *flags], repo_root)
    assert direct.returncode == via_cli.returncode == 0, via_cli.stderr[-3000:]
    assert via_cli.stdout == direct.stdout
    if "seed=7" in flags:
        assert re.search(r"^seed: 7$", via_cli.stdout, re.M)  # the override reached Hydra


def test_vlmsae_demo_takes_the_demo_flags(capsys):
    with pytest.raises(SystemExit) as exit:
        cli.main(["demo", "--help"])
    assert exit.value.code == 0 and "--steps" in capsys.readouterr().out


def test_console_script_is_the_cli_main(repo_root):
    pyproject = tomllib.loads((repo_root / "pyproject.toml").read_text())
    assert pyproject["project"]["scripts"] == {"vlmsae": "vlmsae.cli:main"}

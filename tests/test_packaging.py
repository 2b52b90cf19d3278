"""Packaging: the config tree ships in the wheel, and the declared dependency ranges are the tested ones.

Issue #12 items 11 and 12. The slow tests build a real wheel (and a real PEP 660 editable wheel) from a
copy of the checkout, install it into a fresh venv that sees this interpreter's dependencies but not the
checkout's own ``vlmsae``, and run jobs from a directory outside the repo.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pytest
import yaml

from vlmsae.config import conf_dir

REPO_ROOT = Path(__file__).resolve().parents[1]
BUILD_INPUTS = ("pyproject.toml", "README.md", "vlmsae", "conf")  # what setuptools reads to build vlmsae


def _pyproject() -> dict:
    return tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def _conf_yamls(dpath: Path) -> set[str]:
    return {p.relative_to(dpath).as_posix() for p in dpath.rglob("*.yaml")}


# --------------------------------------------------------------------------------------------- conf/


def test_conf_dir_is_the_repo_conf_seen_through_the_package_symlink():
    # conf/ stays at the repo root; vlmsae/conf links to it so that the package carries it (wheel, editable)
    link = REPO_ROOT / "vlmsae" / "conf"
    assert link.is_symlink() and os.readlink(link) == "../conf", f"{link} must be the symlink ../conf"
    assert conf_dir() == (REPO_ROOT / "conf").resolve()
    assert {"train.yaml", "extract.yaml", "model/tiny.yaml"} <= _conf_yamls(conf_dir())


def _load_config_module_at(package_dpath: Path):
    """vlmsae/config/__init__.py, run as if the package lived at ``package_dpath``."""
    (package_dpath / "config").mkdir(parents=True)
    fpath = package_dpath / "config" / "__init__.py"
    shutil.copy2(REPO_ROOT / "vlmsae" / "config" / "__init__.py", fpath)
    spec = importlib.util.spec_from_file_location("_vlmsae_config_copy", fpath)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_conf_dir_prefers_the_package_copy_then_the_checkout_root_then_says_what_to_do(tmp_path):
    module = _load_config_module_at(tmp_path / "vlmsae")
    with pytest.raises(FileNotFoundError, match=r"train\.yaml.*ln -s \.\./conf vlmsae/conf") as err:
        module.conf_dir()
    assert str(tmp_path / "vlmsae" / "conf") in str(err.value) and str(tmp_path / "conf") in str(err.value)

    (tmp_path / "conf").mkdir()  # a checkout whose symlink git wrote as a text file (core.symlinks=false)
    (tmp_path / "conf" / "train.yaml").write_text("seed: 0\n")
    (tmp_path / "vlmsae" / "conf").write_text("../conf")
    assert module.conf_dir() == (tmp_path / "conf").resolve()

    (tmp_path / "vlmsae" / "conf").unlink()  # an installed wheel: a real directory inside the package
    (tmp_path / "vlmsae" / "conf").mkdir()
    (tmp_path / "vlmsae" / "conf" / "train.yaml").write_text("seed: 0\n")
    assert module.conf_dir() == (tmp_path / "vlmsae" / "conf").resolve()


# A path to conf/ built by hand: '../conf', `/ "conf"`, parents[N] / 'conf', "conf/model" joined to a path.
_CONF_PATH_RE = re.compile(r"""["']\.\./conf\b|/\s*["']conf\b|config_path\s*=\s*["']""")


def test_only_conf_dir_knows_where_conf_is():
    offenders = []
    for fpath in sorted([*(REPO_ROOT / "vlmsae").rglob("*.py"), *(REPO_ROOT / "tests").rglob("*.py")]):
        if fpath.name == "test_packaging.py" or fpath == REPO_ROOT / "vlmsae" / "config" / "__init__.py":
            continue
        for lineno, line in enumerate(fpath.read_text(encoding="utf-8").splitlines(), 1):
            if _CONF_PATH_RE.search(line):
                offenders.append(f"{fpath.relative_to(REPO_ROOT)}:{lineno}: {line.strip()}")
    assert not offenders, "build the config path with vlmsae.config.conf_dir() instead:\n" + "\n".join(offenders)


# ------------------------------------------------------------------------------ dependency ranges
# Why this shape: CI installs constraints.txt's exact pins, so "tested" means "pinned there". The static
# test ties each floor's major.minor to its pin: widening a range below what CI runs (or bumping a pin
# past the floor's minor without moving the floor) fails, while patch releases never matter, since
# nothing compares patch numbers and CI only ever sees the pinned patch. The environment test then checks
# that what is installed here is that tested stack (major.minor; a patch drift is tolerated).


def _requirements():
    from packaging.requirements import Requirement

    project = _pyproject()["project"]
    declared = list(project["dependencies"]) + list(project.get("optional-dependencies", {}).get("dev", []))
    return [Requirement(r) for r in declared]


def _pins() -> dict[str, str]:
    from packaging.utils import canonicalize_name

    pins = {}
    for line in (REPO_ROOT / "constraints.txt").read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep, f"constraints.txt line {line!r} is not an exact pin: write it as <name>==<version>."
            pins[canonicalize_name(name)] = version.strip()
    return pins


def _floor(req):
    from packaging.version import Version

    floors = [Version(s.version) for s in req.specifier if s.operator in (">=", "==", "~=")]
    assert floors, f"dependency {str(req)!r} has no lower bound: declare '>=' the pinned version in constraints.txt."
    return max(floors)


def test_each_declared_floor_is_the_major_minor_ci_pins():
    from packaging.utils import canonicalize_name
    from packaging.version import Version

    pins = _pins()
    reqs = {canonicalize_name(r.name): r for r in _requirements()}
    assert set(pins) == set(reqs), (
        f"constraints.txt pins {sorted(set(pins) - set(reqs))} that pyproject.toml does not declare and "
        f"misses {sorted(set(reqs) - set(pins))}: pin every direct dependency (the version CI tests), nothing else."
    )
    for name, req in reqs.items():
        pinned, floor = Version(pins[name]), _floor(req)
        assert req.specifier.contains(pinned, prereleases=True), f"{name}=={pinned} (CI's pin) is outside {req}."
        assert floor.release[:2] == pinned.release[:2], (
            f"{req} declares a floor of {floor}, but CI tests {name}=={pinned}: set the floor to "
            f">={pinned.major}.{pinned.minor} (or pin and test the older version)."
        )


def test_installed_dependencies_are_the_tested_ones():
    from packaging.utils import canonicalize_name
    from packaging.version import Version

    assert _pyproject()["project"]["requires-python"] == ">=3.11" and sys.version_info >= (3, 11)
    pins = _pins()
    for req in _requirements():
        name = canonicalize_name(req.name)
        try:
            installed = Version(importlib.metadata.version(req.name))
        except importlib.metadata.PackageNotFoundError:
            pytest.fail(f"{req.name} is declared but not installed: run `make install`.")
        assert req.specifier.contains(installed, prereleases=True), f"installed {name}=={installed} is outside {req}."
        assert installed.release[:2] == Version(pins[name]).release[:2], (
            f"installed {name}=={installed}, CI tests {pins[name]} (constraints.txt): run `make install` "
            f"(it applies the pins) so this environment is the tested one."
        )


# --------------------------------------------------------------------------- wheel / editable (slow)


def _clean_env() -> dict[str, str]:
    # PYTHONPATH=$PWD (how the tests run in a worktree) would put the checkout's vlmsae first again
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    env.update(WANDB_MODE="disabled", HYDRA_FULL_ERROR="1")
    return env


def _run(args: list, cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(a) for a in args], cwd=cwd, env=_clean_env(), capture_output=True, text=True)
    assert proc.returncode == 0, f"{args} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _source_copy(tmp_path: Path) -> Path:
    """The files setuptools builds from, copied (symlink kept), so the build leaves nothing in the checkout."""
    if importlib.util.find_spec("setuptools") is None:
        pytest.skip("setuptools is not installed (`make install` installs it); the build test needs it")
    src = tmp_path / "src"
    src.mkdir()
    for name in BUILD_INPUTS:
        if (REPO_ROOT / name).is_dir():
            ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
            shutil.copytree(REPO_ROOT / name, src / name, symlinks=True, ignore=ignore)
        else:
            shutil.copy2(REPO_ROOT / name, src / name)
    return src


def _fresh_venv(tmp_path: Path, wheel: Path) -> tuple[Path, Path]:
    """(python, site-packages) of a new venv holding ``wheel``, with this interpreter's packages for its deps.

    The deps go in as plain path lines of a .pth file: their directories join sys.path but their own .pth
    files (this checkout's editable-install hook among them) do not run, so only the wheel provides vlmsae.
    """
    venv_dpath = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv_dpath], cwd=tmp_path)
    python = venv_dpath / "bin" / "python"
    site_dpath = Path(
        _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path).stdout.strip()
    )
    deps = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    (site_dpath / "zz_vlmsae_test_deps.pth").write_text("\n".join(deps) + "\n")
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "--no-index",
            "--disable-pip-version-check",
            "-q",
            "--target",
            site_dpath,
            wheel,
        ],
        cwd=tmp_path,
    )
    return python, site_dpath


_WHERE = "import vlmsae, vlmsae.config as c; print(vlmsae.__file__); print(c.conf_dir())"


def _job_cfg(python: Path, cwd: Path, job: str, *overrides: str) -> dict:
    return yaml.safe_load(_run([python, "-m", f"vlmsae.{job}", "--cfg", "job", *overrides], cwd).stdout)


@pytest.mark.slow
def test_wheel_ships_conf_and_jobs_run_from_anywhere(tmp_path, compose_cfg):
    from omegaconf import OmegaConf

    src = _source_copy(tmp_path)
    dist = tmp_path / "dist"
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--disable-pip-version-check",
            "-q",
            "-w",
            dist,
            src,
        ],
        cwd=tmp_path,
    )
    (wheel,) = dist.glob("vlmsae-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    shipped = {n.removeprefix("vlmsae/conf/") for n in names if n.startswith("vlmsae/conf/")}
    assert shipped == _conf_yamls(REPO_ROOT / "conf"), "the wheel's vlmsae/conf/ must be exactly the repo's conf/"

    python, site_dpath = _fresh_venv(tmp_path, wheel)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    package_file, conf = _run([python, "-c", _WHERE], elsewhere).stdout.split()
    assert Path(package_file).is_relative_to(site_dpath), f"vlmsae came from {package_file}, not the wheel"
    assert Path(conf) == (site_dpath / "vlmsae" / "conf").resolve() and not Path(conf).is_symlink()

    def expected(job: str, *overrides: str) -> dict:
        return yaml.safe_load(OmegaConf.to_yaml(compose_cfg(job, list(overrides))))

    # the installed jobs compose exactly what the checkout composes
    assert _job_cfg(python, elsewhere, "train", "model=tiny_hf") == expected("train", "model=tiny_hf")
    assert _job_cfg(python, elsewhere, "monosemanticity") == expected("monosemanticity")
    help_text = _run([python, "-m", "vlmsae.extract", "--help"], elsewhere).stdout
    assert "== Configuration groups ==" in help_text and re.search(r"^model: .*\btiny_llava\b", help_text, re.M)
    spec = _run(
        [python, "-c", "from vlmsae.models.spec import get_model_spec as g; print(g('tiny_llava').backend)"], elsewhere
    ).stdout
    assert spec.strip() == "hf_llava"

    # README "Without a network": a user's own option next to the shipped ones, via --config-dir
    (elsewhere / "my_conf" / "model").mkdir(parents=True)
    mine = (REPO_ROOT / "conf" / "model" / "tiny.yaml").read_text().replace("name: tiny", "name: my_tiny")
    (elsewhere / "my_conf" / "model" / "my_tiny.yaml").write_text(mine)
    cfg = _job_cfg(python, elsewhere, "train", "--config-dir", "my_conf", "model=my_tiny")
    assert cfg["model"]["name"] == "my_tiny" and cfg["sae"] == expected("train")["sae"]
    assert not (elsewhere / "outputs").exists(), "--cfg job must not start a run"


@pytest.mark.slow
def test_editable_install_reads_the_checkout_conf(tmp_path):
    src = _source_copy(tmp_path)
    dist = tmp_path / "dist"
    dist.mkdir()
    build = "import sys; from setuptools import build_meta as b; print(b.build_editable(sys.argv[1]))"
    wheel_name = _run([sys.executable, "-c", build, dist], cwd=src).stdout.strip().splitlines()[-1]
    python, _site_dpath = _fresh_venv(tmp_path, dist / wheel_name)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    package_file, conf = _run([python, "-c", _WHERE], elsewhere).stdout.split()
    assert Path(package_file).is_relative_to(src / "vlmsae") and Path(conf) == (src / "conf").resolve()

    # an edit to the checkout's conf/ shows at once, no reinstall
    (src / "conf" / "model" / "tiny.yaml").write_text(
        (src / "conf" / "model" / "tiny.yaml").read_text().replace("width: 64", "width: 48")
    )
    assert _job_cfg(python, elsewhere, "train")["model"]["width"] == 48

"""Command-line overrides Hydra's grammar cannot read: ~ is expanded, anything else stops with the quoted form."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from vlmsae.config import readable_overrides


def test_home_folder_is_expanded_and_readable_overrides_pass_unchanged(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    argv = ["sae_path=~/runs/sae", "format=saelens", "-m", "--cfg", "job", "sae_path=~/a,~/b", 'out="~/q"']
    assert readable_overrides(argv) == [
        f"sae_path={tmp_path}/runs/sae",
        "format=saelens",
        "-m",
        "--cfg",
        "job",
        f"sae_path={tmp_path}/a,{tmp_path}/b",  # a sweep over two folders stays a sweep
        'out="~/q"',  # quoted: Hydra reads it; the SAE loaders and export expand ~ themselves
    ]


@pytest.mark.parametrize(
    "arg, quoted",
    [
        ("sae_path=/data/run(1)/sae", """'sae_path="/data/run(1)/sae"'"""),
        ("sae_path=/data/a=b/sae", """'sae_path="/data/a=b/sae"'"""),
        ("out=/data/#1", """'out="/data/#1"'"""),
        ("sae_path=/data/ré", """'sae_path="/data/ré"'"""),
    ],
)
def test_unreadable_values_stop_with_the_quoted_form(arg, quoted):
    with pytest.raises(SystemExit) as err:
        readable_overrides([arg])
    message = str(err.value)
    assert f"Hydra cannot read the command-line argument {arg!r}" in message and quoted in message


def test_home_folder_with_reserved_characters_is_expanded_in_the_suggestion(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(SystemExit, match=rf"""'sae_path="{tmp_path}/run\(1\)"'"""):
        readable_overrides(["sae_path=~/run(1)"])


@pytest.mark.slow
def test_cli_reads_a_home_relative_sae_path_and_explains_quoting(repo_root, tmp_path):
    """python -m vlmsae.export with sae_path=~/... (no shell expansion: subprocess passes it literally)."""
    from vlmsae.sae import SAEConfig, build_sae, save_sae

    home = tmp_path / "home"
    sae = build_sae(SAEConfig(arch="relu", d_in=8, n_latents=16), seed=0)
    sae.trained_on = {"model": "tiny", "pretrained": None, "layer": 1, "tokens": "cls"}
    save_sae(sae, home / "my sae")
    env = {**os.environ, "HOME": str(home), "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    base = [sys.executable, "-m", "vlmsae.export", "format=vlmsae", f"hydra.run.dir={tmp_path / 'run'}"]

    def export(*overrides):
        return subprocess.run([*base, *overrides], cwd=repo_root, env=env, capture_output=True, text=True, timeout=300)

    proc = export("sae_path=~/my sae", "out=~/out")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (home / "out" / "config.json").is_file()
    proc = export("sae_path=~/runs(1)/sae", "out=~/o2")
    assert proc.returncode != 0 and f"""'sae_path="{home}/runs(1)/sae"'""" in proc.stderr
    assert "Traceback" not in proc.stderr

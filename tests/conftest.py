"""Shared fixtures: the repo root and a composer for the real Hydra configs."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "disabled")
REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture
def compose_cfg() -> Callable:
    """compose_cfg("train", ["model=tiny", ...]) -> DictConfig from the real conf/ tree."""
    from hydra import compose, initialize_config_dir

    from vlmsae.config import conf_dir, register_configs

    register_configs()

    def _compose(config_name: str, overrides: list[str] | None = None):
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            return compose(config_name=config_name, overrides=overrides or [])

    return _compose

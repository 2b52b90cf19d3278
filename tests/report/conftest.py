"""The headless Chromium fixture of the feature-browser tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from vlmsae.report.cdp import Chrome, find_chromium


@pytest.fixture
def chrome(tmp_path: Path):
    binary = find_chromium()
    if binary is None:
        pytest.skip(
            "no chromium on PATH: install Debian's browser with `apt-get install -y chromium` "
            "(.ci/run does this) to run the browser tests"
        )
    c = Chrome(binary, tmp_path / "chrome-profile")
    yield c
    c.close()

"""Atomic writes: readable permissions, and a failed write leaves the old file and no temp file."""

from __future__ import annotations

import os
import stat

import pytest

from vlmsae.utils.io import atomic_write, atomic_write_json, atomic_write_text


def test_atomic_write_uses_the_umask_not_owner_only(tmp_path):
    old = os.umask(0o022)
    try:
        fpath = atomic_write_json(tmp_path / "config.json", {"a": 1})
    finally:
        os.umask(old)
    assert stat.S_IMODE(fpath.stat().st_mode) == 0o644  # mkstemp alone would leave 0600


def test_failed_write_keeps_the_old_file_and_no_temp(tmp_path):
    fpath = atomic_write_text(tmp_path / "x.txt", "old")

    def boom(tmp_fpath):
        tmp_fpath.write_text("half")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        atomic_write(fpath, boom)
    assert fpath.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.txt"]


def test_publish_dir_renames_once_and_keeps_the_first_copy(tmp_path):
    from vlmsae.utils.io import publish_dir

    first = tmp_path / ".m.tmp-1"
    first.mkdir()
    (first / "w").write_text("first")
    dpath = publish_dir(first, tmp_path / "m")
    assert (dpath / "w").read_text() == "first" and not first.exists()

    second = tmp_path / ".m.tmp-2"  # an identical build that lost the race
    second.mkdir()
    (second / "w").write_text("second")
    assert publish_dir(second, dpath) == dpath
    assert (dpath / "w").read_text() == "first" and not second.exists()

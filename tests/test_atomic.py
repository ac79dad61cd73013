"""Atomic writes: all or nothing, with ordinary permissions."""

import os

import pytest

from dmoe_edu._atomic import atomic_write


def test_success_replaces_the_file_with_umask_permissions(tmp_path):
    target = tmp_path / "sub" / "out.json"
    old_mask = os.umask(0o022)
    try:
        with atomic_write(target, "w") as f:
            f.write("new")
    finally:
        os.umask(old_mask)
    assert target.read_text() == "new"
    assert target.stat().st_mode & 0o777 == 0o644
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.json"]


def test_a_directory_target_is_named(tmp_path):
    with pytest.raises(IsADirectoryError, match="is a directory"):
        with atomic_write(tmp_path) as f:
            f.write(b"x")
    assert list(tmp_path.iterdir()) == []


def test_a_crash_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_write(target) as f:
            f.write(b"half")
            raise RuntimeError("killed mid-write")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]

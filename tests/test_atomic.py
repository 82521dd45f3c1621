"""Atomic writes: an interrupted write leaves neither a partial target nor a temporary file."""

from __future__ import annotations

import pytest

from fidmed.atomic import atomic_write


def test_completed_write_replaces_the_target(tmp_path):
    target = tmp_path / "sub" / "stats.npz"
    with atomic_write(target) as f:
        f.write(b"new")
    assert target.read_bytes() == b"new"
    assert [p.name for p in target.parent.iterdir()] == ["stats.npz"]


def test_interrupted_write_leaves_old_content_and_no_temporary_file(tmp_path):
    target = tmp_path / "results.json"
    target.write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_write(target, "w") as f:
            f.write("half of the new conte")
            raise KeyboardInterrupt  # a killed job (Ctrl-C) in the middle of writing
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]

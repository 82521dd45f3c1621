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


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_written_files_get_the_permissions_of_a_plain_write(tmp_path, umask):
    """mkstemp makes 0600 files: colleagues sharing an outputs folder could not read results or checkpoints."""
    import os

    old = os.umask(umask)
    try:
        with atomic_write(tmp_path / "atomic.json", "w") as f:
            f.write("{}")
        (tmp_path / "plain.json").write_text("{}")
    finally:
        os.umask(old)
    mode = (tmp_path / "atomic.json").stat().st_mode & 0o777
    assert mode == (tmp_path / "plain.json").stat().st_mode & 0o777 == 0o666 & ~umask


def test_stale_temporary_files_of_killed_writers_are_removed(tmp_path):
    import os
    import time

    from fidmed.atomic import remove_stale_temp_files

    stale = tmp_path / ".real-inception_tf-0123.npz.k3j4h2l1.fidmed.tmp"
    legacy = tmp_path / ".results.json.ab12cd34.tmp"  # the naming of earlier fidmed versions
    fresh = tmp_path / ".final.pt.zz99yy88.fidmed.tmp"  # someone may still be writing it
    foreign = tmp_path / ".notes.tmp"  # not fidmed's naming
    for p in (stale, legacy, fresh, foreign):
        p.write_bytes(b"x" * 10)
    old = time.time() - 3600
    for p in (stale, legacy, foreign):
        os.utime(p, (old, old))
    removed = remove_stale_temp_files(tmp_path)
    assert sorted(p.name for p in removed) == sorted([stale.name, legacy.name])
    assert fresh.exists() and foreign.exists() and not stale.exists() and not legacy.exists()


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 truncated"])
def test_an_unreadable_statistics_cache_is_reported_and_recomputed(tmp_path, caplog, content):
    """An empty or truncated cache file (a full disk, a copy cut short) crashed fidmed evaluate with BadZipFile /
    EOFError; it is now a warning, and the next save replaces it atomically."""
    import logging

    import numpy as np

    from fidmed.evaluation.cache import StatsCache

    cache = StatsCache(tmp_path)
    record = {"extractor": "toy", "num_real": 4}
    path = cache.path_for(record)
    path.write_bytes(content)
    with caplog.at_level(logging.WARNING):
        assert cache.load(record) is None
    assert "cannot be read" in caplog.text and "recomputing" in caplog.text
    cache.save(record, {"a.sum": np.arange(3.0)})
    np.testing.assert_array_equal(cache.load(record)["a.sum"], np.arange(3.0))

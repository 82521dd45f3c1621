"""StreamingMoments: chunked/merged statistics equal np.mean / np.cov of the whole set, even with large means."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fidmed.errors import FidmedError
from fidmed.metrics.moments import StreamingMoments


def _features(n: int, d: int, mean: float, seed: int, dtype=np.float32) -> np.ndarray:
    """Correlated features with a large common mean (|mu| >> std), as float32 like an extractor's output."""
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((d, d)) / np.sqrt(d)
    x = rng.standard_normal((n, d)) @ mix + mean + rng.standard_normal(d)
    return x.astype(dtype)


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def _chunks(x: np.ndarray, sizes: list[int]) -> list[np.ndarray]:
    cuts = np.cumsum(sizes)[:-1]
    return np.split(x, cuts)


def test_chunked_updates_match_numpy_with_large_mean() -> None:
    x = _features(1000, 16, mean=1e4, seed=0)
    ref_mean, ref_cov = x.astype(np.float64).mean(0), np.cov(x.astype(np.float64), rowvar=False)
    m = StreamingMoments(16)
    for c in _chunks(x, [1, 7, 300, 2, 690]):
        m.update(torch.from_numpy(c))
    assert m.count == 1000
    assert _rel(m.mean, ref_mean) < 1e-14
    assert _rel(m.cov, ref_cov) < 1e-12
    assert m.mean.dtype == np.float64 and m.cov.dtype == np.float64
    assert np.array_equal(m.cov, m.cov.T)

    # The same data breaks the textbook formula E[xx^T] - mu mu^T: proof that the test above can fail.
    x64 = x.astype(np.float64)
    naive = (x64.T @ x64 - len(x64) * np.outer(x64.mean(0), x64.mean(0))) / (len(x64) - 1)
    assert _rel(naive, ref_cov) > 1e-10


def test_merge_of_separately_shifted_states_equals_whole() -> None:
    x = _features(900, 12, mean=-3e3, seed=1)
    parts = _chunks(x, [400, 1, 499])
    states = []
    for p in parts:  # each state picks its own shift (its first batch's mean)
        s = StreamingMoments(12)
        s.update(torch.from_numpy(p[: len(p) // 2 + 1]))
        s.update(torch.from_numpy(p[len(p) // 2 + 1 :]))
        states.append(s)
    merged = StreamingMoments(12)  # empty: takes the first state's shift
    for s in states:
        merged.merge(s)
    x64 = x.astype(np.float64)
    assert merged.count == 900
    assert _rel(merged.mean, x64.mean(0)) < 1e-14
    assert _rel(merged.cov, np.cov(x64, rowvar=False)) < 1e-12


def test_state_dict_round_trip_through_npz(tmp_path) -> None:
    x = _features(300, 8, mean=50.0, seed=2)
    m = StreamingMoments(8, keep_features=True)
    m.update(torch.from_numpy(x[:100]), indices=torch.arange(100))
    path = tmp_path / "stats.npz"
    np.savez(path, **m.state_dict())
    with np.load(path) as z:
        restored = StreamingMoments.from_state_dict(dict(z))
    restored.update(torch.from_numpy(x[100:]), indices=torch.arange(100, 300))
    x64 = x.astype(np.float64)
    assert _rel(restored.cov, np.cov(x64, rowvar=False)) < 1e-12
    assert restored.features.dtype == np.float32
    assert np.array_equal(restored.features, x)
    assert np.array_equal(restored.indices, np.arange(300))


def test_keep_features_keeps_raw_float32() -> None:
    x = _features(20, 5, mean=0.0, seed=3)
    m = StreamingMoments(5, keep_features=True)
    m.update(torch.from_numpy(x[:3]))
    m.update(torch.from_numpy(x[3:]))
    assert m.features.dtype == np.float32
    assert np.array_equal(m.features, x)
    other = StreamingMoments(5, keep_features=True)
    other.update(torch.from_numpy(x[:4]))
    m.merge(other)
    assert np.array_equal(m.features, np.concatenate([x, x[:4]]))
    assert _rel(m.cov, np.cov(np.concatenate([x, x[:4]]).astype(np.float64), rowvar=False)) < 1e-12
    # indices are only kept with features; without, they are ignored
    plain = StreamingMoments(5)
    plain.update(torch.from_numpy(x[:3]), indices=torch.arange(3))
    plain.update(torch.from_numpy(x[3:]))
    assert plain.count == 20 and plain.indices is None
    with pytest.raises(FidmedError, match="keep_features"):
        _ = StreamingMoments(5).features


def test_float64_input_accumulates_exactly_like_numpy() -> None:
    x = _features(50, 6, mean=1.0, seed=4, dtype=np.float64)
    m = StreamingMoments(6)
    m.update(torch.from_numpy(x))
    assert _rel(m.cov, np.cov(x, rowvar=False)) < 1e-13


def test_errors_for_too_few_wrong_shape_and_nan() -> None:
    m = StreamingMoments(4)
    m.update(torch.ones(1, 4))
    with pytest.raises(FidmedError, match="at least 2"):
        _ = m.cov
    with pytest.raises(FidmedError, match=r"expected \[N, 4\]"):
        m.update(torch.ones(3, 5))
    bad = torch.ones(2, 4)
    bad[1, 2] = float("nan")
    with pytest.raises(FidmedError, match="NaN"):
        m.update(bad)
    with pytest.raises(FidmedError, match="at least 1"):
        _ = StreamingMoments(4).mean


# ------------------------------------------------------------------------------------------ distributed (gloo)
def _ddp_worker(rank: int, world: int, port: int, x: np.ndarray, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        # rank r takes indices r, r+world, ...; the last rank also repeats index 0, like a padded sampler
        idx = np.arange(rank, len(x), world)
        if rank == world - 1:
            idx = np.append(idx, 0)
        m = StreamingMoments(x.shape[1], keep_features=True)
        m.update(torch.from_numpy(x[idx]), indices=torch.from_numpy(idx))
        m.all_reduce()
        plain = StreamingMoments(x.shape[1])
        plain.update(torch.from_numpy(x[rank::world]))  # no duplicates, sums only
        plain.all_reduce()
        np.savez(
            f"{out_dir}/rank{rank}.npz",
            mean=m.mean,
            cov=m.cov,
            feats=m.features,
            idx=m.indices,
            count=m.count,
            plain_cov=plain.cov,
            plain_count=plain.count,
        )
    finally:
        dist.destroy_process_group()


def test_all_reduce_with_gloo_is_exact_and_drops_padded_duplicates(tmp_path) -> None:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    x = _features(41, 6, mean=200.0, seed=5)
    mp.spawn(_ddp_worker, args=(2, port, x, str(tmp_path)), nprocs=2, join=True)
    x64 = x.astype(np.float64)
    for rank in range(2):
        r = np.load(tmp_path / f"rank{rank}.npz")
        assert int(r["count"]) == 41 and int(r["plain_count"]) == 41
        assert np.array_equal(r["idx"], np.arange(41))
        assert np.array_equal(r["feats"], x)  # restored to index order, duplicate dropped
        assert _rel(r["cov"], np.cov(x64, rowvar=False)) < 1e-12
        assert _rel(r["mean"], x64.mean(0)) < 1e-14
        assert _rel(r["plain_cov"], np.cov(x64, rowvar=False)) < 1e-12

"""Frechet distance: agreement with independent references (scipy sqrtm, closed forms, 50-digit mpmath)."""

from __future__ import annotations

import mpmath
import numpy as np
import pytest
import scipy.linalg
import torch

from fidmed.errors import FidmedError
from fidmed.metrics.fd import (
    FDResult,
    frechet_distance,
    frechet_distance_from_features,
    frechet_distance_from_moments,
    frechet_distance_stats,
    relative_fd,
)
from fidmed.metrics.moments import StreamingMoments


def _features(n: int, d: int, seed: int, decay: float = 0.7, offset: float = 0.0) -> np.ndarray:
    """Gaussian features with a decaying spectrum in a random basis (like a CNN's pooled features)."""
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.standard_normal((d, d)))[0]
    scales = (1.0 + np.arange(d)) ** -decay
    return (rng.standard_normal((n, d)) * scales) @ basis.T + offset + 0.1 * rng.standard_normal(d)


def _stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return x.mean(0), np.cov(x, rowvar=False)


def _fd_sqrtm(mu1, cov1, mu2, cov2) -> float:
    """The classic reference: scipy.linalg.sqrtm of S1 S2 (called without ``disp``, removed in SciPy 1.18)."""
    covmean = scipy.linalg.sqrtm(cov1 @ cov2)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2.0 * np.trace(covmean).real)


def test_identical_statistics_give_zero() -> None:
    mu, cov = _stats(_features(500, 64, seed=0))
    scale = float(np.trace(cov))
    assert abs(frechet_distance(mu, cov, mu, cov)) < 1e-8 * scale
    x = _features(30, 64, seed=1)  # n < d: nuclear route
    assert abs(frechet_distance_from_features(x, x).value) < 1e-8 * float(np.trace(np.cov(x, rowvar=False)))


def test_closed_form_for_commuting_covariances() -> None:
    # Diagonal covariances commute: tr((S1 S2)^1/2) = sum sqrt(a_i b_i), so FD = |dmu|^2 + sum (sqrt a - sqrt b)^2.
    rng = np.random.default_rng(2)
    a, b = rng.uniform(0.01, 3.0, 40), rng.uniform(0.01, 3.0, 40)
    mu1, mu2 = rng.standard_normal(40), rng.standard_normal(40)
    expected = float(((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum())
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-13)
    as_torch = [torch.from_numpy(v).float() for v in (mu1, np.diag(a), mu2, np.diag(b))]  # float32 tensors in
    assert frechet_distance(*as_torch) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("d", [64, 256])
def test_matches_scipy_sqrtm_on_full_rank_covariances(d: int) -> None:
    mu1, cov1 = _stats(_features(4 * d, d, seed=3))
    mu2, cov2 = _stats(_features(4 * d, d, seed=4, decay=0.5, offset=0.2))
    ref = _fd_sqrtm(mu1, cov1, mu2, cov2)
    got = frechet_distance_stats(mu1, cov1, mu2, cov2)
    assert got.route == "cholesky" and got.dim == d
    assert abs(got.value - ref) / ref < 1e-9
    via_eigh = frechet_distance_stats(mu1, cov1, mu2, cov2, method="eigh")
    assert via_eigh.route == "eigh" and abs(via_eigh.value - ref) / ref < 1e-9
    assert got.value == pytest.approx(got.mean_term + got.trace1 + got.trace2 - 2 * got.trace_sqrt, rel=1e-15)


def test_symmetry_for_both_routes() -> None:
    a, b = _features(300, 64, seed=5), _features(200, 64, seed=6, decay=0.4)
    mu1, cov1 = _stats(a)
    mu2, cov2 = _stats(b)
    ab, ba = frechet_distance(mu1, cov1, mu2, cov2), frechet_distance(mu2, cov2, mu1, cov1)
    assert abs(ab - ba) / ab < 1e-11
    small_a, small_b = a[:20], b[:30]
    ab = frechet_distance_from_features(small_a, small_b).value
    ba = frechet_distance_from_features(small_b, small_a).value
    assert abs(ab - ba) / ab < 1e-12


def _mp_reference(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """FD and tr((S1 S2)^1/2) in 50-digit arithmetic (mpmath) from the same float64 features.

    Independent of both fidmed routes' floating point: covariances, S1^1/2 via a 50-digit symmetric eigensolver,
    then the eigenvalues of S1^1/2 S2 S1^1/2. Rounding at 1e-50 costs at most ~1e-25 after the square roots.
    """
    with mpmath.workdps(50):
        n1, d = a.shape
        n2 = b.shape[0]

        def centred(x: np.ndarray):
            m = mpmath.matrix(x.tolist())
            n = x.shape[0]
            mu = [mpmath.fsum(m[i, j] for i in range(n)) / n for j in range(d)]
            for i in range(n):
                for j in range(d):
                    m[i, j] -= mu[j]
            return m, mu

        ac, mu1 = centred(a)
        bc, mu2 = centred(b)
        s1 = ac.T * ac / (n1 - 1)
        s2 = bc.T * bc / (n2 - 1)
        w, v = mpmath.eigsy(s1)
        root = v * mpmath.diag([mpmath.sqrt(max(x, 0)) for x in w]) * v.T
        wm = mpmath.eigsy(root * s2 * root, eigvals_only=True)
        ts = mpmath.fsum(mpmath.sqrt(max(x, 0)) for x in wm)
        fd = (mpmath.fsum((mu1[j] - mu2[j]) ** 2 for j in range(d)) + mpmath.fsum(s1[j, j] for j in range(d))
              + mpmath.fsum(s2[j, j] for j in range(d)) - 2 * ts)
        return float(fd), float(ts)


@pytest.mark.parametrize("n1,n2,d", [(8, 10, 24), (6, 40, 32)])
def test_nuclear_route_is_exact_when_n_below_d_and_eigh_is_not(n1: int, n2: int, d: int) -> None:
    a = _features(n1, d, seed=7, offset=3.0)
    b = _features(n2, d, seed=8, decay=0.3, offset=2.5)
    ref_fd, ref_ts = _mp_reference(a, b)
    nuc = frechet_distance_from_features(a, b)  # auto -> nuclear since min(n) < d
    eig = frechet_distance_from_features(a, b, route="eigh")
    assert nuc.route == "nuclear" and eig.route == "eigh"
    err_nuc = abs(nuc.value - ref_fd) / ref_fd
    err_eig = abs(eig.value - ref_fd) / ref_fd
    assert err_nuc < 1e-10
    assert abs(nuc.trace_sqrt - ref_ts) / ref_ts < 1e-10
    # Measured on the dev machine (torch 2.14 CPU, MKL): err_nuc ~ 2e-16 .. 4e-16, err_eig ~ 3.9e-9 .. 4.5e-9:
    # the eigh route misses the 1e-10 tolerance that the nuclear route meets with six digits to spare.
    assert err_eig > 1e-10 and err_eig > 1000 * max(err_nuc, 1e-16)


def test_full_rank_features_take_eigh_route_and_match_statistics() -> None:
    a, b = _features(100, 16, seed=9), _features(80, 16, seed=10)
    r = frechet_distance_from_features(torch.from_numpy(a), b)
    assert r.route == "cholesky" and (r.n1, r.n2, r.dim) == (100, 80, 16)
    assert r.value == pytest.approx(frechet_distance(*_stats(a), *_stats(b)), rel=1e-12)
    # the nuclear route is exact for any n (QR-reduced when n > d): same number
    assert frechet_distance_from_features(a, b, route="nuclear").value == pytest.approx(r.value, rel=1e-12)


def test_from_moments_uses_kept_features_when_n_below_d() -> None:
    a, b = _features(10, 32, seed=11), _features(12, 32, seed=12)
    ma, mb = StreamingMoments(32, keep_features=True), StreamingMoments(32, keep_features=True)
    ma.update(torch.from_numpy(a))
    mb.update(torch.from_numpy(b))
    r = frechet_distance_from_moments(ma, mb)
    assert r.route == "nuclear"
    assert r.value == pytest.approx(frechet_distance_from_features(a, b).value, rel=1e-14)
    # without features the stats route is used and still works on singular covariances (no epsilon added)
    pa, pb = StreamingMoments(32), StreamingMoments(32)
    pa.update(torch.from_numpy(a))
    pb.update(torch.from_numpy(b))
    r2 = frechet_distance_from_moments(pa, pb)
    assert r2.route in ("eigh", "cholesky") and abs(r2.value - r.value) / r.value < 1e-6
    assert frechet_distance_from_moments(pa, pb, route="eigh").route == "eigh"


def test_singular_covariances_fall_back_to_eigh() -> None:
    # rank-2 covariances in 3-D: no Cholesky factor exists, the eigh route handles them (and agrees with the
    # closed form for commuting covariances)
    a, b = np.diag([2.0, 0.5, 0.0]), np.diag([1.0, 0.0, 0.0])
    r = frechet_distance_stats(np.zeros(3), a, np.zeros(3), b)
    assert r.route == "eigh"
    assert r.value == pytest.approx((np.sqrt(2.0) - 1.0) ** 2 + 0.5, rel=1e-14)
    with pytest.raises(FidmedError, match="positive definite"):
        frechet_distance_stats(np.zeros(3), a, np.zeros(3), b, method="cholesky")


def test_errors_one_sample_and_non_psd() -> None:
    with pytest.raises(FidmedError, match="at least 2 images"):
        frechet_distance_from_features(np.ones((1, 4)), np.ones((5, 4)))
    mu = np.zeros(3)
    cov = np.eye(3)
    bad = np.diag([1.0, 1.0, -0.5])
    with pytest.raises(FidmedError, match="not positive semidefinite"):
        frechet_distance(mu, bad, mu, cov)
    with pytest.raises(FidmedError, match="not positive semidefinite"):
        frechet_distance(mu, cov, mu, bad)
    # rounding-size negatives are clipped, not rejected
    tiny = np.diag([1.0, 1.0, -1e-14])
    assert np.isfinite(frechet_distance(mu, tiny, mu, cov))
    with pytest.raises(FidmedError, match="need at least 2"):
        frechet_distance_stats(mu, cov, mu, cov, n1=1, n2=10)


def test_relative_fd_and_result_record() -> None:
    r = FDResult(12.0, "eigh", 10, 10, 4, 1.0, 6.0, 7.0, 1.0)
    assert relative_fd(r, 4.0) == 3.0
    assert float(r) == 12.0 and r.as_dict()["route"] == "eigh"
    with pytest.raises(FidmedError, match="positive"):
        relative_fd(1.0, 0.0)


def test_mixed_route_equals_the_nuclear_route_when_only_the_small_set_kept_features():
    """Few generated images (n < d) against a large real set known only by its moments."""
    from fidmed.metrics.fd import frechet_distance_from_features, frechet_distance_from_moments
    from fidmed.metrics.moments import StreamingMoments

    rng = np.random.default_rng(3)
    d = 48
    small = rng.normal(size=(20, d)) * 2.0 + 1.0
    large = rng.normal(size=(400, d)) @ rng.normal(size=(d, d)) * 0.3
    exact = frechet_distance_from_features(small, large, route="nuclear").value
    m_small = StreamingMoments(d, keep_features=True)
    m_small.update(torch.as_tensor(small))
    m_large = StreamingMoments(d, keep_features=False)
    m_large.update(torch.as_tensor(large))
    for a, b in ((m_small, m_large), (m_large, m_small)):
        res = frechet_distance_from_moments(a, b)
        assert res.route == "mixed"
        assert res.value == pytest.approx(exact, rel=1e-11)
    eigh = frechet_distance_from_moments(m_small, m_large, route="eigh").value
    assert abs(eigh - exact) > abs(frechet_distance_from_moments(m_small, m_large).value - exact)

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


def _mp_reference(a: np.ndarray, b: np.ndarray, dps: int = 50) -> tuple[float, float, float]:
    """(FD, tr((S1 S2)^1/2), |dmu|^2 + tr S1 + tr S2) of the same float64 features in ``dps``-digit arithmetic.

    Independent of fidmed's floating point: centring, covariances and eigenvalues are all computed by mpmath
    (mpf from a float64 is exact). The trace term comes from the eigenvalues of the smallest Gram matrix
    available: (A_c B_c^T)(A_c B_c^T)^T when a set has at most d images, else S1^1/2 S2 S1^1/2. An eigenvalue
    that is 0 in exact arithmetic comes out below 1e-50 relative, so its square root costs at most ~1e-25.
    """
    with mpmath.workdps(dps):

        def centred(x: np.ndarray):
            n, d = x.shape
            m = mpmath.matrix(x.tolist())
            mu = [mpmath.fsum(m[i, j] for i in range(n)) / n for j in range(d)]
            for i in range(n):
                for j in range(d):
                    m[i, j] -= mu[j]
            return m, mu

        n1, d = a.shape
        n2 = b.shape[0]
        ac, mu1 = centred(a)
        bc, mu2 = centred(b)
        t1 = mpmath.fsum(ac[i, j] ** 2 for i in range(n1) for j in range(d)) / (n1 - 1)
        t2 = mpmath.fsum(bc[i, j] ** 2 for i in range(n2) for j in range(d)) / (n2 - 1)
        mean = mpmath.fsum((mu1[j] - mu2[j]) ** 2 for j in range(d))
        if min(n1, n2) <= d:
            cross = ac * bc.T
            gram = cross * cross.T if n1 <= n2 else cross.T * cross
            w = mpmath.eigsy(gram, eigvals_only=True)
            ts = mpmath.fsum(mpmath.sqrt(max(x, 0)) for x in w) / mpmath.sqrt((n1 - 1) * (n2 - 1))
        else:
            s1, s2 = ac.T * ac / (n1 - 1), bc.T * bc / (n2 - 1)
            w, v = mpmath.eigsy(s1)
            root = v * mpmath.diag([mpmath.sqrt(max(x, 0)) for x in w]) * v.T
            wm = mpmath.eigsy(root * s2 * root, eigvals_only=True)
            ts = mpmath.fsum(mpmath.sqrt(max(x, 0)) for x in wm)
        return float(mean + t1 + t2 - 2 * ts), float(ts), float(mean + t1 + t2)


def _classic_fd(a: np.ndarray, b: np.ndarray) -> float:
    """The classic route that fidmed must beat: sqrt of the eigenvalues of S1^1/2 S2 S1^1/2 (negatives clipped),
    as every sqrtm-free FD implementation computes it. Used as a negative control only."""
    (mu1, s1), (mu2, s2) = _stats(a), _stats(b)
    w, v = np.linalg.eigh(s1)
    root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    wm = np.linalg.eigvalsh(root @ s2 @ root)
    return float((mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.clip(wm, 0, None)).sum())


def _set(
    n: int,
    d: int,
    seed: int,
    rank: int | None = None,
    constant: int = 0,
    dead: int = 0,
    duplicates: int = 0,
    offset: float = 0.0,
) -> np.ndarray:
    """Features with a decaying spectrum; optionally confined to a random rank-``rank`` subspace, with
    ``constant`` features fixed at a non-zero value, ``dead`` features at exactly 0 (dead ReLU units) and the
    first ``duplicates`` rows repeated (the same image twice)."""
    rng = np.random.default_rng(seed)
    r = rank or d
    basis = np.linalg.qr(rng.standard_normal((d, d)))[0][:, :r]
    x = (rng.standard_normal((n - duplicates, r)) * (1.0 + np.arange(r)) ** -0.7) @ basis.T
    x = np.concatenate([x, x[:duplicates]]) + offset + 0.1 * rng.standard_normal(d)
    x[:, :dead] = 0.0
    x[:, dead : dead + constant] = rng.uniform(0.05, 2.0, constant)
    return x


def _moments(x: np.ndarray, keep_features: bool) -> StreamingMoments:
    m = StreamingMoments(x.shape[1], keep_features=keep_features)
    m.update(torch.as_tensor(x))
    return m


D = 20  # small enough for a 50-digit reference in well under a second per case
#: (first set, second set): n just below, at and above d; tiny sets; singular covariances with n >= d from
#: constant and dead features, from a rank-deficient subspace and from duplicated images.
CASES = {
    "n=d-1 both": (dict(n=D - 1), dict(n=D - 1)),
    "n=d-1 vs d+1": (dict(n=D - 1), dict(n=D + 1)),
    "n=3 vs 2d": (dict(n=3), dict(n=2 * D)),
    "n=d+1 both": (dict(n=D + 1), dict(n=D + 1)),
    "n>d definite": (dict(n=3 * D), dict(n=4 * D)),
    "n>d constant+dead": (dict(n=3 * D, constant=2, dead=2), dict(n=4 * D, constant=1, dead=3)),
    "n>d rank d-4": (dict(n=3 * D, rank=D - 4), dict(n=4 * D, rank=D - 2)),
    "n>d duplicated rows, rank<d": (dict(n=D + 6, duplicates=10), dict(n=3 * D)),
}
SEEDS = range(6)
#: Every route must agree with the 50-digit reference to this fraction of |dmu|^2 + tr S1 + tr S2 (the size of
#: the terms the FD is a difference of, so the bound is meaningful for small FDs too). Measured on a Xeon
#: (MKL) host: at most 1.3e-15 for every route and case above at d = 16 and 40, 6 seeds each; 1e-13 leaves two
#: orders of margin for other BLAS/LAPACK builds. The classic sqrt-of-eigenvalues route misses it by 3-4 orders
#: of magnitude (5e-10 .. 5e-9) in every singular case, whichever way its rounding falls.
RTOL_SCALE = 1e-13


def _case(name: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    first, second = CASES[name]
    return _set(d=D, seed=seed, **first), _set(d=D, seed=seed + 100, offset=0.3, **second)


def _expected_routes(a: np.ndarray, b: np.ndarray, name: str) -> tuple[str, str]:
    """(from features, from moments only) routes that "auto" must take for a case: any singular covariance
    sends features to the nuclear route; moments take Cholesky unless a covariance stays singular after the
    constant features are set aside."""
    rank_deficient = min(len(a), len(b)) <= D or "rank" in name
    singular = rank_deficient or "constant" in name
    return ("nuclear" if singular else "cholesky"), ("eigh" if rank_deficient else "cholesky")


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_route_matches_a_50_digit_reference(name: str) -> None:
    """Each FD route, on every seed, against mpmath; the classic route as a negative control."""
    worst_classic = 0.0
    for seed in SEEDS:
        a, b = _case(name, seed)
        ref_fd, ref_ts, scale = _mp_reference(a, b)
        got = {
            "features": frechet_distance_from_features(a, b),
            "features, swapped": frechet_distance_from_features(b, a),
            "moments only": frechet_distance_from_moments(_moments(a, False), _moments(b, False)),
            "statistics without n": frechet_distance_stats(*_stats(a), *_stats(b)),
            "forced nuclear": frechet_distance_from_features(a, b, route="nuclear"),
            "forced eigh": frechet_distance_from_features(a, b, route="eigh"),
        }
        if len(a) < D:  # few images with features against statistics: the mixed route
            got["mixed"] = frechet_distance_from_moments(_moments(a, True), _moments(b, False))
            assert got["mixed"].route == "mixed"
        for what, res in got.items():
            err = abs(res.value - ref_fd) / scale
            assert err < RTOL_SCALE, f"{name} seed {seed} {what} ({res.route}): {err:.2e}"
            assert abs(res.trace_sqrt - ref_ts) / scale < RTOL_SCALE
        features_route, moments_route = _expected_routes(a, b, name)
        assert got["features"].route == features_route, name
        assert got["moments only"].route == moments_route, name
        worst_classic = max(worst_classic, abs(_classic_fd(a, b) - ref_fd) / scale)
    singular = name not in ("n>d definite", "n=d+1 both")
    if singular:  # the tolerance is one that the classic route cannot meet on these sets
        assert worst_classic > 100 * RTOL_SCALE, f"{name}: classic route {worst_classic:.1e}"


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


def test_constant_features_are_set_aside_and_other_singular_covariances_take_eigh() -> None:
    # Diagonal covariances with zero variances: the constant features leave the trace term (exactly: their
    # rows and columns are 0), and what remains is definite, so the Cholesky route still runs.
    a, b = np.diag([2.0, 0.5, 0.0]), np.diag([1.0, 0.0, 0.0])
    r = frechet_distance_stats(np.zeros(3), a, np.zeros(3), b)
    assert (r.route, r.constant_dims) == ("cholesky", 2)
    assert r.value == pytest.approx((np.sqrt(2.0) - 1.0) ** 2 + 0.5, rel=1e-14)
    # A rotated rank-2 covariance in 3-D has no constant feature and no Cholesky factor: the eigh factor of
    # rank 2 (and the same FD as the closed form: the rotation changes nothing when both are rotated).
    q = np.linalg.qr(np.random.default_rng(0).standard_normal((3, 3)))[0]
    ra, rb = q @ a @ q.T, q @ np.diag([1.0, 0.3, 0.0]) @ q.T
    r = frechet_distance_stats(np.zeros(3), ra, np.zeros(3), rb)
    assert (r.route, r.constant_dims) == ("eigh", 0)
    assert r.value == pytest.approx((np.sqrt(2.0) - 1.0) ** 2 + (np.sqrt(0.5) - np.sqrt(0.3)) ** 2, rel=1e-13)
    with pytest.raises(FidmedError, match="positive definite"):
        frechet_distance_stats(np.zeros(3), ra, np.zeros(3), rb, method="cholesky")


def test_an_fd_is_never_negative_and_keeps_its_signed_value() -> None:
    """FD of a set against itself is 0 (rounding can make the signed sum -1e-16: value clips it, raw keeps it)."""
    for seed in range(20):
        x = _set(3 * D, D, seed)
        for res in (
            frechet_distance_from_features(x, x),
            frechet_distance_stats(*_stats(x), *_stats(x)),
            frechet_distance_from_features(x[:5], x[:5]),
        ):
            scale = res.mean_term + res.trace1 + res.trace2
            assert res.value >= 0.0 and res.value == max(res.raw, 0.0)
            assert abs(res.raw) < RTOL_SCALE * scale
    # the clip acts on the signed sum only: a constructed negative sum reads 0 with its raw value kept
    fd = frechet_distance_stats(np.zeros(1), np.eye(1) * (1 + 2**-52), np.zeros(1), np.eye(1))
    assert fd.value >= 0.0 and fd.raw == fd.mean_term + fd.trace1 + fd.trace2 - 2 * fd.trace_sqrt


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


def test_relative_fd_metric_and_result_record() -> None:
    """rfd = FD / FD(real half A, real half B), through the registered metric; NaN when the split FD is 0."""
    from fidmed.metrics.base import METRICS, MetricInputs, MetricValue

    r = FDResult(12.0, "eigh", 10, 10, 4, 1.0, 6.0, 7.0, 1.0)
    assert float(r) == 12.0 and r.as_dict()["route"] == "eigh"
    a, b = _moments(_set(40, 4, seed=1), False), _moments(_set(40, 4, seed=2), False)
    split = frechet_distance_from_moments(a, b).value
    inputs = MetricInputs(a, a, (a, b), torch.device("cpu"), 0, results={"fd": MetricValue("fd", 3.0)})
    (rfd,) = METRICS.get("rfd").obj(inputs)
    assert rfd.value == 3.0 / split and rfd.details["fd_real_split"] == split
    same = MetricInputs(a, a, (a, a), torch.device("cpu"), 0, results={"fd": MetricValue("fd", 3.0)})
    assert np.isnan(METRICS.get("rfd").obj(same)[0].value)


def test_mixed_route_equals_the_nuclear_route_when_only_the_small_set_kept_features():
    """Few generated images (n < d) against a large real set known only by its moments.

    This data failed on AMD hosts before the mixed route became an SVD of B_c F: the centred small set has rank
    n - 1, so B_c S B_c^T has a zero eigenvalue that eigvalsh returned there as +2.6e-13; its square root
    (5e-7) entered the trace, 1.6e-9 relative off the 50-digit value 236.691507287322098...
    """
    rng = np.random.default_rng(3)
    d = 48
    small = rng.normal(size=(20, d)) * 2.0 + 1.0
    large = rng.normal(size=(400, d)) @ rng.normal(size=(d, d)) * 0.3
    ref_fd, _, scale = _mp_reference(small, large)
    exact = frechet_distance_from_features(small, large, route="nuclear").value
    assert abs(exact - ref_fd) < RTOL_SCALE * scale
    m_small, m_large = _moments(small, True), _moments(large, False)
    for a, b in ((m_small, m_large), (m_large, m_small)):
        res = frechet_distance_from_moments(a, b)
        assert res.route == "mixed" and (res.n1, res.n2) == (a.count, b.count)
        assert abs(res.value - ref_fd) < RTOL_SCALE * scale
        assert res.value == pytest.approx(exact, rel=1e-13)

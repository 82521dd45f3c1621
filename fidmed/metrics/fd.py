"""Frechet distance between two Gaussian fits of feature sets, in float64, without scipy.linalg.sqrtm.

    FD = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^1/2)

The whole difficulty is the trace term. For any factors S1 = F1 F1^T and S2 = F2 F2^T (square or not),
S1 S2 = F1 (F1^T F2) F2^T has the same non-zero eigenvalues as M M^T with M = F1^T F2, so

    tr((S1 S2)^1/2) = sum of singular values of M = ||F1^T F2||_*      (the nuclear norm).

Every route below computes that nuclear norm with an SVD; they differ only in where the factors come from.
An SVD returns each singular value, zero ones included, to an absolute accuracy of about eps * ||M||; the
classic routes (sqrtm, or sqrt of the eigenvalues of S1^1/2 S2 S1^1/2) square M first and take square roots of
eigenvalues afterwards, which turns an eigenvalue computed as eps * lambda_max instead of 0 into a term
sqrt(eps * lambda_max): about 8 of float64's 16 digits, for every numerically-zero eigenvalue. Whether such an
eigenvalue rounds to +2.6e-13 (and counts) or to -1e-13 (and is clipped) depends on the BLAS/LAPACK build
and the CPU, so those routes give machine-dependent digits exactly when covariances are singular (fewer images
than dimensions, constant features, dead ReLU units). No route here ever takes the square root of a computed
eigenvalue of a product; and no epsilon is ever added to a diagonal.

Routes (``FDResult.route`` records which one made a number):

``nuclear`` (both feature sets available): F = centred features, M = A_c B_c^T / sqrt((n1-1)(n2-1)), reduced by
    a QR when a set has more rows than dimensions. Exact to rounding for any n and any rank. Taken by
    ``frechet_distance_from_features`` whenever min(n1, n2) < d or a covariance is singular.

``mixed`` (features of a small set, moments of the other): F_g = B_c^T / sqrt(n-1) for the features, a factor of
    the other covariance as below. Exact to rounding; for few generated images against cached real statistics.

``cholesky`` (moments only, both covariances positive definite after constant features are set aside): the
    Cholesky factors. The default for statistics.

``eigh`` (moments only, a covariance singular): that covariance's factor is V_r diag(sqrt w_r) from a symmetric
    eigendecomposition, keeping only the eigenvalues above its numerical-rank threshold (d * eps * w_max, the
    convention of numpy.linalg.matrix_rank) and at most n - 1 of them (a covariance of n images has rank <= n-1).
    The eigenvalues dropped are within the rounding error of the covariance itself, so dropping them is a
    perturbation no larger than the one already in the input; keeping them would add sqrt(rounding) terms.

Constant features. A feature whose spread is below float64's resolution of its own mean or of the set's largest
spread (variance <= (eps * max(|mean|, largest std))^2, e.g. a dead ReLU unit, exactly 0) has a zero row and
column in its covariance, and then tr((S1 S2)^1/2) equals the same trace over the other features alone (S1 S2
restricted to them has the same non-zero eigenvalues). Such features are set aside from the trace term (their
mean and variance still count in the other terms) before factoring, so that singular covariances of that common
kind keep the fast, exact Cholesky route. ``FDResult.constant_dims`` says how many there were.

Negative results. FD >= 0 in exact arithmetic; in float64 a set compared with itself can give -1e-16.
``FDResult.value`` is max(FD, 0); the signed sum is kept in ``FDResult.raw``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from fidmed.errors import FidmedError
from fidmed.metrics.base import MetricInputs, MetricValue, register_metric

#: Default tolerance for "negative eigenvalue from rounding" relative to the largest eigenvalue. Rounding in a
#: float64 covariance of d = 2048 features gives about d * eps = 5e-13; 1e-8 leaves a wide margin for that and
#: still rejects covariances that are not PSD (or were stored in float32, whose rounding is ~1e-7 relative).
DEFAULT_PSD_RTOL = 1e-8

_EPS = float(np.finfo(np.float64).eps)


@dataclass(frozen=True)
class FDResult:
    """An FD value and how it was made (log it with the number)."""

    value: float  # max(raw, 0)
    route: str  # "cholesky", "eigh", "nuclear" or "mixed"
    n1: int | None  # sample counts (None when only statistics were given)
    n2: int | None
    dim: int
    mean_term: float  # |mu1 - mu2|^2
    trace1: float  # tr(S1)
    trace2: float  # tr(S2)
    trace_sqrt: float  # tr((S1 S2)^1/2)
    raw: float | None = None  # the signed sum mean_term + trace1 + trace2 - 2 trace_sqrt (value clips it at 0)
    constant_dims: int = 0  # features set aside from the trace term as constant in either set

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __float__(self) -> float:
        return self.value


def _result(
    route: str,
    n1: int | None,
    n2: int | None,
    dim: int,
    mean_term: float,
    t1: float,
    t2: float,
    ts: float,
    constant_dims: int = 0,
) -> FDResult:
    raw = mean_term + t1 + t2 - 2.0 * ts
    return FDResult(max(raw, 0.0), route, n1, n2, dim, mean_term, t1, t2, ts, raw, constant_dims)


# ---------------------------------------------------------------------------------------------- factors
def _clip_psd(w: torch.Tensor, what: str, psd_rtol: float) -> torch.Tensor:
    """Clip rounding-size negative eigenvalues to 0; raise on larger ones (a non-PSD input)."""
    top = float(w.max()) if w.numel() else 0.0
    low = float(w.min()) if w.numel() else 0.0
    if low < 0 and -low > psd_rtol * max(top, 0.0):
        raise FidmedError(
            f"{what} is not positive semidefinite: eigenvalue {low:.3e} vs largest {top:.3e} "
            f"(tolerance {psd_rtol:g} relative). Covariances must be float64 sample covariances (N - 1) of real "
            "features; statistics stored in float32 or edited by hand can cause this. Recompute them in float64."
        )
    return w.clamp(min=0.0)


def _rank_tol(d: int) -> float:
    """Relative threshold below which an eigenvalue (or Cholesky pivot) is numerically zero: d * eps."""
    return max(d, 1) * _EPS


def _cholesky(cov: torch.Tensor) -> torch.Tensor | None:
    """Lower Cholesky factor, or None when the matrix is not positive definite at the rank tolerance.

    A Cholesky that succeeds on a singular matrix (rounding made it slightly definite) has pivots L_kk^2 of the
    size of that rounding; each pivot bounds the smallest eigenvalue from above, so a pivot below d * eps of the
    largest diagonal entry marks the matrix as numerically singular and sends it to the eigh factor.
    """
    if cov.shape[0] == 0:
        return cov.new_zeros((0, 0))
    chol, info = torch.linalg.cholesky_ex(cov)
    if int(info) != 0:
        return None
    pivots = chol.diagonal() ** 2
    if float(pivots.min()) <= _rank_tol(cov.shape[0]) * float(cov.diagonal().max()):
        return None
    return chol


def _eigh_factor(cov: torch.Tensor, n: int | None, what: str, psd_rtol: float) -> torch.Tensor:
    """F = V_r diag(sqrt w_r) with F F^T = cov up to its rounding, r = numerical rank (at most n - 1)."""
    w, v = torch.linalg.eigh(cov)
    w = _clip_psd(w, what, psd_rtol)
    keep = w > _rank_tol(cov.shape[0]) * float(w.max()) if w.numel() else w > 0
    if n is not None and int(keep.sum()) > n - 1:
        # eigh sorts ascending: keep the n - 1 largest
        keep = torch.zeros_like(keep)
        keep[w.numel() - (n - 1) :] = True
    return v[:, keep] * w[keep].sqrt()


def _factor(
    cov: torch.Tensor, n: int | None, what: str, psd_rtol: float, allow_eigh: bool = True
) -> tuple[torch.Tensor, bool]:
    """A factor F of ``cov`` (F F^T = cov) and whether it is a Cholesky factor (else a rank-truncated eigh one)."""
    chol = _cholesky(cov)
    if chol is not None:
        return chol, True
    if not allow_eigh:
        raise FidmedError(f"{what} is not positive definite; use method='eigh' (or 'auto')")
    return _eigh_factor(cov, n, what, psd_rtol), False


def _nuclear_norm(m: torch.Tensor) -> float:
    """Sum of singular values (0 for an empty matrix)."""
    if m.numel() == 0:
        return 0.0
    return float(torch.linalg.svdvals(m).sum())


def _constant_dims(var: torch.Tensor, mean: torch.Tensor, what: str, psd_rtol: float) -> torch.Tensor:
    """Features whose spread is below float64's resolution of their mean or of the set's largest spread.

    ``var`` is a covariance's diagonal: a clearly negative entry means the matrix is not PSD (raises).
    """
    _clip_psd(var, what, psd_rtol)
    top = var.max().clamp(min=0.0).sqrt() if var.numel() else var.new_zeros(())
    return var.abs() <= (_EPS * torch.maximum(mean.abs(), top)) ** 2


def _check_stats(mu1: torch.Tensor, cov1: torch.Tensor, mu2: torch.Tensor, cov2: torch.Tensor) -> int:
    if mu1.ndim != 1 or mu2.shape != mu1.shape:
        raise FidmedError(f"mean vectors must be 1-D of equal length, got {tuple(mu1.shape)} and {tuple(mu2.shape)}")
    d = mu1.shape[0]
    if cov1.shape != (d, d) or cov2.shape != (d, d):
        raise FidmedError(f"covariances must be [{d}, {d}], got {tuple(cov1.shape)} and {tuple(cov2.shape)}")
    for name, a in (("mu1", mu1), ("cov1", cov1), ("mu2", mu2), ("cov2", cov2)):
        if not bool(torch.isfinite(a).all()):
            raise FidmedError(f"{name} contains NaN or infinite values; recompute the statistics")
    return d


def _sym(m: torch.Tensor) -> torch.Tensor:
    return 0.5 * (m + m.T)


def _trace_sqrt_stats(
    mu1: torch.Tensor,
    cov1: torch.Tensor,
    n1: int | None,
    mu2: torch.Tensor,
    cov2: torch.Tensor,
    n2: int | None,
    method: str,
    psd_rtol: float,
) -> tuple[float, str, int]:
    """tr((S1 S2)^1/2) from covariances: (value, route, number of constant features set aside)."""
    if method not in ("auto", "cholesky", "eigh"):
        raise FidmedError(f"unknown FD method {method!r}; use 'auto', 'cholesky' or 'eigh'")
    const = _constant_dims(cov1.diagonal(), mu1, "covariance 1", psd_rtol) | _constant_dims(
        cov2.diagonal(), mu2, "covariance 2", psd_rtol
    )
    keep = ~const
    c1, c2 = _sym(cov1[keep][:, keep]), _sym(cov2[keep][:, keep])
    if method == "eigh":
        f1 = _eigh_factor(c1, n1, "covariance 1", psd_rtol)
        f2 = _eigh_factor(c2, n2, "covariance 2", psd_rtol)
        route = "eigh"
    else:
        allow = method == "auto"
        f1, chol1 = _factor(c1, n1, "covariance 1", psd_rtol, allow)
        f2, chol2 = _factor(c2, n2, "covariance 2", psd_rtol, allow)
        route = "cholesky" if chol1 and chol2 else "eigh"
    return _nuclear_norm(f1.T @ f2), route, int(const.sum())


def _f64(x: Any, device: str | torch.device | None) -> torch.Tensor:
    """A float64 torch tensor (zero-copy from a float64 numpy array on the CPU)."""
    t = x.detach() if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64))
    return t.to(device=device if device is not None else t.device, dtype=torch.float64)


def frechet_distance_stats(
    mu1: Any,
    cov1: Any,
    mu2: Any,
    cov2: Any,
    n1: int | None = None,
    n2: int | None = None,
    method: str = "auto",
    psd_rtol: float = DEFAULT_PSD_RTOL,
    device: str | torch.device | None = None,
) -> FDResult:
    """FD from means and covariances (numpy or torch; computed in float64), with its terms.

    ``method``: "cholesky" (both covariances positive definite once constant features are set aside; raises
    otherwise), "eigh" (rank-truncated eigendecomposition factors for both), or "auto" (Cholesky where a
    covariance is definite, eigh for the singular one). ``n1``/``n2`` (sample counts), when given, bound each
    covariance's rank by n - 1. The result's ``route`` says which factors were used. ``device``: where the
    linear algebra runs (default: where the inputs are; numpy inputs: the CPU).
    """
    if device is None:
        device = cov1.device if isinstance(cov1, torch.Tensor) else torch.device("cpu")
    mu1, mu2 = _f64(mu1, device), _f64(mu2, device)
    cov1, cov2 = _f64(cov1, device), _f64(cov2, device)
    d = _check_stats(mu1, cov1, mu2, cov2)
    for n in (n1, n2):
        if n is not None and n < 2:
            raise FidmedError(f"need at least 2 images per set to compute an FD, got {n}")
    diff = mu1 - mu2
    mean_term = float(diff @ diff)
    t1, t2 = float(cov1.diagonal().sum()), float(cov2.diagonal().sum())
    ts, route, n_const = _trace_sqrt_stats(mu1, cov1, n1, mu2, cov2, n2, method, psd_rtol)
    return _result(route, n1, n2, d, mean_term, t1, t2, ts, n_const)


def frechet_distance(
    mu1: Any,
    cov1: Any,
    mu2: Any,
    cov2: Any,
    method: str = "auto",
    psd_rtol: float = DEFAULT_PSD_RTOL,
    device: str | torch.device | None = None,
) -> float:
    """FD = |mu1-mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^1/2) in float64 (see ``frechet_distance_stats``)."""
    return frechet_distance_stats(mu1, cov1, mu2, cov2, method=method, psd_rtol=psd_rtol, device=device).value


# ---------------------------------------------------------------------------------------------- features route
def _as_features(x: Any, name: str) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor
        x = x.detach().cpu().numpy()
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 2:
        raise FidmedError(f"{name} must be a [N, d] feature matrix, got shape {a.shape}")
    if a.shape[0] < 2:
        raise FidmedError(f"need at least 2 images per set to compute an FD, {name} has {a.shape[0]}")
    if not np.all(np.isfinite(a)):
        raise FidmedError(f"{name} contains NaN or infinite features")
    return a


def _reduce_rows(x_c: torch.Tensor) -> torch.Tensor:
    """A matrix with the same Gram matrix X_c^T X_c but at most d rows: the R factor of a QR when n > d.

    X_c = Q R with orthonormal Q, so X_c Y^T = Q (R Y^T) has the same singular values as R Y^T.
    """
    n, d = x_c.shape
    if n <= d:
        return x_c
    return torch.linalg.qr(x_c, mode="r")[1]


def _trace_sqrt_nuclear(a_c: np.ndarray, b_c: np.ndarray) -> float:
    n1, n2 = a_c.shape[0], b_c.shape[0]
    cross = _reduce_rows(_f64(a_c, None)) @ _reduce_rows(_f64(b_c, None)).T
    return _nuclear_norm(cross) / float(np.sqrt((n1 - 1.0) * (n2 - 1.0)))


def frechet_distance_from_features(a: Any, b: Any, route: str = "auto", psd_rtol: float = DEFAULT_PSD_RTOL) -> FDResult:
    """FD between two feature sets ``[n1, d]`` and ``[n2, d]`` (numpy or torch; computed in float64).

    ``route``: "auto" takes the Cholesky route when both sets have at least d images and both covariances are
    positive definite (constant features set aside), and the exact nuclear route otherwise (min(n) < d, or a
    singular covariance); "nuclear", "cholesky" and "eigh" force one (for tests and diagnostics).
    """
    a = _as_features(a, "features 1")
    b = _as_features(b, "features 2")
    if a.shape[1] != b.shape[1]:
        raise FidmedError(f"feature dimensions differ: {a.shape[1]} vs {b.shape[1]} (different extractors?)")
    if route not in ("auto", "nuclear", "cholesky", "eigh"):
        raise FidmedError(f"unknown FD route {route!r}; use 'auto', 'nuclear', 'cholesky' or 'eigh'")
    n1, d = a.shape
    n2 = b.shape[0]
    mu1, mu2 = a.mean(axis=0), b.mean(axis=0)
    a_c, b_c = a - mu1, b - mu2
    diff = mu1 - mu2
    mean_term = float(diff @ diff)
    t1 = float(np.einsum("ij,ij->", a_c, a_c) / (n1 - 1))
    t2 = float(np.einsum("ij,ij->", b_c, b_c) / (n2 - 1))
    if route != "nuclear" and not (route == "auto" and min(n1, n2) < d):
        cov1, cov2 = _f64(a_c.T @ a_c / (n1 - 1), None), _f64(b_c.T @ b_c / (n2 - 1), None)
        ts, got, n_const = _trace_sqrt_stats(
            _f64(mu1, None), cov1, n1, _f64(mu2, None), cov2, n2, "auto" if route == "auto" else route, psd_rtol
        )
        if route != "auto" or (got == "cholesky" and n_const == 0):
            return _result(got, n1, n2, d, mean_term, t1, t2, ts, n_const)
    return _result("nuclear", n1, n2, d, mean_term, t1, t2, _trace_sqrt_nuclear(a_c, b_c))


def frechet_distance_mixed(
    features: Any, mu: Any, cov: Any, n_stats: int | None = None, psd_rtol: float = DEFAULT_PSD_RTOL
) -> FDResult:
    """FD between a feature set ``[n, d]`` and a set known only by its mean and covariance (of ``n_stats``
    images, when known).

    With B_c the centred features (S_g = B_c^T B_c / (n - 1)) and S = F F^T a factor of the other covariance,
    tr((S S_g)^1/2) = ||B_c F||_* / sqrt(n - 1): the singular values of an n x d matrix, exact to rounding
    even though S_g has d - n + 1 zero eigenvalues. For few generated images (n < d) against the cached
    statistics of a large real set, where the covariance routes would lose about 8 digits.
    """
    b = _as_features(features, "features")
    n, d = b.shape
    mu_t, cov_t = _f64(mu, None), _f64(cov, None)
    if mu_t.shape != (d,) or cov_t.shape != (d, d):
        raise FidmedError(f"statistics of dimension {tuple(cov_t.shape)} do not match features of dimension {d}")
    if not (bool(torch.isfinite(mu_t).all()) and bool(torch.isfinite(cov_t).all())):
        raise FidmedError("the statistics contain NaN or infinite values; recompute them")
    mu_b = b.mean(axis=0)
    b_c = _f64(b - mu_b, None)
    diff = _f64(mu_b, None) - mu_t
    mean_term = float(diff @ diff)
    t_feat = float((b_c * b_c).sum() / (n - 1))
    t_cov = float(cov_t.diagonal().sum())
    # constant features of the statistics side have zero rows and columns in S: set them aside (exact)
    keep = ~_constant_dims(cov_t.diagonal(), mu_t, "the covariance", psd_rtol)
    factor, _ = _factor(_sym(cov_t[keep][:, keep]), n_stats, "the covariance", psd_rtol)
    ts = _nuclear_norm(b_c[:, keep] @ factor) / float(np.sqrt(n - 1.0))
    return _result("mixed", n, n_stats, d, mean_term, t_feat, t_cov, ts, int((~keep).sum()))


def frechet_distance_from_moments(m1: Any, m2: Any, route: str = "auto") -> FDResult:
    """FD between two ``StreamingMoments``; uses the kept features for an exact route when min(n) < d.

    ``route`` as in ``frechet_distance_from_features``, plus "mixed" (:func:`frechet_distance_mixed`), which
    "auto" takes when only the smaller set (n < d) kept its features. Without kept features only the covariance
    routes exist (still exact for the common singular case of constant features).
    """
    if m1.count < 2 or m2.count < 2:
        raise FidmedError(f"need at least 2 images per set to compute an FD, got {m1.count} and {m2.count}")
    have_features = m1.keep_features and m2.keep_features
    if route == "auto" and have_features and min(m1.count, m2.count) < m1.dim:
        route = "nuclear"
    if route == "auto" and not have_features:
        small, large = (m1, m2) if m1.count <= m2.count else (m2, m1)
        if small.keep_features and small.count < small.dim:
            res = frechet_distance_mixed(small.features, large.mean, large.cov, n_stats=large.count)
            t1, t2 = (res.trace1, res.trace2) if small is m1 else (res.trace2, res.trace1)
            return FDResult(
                res.value,
                res.route,
                m1.count,
                m2.count,
                res.dim,
                res.mean_term,
                t1,
                t2,
                res.trace_sqrt,
                res.raw,
                res.constant_dims,
            )
    if route == "nuclear":
        if not have_features:
            raise FidmedError("the nuclear FD route needs kept features: use StreamingMoments(keep_features=True)")
        return frechet_distance_from_features(m1.features, m2.features, route="nuclear")
    return frechet_distance_stats(m1.mean, m1.cov, m2.mean, m2.cov, n1=m1.count, n2=m2.count, method=route)


# ---------------------------------------------------------------------------------------------- registered metrics
def moments_for_fd(m: Any) -> Any:
    """``m`` without kept features where the FD does not need them (n >= d), so that keeping features for kNN
    metrics never changes the FD route: FD numbers are the same whichever metrics were asked for."""
    from fidmed.metrics.moments import StreamingMoments

    if not m.keep_features or m.count < m.dim:
        return m
    state = {k: v for k, v in m.state_dict().items() if k not in ("features", "indices")}
    state["keep_features"] = False
    return StreamingMoments.from_state_dict(state)


@register_metric(
    "fd", columns={"fd": "FD"}, summary="Frechet distance of the generated to the real set (float64, exact routes)"
)
def fd_metric(inputs: MetricInputs) -> list[MetricValue]:
    res = frechet_distance_from_moments(moments_for_fd(inputs.gen), moments_for_fd(inputs.real))
    return [
        MetricValue(
            "fd",
            res.value,
            {"route": res.route, "mean_term": res.mean_term, "raw": res.raw, "constant_dims": res.constant_dims},
        )
    ]


@register_metric(
    "rfd",
    columns={"rfd": "rFD"},
    requires=("fd",),
    summary="relative FD: FD / FD between two seeded halves of the real set (the study's rFD)",
)
def rfd_metric(inputs: MetricInputs) -> list[MetricValue]:
    """Relative FD = FD(generated, real) / FD(real half A, real half B); NaN when the split FD is not positive
    (too few or identical real images)."""
    a, b = inputs.real_halves
    split = frechet_distance_from_moments(a, b)
    fd = inputs.results["fd"].value
    value = fd / split.value if split.value > 0 else float("nan")
    return [
        MetricValue(
            "rfd",
            value,
            {
                "fd": fd,
                "fd_real_split": split.value,
                "split_route": split.route,
                "n_half_a": a.count,
                "n_half_b": b.count,
            },
        )
    ]

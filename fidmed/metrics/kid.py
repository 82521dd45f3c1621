"""Kernel Inception Distance (Binkowski et al. 2018) and FD-infinity (Chong & Forsyth 2020).

KID: the unbiased estimate of the squared MMD with the cubic polynomial kernel k(x, y) = (x.y / d + 1)^3,
averaged over ``n_subsets`` random subsets of ``subset_size`` samples drawn without replacement from each set
(defaults 100 x 1000 as in the KID paper, clean-fid and torchmetrics). The subsets come from a seeded
``np.random.default_rng(seed)``, so a KID is reproducible; it is not bit-equal to clean-fid's or torchmetrics'
subsets (they use unseeded global generators), only to the same estimator on the same subsets. Computed in
float64 on the features' device (or CUDA when present).

FD-infinity: FD computed on ``n_points`` seeded subsets of the generated features of sizes evenly spaced from
``min_n`` to N, fitted by least squares as FD_N = FD_inf + slope / N, extrapolated to 1/N = 0 (Chong & Forsyth's
``calculate_FID_infinity``: 15 points from 5,000 to 50,000 by default there).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from fidmed.errors import ConfigError, FidmedError
from fidmed.metrics.base import MetricInputs, MetricValue, register_metric
from fidmed.metrics.knn import resolve_knn_device

KID_N_SUBSETS = 100
KID_SUBSET_SIZE = 1000


@dataclass
class KIDResult:
    value: float  # mean over subsets of the unbiased MMD^2
    std: float  # standard deviation over subsets (numpy std, ddof=0)
    n_subsets: int
    subset_size: int
    seed: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def poly_mmd2_unbiased(x: torch.Tensor, y: torch.Tensor, degree: int = 3, coef: float = 1.0) -> float:
    """Unbiased MMD^2 between equal-sized sets ``x`` and ``y`` ([m, d]) with kernel (x.y/d + coef)^degree."""
    m, d = x.shape
    if y.shape[0] != m:
        raise FidmedError(f"unbiased MMD here needs equal set sizes, got {m} and {y.shape[0]}")
    if m < 2:
        raise FidmedError("KID needs at least 2 samples per subset")
    kxx = (x @ x.T / d + coef) ** degree
    kyy = (y @ y.T / d + coef) ** degree
    kxy = (x @ y.T / d + coef) ** degree
    within = (kxx.sum() - kxx.diagonal().sum() + kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
    return float(within - 2 * kxy.sum() / (m * m))


def kid(
    real_features: Any,
    fake_features: Any,
    n_subsets: int = KID_N_SUBSETS,
    subset_size: int = KID_SUBSET_SIZE,
    seed: int = 0,
    device: str | torch.device | None = "auto",
) -> KIDResult:
    """KID of generated against real features (symmetric in its arguments; real first by convention)."""
    dev = resolve_knn_device(device, real_features)
    real = torch.as_tensor(
        np.asarray(real_features) if not isinstance(real_features, torch.Tensor) else real_features
    ).to(dev, torch.float64)
    fake = torch.as_tensor(
        np.asarray(fake_features) if not isinstance(fake_features, torch.Tensor) else fake_features
    ).to(dev, torch.float64)
    m = min(int(subset_size), real.shape[0], fake.shape[0])
    if m < 2:
        raise FidmedError(f"KID needs at least 2 images per set, got {real.shape[0]} real, {fake.shape[0]} generated")
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(int(n_subsets)):
        ir = torch.from_numpy(rng.choice(real.shape[0], m, replace=False)).to(dev)
        ig = torch.from_numpy(rng.choice(fake.shape[0], m, replace=False)).to(dev)
        values.append(poly_mmd2_unbiased(real[ir], fake[ig]))
    v = np.asarray(values)
    return KIDResult(float(v.mean()), float(v.std()), int(n_subsets), m, int(seed))


@dataclass
class FDInfResult:
    value: float
    slope: float
    ns: list[int]
    fds: list[float]
    seed: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def fd_infinity(
    fake_features: Any, real_moments: Any, n_points: int = 15, min_n: int | None = None, seed: int = 0
) -> FDInfResult:
    """FD-infinity of generated features against real moments (a ``StreamingMoments``)."""
    from fidmed.metrics.fd import frechet_distance_from_moments
    from fidmed.metrics.moments import StreamingMoments

    feats = np.asarray(fake_features)
    n = feats.shape[0]
    if min_n is None:
        min_n = max(2, n // 10)  # Chong & Forsyth: 5,000 of 50,000
    if n_points < 2 or min_n >= n:
        raise FidmedError(
            f"FD-infinity needs at least 2 subset sizes between min_n={min_n} and N={n}; generate more images"
        )
    ns = np.linspace(min_n, n, n_points).astype(np.int64)
    perm = np.random.default_rng(seed).permutation(n)
    fds = []
    for size in ns:
        m = StreamingMoments(feats.shape[1], keep_features=size < feats.shape[1])
        m.update(torch.from_numpy(feats[perm[:size]]))
        fds.append(frechet_distance_from_moments(m, real_moments).value)
    design = np.stack([np.ones(len(ns)), 1.0 / ns], axis=1)
    (intercept, slope), *_ = np.linalg.lstsq(design, np.asarray(fds), rcond=None)
    return FDInfResult(float(intercept), float(slope), [int(x) for x in ns], [float(x) for x in fds], int(seed))


@dataclass
class KIDConfig:
    """``eval.kid``: the subsets KID averages over (seeded by ``eval.metric_seed``)."""

    subsets: int = KID_N_SUBSETS
    subset_size: int = KID_SUBSET_SIZE

    def __post_init__(self) -> None:
        if int(self.subsets) < 1 or int(self.subset_size) < 2:
            raise ConfigError(
                f"eval.kid.subsets={self.subsets} must be >= 1 and eval.kid.subset_size={self.subset_size} >= 2."
            )


@register_metric(
    "kid",
    columns={"kid": "KID"},
    needs_gen_features=True,
    needs_real_features=True,
    config=KIDConfig,
    summary="Kernel Inception Distance: unbiased MMD^2, cubic kernel, seeded subsets",
)
def kid_metric(inputs: MetricInputs) -> list[MetricValue]:
    opts = inputs.options
    res = kid(
        inputs.real_features,
        inputs.gen_features,
        int(opts.subsets),
        int(opts.subset_size),
        inputs.seed,
        device=inputs.device,
    )
    return [MetricValue("kid", res.value, {**res.as_dict(), "kernel": "(x.y/d+1)^3", "estimator": "unbiased"})]


@register_metric(
    "fd_inf",
    columns={"fd_inf": "FD-inf"},
    needs_gen_features=True,
    summary="FD-infinity: FD on seeded subsets of the generated set extrapolated to N = infinity",
)
def fd_inf_metric(inputs: MetricInputs) -> list[MetricValue]:
    from fidmed.metrics.fd import moments_for_fd

    res = fd_infinity(inputs.gen_features, moments_for_fd(inputs.real), seed=inputs.seed)
    return [MetricValue("fd_inf", res.value, res.as_dict())]

"""k-nearest-neighbour metrics: improved precision/recall (Kynkaanniemi et al. 2019) and density/coverage
(Naeem et al. 2020), computed in row chunks with bounded memory.

Argument order (the study's pitfall, docs/metrics.md#precision-recall-density-coverage): ``prdc(real_features,
fake_features, k)``. The study's README passed the *generated* images as StudioGAN's first (reference) set, which
swaps precision and recall. Here the first argument is always the real set and the definitions are the standard ones:

    r_real[i]  distance from real i to its k-th nearest other real sample   (k-th NN radius, self excluded)
    r_fake[j]  distance from fake j to its k-th nearest other fake sample
    D[i, j]    distance between real i and fake j

    precision = mean_j  [ any_i  D[i, j] < r_real[i] ]         share of fakes inside the real manifold
    recall    = mean_i  [ any_j  D[i, j] < r_fake[j] ]         share of reals inside the fake manifold
    density   = 1/(k N_fake) * sum_j sum_i [ D[i, j] < r_real[i] ]
    coverage  = mean_i  [ min_j D[i, j] < r_real[i] ]           share of reals with a fake inside their ball

These are exactly the formulas of the ``prdc`` package (Naeem et al.'s reference code), including the strict
``<`` and the k-th radius counting the sample itself as its own nearest neighbour (radius = (k+1)-th smallest
distance of a row that includes the zero self-distance).

Precision of distances: float64 by default. Every decision is a comparison ``D < r`` of two distances computed
through the matrix-product route (||a||^2 + ||b||^2 - 2 a.b, as torch.cdist and sklearn use for large sets); in
float32 its rounding error is about 1e-7 |a|^2, which can flip comparisons near the ball boundary and make the
result depend on the chunk size and the device. In float64 that error is ~1e-16 |a|^2, far below any gap that
occurs between distinct distances of real features, so results are reproducible across chunk sizes and equal
to the prdc package. Cost: fp64 matmuls (fast on H100/A100, slower on consumer GPUs); ``dtype=torch.float32``
is available as an opt-in.

Memory: never an N x N matrix. Rows are processed ``chunk_size`` at a time against the full other set, so the
peak extra memory is ``chunk_size * max(N_real, N_fake) * 8`` bytes (default budget 256 MiB).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from fidmed.errors import ConfigError, FidmedError
from fidmed.metrics.base import MetricInputs, MetricValue, register_metric

DEFAULT_K = 5  # the study's StudioGAN default
ARGUMENT_ORDER = "prdc(real_features, fake_features, k): precision = share of fakes inside the real manifold"
DEFAULT_MEMORY_BYTES = 256 << 20


@dataclass
class PRDC:
    precision: float
    recall: float
    density: float
    coverage: float
    k: int
    n_real: int
    n_fake: int
    distance_dtype: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _as_tensor(x: Any, name: str, device: torch.device | None, dtype: torch.dtype) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))
    if t.ndim != 2:
        raise FidmedError(f"{name} must be a [N, d] feature matrix, got shape {tuple(t.shape)}")
    if not bool(torch.isfinite(t).all()):
        raise FidmedError(f"{name} contain NaN or infinite values; check the extractor and its input images")
    return t.to(device=device if device is not None else t.device, dtype=dtype)


def _chunk_rows(chunk_size: int | None, n_cols: int, memory_bytes: int) -> int:
    if chunk_size is not None:
        if chunk_size < 1:
            raise FidmedError(f"chunk_size must be >= 1, got {chunk_size}")
        return int(chunk_size)
    return max(1, memory_bytes // (8 * max(1, n_cols)))


def kth_nn_radii(
    features: torch.Tensor, k: int, chunk_size: int | None = None, memory_bytes: int = DEFAULT_MEMORY_BYTES
) -> torch.Tensor:
    """Distance of every row to its k-th nearest other row (the (k+1)-th smallest including itself), chunked."""
    n = features.shape[0]
    if n < k + 1:
        raise FidmedError(
            f"k-NN radii with k={k} need at least {k + 1} samples, got {n}; use more images or a smaller k"
        )
    rows = _chunk_rows(chunk_size, n, memory_bytes)
    out = torch.empty(n, dtype=features.dtype, device=features.device)
    for start in range(0, n, rows):
        d = torch.cdist(features[start : start + rows], features, compute_mode="use_mm_for_euclid_dist")
        out[start : start + rows] = torch.topk(d, k + 1, dim=1, largest=False, sorted=True).values[:, k]
    return out


def resolve_knn_device(device: str | torch.device | None, like: torch.Tensor | np.ndarray) -> torch.device:
    """``None``/'auto': the features' device if they are a CUDA tensor, else CUDA when present, else CPU."""
    if device not in (None, "auto"):
        return torch.device(device)
    if isinstance(like, torch.Tensor) and like.is_cuda:
        return like.device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def prdc(
    real_features: Any,
    fake_features: Any,
    k: int = DEFAULT_K,
    *,
    chunk_size: int | None = None,
    device: str | torch.device | None = "auto",
    dtype: torch.dtype = torch.float64,
    memory_bytes: int = DEFAULT_MEMORY_BYTES,
) -> PRDC:
    """Precision, recall, density and coverage of ``fake_features`` against ``real_features`` (see module doc).

    ``chunk_size``: rows per distance block (None: from ``memory_bytes``); it never changes the result.
    """
    if int(k) < 1:
        raise FidmedError(f"k must be >= 1, got {k}")
    k = int(k)
    dev = resolve_knn_device(device, real_features)
    real = _as_tensor(real_features, "real features", dev, dtype)
    fake = _as_tensor(fake_features, "generated features", dev, dtype)
    if real.shape[1] != fake.shape[1]:
        raise FidmedError(
            f"real features are {real.shape[1]}-d but generated features {fake.shape[1]}-d: "
            f"they come from different extractors"
        )
    n_real, n_fake = real.shape[0], fake.shape[0]
    r_real = kth_nn_radii(real, k, chunk_size, memory_bytes)
    r_fake = kth_nn_radii(fake, k, chunk_size, memory_bytes)

    rows = _chunk_rows(chunk_size, n_fake, memory_bytes)
    fake_inside = torch.zeros(n_fake, dtype=torch.bool, device=dev)  # precision
    fake_count = torch.zeros(n_fake, dtype=torch.int64, device=dev)  # density
    recall_hits = 0
    coverage_hits = 0
    for start in range(0, n_real, rows):
        d = torch.cdist(real[start : start + rows], fake, compute_mode="use_mm_for_euclid_dist")  # [c, n_fake]
        radii = r_real[start : start + rows, None]
        inside_real = d < radii
        fake_inside |= inside_real.any(dim=0)
        fake_count += inside_real.sum(dim=0)
        recall_hits += int((d < r_fake[None, :]).any(dim=1).sum())
        coverage_hits += int((d.min(dim=1).values < radii[:, 0]).sum())
    return PRDC(
        precision=float(fake_inside.double().mean()),
        recall=recall_hits / n_real,
        density=float(fake_count.double().sum()) / (k * n_fake),
        coverage=coverage_hits / n_real,
        k=k,
        n_real=n_real,
        n_fake=n_fake,
        distance_dtype=str(dtype).replace("torch.", ""),
    )


@dataclass
class PRDCConfig:
    """``eval.prdc``: options of precision/recall/density/coverage."""

    k: int = DEFAULT_K  # nearest neighbours (the study's StudioGAN: 5)

    def __post_init__(self) -> None:
        if int(self.k) < 1:
            raise ConfigError(f"eval.prdc.k={self.k} must be >= 1 (the study used 5).")


@register_metric(
    "prdc",
    columns={"precision": "P", "recall": "R", "density": "D", "coverage": "C"},
    needs_gen_features=True,
    needs_real_features=True,
    config=PRDCConfig,
    summary="improved precision/recall (Kynkaanniemi 2019) and density/coverage (Naeem 2020), "
    "k nearest neighbours, real set first",
)
def prdc_metric(inputs: MetricInputs) -> list[MetricValue]:
    k = int(inputs.options.k)
    res = prdc(inputs.real_features, inputs.gen_features, k, device=inputs.device)
    details = {
        "k": res.k,
        "argument_order": ARGUMENT_ORDER,
        "distance_dtype": res.distance_dtype,
        "n_real": res.n_real,
        "n_gen": res.n_fake,
    }
    return [
        MetricValue(name, getattr(res, name), details, {"knn_k": res.k})
        for name in ("precision", "recall", "density", "coverage")
    ]

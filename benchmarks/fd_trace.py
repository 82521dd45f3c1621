"""Benchmark: fidmed's FD trace term vs scipy.linalg.sqrtm (the route of pytorch-fid, clean-fid, StudioGAN).

For each d, two feature sets of n Gaussian vectors with decaying spectra in random bases give full-rank float64
covariances; the FD is computed
  - by fidmed.metrics.fd.frechet_distance (default: Cholesky route, the nuclear norm of L1^T L2 by an SVD),
  - by fidmed with method="eigh" (the factors of the singular-covariance route, for reference),
  - by the sqrt-of-eigenvalues formula fidmed used before 2026-11-29 (sum sqrt eigvalsh(L1^T S2 L1)): as fast
    as it gets, but not exact for singular products, which is why it was replaced; timed here to show the cost,
  - the classic way: |dmu|^2 + tr S1 + tr S2 - 2 Re tr sqrtm(S1 @ S2) (sqrtm called without ``disp``).
fidmed's linear algebra runs in torch (float64; MKL's LAPACK on x86 CPUs), sqrtm in scipy (its own BLAS).
Timings are medians over interleaved repeats (so machine load hits all routes alike). Agreement is the relative
difference of the FD values. Targets: speed-up >= 10x over sqrtm, agreement <= 1e-9.

    python benchmarks/fd_trace.py --out benchmarks/results/fd_trace.md
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import statistics
import time
from collections.abc import Callable

import numpy as np
import scipy
import scipy.linalg
import torch

from fidmed.metrics.fd import frechet_distance_stats


def features(n: int, d: int, rng: np.random.Generator, decay: float) -> np.ndarray:
    """n Gaussian feature vectors whose covariance spectrum decays like k^-decay, in a random orthonormal basis."""
    basis = np.linalg.qr(rng.standard_normal((d, d)))[0]
    scale = (1.0 + np.arange(d)) ** -decay
    return (rng.standard_normal((n, d)) * scale) @ basis.T + 0.05 * rng.standard_normal(d)


def fd_sqrtm(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray) -> tuple[float, float]:
    """(FD, tr sqrt(S1 S2)) the classic way."""
    covmean = scipy.linalg.sqrtm(cov1 @ cov2)
    diff = mu1 - mu2
    ts = float(np.trace(covmean).real)
    return float(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2.0 * ts), ts


def fd_sqrt_eigvalsh(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray) -> float:
    """The replaced formula: tr((S1 S2)^1/2) = sum sqrt(eigvalsh(L^T S2 L)), S1 = L L^T (timing reference)."""
    c1, c2 = torch.from_numpy(cov1), torch.from_numpy(cov2)
    chol = torch.linalg.cholesky(c1)
    m = (chol.T @ c2) @ chol
    ts = float(torch.linalg.eigvalsh(0.5 * (m + m.T)).clamp(min=0).sqrt().sum())
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2.0 * ts)


def timed(fn: Callable[[], object]) -> tuple[object, float]:
    t0 = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - t0


def machine() -> list[str]:
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    blas = "unknown"
    try:
        cfg = np.show_config(mode="dicts")
        b = cfg["Build Dependencies"]["blas"]
        blas = f"{b.get('name')} {b.get('version')}"
    except Exception:  # older numpy
        pass
    names = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
    threads = {k: os.environ[k] for k in names if k in os.environ}
    torch_blas = "MKL" if torch.backends.mkl.is_available() else "non-MKL"
    return [
        f"- CPU: {cpu}, {os.cpu_count()} logical cores visible; load average at start {os.getloadavg()[0]:.2f}",
        f"- Python {platform.python_version()}, numpy {np.__version__}, scipy {scipy.__version__} "
        f"(scipy/numpy BLAS+LAPACK: {blas}); torch {torch.__version__} ({torch_blas} LAPACK, "
        f"{torch.get_num_threads()} intra-op threads): fidmed's linear algebra runs in torch float64",
        f"- thread settings: {threads or 'library defaults'}",
    ]


def run(dims: list[int], n: int, repeats: int, seed: int) -> str:
    lines = ["# FD trace-term benchmark (benchmarks/fd_trace.py)", ""]
    lines += machine()
    lines += [
        f"- data: n = {n} Gaussian features per set, spectra k^-0.7 and k^-0.5 in random bases (full rank); "
        f"median of {repeats} interleaved repeats",
        "",
        "| d | fidmed (cholesky) s | fidmed eigh s | replaced sqrt-eigvalsh s | sqrtm s | speed-up vs sqrtm | FD | "
        "tr sqrt(S1 S2) | rel. diff FD vs sqrtm | rel. diff trace vs sqrtm | rel. diff trace eigh vs cholesky |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    rng = np.random.default_rng(seed)
    for d in dims:
        a, b = features(n, d, rng, 0.7), features(n, d, rng, 0.5)
        mu1, cov1 = a.mean(0), np.cov(a, rowvar=False)
        mu2, cov2 = b.mean(0), np.cov(b, rowvar=False)
        del a, b
        t_ours, t_eigh, t_old, t_ref = [], [], [], []
        for _ in range(repeats):
            stats = (mu1, cov1, mu2, cov2)
            r_ours, t = timed(functools.partial(frechet_distance_stats, *stats))
            t_ours.append(t)
            r_eigh, t = timed(functools.partial(frechet_distance_stats, *stats, method="eigh"))
            t_eigh.append(t)
            _, t = timed(functools.partial(fd_sqrt_eigvalsh, *stats))
            t_old.append(t)
            (v_ref, ts_ref), t = timed(functools.partial(fd_sqrtm, *stats))
            t_ref.append(t)
        assert r_ours.route == "cholesky" and r_eigh.route == "eigh"
        v_ours, ts_ours, ts_eigh = r_ours.value, r_ours.trace_sqrt, r_eigh.trace_sqrt
        m_ours, m_eigh, m_old, m_ref = (statistics.median(x) for x in (t_ours, t_eigh, t_old, t_ref))
        lines.append(
            f"| {d} | {m_ours:.3f} | {m_eigh:.3f} | {m_old:.3f} | {m_ref:.3f} | {m_ref / m_ours:.1f}x | {v_ours:.10g} | "
            f"{ts_ours:.10g} | {abs(v_ours - v_ref) / abs(v_ref):.2e} | {abs(ts_ours - ts_ref) / ts_ref:.2e} | "
            f"{abs(ts_eigh - ts_ours) / ts_ours:.2e} |"
        )
        print(lines[-1], flush=True)
    lines += ["", f"load average at end {os.getloadavg()[0]:.2f}", ""]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dims", type=int, nargs="+", default=[1024, 2048])
    p.add_argument("--n", type=int, default=10000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=str, default=None, help="write the markdown report here")
    args = p.parse_args()
    report = run(args.dims, args.n, args.repeats, args.seed)
    print(report)
    if args.out:
        with open(args.out, "w") as f:
            f.write(report)


if __name__ == "__main__":
    main()

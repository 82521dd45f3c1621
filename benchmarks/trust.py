"""What "how far to trust a score" costs (issue 15): the bootstrap of every number and the memorisation audit, at
the study's N = 50,000 generated images, per extractor feature dimension. Usage:

    python benchmarks/trust.py [--n-gen 50000] [--n-real 5000] [--dims 768 1024 1536 2048] [--replicates 2]
                               [--kid-subsets 10] [--prdc-dim 64] [--device cpu|cuda] [--out FILE.md]

Features are synthetic float32 Gaussians whose covariance spectrum decays like k^-0.7 in a random basis (full-rank
covariances like real extractors'; the cost of every step depends on N and d only, not on the values). Each case
runs in its own process (spawn) and reports its wall time and its peak resident memory (ru_maxrss, which includes
the feature matrices the evaluation holds anyway: N x d x 4 bytes per set). Cases:

(a) ``fd + rfd`` bootstrap: ``--replicates`` replicates of fidmed.metrics.uncertainty.moments_bootstrap (per
    replicate: count-weighted float64 sums of the generated and real features, then fd and rfd through their exact
    routes); reported per replicate.
(b) ``kid`` half-samples: ``--kid-subsets`` of KID's subsets of 1,000 with 200 replicates; reported per subset
    (KID's default is 100 subsets: 100 x that time; the value itself costs about half of it).
(c) ``prdc`` half-samples: building the k-NN graph (k = 5) of both sets and 200 replicates from it, at d =
    ``--prdc-dim`` with N = --n-gen and at each d of --dims with N = --n-real for both sets; both sets from one
    distribution, where the sets overlap most and the graph stores the most pairs.
(d) the memorisation audit of one feature space: nearest training image of every generated image, the training
    set's own nearest-neighbour distances, C_T with 1,000 held-out features, at every d.

(e) calibration, on Gaussian features with a closed-form FD (fidmed's own code, small d): the coverage of the
    95% FD interval of the true FD and its standard error against the spread over independent data sets, at a
    moderate and at a high dimension per real image; and, for two generators scored against the same real set,
    the spread of the paired replicate differences against the true spread of the difference, and the mean
    bootstrap P(order) against how often the observed order is the true one.

Nothing is extrapolated here except where a line says so (per-replicate or per-subset times multiplied out).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def features(n: int, d: int, seed: int, shift: float = 0.0) -> np.ndarray:
    """``n`` feature rows of one distribution (the basis is the same for every seed), moved by ``shift``."""
    basis = np.linalg.qr(np.random.default_rng(0).standard_normal((d, d)))[0]
    rng = np.random.default_rng(seed)
    scale = (1.0 + np.arange(d)) ** -0.7
    out = np.empty((n, d), dtype=np.float32)
    for s in range(0, n, 10_000):  # chunks: never an n x d float64 temporary
        block = (rng.standard_normal((min(10_000, n - s), d)) * scale) @ basis.T
        out[s : s + len(block)] = block + shift
    return out


def _loadavg() -> str:
    try:
        return Path("/proc/loadavg").read_text().strip()
    except OSError:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _inputs(xg: np.ndarray, xr: np.ndarray, device: torch.device):
    from fidmed.metrics.base import MetricInputs
    from fidmed.metrics.moments import StreamingMoments

    def moments(x):
        m = StreamingMoments(x.shape[1], keep_features=True)
        for s in range(0, len(x), 5000):
            m.update(torch.from_numpy(x[s : s + 5000]))
        return m

    half = np.zeros(len(xr), dtype=bool)
    half[np.random.default_rng(0).permutation(len(xr))[: len(xr) // 2]] = True
    return MetricInputs(moments(xg), moments(xr), (moments(xr[half]), moments(xr[~half])), device, 0)


def case_fd(n_gen: int, n_real: int, d: int, replicates: int, device: str) -> dict:
    from fidmed.metrics.base import METRICS
    from fidmed.metrics.uncertainty import ResampleContext, ResamplePlan, moments_bootstrap

    dev = torch.device(device)
    xg, xr = features(n_gen, d, 1, 0.05), features(n_real, d, 2)
    inputs = _inputs(xg, xr, dev)
    values = {}
    for name in ("fd", "rfd"):
        for v in METRICS.get(name).obj(inputs):
            inputs.results[v.name] = v
            values[v.name] = v
    ctx = ResampleContext(inputs, ResamplePlan(replicates), values, {}, ["fd", "rfd"], xg, xr, dev)
    t = time.perf_counter()
    reps = moments_bootstrap(ctx, ["fd", "rfd"])
    seconds = time.perf_counter() - t
    assert np.isfinite(reps["fd"]).all()
    return {"seconds": seconds / replicates, "peak_mb": _peak_mb(), "fd": values["fd"].value}


def case_kid(n_gen: int, n_real: int, d: int, subsets: int, device: str) -> dict:
    from fidmed.metrics.kid import KIDConfig
    from fidmed.metrics.uncertainty import ResampleContext, ResamplePlan, kid_half_samples

    dev = torch.device(device)
    xg, xr = features(n_gen, d, 1, 0.05), features(n_real, d, 2)
    inputs = _inputs(xg[:2000], xr[:2000], dev)  # moments are not used by KID; features are
    opts = {"kid": KIDConfig(subsets, 1000)}
    ctx = ResampleContext(inputs, ResamplePlan(200), {}, opts, ["kid"], xg, xr, dev)
    t = time.perf_counter()
    reps = kid_half_samples(ctx, ["kid"])
    seconds = time.perf_counter() - t
    assert np.isfinite(reps["kid"]).all()
    return {"seconds": seconds / subsets, "peak_mb": _peak_mb()}


def case_prdc(n_gen: int, n_real: int, d: int, device: str) -> dict:
    from fidmed.metrics.uncertainty import KnnGraph, ResamplePlan

    dev = torch.device(device)
    xg, xr = features(n_gen, d, 1), features(n_real, d, 2)  # one distribution: the most pairs to store
    t = time.perf_counter()
    graph = KnnGraph(xr, xg, 5, dev)
    build = time.perf_counter() - t
    plan = ResamplePlan(200)
    t = time.perf_counter()
    for r in range(plan.replicates):
        graph.replicate(plan.half_mask(n_real, "real", r), plan.half_mask(n_gen, "gen", r))
    per = (time.perf_counter() - t) / plan.replicates
    return {"build": build, "seconds": per, "pairs": graph.n_pairs, "peak_mb": _peak_mb()}


def case_audit(n_gen: int, n_real: int, d: int, device: str) -> dict:
    from fidmed.metrics.memorisation import AuditSettings, audit

    dev = torch.device(device)
    xg, xr, xh = features(n_gen, d, 1, 0.05), features(n_real, d, 2), features(1000, d, 3)
    t = time.perf_counter()
    res = audit(xg, xr, AuditSettings(), dev, "bench", heldout=xh)
    return {"seconds": time.perf_counter() - t, "peak_mb": _peak_mb(), "ct": res.ct}


def _fd_unc(xg: np.ndarray, xr: np.ndarray, replicates: int, seed: int) -> tuple[float, dict]:
    from fidmed.metrics.base import METRICS
    from fidmed.metrics.uncertainty import ResampleContext, ResamplePlan, metric_uncertainty

    inputs = _inputs(xg, xr, torch.device("cpu"))
    values = {v.name: v for v in METRICS.get("fd").obj(inputs)}
    ctx = ResampleContext(inputs, ResamplePlan(replicates, seed=seed), values, {}, ["fd"], xg, xr)
    return values["fd"].value, metric_uncertainty(ctx, "k")["fd"]


def case_calibration(d: int, n_real: int, n_gen: int, datasets: int, replicates: int) -> dict:
    """Coverage and spread of the FD interval; paired differences and P(order) for two generators."""
    torch.set_num_threads(1)
    mu_a, mu_b = np.zeros(d), np.zeros(d)
    mu_a[0], mu_b[0] = 1.0, 1.15
    scale = np.sqrt(1.5)
    truth_a = float(mu_a @ mu_a + d * (scale - 1.0) ** 2)
    hits, fd_a, se_a, diffs, diff_sd, p_order = 0, [], [], [], [], []
    for s in range(datasets):
        rng = np.random.default_rng(s)
        xr = rng.standard_normal((n_real, d)).astype(np.float32)
        xa = (mu_a + scale * rng.standard_normal((n_gen, d))).astype(np.float32)
        xb = (mu_b + scale * rng.standard_normal((n_gen, d))).astype(np.float32)
        va, ua = _fd_unc(xa, xr, replicates, s)
        vb, ub = _fd_unc(xb, xr, replicates, s)  # the same seed: the same real resample in every replicate
        hits += ua["ci_low"] <= truth_a <= ua["ci_high"]
        fd_a.append(va)
        se_a.append(ua["se"])
        d_rep = np.asarray(ub["values"]) - np.asarray(ua["values"])
        diffs.append(vb - va)
        diff_sd.append(float(d_rep.std(ddof=1)))
        p_order.append(float((d_rep > 0).mean()))
    return {
        "coverage": hits / datasets,
        "truth": truth_a,
        "mean_fd": float(np.mean(fd_a)),
        "se_ratio": float(np.mean(se_a) / np.std(fd_a)),
        "diff_sd_ratio": float(np.mean(diff_sd) / np.std(diffs)),
        "p_order": float(np.mean(p_order)),
        "order_right": float(np.mean(np.asarray(diffs) > 0)),
    }


def case_baseline() -> dict:
    """The resident memory of a process that imported what the cases import (their peaks include it)."""
    import fidmed.metrics.memorisation  # noqa: F401
    import fidmed.metrics.uncertainty  # noqa: F401

    return {"peak_mb": _peak_mb()}


def _child(fn, kwargs, queue):
    torch.set_num_threads(max(1, torch.get_num_threads()))
    queue.put(fn(**kwargs))


def run(fn, **kwargs) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(fn, kwargs, queue))
    proc.start()
    out = queue.get()
    proc.join()
    return out


def main() -> None:
    from machine import cpu_name

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-gen", type=int, default=50_000)
    p.add_argument("--n-real", type=int, default=5_000)
    p.add_argument("--dims", type=int, nargs="+", default=[768, 1024, 1536, 2048])
    p.add_argument("--replicates", type=int, default=2)
    p.add_argument("--kid-subsets", type=int, default=10)
    p.add_argument("--prdc-dim", type=int, default=64)
    p.add_argument("--only", nargs="+", default=["a", "b", "c", "d", "e"])
    p.add_argument("--datasets", type=int, default=100, help="(e): independent data sets per setting")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    lines: list[str] = []

    def say(text: str = "") -> None:
        print(text, flush=True)
        lines.append(text)

    say("# How far to trust a score: what it costs")
    say()
    say(
        f"- machine: {cpu_name()}, {os.cpu_count()} logical cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), Python {platform.python_version()}, device {args.device}"
    )
    say(
        f"- /proc/loadavg at start: {_loadavg()}; date {time.strftime('%Y-%m-%d %H:%M')} (2 cores shared: timings under load)"
    )
    say(f"- command: `python benchmarks/trust.py {' '.join(sys.argv[1:])}`")
    say(f"- N generated = {args.n_gen:,}, N real = {args.n_real:,}; synthetic float32 features (see the script)")
    say(f"- peak RSS of a process that only imports torch and fidmed: {run(case_baseline)['peak_mb']:.0f} MB")
    say()
    if "a" in args.only:
        say(f"## (a) fd + rfd bootstrap, per replicate ({args.replicates} measured per d)")
        say()
        say("| d | s per replicate | 200 replicates (x 200, extrapolated) | peak RSS MB | features held MB |")
        say("|---|---|---|---|---|")
        for d in args.dims:
            r = run(case_fd, n_gen=args.n_gen, n_real=args.n_real, d=d, replicates=args.replicates, device=args.device)
            held = (args.n_gen + args.n_real) * d * 4 / 2**20
            say(f"| {d} | {r['seconds']:.2f} | {r['seconds'] * 200 / 60:.1f} min | {r['peak_mb']:.0f} | {held:.0f} |")
        say()
    if "b" in args.only:
        say(f"## (b) kid half-samples: 200 replicates, per subset of 1,000 ({args.kid_subsets} subsets measured)")
        say()
        say("| d | s per subset (200 replicates) | KID's 100 subsets (x 100, extrapolated) | peak RSS MB |")
        say("|---|---|---|---|")
        for d in args.dims:
            r = run(case_kid, n_gen=args.n_gen, n_real=args.n_real, d=d, subsets=args.kid_subsets, device=args.device)
            say(f"| {d} | {r['seconds']:.3f} | {r['seconds'] * 100:.0f} s | {r['peak_mb']:.0f} |")
        say()
    if "c" in args.only:
        say("## (c) prdc half-samples (k = 5): the k-NN graph once, then 200 replicates")
        say()
        say("| N gen | N real | d | graph build s | s per replicate | stored pairs | peak RSS MB |")
        say("|---|---|---|---|---|---|---|")
        for n_gen, n_real, d in [(args.n_gen, args.n_real, args.prdc_dim)] + [
            (args.n_real, args.n_real, d) for d in args.dims
        ]:
            r = run(case_prdc, n_gen=n_gen, n_real=n_real, d=d, device=args.device)
            say(
                f"| {n_gen:,} | {n_real:,} | {d} | {r['build']:.1f} | {r['seconds']:.3f} | {r['pairs']:,} | "
                f"{r['peak_mb']:.0f} |"
            )
        say()
    if "d" in args.only:
        say("## (d) memorisation audit of one feature space (with C_T, 1,000 held-out)")
        say()
        say("| d | s | peak RSS MB |")
        say("|---|---|---|")
        for d in args.dims:
            r = run(case_audit, n_gen=args.n_gen, n_real=args.n_real, d=d, device=args.device)
            say(f"| {d} | {r['seconds']:.1f} | {r['peak_mb']:.0f} |")
        say()
    if "e" in args.only:
        say(f"## (e) calibration on Gaussian features ({args.datasets} independent data sets, 200 replicates each)")
        say()
        say(
            "Generators A: N(e1, 1.5 I) and B: N(1.15 e1, 1.5 I) against real N(0, I); true FD of A = "
            "1 + d (sqrt(1.5) - 1)^2. 'SE / true sd': mean bootstrap standard error over the sd of the FD over the "
            "data sets (1 = exact, > 1 = conservative); 'diff sd ratio': the same for the paired replicate "
            "differences FD_B - FD_A against the sd of the observed difference; 'mean P(order)': the bootstrap "
            "probability that B ranks behind A, averaged; 'order right': how often the observed order is the "
            "true one."
        )
        say()
        say(
            "| d | N real | N gen | true FD | mean FD | coverage of 95% CI | SE / true sd | diff sd ratio | "
            "mean P(order) | order right |"
        )
        say("|---|---|---|---|---|---|---|---|---|---|")
        for d, n_real, n_gen in ((8, 300, 300), (64, 1000, 1000), (64, 128, 1600)):
            r = run(case_calibration, d=d, n_real=n_real, n_gen=n_gen, datasets=args.datasets, replicates=200)
            say(
                f"| {d} | {n_real} | {n_gen} | {r['truth']:.3f} | {r['mean_fd']:.3f} | {r['coverage']:.2f} | "
                f"{r['se_ratio']:.2f} | {r['diff_sd_ratio']:.2f} | {r['p_order']:.2f} | {r['order_right']:.2f} |"
            )
        say()
    say(f"/proc/loadavg at end: {_loadavg()}")
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

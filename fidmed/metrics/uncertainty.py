"""How far a number can move: bootstrap standard errors, confidence intervals and per-replicate values of every
metric, from the features the evaluation pass already holds (docs/metrics.md#uncertainty).

A **replicate** is one redraw of the generated and the real set from themselves. Images are drawn in *units* of
``block_size`` consecutive indices (1: single images; a volume's slices, which sit next to each other in a prepared
folder, can be kept together), and every draw comes from ``np.random.default_rng([seed, stream, r])``: replicate
``r`` is the same whatever the number of replicates, and the real set's draw depends only on the seed and the real
set, so every generator of a modality sees the *same* real resample in replicate ``r`` (and generators evaluated on
the same seeds the same generated-side draw: their images are paired by latent). That is what makes replicates of
different runs comparable, and ``fidmed analyze`` computes from them the probability that an order of models holds.

How each metric is redrawn is registered next to it, in :data:`RESAMPLERS` (metric name -> :class:`ResamplerInfo`
and a replicate function), so a plugin metric can declare its own:

``bootstrap`` (fd, rfd): per-image multinomial counts (the ordinary bootstrap, by units). The metric function
    itself is called on each replicate's float64 moments, made from count-weighted sums of the kept features, so
    every replicate FD goes through the same exact routes (fidmed/metrics/fd.py) as the number it qualifies. The
    relative FD's real halves are redrawn by re-splitting the replicate's real images at random, as the real set of
    a new study would be split (keeping each original half would put the observed difference of the halves into
    every replicate and double the denominator).
``half-sample`` (kid, precision/recall/density/coverage): a random half of the units of each set, without
    replacement. The bootstrap's duplicated images would sit at distance zero from themselves, which shrinks k-NN
    radii and adds k(x, x) terms to KID's U-statistic; half-samples have no duplicates, and by the finite-population
    correction the spread of a mean over half of n units is that of the mean over n. Both are computed without
    recomputing everything: KID on each of its own subsets restricted to the half-samples (one more KID's worth of
    kernel evaluations for all replicates together), P/R/D/C from one k-NN graph of both sets
    (:class:`KnnGraph`) whose per-replicate radii and ball memberships equal ``prdc`` on the half-sampled sets.

Intervals (``ResamplerInfo.interval``): ``basic`` (2 x value - the upper and lower replicate quantiles: corrects
the FD's bias, which the bootstrap reproduces, so that the interval is for the FD of infinitely many images; with
few images, where the FD is mostly bias, the interval can lie below the value); ``centred`` (the value plus the
replicate quantiles about their mean: for numbers whose target is their value at these set sizes, where the
replicates are shifted by something that says nothing about the spread: half-sampled sets are half the size,
which moves k-NN statistics; the relative FD's duplicated images move both of its FDs); ``percentile`` (the
replicate quantiles, for a plugin whose replicates are centred as its value). The standard error is always the
standard deviation of the replicates, and ``bias`` their mean minus the value.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fidmed.errors import ConfigError, FidmedError
from fidmed.metrics.base import METRICS, MetricInputs, MetricValue
from fidmed.metrics.moments import STATE_FORMAT, StreamingMoments
from fidmed.registry import new_registry

#: schemes of :class:`ResamplerInfo`
BOOTSTRAP, HALF_SAMPLE = "bootstrap", "half-sample"
INTERVALS = ("basic", "percentile", "centred")
#: version of the way replicates are drawn (part of the resample key: replicates of different versions never pair)
SCHEME_VERSION = "fidmed-resample/1"
_STREAMS = {"gen-bootstrap": 1, "real-bootstrap": 2, "gen-half": 3, "real-half": 4, "real-resplit": 5}
RESAMPLE_CHOICES = ("both", "generated")


# ------------------------------------------------------------------------------------------------ registry
@dataclass(frozen=True)
class ResamplerInfo:
    """How a metric's numbers are redrawn: the scheme, the interval, what the interval is for, and the range of
    each number (intervals are clipped to it)."""

    scheme: str
    interval: str
    estimand: str
    bounds: dict[str, tuple[float | None, float | None]] = field(default_factory=dict)


#: fn(ctx, metric_names) -> {value name: replicate values [B]}; metrics registered with the same function are
#: redrawn together (fd and rfd share each replicate's moments)
ResamplerFn = Callable[["ResampleContext", list[str]], dict[str, np.ndarray]]

RESAMPLERS = new_registry(
    "metric resampler", ("fidmed.metrics",), hint="register one with fidmed.metrics.uncertainty.register_resampler"
)


def register_resampler(
    metric: str,
    fn: ResamplerFn,
    *,
    scheme: str,
    interval: str,
    estimand: str,
    bounds: dict[str, tuple[float | None, float | None]] | None = None,
) -> None:
    """Declare how the numbers of the registered metric ``metric`` are redrawn (see the module docstring)."""
    if scheme not in (BOOTSTRAP, HALF_SAMPLE):
        raise ValueError(f"resampler scheme {scheme!r}: use {BOOTSTRAP!r} or {HALF_SAMPLE!r}")
    if interval not in INTERVALS:
        raise ValueError(f"resampler interval {interval!r}: use one of {INTERVALS}")
    RESAMPLERS.add(metric, fn, info=ResamplerInfo(scheme, interval, estimand, dict(bounds or {})))


# ------------------------------------------------------------------------------------------------ the plan
@dataclass(frozen=True)
class ResamplePlan:
    """What to redraw and how often (``eval.uncertainty``, checked)."""

    replicates: int
    level: float = 0.95
    seed: int = 0
    block_size: int = 1
    resample_real: bool = True
    keep_replicates: bool = True

    @property
    def resampled(self) -> list[str]:
        return ["generated", "real"] if self.resample_real else ["generated"]

    def protocol(self) -> dict[str, Any]:
        return {
            "replicates": self.replicates,
            "level": self.level,
            "seed": self.seed,
            "block_size": self.block_size,
            "resampled": self.resampled,
            "scheme_version": SCHEME_VERSION,
        }

    # ------------------------------------------------------------------ draws
    def _rng(self, stream: str, r: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, _STREAMS[stream], r])

    def units(self, n: int) -> np.ndarray:
        """The resampling unit of every image: consecutive runs of ``block_size`` indices."""
        return np.arange(n) // self.block_size

    def _n_units(self, n: int) -> int:
        return -(-n // self.block_size)

    def bootstrap_counts(self, n: int, side: str, r: int) -> np.ndarray:
        """How often each of ``n`` images is drawn in bootstrap replicate ``r`` (``side``: gen or real)."""
        k = self._n_units(n)
        drawn = self._rng(f"{side}-bootstrap", r).integers(0, k, k)
        return np.bincount(drawn, minlength=k)[self.units(n)]

    def half_mask(self, n: int, side: str, r: int) -> np.ndarray:
        """Which of ``n`` images are in half-sample ``r`` (half of the units, without replacement)."""
        k = self._n_units(n)
        chosen = np.zeros(k, dtype=bool)
        chosen[self._rng(f"{side}-half", r).permutation(k)[: k // 2]] = True
        return chosen[self.units(n)]

    def resplit(self, counts: np.ndarray, r: int) -> tuple[np.ndarray, np.ndarray]:
        """Counts of the replicate's two real halves: its drawn images shuffled and cut in two (sizes floor/ceil)."""
        positions = np.repeat(np.arange(len(counts)), counts)
        perm = self._rng("real-resplit", r).permutation(len(positions))
        a = np.bincount(positions[perm[: len(positions) // 2]], minlength=len(counts))
        return a, counts - a

    def real_resample_key(self, real_description: dict[str, Any], n_real: int, real_split_seed: int) -> str:
        """Equal for two evaluations exactly when their replicate ``r`` redraws the same real images (and re-splits
        them alike): ``fidmed analyze`` pairs replicates of different runs only then."""
        record = {
            "scheme": SCHEME_VERSION,
            "seed": self.seed,
            "block_size": self.block_size,
            "resample_real": self.resample_real,
            "n_real": int(n_real),
            "real": real_description.get("manifest_sha256") or real_description.get("name"),
            "real_split_seed": int(real_split_seed),
        }
        return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]


def plan_from(cfg: Any) -> ResamplePlan | None:
    """The plan of an ``eval.uncertainty`` node (a dataclass, a mapping or a DictConfig); None when it is off."""
    if cfg is None:
        return None
    get = cfg.get if hasattr(cfg, "get") else lambda k, d=None: getattr(cfg, k, d)
    replicates = int(get("replicates", 0) or 0)
    if replicates == 0:
        return None
    level, block, resample = float(get("level", 0.95)), int(get("block_size", 1)), str(get("resample", "both"))
    if replicates < 10:
        raise ConfigError(
            f"eval.uncertainty.replicates={replicates}: use 0 (off) or at least 10 (200 or more for intervals; "
            "the 2.5% tails of a 95% interval need a few replicates each)."
        )
    if not 0 < level < 1:
        raise ConfigError(f"eval.uncertainty.level={level} must be between 0 and 1 (e.g. 0.95).")
    if block < 1:
        raise ConfigError(f"eval.uncertainty.block_size={block} must be >= 1 (images per resampling unit).")
    if resample not in RESAMPLE_CHOICES:
        raise ConfigError(
            f"eval.uncertainty.resample={resample!r}: use both (generated and real images) or generated "
            "(the real set stays fixed)."
        )
    return ResamplePlan(
        replicates,
        level,
        int(get("seed", 0)),
        block,
        resample == "both",
        bool(get("keep_replicates", True)),
    )


# ------------------------------------------------------------------------------------------------ context
@dataclass
class ResampleContext:
    """Everything a resampler may use for one extractor: the point inputs and values, the kept features in index
    order, the plan and every selected metric's options."""

    inputs: MetricInputs
    plan: ResamplePlan
    values: dict[str, MetricValue]
    options: dict[str, Any]
    metrics: list[str]  # every selected metric, in evaluation order
    gen_features: np.ndarray | None = None
    real_features: np.ndarray | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def need(self, which: str) -> np.ndarray:
        feats = self.gen_features if which == "gen" else self.real_features
        if feats is None:
            raise FidmedError(f"the {which} features were not kept; the evaluator keeps them with eval.uncertainty on")
        return feats


# ------------------------------------------------------------------------------------------------ bootstrap
class _Centred:
    """A feature set centred at its float64 mean, on the device, for count-weighted sums."""

    def __init__(self, x: np.ndarray, device: torch.device, chunk_bytes: int = 256 << 20) -> None:
        self.raw = x
        self.n, self.d = x.shape
        xt = torch.from_numpy(np.ascontiguousarray(x)).to(device, torch.float64)
        self.shift = xt.mean(dim=0)
        self.y = xt - self.shift
        self.rows = max(1, chunk_bytes // (8 * max(1, self.d)))

    def sums(self, counts: np.ndarray) -> tuple[int, torch.Tensor, torch.Tensor]:
        """(count, sum, outer) about the shift of the multiset that holds image i counts[i] times. Only the images
        drawn enter the products (a bootstrap replicate leaves about 37% of the images out, a re-split half about
        60%): the cost is (drawn images) x d^2."""
        drawn = np.flatnonzero(counts)
        idx = torch.from_numpy(drawn).to(self.y.device)
        w = torch.from_numpy(counts[drawn].astype(np.float64)).to(self.y.device)
        s = torch.zeros(self.d, dtype=torch.float64, device=self.y.device)
        o = torch.zeros(self.d, self.d, dtype=torch.float64, device=self.y.device)
        for a in range(0, len(drawn), self.rows):
            y, wc = self.y[idx[a : a + self.rows]], w[a : a + self.rows]
            s += wc @ y
            o += (y * wc[:, None]).T @ y
        return int(counts.sum()), s, o

    def moments(
        self, counts: np.ndarray, keep_small: bool, sums: tuple[int, torch.Tensor, torch.Tensor] | None = None
    ) -> StreamingMoments:
        """The moments of that multiset (from ``sums`` when given), with its raw feature rows too when it is smaller
        than the feature dimension and ``keep_small``, as the exact n < d FD routes read them."""
        count, s, o = sums if sums is not None else self.sums(counts)
        state = {
            "format": STATE_FORMAT,
            "dim": self.d,
            "count": count,
            "keep_features": bool(keep_small and count < self.d),
            "shift": self.shift.cpu().numpy(),
            "sum": s.cpu().numpy(),
            "outer": o.cpu().numpy(),
        }
        if state["keep_features"]:
            state["features"] = self.raw[np.repeat(np.arange(self.n), counts)]
        return StreamingMoments.from_state_dict(state)


def moments_bootstrap(ctx: ResampleContext, names: list[str]) -> dict[str, np.ndarray]:
    """Replicates of metrics computed from moments (fd, rfd): each metric function is called on every replicate's
    moments (bootstrap counts; the real halves re-split), so replicates take the routes of the value itself."""
    plan, inputs = ctx.plan, ctx.inputs
    for name in names:
        info = METRICS.get(name).info
        if info.needs_gen_features or info.needs_real_features:
            raise FidmedError(
                f"metric {name} reads raw features, which the moments bootstrap does not redraw; register a "
                "resampler of its own for it (fidmed.metrics.uncertainty.register_resampler)"
            )
    gen = _Centred(ctx.need("gen"), ctx.device)
    keep_gen = bool(inputs.gen.keep_features)
    real = _Centred(ctx.need("real"), ctx.device) if plan.resample_real else None
    keep_real = bool(inputs.real.keep_features)
    out: dict[str, list[float]] = {}
    for r in range(plan.replicates):
        g = gen.moments(plan.bootstrap_counts(gen.n, "gen", r), keep_gen)
        if real is not None:
            counts = plan.bootstrap_counts(real.n, "real", r)
            a_counts, b_counts = plan.resplit(counts, r)
            sums_a, sums_b = real.sums(a_counts), real.sums(b_counts)
            half_a, half_b = real.moments(a_counts, keep_real, sums_a), real.moments(b_counts, keep_real, sums_b)
            whole = (sums_a[0] + sums_b[0], sums_a[1] + sums_b[1], sums_a[2] + sums_b[2])  # the halves' union
            full = real.moments(counts, keep_real, whole)
        else:
            full, (half_a, half_b) = inputs.real, inputs.real_halves
        rep = MetricInputs(g, full, (half_a, half_b), inputs.device, inputs.seed)
        for name in names:
            rep.options = ctx.options.get(name)
            try:
                values = METRICS.get(name).obj(rep)
            except FidmedError:  # a degenerate replicate (e.g. too few distinct images): left out, counted
                values = [MetricValue(v.name, math.nan) for v in _point_values(ctx, name)]
            for v in values:
                rep.results[v.name] = v
                out.setdefault(v.name, []).append(float(v.value))
    return {k: np.asarray(v, dtype=np.float64) for k, v in out.items()}


def _point_values(ctx: ResampleContext, metric: str) -> list[MetricValue]:
    columns = METRICS.get(metric).info.columns
    return [ctx.values[c] for c in columns if c in ctx.values]


# ------------------------------------------------------------------------------------------------ half-samples
def _half_masks(ctx: ResampleContext, side: str, n: int) -> np.ndarray:
    """[B, n] bool: the images of each half-sample (all True for a real set that stays fixed)."""
    if side == "real" and not ctx.plan.resample_real:
        return np.ones((ctx.plan.replicates, n), dtype=bool)
    return np.stack([ctx.plan.half_mask(n, side, r) for r in range(ctx.plan.replicates)])


def kid_half_samples(ctx: ResampleContext, names: list[str]) -> dict[str, np.ndarray]:
    """KID on every replicate: each of KID's own subsets (the same seeded draws as the value) restricted to the
    half-sampled images, the unbiased MMD^2 for the unequal sizes that leaves, averaged over the subsets. Each
    subset's three kernel matrices are computed once and reused by all replicates."""
    from fidmed.metrics.knn import resolve_knn_device

    opts = ctx.options.get("kid")
    n_subsets, subset_size = int(opts.subsets), int(opts.subset_size)
    dev = resolve_knn_device(ctx.inputs.device, ctx.need("real"))
    real = torch.from_numpy(np.asarray(ctx.need("real"))).to(dev, torch.float64)
    fake = torch.from_numpy(np.asarray(ctx.need("gen"))).to(dev, torch.float64)
    m = min(subset_size, real.shape[0], fake.shape[0])
    d = real.shape[1]
    pr = torch.from_numpy(_half_masks(ctx, "real", real.shape[0]).T.astype(np.float64)).to(dev)  # [n_real, B]
    pg = torch.from_numpy(_half_masks(ctx, "gen", fake.shape[0]).T.astype(np.float64)).to(dev)
    rng = np.random.default_rng(ctx.inputs.seed)  # KID's own subsets (fidmed.metrics.kid.kid draws them so)
    total = torch.zeros(ctx.plan.replicates, dtype=torch.float64, device=dev)
    for _ in range(n_subsets):
        ir = torch.from_numpy(rng.choice(real.shape[0], m, replace=False)).to(dev)
        ig = torch.from_numpy(rng.choice(fake.shape[0], m, replace=False)).to(dev)
        x, y = real[ir], fake[ig]
        px, py = pr[ir], pg[ig]  # [m, B] presence of the subset's members in each replicate
        kxx = (x @ x.T / d + 1.0) ** 3
        kyy = (y @ y.T / d + 1.0) ** 3
        kxy = (x @ y.T / d + 1.0) ** 3
        nx, ny = px.sum(dim=0), py.sum(dim=0)
        sxx = (px * (kxx @ px)).sum(dim=0) - (px * kxx.diagonal()[:, None]).sum(dim=0)
        syy = (py * (kyy @ py)).sum(dim=0) - (py * kyy.diagonal()[:, None]).sum(dim=0)
        sxy = (px * (kxy @ py)).sum(dim=0)
        total += sxx / (nx * (nx - 1)) + syy / (ny * (ny - 1)) - 2 * sxy / (nx * ny)
    reps = (total / n_subsets).cpu().numpy()
    return {"kid": np.where(np.isfinite(reps), reps, np.nan)}


def _cdist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Euclidean distances by the matrix-product route, as fidmed.metrics.knn computes them."""
    return torch.cdist(a, b, compute_mode="use_mm_for_euclid_dist")


def _nearest(a: torch.Tensor, b: torch.Tensor, keep: int, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row of ``a``: its ``keep`` nearest rows of ``b`` (distances ascending, indices)."""
    keep = min(keep, b.shape[0])
    dist = torch.empty(a.shape[0], keep, dtype=a.dtype, device=a.device)
    idx = torch.empty(a.shape[0], keep, dtype=torch.int64, device=a.device)
    for s in range(0, a.shape[0], rows):
        top = torch.topk(_cdist(a[s : s + rows], b), keep, dim=1, largest=False, sorted=True)
        dist[s : s + rows], idx[s : s + rows] = top.values, top.indices
    return dist, idx


class KnnGraph:
    """Everything P/R/D/C of half-sampled sets need, from one pass of distance computations.

    Per set: each point's ``list_size`` nearest points of its own set (itself included, as ``prdc`` counts it);
    a half-sample's k-NN radius of a present point is the (k+1)-th nearest *present* entry of its list (or, when the
    list holds fewer than k+1 present points, an exact distance computation for that point). Across the sets: every
    (real, generated) pair closer than the largest radius either point can have in any half-sample (its list's
    last distance), with the distance. So each replicate's ``D < r`` decisions are the full computation's, on the
    same float64 distances (``tests/test_uncertainty.py`` checks equality with ``prdc`` on the half-samples).

    Memory: the lists (``(N_real + N_gen) * list_size`` entries) and the pairs, about ``list_size`` per point when
    the two sets overlap as samples of one distribution (more where generated images crowd a few real ones);
    ``max_pairs`` bounds them (beyond it the replicates are computed by ``prdc`` on each half-sample instead).
    """

    def __init__(
        self,
        real: np.ndarray,
        fake: np.ndarray,
        k: int,
        device: torch.device,
        list_size: int | None = None,
        memory_bytes: int = 256 << 20,
        max_pairs: int = 50_000_000,
    ) -> None:
        self.k = int(k)
        self.device = device
        self.real = torch.from_numpy(np.asarray(real)).to(device, torch.float64)
        self.fake = torch.from_numpy(np.asarray(fake)).to(device, torch.float64)
        n_r, n_f = self.real.shape[0], self.fake.shape[0]
        self.list_size = int(list_size or 4 * (self.k + 1) + 1)
        rows_r = max(1, memory_bytes // (8 * max(n_r, n_f)))
        self.rr_dist, self.rr_idx = _nearest(self.real, self.real, self.list_size, rows_r)
        self.ff_dist, self.ff_idx = _nearest(self.fake, self.fake, self.list_size, rows_r)
        reach_r, reach_f = self.rr_dist[:, -1], self.ff_dist[:, -1]
        rb_i, rb_j, rb_d, fb_i, fb_j, fb_d = [], [], [], [], [], []
        pairs = 0
        self.complete = True
        for s in range(0, n_r, rows_r):
            dist = _cdist(self.real[s : s + rows_r], self.fake)
            ii, jj = torch.nonzero(dist <= reach_r[s : s + rows_r, None], as_tuple=True)
            rb_i.append(ii + s), rb_j.append(jj), rb_d.append(dist[ii, jj])
            ii, jj = torch.nonzero(dist <= reach_f[None, :], as_tuple=True)
            fb_i.append(ii + s), fb_j.append(jj), fb_d.append(dist[ii, jj])
            pairs += len(rb_d[-1]) + len(fb_d[-1])
            if pairs > max_pairs:
                self.complete = False
                return
        self.real_ball = (torch.cat(rb_i), torch.cat(rb_j), torch.cat(rb_d))  # (real i, fake j, D) within i's reach
        self.fake_ball = (torch.cat(fb_i), torch.cat(fb_j), torch.cat(fb_d))  # (real i, fake j, D) within j's reach
        self.n_pairs = pairs

    def _radii(self, points: torch.Tensor, dist: torch.Tensor, idx: torch.Tensor, present: torch.Tensor):
        """k-NN radii of every point among the present points of its set (valid for present points)."""
        here = present[idx]  # [n, L]: which list entries are present
        rank = here.cumsum(dim=1)
        hit = here & (rank == self.k + 1)
        ok = hit.any(dim=1)
        radius = torch.where(ok, (dist * hit).sum(dim=1), torch.full_like(dist[:, 0], math.inf))
        short = torch.nonzero(present & ~ok, as_tuple=True)[0]  # present points whose list ran out: exact
        if len(short):
            others = points[present]
            if others.shape[0] < self.k + 1:
                raise FidmedError(f"a half-sample holds {others.shape[0]} points, fewer than k + 1 = {self.k + 1}")
            d = _cdist(points[short], others)
            radius[short] = torch.topk(d, self.k + 1, dim=1, largest=False, sorted=True).values[:, self.k]
        return radius, short

    def replicate(self, pr: np.ndarray, pf: np.ndarray) -> tuple[float, float, float, float]:
        """(precision, recall, density, coverage) of the half-samples ``pr`` (real) and ``pf`` (generated)."""
        pr_t = torch.from_numpy(pr).to(self.device)
        pf_t = torch.from_numpy(pf).to(self.device)
        r_real, short_r = self._radii(self.real, self.rr_dist, self.rr_idx, pr_t)
        r_fake, short_f = self._radii(self.fake, self.ff_dist, self.ff_idx, pf_t)
        n_r, n_f = self.real.shape[0], self.fake.shape[0]
        # real points whose radius lies beyond the stored reach: all their pairs computed exactly, in one block
        exact_r = torch.zeros(n_r, dtype=torch.bool, device=self.device)
        exact_r[short_r] = True
        i, j, dist = self.real_ball
        ok = pr_t[i] & pf_t[j] & (dist < r_real[i]) & ~exact_r[i]
        vi, vj = i[ok], j[ok]
        if len(short_r):
            si, sj = torch.nonzero(
                pf_t & (_cdist(self.real[short_r], self.fake) < r_real[short_r, None]), as_tuple=True
            )
            vi, vj = torch.cat([vi, short_r[si]]), torch.cat([vj, sj])
        inside = torch.zeros(n_f, dtype=torch.bool, device=self.device)
        inside[vj] = True
        covered = torch.zeros(n_r, dtype=torch.bool, device=self.device)
        covered[vi] = True
        i, j, dist = self.fake_ball
        ok = pr_t[i] & pf_t[j] & (dist < r_fake[j])
        recalled = torch.zeros(n_r, dtype=torch.bool, device=self.device)
        recalled[i[ok]] = True
        if len(short_f):  # generated points beyond their stored reach: exactly
            recalled |= (pr_t & (_cdist(self.fake[short_f], self.real) < r_fake[short_f, None])).any(dim=0)
        n_pf = int(pf_t.sum())
        return (
            float(inside[pf_t].double().mean()),
            float(recalled[pr_t].double().mean()),
            float(len(vj)) / (self.k * n_pf),
            float(covered[pr_t].double().mean()),
        )


def prdc_half_samples(ctx: ResampleContext, names: list[str]) -> dict[str, np.ndarray]:
    """Precision, recall, density and coverage of every replicate's half-samples (:class:`KnnGraph`)."""
    from fidmed.metrics.knn import prdc, resolve_knn_device

    k = int(ctx.options.get("prdc").k)
    real, fake = ctx.need("real"), ctx.need("gen")
    dev = resolve_knn_device(ctx.inputs.device, real)
    masks_r, masks_f = _half_masks(ctx, "real", len(real)), _half_masks(ctx, "gen", len(fake))
    graph = KnnGraph(real, fake, k, dev)
    rows = []
    for pr, pf in zip(masks_r, masks_f):
        if graph.complete:
            rows.append(graph.replicate(pr, pf))
        else:  # too many pairs to store: each half-sample computed in full
            res = prdc(real[pr], fake[pf], k, device=dev)
            rows.append((res.precision, res.recall, res.density, res.coverage))
    arr = np.asarray(rows, dtype=np.float64)
    return {name: arr[:, c] for c, name in enumerate(("precision", "recall", "density", "coverage"))}


register_resampler(
    "fd",
    moments_bootstrap,
    scheme=BOOTSTRAP,
    interval="basic",
    estimand="the FD of the two distributions (infinitely many images): the basic interval corrects the bias the "
    "bootstrap reproduces",
    bounds={"fd": (0.0, None)},
)
register_resampler(
    "rfd",
    moments_bootstrap,
    scheme=BOOTSTRAP,
    interval="centred",
    estimand="the relative FD at these set sizes (its denominator, the FD between two real halves, vanishes "
    "with infinitely many images; replicates, whose duplicated images shift both FDs, give its spread)",
    bounds={"rfd": (0.0, None)},
)
register_resampler(
    "kid",
    kid_half_samples,
    scheme=HALF_SAMPLE,
    interval="centred",
    estimand="the squared MMD of the two distributions (KID is unbiased for it)",
)
register_resampler(
    "prdc",
    prdc_half_samples,
    scheme=HALF_SAMPLE,
    interval="centred",
    estimand="the metric's expected value at these set sizes",
    bounds={"precision": (0.0, 1.0), "recall": (0.0, 1.0), "density": (0.0, None), "coverage": (0.0, 1.0)},
)


# ------------------------------------------------------------------------------------------------ summaries
def interval(
    value: float,
    replicates: np.ndarray,
    kind: str,
    level: float,
    bounds: tuple[float | None, float | None] = (None, None),
) -> tuple[float, float]:
    """The ``level`` interval of ``value`` from its replicates (``kind``: basic, percentile or centred)."""
    ok = replicates[np.isfinite(replicates)]
    alpha = (1.0 - level) / 2.0
    q_lo, q_hi = (float(q) for q in np.quantile(ok, [alpha, 1.0 - alpha]))
    if kind == "basic":
        lo, hi = 2.0 * value - q_hi, 2.0 * value - q_lo
    elif kind == "percentile":
        lo, hi = q_lo, q_hi
    elif kind == "centred":
        mean = float(ok.mean())
        lo, hi = value + q_lo - mean, value + q_hi - mean
    else:
        raise ValueError(f"unknown interval {kind!r}")
    low, high = bounds
    if low is not None:
        lo, hi = max(lo, low), max(hi, low)
    if high is not None:
        lo, hi = min(lo, high), min(hi, high)
    return lo, hi


def summarise(
    value: float, replicates: np.ndarray, info: ResamplerInfo, name: str, plan: ResamplePlan, resample_key: str
) -> dict[str, Any]:
    """The ``uncertainty`` entry of one number: standard error, interval, how it was made, and the replicates."""
    reps = np.asarray(replicates, dtype=np.float64)
    ok = reps[np.isfinite(reps)]
    out: dict[str, Any] = {
        "scheme": info.scheme,
        "interval": info.interval,
        "estimand": info.estimand,
        **plan.protocol(),
        "n_valid": int(ok.size),
        "real_resample_key": resample_key,
    }
    if not plan.resample_real:
        out["covers"] = (
            "generated images only: the real set was not resampled (eval.uncertainty.resample=generated), so the "
            "spread it adds is not included"
        )
    else:
        out["covers"] = "generated and real images"
    if ok.size < 2 or not math.isfinite(value):
        out.update(available=False, se=None, ci_low=None, ci_high=None)
        out["reason"] = "the value is not finite" if not math.isfinite(value) else "fewer than 2 finite replicates"
    else:
        lo, hi = interval(value, reps, info.interval, plan.level, info.bounds.get(name, (None, None)))
        out.update(available=True, se=float(ok.std(ddof=1)), ci_low=lo, ci_high=hi)
        out["bias"] = float(ok.mean()) - value  # the replicates' mean minus the value (the bootstrap's bias estimate)
    if plan.keep_replicates:
        out["values"] = [float(v) if math.isfinite(v) else None for v in reps]
    return out


def unavailable(reason: str, plan: ResamplePlan) -> dict[str, Any]:
    return {**plan.protocol(), "available": False, "se": None, "ci_low": None, "ci_high": None, "reason": reason}


def metric_uncertainty(ctx: ResampleContext, resample_key: str) -> dict[str, dict[str, Any]]:
    """value name -> its ``uncertainty`` entry, for every number of every selected metric of one extractor."""
    groups: dict[Any, list[str]] = {}
    out: dict[str, dict[str, Any]] = {}
    for name in ctx.metrics:
        if name in RESAMPLERS:
            groups.setdefault(RESAMPLERS.get(name).obj, []).append(name)
        else:
            for v in _point_values(ctx, name):
                out[v.name] = unavailable(
                    f"metric {name} registers no resampler (fidmed.metrics.uncertainty.register_resampler)", ctx.plan
                )
    for fn, names in groups.items():
        reps = fn(ctx, names)
        for name in names:
            info: ResamplerInfo = RESAMPLERS.get(name).info
            for v in _point_values(ctx, name):
                if v.name in reps:
                    out[v.name] = summarise(float(v.value), reps[v.name], info, v.name, ctx.plan, resample_key)
                else:
                    out[v.name] = unavailable(f"the resampler of {name} made no replicates of {v.name}", ctx.plan)
    return out


def replicate_values(entry: dict[str, Any] | None) -> np.ndarray | None:
    """The replicate values an ``uncertainty`` entry holds (None: none kept), NaN where a replicate failed."""
    if not entry or entry.get("values") is None:
        return None
    return np.array([math.nan if v is None else float(v) for v in entry["values"]], dtype=np.float64)


@dataclass
class RankConfidence:
    """How often the order of models holds over paired replicates (replicate r of every model redrew the same real
    images): ``pairs[(a, b)]`` = P(a stays ahead of b) for every pair whose values are ordered (a better), ties in a
    replicate counting one half; ``p_ranking`` = P(every such pair keeps its order at once)."""

    pairs: dict[tuple[int, int], float]
    p_ranking: float
    n_replicates: int


def rank_confidence(values: Sequence[float], replicates: np.ndarray, lower_is_better: bool = True) -> RankConfidence:
    """``values`` [models] and their paired ``replicates`` [models, B] (NaN: a failed replicate, left out)."""
    v = np.asarray(values, dtype=np.float64)
    reps = np.atleast_2d(np.asarray(replicates, dtype=np.float64))
    if reps.shape[0] != len(v):
        raise FidmedError(f"{reps.shape[0]} replicate rows for {len(v)} models")
    sign = 1.0 if lower_is_better else -1.0
    usable = np.isfinite(reps).all(axis=0)
    r = sign * reps[:, usable]
    score = sign * v
    pairs: dict[tuple[int, int], float] = {}
    holds = np.ones(r.shape[1], dtype=bool)
    for a in range(len(v)):
        for b in range(len(v)):
            if score[a] < score[b]:
                ahead = (r[a] < r[b]).astype(np.float64) + 0.5 * (r[a] == r[b])
                pairs[(a, b)] = float(ahead.mean()) if r.shape[1] else math.nan
                holds &= r[a] < r[b]
    p_ranking = float(holds.mean()) if r.shape[1] else math.nan
    return RankConfidence(pairs, p_ranking, int(r.shape[1]))

"""How far a number can move (fidmed.metrics.uncertainty): coverage of the FD interval on Gaussian features with a
closed-form FD, replicates equal to the metrics recomputed on the resampled sets, paired real resamples across
generators, rank confidence, and the evaluator's uncertainty entries (values unchanged, in results.json)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from test_evaluator import ToyDataset, _extractors

from fidmed.errors import ConfigError, FidmedError
from fidmed.evaluation.evaluator import Evaluator
from fidmed.evaluation.results import format_results_table, summary_values, write_results_json
from fidmed.evaluation.sources import DatasetSource
from fidmed.metrics.base import METRICS, MetricInputs
from fidmed.metrics.fd import frechet_distance_from_features
from fidmed.metrics.kid import KIDConfig
from fidmed.metrics.knn import PRDCConfig, prdc
from fidmed.metrics.moments import StreamingMoments
from fidmed.metrics.uncertainty import (
    KnnGraph,
    ResampleContext,
    ResamplePlan,
    metric_uncertainty,
    plan_from,
    rank_confidence,
)

OPTIONS = {"prdc": PRDCConfig(3), "kid": KIDConfig(5, 20)}


def _moments(x: np.ndarray) -> StreamingMoments:
    m = StreamingMoments(x.shape[1], keep_features=True)
    m.update(torch.from_numpy(x))
    return m


def _inputs(xg: np.ndarray, xr: np.ndarray, split_seed: int = 0) -> MetricInputs:
    half = np.zeros(len(xr), dtype=bool)
    half[np.random.default_rng(split_seed).permutation(len(xr))[: len(xr) // 2]] = True
    return MetricInputs(
        _moments(xg),
        _moments(xr),
        (_moments(xr[half]), _moments(xr[~half])),
        torch.device("cpu"),
        0,
        gen_features_fn=lambda: xg,
        real_features_fn=lambda: xr,
    )


def _uncertainty(xg, xr, metrics, plan, options=OPTIONS):
    inputs = _inputs(xg, xr)
    values = {}
    for name in metrics:
        inputs.options = options.get(name)
        for v in METRICS.get(name).obj(inputs):
            inputs.results[v.name] = v
            values[v.name] = v
    ctx = ResampleContext(inputs, plan, values, options, list(metrics), xg, xr)
    return values, metric_uncertainty(ctx, "key")


# ------------------------------------------------------------------------------------------------ coverage
@pytest.mark.slow  # ~70 s on 2 CPU cores: 100 data sets x 200 replicates
def test_fd_interval_covers_the_closed_form_fd_at_the_nominal_rate(one_cpu_thread):
    """Gaussian features, N(mu_g, diag s_g) vs N(0, I): FD = |mu_g|^2 + sum (sqrt(s_g) - 1)^2 exactly. The 95%
    intervals over 100 independent data sets cover it about 95 times (binomial sd 2.2); the percentile interval,
    which ignores the FD's bias (estimate 0.15 above the truth here, about one standard error), covers it far
    less often: the bias correction is what makes the interval right."""
    d, n, seeds = 8, 300, 100
    mu = np.zeros(d)
    mu[0] = 1.0
    scale = np.full(d, 1.5)
    truth = float(mu @ mu + ((np.sqrt(scale) - 1.0) ** 2).sum())
    hits = percentile_hits = 0
    for s in range(seeds):
        rng = np.random.default_rng(s)
        xr = rng.standard_normal((n, d)).astype(np.float32)
        xg = (mu + rng.standard_normal((n, d)) * np.sqrt(scale)).astype(np.float32)
        values, unc = _uncertainty(xg, xr, ["fd"], ResamplePlan(200, seed=s))
        u = unc["fd"]
        hits += u["ci_low"] <= truth <= u["ci_high"]
        lo, hi = np.quantile([v for v in u["values"]], [0.025, 0.975])
        percentile_hits += lo <= truth <= hi
    assert 0.89 <= hits / seeds <= 0.99, hits
    assert percentile_hits / seeds < 0.8, percentile_hits


@pytest.mark.slow  # ~60 s: 40 independent data sets
def test_standard_errors_match_the_spread_over_independent_data_sets(one_cpu_thread):
    """Every metric's bootstrap standard error against the standard deviation of the metric over independent data
    sets: neither much too small (overclaiming) nor far too large (measured ratios 1.1-1.4 for fd, kid and the
    half-sampled k-NN metrics: half-samples have noisier k-NN radii, so those intervals are conservative)."""
    metrics = ["fd", "prdc", "kid"]
    values, ses = {}, {}
    for s in range(40):
        rng = np.random.default_rng(1000 + s)
        xr = rng.standard_normal((200, 8)).astype(np.float32)
        xg = (rng.standard_normal((200, 8)) * 1.2 + 0.3).astype(np.float32)
        vals, unc = _uncertainty(xg, xr, metrics, ResamplePlan(60, seed=s), {**OPTIONS, "kid": KIDConfig(10, 100)})
        for k, u in unc.items():
            values.setdefault(k, []).append(vals[k].value)
            ses.setdefault(k, []).append(u["se"])
    ratios = {k: float(np.mean(ses[k]) / np.std(values[k])) for k in values}
    print(ratios)
    assert all(0.85 <= r <= 1.6 for r in ratios.values()), ratios


# ------------------------------------------------------------------------------------------------ replicates
def test_each_replicate_is_the_metric_of_its_resampled_sets():
    """FD and rFD replicates equal the FD computed from the feature rows the replicate drew (duplicates included),
    with n >= d (Cholesky) and n < d (exact nuclear/mixed routes); the rFD's halves are its drawn images re-split."""
    rng = np.random.default_rng(0)
    for n_gen, d in ((120, 6), (25, 40)):
        xg = rng.standard_normal((n_gen, d)).astype(np.float32)
        xr = (rng.standard_normal((90, d)) + 0.2).astype(np.float32)
        plan = ResamplePlan(12, seed=3, block_size=2)
        values, unc = _uncertainty(xg, xr, ["fd", "rfd"], plan)
        for r in range(plan.replicates):
            cg = plan.bootstrap_counts(len(xg), "gen", r)
            cr = plan.bootstrap_counts(len(xr), "real", r)
            a, b = plan.resplit(cr, r)
            rows = lambda x, c: x[np.repeat(np.arange(len(x)), c)]  # noqa: E731
            fd = frechet_distance_from_features(rows(xg, cg), rows(xr, cr)).value
            split = frechet_distance_from_features(rows(xr, a), rows(xr, b)).value
            assert unc["fd"]["values"][r] == pytest.approx(fd, rel=1e-9, abs=1e-12)
            assert unc["rfd"]["values"][r] == pytest.approx(fd / split, rel=1e-9)
        assert unc["fd"]["interval"] == "basic" and unc["rfd"]["interval"] == "centred"
        assert unc["fd"]["ci_low"] >= 0 and unc["fd"]["se"] > 0


def test_blocks_are_drawn_whole_and_draws_do_not_depend_on_the_number_of_replicates():
    plan = ResamplePlan(50, seed=7, block_size=4)
    counts = plan.bootstrap_counts(22, "real", 3)
    assert counts[::4].sum() == 6  # 6 units drawn: 5 blocks of 4 images and the last of 2
    for block in range(5):
        assert len(set(counts[block * 4 : block * 4 + 4])) == 1
    mask = plan.half_mask(22, "gen", 5)
    assert all(len(set(mask[b * 4 : b * 4 + 4])) == 1 for b in range(5))
    assert np.array_equal(ResamplePlan(10, seed=7, block_size=4).bootstrap_counts(22, "real", 3), counts)
    assert not np.array_equal(plan.bootstrap_counts(22, "real", 4), counts)
    a, b = plan.resplit(counts, 3)
    assert np.array_equal(a + b, counts) and a.sum() == counts.sum() // 2


def test_prdc_half_samples_equal_prdc_on_the_half_samples():
    rng = np.random.default_rng(1)
    real = rng.standard_normal((160, 10))
    fake = rng.standard_normal((140, 10)) * 1.1 + 0.2
    for block, list_size in ((1, None), (3, None), (1, 6)):  # list_size 6 < ~2(k+1): many exact fallbacks
        plan = ResamplePlan(8, seed=2, block_size=block)
        graph = KnnGraph(real, fake, 3, torch.device("cpu"), list_size=list_size)
        assert graph.complete
        for r in range(plan.replicates):
            pr, pf = plan.half_mask(len(real), "real", r), plan.half_mask(len(fake), "gen", r)
            want = prdc(real[pr], fake[pf], 3, device="cpu")
            assert graph.replicate(pr, pf) == (want.precision, want.recall, want.density, want.coverage)


def _mmd_unbiased(x, y):
    k = lambda a, b: (a @ b.T / a.shape[1] + 1.0) ** 3  # noqa: E731
    kxx, kyy = k(x, x), k(y, y)
    m, n = len(x), len(y)
    return (
        (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
        + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
        - 2 * k(x, y).sum() / (m * n)
    )


def test_kid_replicates_are_kids_subsets_restricted_to_the_half_samples():
    rng = np.random.default_rng(2)
    xr = rng.standard_normal((60, 5)).astype(np.float32)
    xg = (rng.standard_normal((50, 5)) + 0.5).astype(np.float32)
    plan = ResamplePlan(10, seed=4)
    values, unc = _uncertainty(xg, xr, ["kid"], plan)
    draws = np.random.default_rng(0)  # KID's own subsets (metric seed 0), as fidmed.metrics.kid.kid draws them
    subsets = [(draws.choice(60, 20, replace=False), draws.choice(50, 20, replace=False)) for _ in range(5)]
    for r in range(plan.replicates):
        pr, pg = plan.half_mask(60, "real", r), plan.half_mask(50, "gen", r)
        want = np.mean(
            [_mmd_unbiased(xr[ir[pr[ir]]].astype(np.float64), xg[ig[pg[ig]]].astype(np.float64)) for ir, ig in subsets]
        )
        assert unc["kid"]["values"][r] == pytest.approx(want, rel=1e-10, abs=1e-14)
    # all images present: the replicate is KID itself
    full = metric_uncertainty(
        ResampleContext(_inputs(xg, xr), ResamplePlan(10, resample_real=False), values, OPTIONS, ["kid"], xg, xr),
        "key",
    )
    assert full["kid"]["covers"].startswith("generated images only")


def test_real_set_fixed_leaves_the_real_spread_out_and_says_so():
    rng = np.random.default_rng(3)
    xg = rng.standard_normal((80, 4)).astype(np.float32)
    xr = rng.standard_normal((70, 4)).astype(np.float32)
    _, both = _uncertainty(xg, xr, ["fd"], ResamplePlan(40, seed=1))
    _, gen_only = _uncertainty(xg, xr, ["fd"], ResamplePlan(40, seed=1, resample_real=False))
    assert both["fd"]["resampled"] == ["generated", "real"] and gen_only["fd"]["resampled"] == ["generated"]
    assert "not included" in gen_only["fd"]["covers"]
    assert gen_only["fd"]["se"] < both["fd"]["se"]


def test_plan_from_config_checks_values():
    assert plan_from({"replicates": 0}) is None
    plan = plan_from({"replicates": 20, "level": 0.9, "block_size": 3, "resample": "generated"})
    assert plan == ResamplePlan(20, 0.9, 0, 3, False, True)
    for bad, word in (
        ({"replicates": 5}, "at least 10"),
        ({"replicates": 20, "level": 1.5}, "between 0 and 1"),
        ({"replicates": 20, "block_size": 0}, "block_size"),
        ({"replicates": 20, "resample": "real"}, "resample"),
    ):
        with pytest.raises(ConfigError, match=word):
            plan_from(bad)


# ------------------------------------------------------------------------------------------------ rank confidence
def test_rank_confidence_by_hand():
    values = [1.0, 2.0, 3.0]
    reps = np.array([[1.0, 2.5, 1.0, 1.0], [2.0, 2.0, 0.5, 2.0], [3.0, 3.0, 3.0, 1.0]])
    conf = rank_confidence(values, reps)
    # pairs (ahead, behind): replicate columns where the order holds; a tie counts one half
    assert conf.pairs[(0, 1)] == pytest.approx((1 + 0 + 0 + 1) / 4)
    assert conf.pairs[(0, 2)] == pytest.approx((1 + 1 + 1 + 0.5) / 4)
    assert conf.pairs[(1, 2)] == pytest.approx((1 + 1 + 1 + 0) / 4)
    assert conf.p_ranking == pytest.approx(1 / 4) and conf.n_replicates == 4
    higher = rank_confidence(values, reps, lower_is_better=False)
    assert higher.pairs[(2, 0)] == pytest.approx(conf.pairs[(0, 2)])  # the same event seen from the other side
    assert set(higher.pairs) == {(2, 1), (2, 0), (1, 0)}
    nan = rank_confidence(values, np.where(np.arange(4) == 1, np.nan, reps))
    assert nan.n_replicates == 3 and nan.p_ranking == pytest.approx(1 / 3)
    with pytest.raises(FidmedError, match="replicate rows"):
        rank_confidence(values, reps[:2])


# ------------------------------------------------------------------------------------------------ the evaluator
def test_evaluator_adds_uncertainty_without_changing_a_number(tmp_path):
    real, gen_a, gen_b = ToyDataset(60, 0), ToyDataset(50, 1, name="a"), ToyDataset(50, 2, name="b")
    common = dict(
        batch_size=8,
        device="cpu",
        metrics=["fd", "rfd", "prdc", "kid"],
        metric_options={"prdc": {"k": 3}, "kid": {"subsets": 4, "subset_size": 12}},
    )
    plain = Evaluator(_extractors(), DatasetSource(real), cache_dir=tmp_path / "c0", **common)
    want = plain.evaluate(DatasetSource(gen_a))
    ev = Evaluator(
        _extractors(), DatasetSource(real), cache_dir=tmp_path / "c1", uncertainty={"replicates": 20}, **common
    )
    got = ev.evaluate(DatasetSource(gen_a))
    assert [(r.extractor, r.metric) for r in got] == [(r.extractor, r.metric) for r in want]
    for a, b in zip(got, want):
        assert a.value == b.value or (math.isnan(a.value) and math.isnan(b.value))  # bit for bit
        assert "uncertainty" not in b.details
        u = a.details["uncertainty"]
        assert u["replicates"] == 20 and len(u["values"]) == 20 and u["resampled"] == ["generated", "real"]
        if u["available"]:
            assert u["ci_low"] <= u["ci_high"] and u["se"] >= 0
    # the same real resample for every generator of the real set; cached real features serve the second
    other = ev.evaluate(DatasetSource(gen_b))
    keys = {r.details["uncertainty"]["real_resample_key"] for r in got + other}
    assert len(keys) == 1
    ev2 = Evaluator(
        _extractors(), DatasetSource(real), cache_dir=tmp_path / "c1", uncertainty={"replicates": 20}, **common
    )
    again = ev2.evaluate(DatasetSource(gen_b))
    assert all(ev2.real_stats()[ex.name].from_cache for ex in _extractors())
    assert [r.details["uncertainty"]["values"] for r in again] == [r.details["uncertainty"]["values"] for r in other]
    # results.json, the table and the W&B summary carry it
    path = write_results_json(tmp_path / "results.json", got, {})
    rec = json.loads(path.read_text())["results"][0]
    assert rec["metric"] == "fd" and len(rec["details"]["uncertainty"]["values"]) == 20
    text = format_results_table(got)
    assert "How far each number can move" in text and "95% basic" in text and "20 replicates" in text
    summary = summary_values(got)
    assert "fd_ci_low/a [RANDOM-INIT]" in summary and "precision_se/b [RANDOM-INIT]" in summary


def test_uncertainty_and_audit_are_configured_in_the_eval_group(compose_cfg):
    from fidmed.config import compose_config

    cfg = compose_cfg(["eval.uncertainty.replicates=200", "eval.uncertainty.block_size=5", "eval.audit.enabled=true"])
    assert cfg.eval.uncertainty.replicates == 200 and cfg.eval.uncertainty.block_size == 5
    assert cfg.eval.audit.enabled and cfg.eval.audit.threshold == 0.5
    with pytest.raises(ConfigError):
        compose_config(["eval.uncertainty.replicates=abc"])

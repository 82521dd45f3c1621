"""VTT scores against hand computations: the study's published example, ties, exact KS p-values, rankings."""

from __future__ import annotations

import math
import warnings
from fractions import Fraction
from math import comb

import numpy as np
import pytest
from scipy import stats

from fidmed.analysis.scoring import (
    GENERATED,
    REAL,
    Answer,
    KSTest,
    aggregate_scores,
    criteria_from_names,
    exact_ks_pvalue,
    ks_statistic,
    rank_best_first,
    rater_scores,
    score_answers,
    score_rows_from_table,
)
from fidmed.errors import DataError


def exact_ks_p_equal_sizes(n: int, k: int) -> Fraction:
    """P(D >= k/n) for two samples of size n from one continuous distribution, by counting lattice paths from
    (0, 0) to (n, n) that stay within |i - j| < k (Gnedenko-Korolyuk); an independent route from SciPy's."""
    if k <= 0:
        return Fraction(1)
    paths = [[0] * (n + 1) for _ in range(n + 1)]
    paths[0][0] = 1
    for i in range(n + 1):
        for j in range(n + 1):
            if (i, j) == (0, 0) or abs(i - j) >= k:
                continue
            paths[i][j] = (paths[i - 1][j] if i else 0) + (paths[i][j - 1] if j else 0)
    return 1 - Fraction(paths[n][n], comb(2 * n, n))


def answers(rater, model, real, gen, modality="ct"):
    """real / gen: lists of (answer, rating) for the real and the generated images of one model."""
    out = [Answer(modality, rater, model, f"{model}-r{i}", REAL, a, float(r)) for i, (a, r) in enumerate(real)]
    out += [Answer(modality, rater, model, f"{model}-g{i}", GENERATED, a, float(r)) for i, (a, r) in enumerate(gen)]
    return out


def test_study_example_acdc_participant_1():
    # fid-med-eval additional_results/ACDC_VTT_results.PNG, participant 1, no augmentation: Pre 59, Rec 100,
    # Acc 65, FPR 70, FNR 0, t test p = .065. That is: all 10 real images called real, 7 of 10 generated ones too.
    real = [("real", 4)] * 10
    gen = [("real", 4)] * 7 + [("generated", 2)] * 3
    (s,) = score_answers(answers("p1", "noaug", real, gen))
    assert (s.tp, s.fn, s.fp, s.tn) == (10, 0, 7, 3)
    assert s.precision == 10 / 17 and round(100 * s.precision) == 59
    assert (s.recall, s.accuracy, s.fpr, s.fnr) == (1.0, 0.65, 0.7, 0.0)
    # Pooled two-sample t by hand: means 1 and 0.7, variances 0 and 0.7*0.3*10/9, df 18.
    var_gen = 7 * 0.3**2 / 9 + 3 * 0.7**2 / 9
    pooled = (9 * 0 + 9 * var_gen) / 18
    t = 0.3 / math.sqrt(pooled * (1 / 10 + 1 / 10))
    assert s.t_statistic == pytest.approx(t, rel=1e-12)
    assert s.t_pvalue == pytest.approx(2 * stats.t.sf(t, 18), rel=1e-10)
    assert round(s.t_pvalue, 3) == 0.065
    # Likert: real all 4, generated 4 x7 and 2 x3: Diff = 4 - 3.4, D = 3/10.
    assert s.diff == pytest.approx(0.6, abs=1e-15)
    assert s.ks_statistic == 0.3
    assert s.ks_pvalue == pytest.approx(float(exact_ks_p_equal_sizes(10, 3)), rel=1e-12)
    assert s.ks_method == "exact"


@pytest.mark.parametrize("k", range(11))
def test_exact_ks_pvalues_n_equals_m_equals_10(k):
    # Likert ratings with ties: real = 5 for the first k images, 3 for the rest; generated all 3. D = k/10.
    real_ratings = [5] * k + [3] * (10 - k)
    gen_ratings = [3] * 10
    d, p, method = KSTest()(np.array(real_ratings), np.array(gen_ratings))
    assert d == k / 10
    expected = exact_ks_p_equal_sizes(10, k)
    assert p == pytest.approx(float(expected), rel=1e-12, abs=0)
    assert method == "exact"
    if k == 0:
        assert p == 1.0
    if k == 10:
        assert expected == Fraction(2, comb(20, 10))


def test_ks_statistic_and_cached_pvalues_equal_scipy():
    rng = np.random.default_rng(0)
    ks = KSTest()
    for _ in range(200):
        n, m = rng.integers(3, 15, 2)
        a, b = rng.integers(1, 6, n), rng.integers(1, 6, m)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ref = stats.ks_2samp(a, b, method="exact")
        d, p, method = ks(a, b)
        assert d == pytest.approx(float(ref.statistic), abs=1e-15)
        # the lattice count agrees with SciPy wherever SciPy's exact route works
        assert exact_ks_pvalue(n, m, round(d * n * m)) == pytest.approx(p, rel=1e-10, abs=1e-15)
        if caught:  # SciPy fell back to asymptotics; fidmed counts exactly and says so
            assert method.startswith("exact (lattice count")
        else:
            assert p == float(ref.pvalue) and method == "exact"  # cache keyed by (n, m, D*n*m): SciPy's p bit for bit
    assert len(ks._cache) < 200  # and it did cache


def test_scipy_exact_failure_is_replaced_by_the_lattice_count():
    # n = m = 13, D = 1/13: SciPy's exact route overshoots 1, warns and switches to the asymptotic p. Every pair of
    # different samples has D >= 1/13, so the exact P(D >= 1/13) is 1 (by hand: only the paths with |i - j| < 1,
    # i.e. none but the diagonal, which is not a monotone path, lie inside).
    d, p, method = KSTest()(np.array([1] * 12 + [2]), np.array([1] * 13))
    assert d == 1 / 13 and p == 1.0 and method.startswith("exact (lattice count")


def test_ks_statistic_is_the_exact_fraction():
    # 1/3 computed as a fraction of integers, not 2/3 - 1/3 in floats
    assert ks_statistic(np.array([1, 2, 3]), np.array([2, 3, 4])) == 1 / 3


def test_hand_computed_scores_with_ties_and_likert_ties():
    # 4 real, 6 generated: real answers R R G R (ratings 5 4 2 4), generated R G G R G G (ratings 4 1 2 3 1 2)
    real = [("real", 5), ("real", 4), ("generated", 2), ("real", 4)]
    gen = [("real", 4), ("generated", 1), ("generated", 2), ("real", 3), ("generated", 1), ("generated", 2)]
    (s,) = score_answers(answers("r", "m", real, gen))
    assert (s.tp, s.fn, s.fp, s.tn) == (3, 1, 2, 4)
    assert s.precision == 3 / 5 and s.recall == 3 / 4 and s.accuracy == 7 / 10
    assert s.fpr == 2 / 6 and s.fnr == 1 / 4
    assert s.diff == pytest.approx(15 / 4 - 13 / 6, abs=1e-15)
    # ECDFs at 1..5: real 0, 1/4, 1/4, 3/4, 1; generated 2/6, 4/6, 5/6, 1, 1
    # -> D = max(1/3, 5/12, 7/12, 1/4, 0) = 7/12
    assert s.ks_statistic == 7 / 12
    assert s.ks_pvalue == float(stats.ks_2samp([5, 4, 2, 4], [4, 1, 2, 3, 1, 2], method="exact").pvalue)
    # t by hand on 1/0 answers: real mean 3/4 var 1/4 (ddof 1: 0.25), generated mean 1/3 var (ddof 1) 4/15
    v_real = (3 * (1 / 4) ** 2 + (3 / 4) ** 2) / 3
    v_gen = (2 * (2 / 3) ** 2 + 4 * (1 / 3) ** 2) / 5
    sp = (3 * v_real + 5 * v_gen) / 8
    t = (3 / 4 - 1 / 3) / math.sqrt(sp * (1 / 4 + 1 / 6))
    assert s.t_statistic == pytest.approx(t, rel=1e-12) and s.t_df == 8


def test_degenerate_answers_are_explicit():
    # everything called real: t undefined; precision defined; FPR = 1
    s = rater_scores(np.ones(10, bool), np.ones(10, bool), np.full(10, 3.0), np.full(10, 3.0))
    assert math.isnan(s["t_statistic"]) and math.isnan(s["t_pvalue"])
    assert "t test undefined" in s["note"]
    assert s["fpr"] == 1.0 and s["precision"] == 0.5 and s["ks_statistic"] == 0 and s["ks_pvalue"] == 1.0
    # nothing called real: precision undefined; perfect separation would be t = inf, p = 0 for the opposite
    s = rater_scores(np.zeros(10, bool), np.zeros(10, bool), np.full(10, 3.0), np.full(10, 3.0))
    assert math.isnan(s["precision"]) and "precision undefined" in s["note"]
    s = rater_scores(np.ones(10, bool), np.zeros(10, bool), np.full(10, 5.0), np.full(10, 1.0))
    assert s["t_statistic"] == math.inf and s["t_pvalue"] == 0.0 and s["note"] == ""
    assert s["ks_pvalue"] == pytest.approx(2 / comb(20, 10), rel=1e-12)


def test_rankings_with_ties_use_average_ranks():
    assert list(rank_best_first([0.7, 0.5, 0.5, 0.1], higher_is_better=True)) == [1.0, 2.5, 2.5, 4.0]
    assert list(rank_best_first([0.7, 0.5, 0.5, 0.1], higher_is_better=False)) == [4.0, 2.5, 2.5, 1.0]
    # Three raters, four models. FPR per rater (generated images called real, 4 generated images per model):
    #   m1: 2,2,2 -> mean 0.5;  m2: 4,0,2 -> 0.5;  m3: 4,4,4 -> 1.0;  m4: 0,0,1 -> 1/12
    fp_counts = {"m1": (2, 2, 2), "m2": (4, 0, 2), "m3": (4, 4, 4), "m4": (0, 0, 1)}
    rows = []
    for model, counts in fp_counts.items():
        for rater, fp in zip(("a", "b", "c"), counts):
            gen = [("real", 3)] * fp + [("generated", 3)] * (4 - fp)
            rows += answers(rater, model, [("real", 4)] * 4, gen)
    agg = {a["model"]: a for a in aggregate_scores(score_answers(rows))}
    assert [agg[m]["mean_fpr"] for m in ("m1", "m2", "m3", "m4")] == pytest.approx([0.5, 0.5, 1.0, 1 / 12])
    assert [agg[m]["rank_fpr"] for m in ("m1", "m2", "m3", "m4")] == [2.5, 2.5, 1.0, 4.0]
    assert agg["m2"]["sd_fpr"] == pytest.approx(np.std([1.0, 0.0, 0.5], ddof=1))
    # Diff = 4 - 3 = 1 for every rater and model: a four-way tie
    assert {agg[m]["rank_diff"] for m in agg} == {2.5}
    # KS: real all 4 vs generated all 3 -> D = 1, p = 2/C(8,4) for n = m = 4, below 0.05: no rater passes
    assert {agg[m]["ks_not_rejected"] for m in agg} == {0}


def test_bad_answer_sets_name_what_is_wrong():
    base = answers("a", "m", [("real", 4)] * 2, [("generated", 2)] * 2) + answers(
        "b", "m", [("real", 4)] * 2, [("generated", 2)] * 2
    )
    score_answers(base)  # fine
    with pytest.raises(DataError, match=r"duplicate answers.*rater a image m-r0"):
        score_answers(base + [base[0]])
    with pytest.raises(DataError, match=r"raters saw different image sets for model m \(ct\): rater b lacks m-g1"):
        score_answers([x for x in base if not (x.rater == "b" and x.image_id == "m-g1")])
    other = [Answer("ct", "b", "m", "m-x", GENERATED, "real", 1.0)]
    with pytest.raises(DataError, match=r"rater a lacks m-x"):
        score_answers(base + other)
    with pytest.raises(DataError, match=r"rater a, model m \(ct\): no generated images"):
        score_answers([x for x in base if not (x.rater == "a" and x.truth == GENERATED)])
    flipped = [
        Answer("ct", "b", "m", "m-r0", GENERATED, "real", 4.0) if (x.rater, x.image_id) == ("b", "m-r0") else x
        for x in base
    ]
    with pytest.raises(DataError, match=r"image m-r0: m/real vs m/generated"):
        score_answers(flipped)
    two_models = base + answers("a", "m2", [("real", 4)] * 2, [("generated", 2)] * 2)
    with pytest.raises(DataError, match=r"model m2 \(ct\) has no answers from rater\(s\) b"):
        score_answers(two_models)


# ---------------------------------------------------------------------------------------------------------------
# Equal means rank equal: per-model means are aggregated exactly (fractions), not by float summation.

# The example: five raters, 10 generated images per model; generated images called real per rater.
# m1 and m2 both have 28 of 50 generated images called real (mean FPR 14/25), but in floats
# mean(0.5, 0.7, 0.8, 0.8, 0.0) = 0.5599999999999999 and mean(0.2, 0.4, 1.0, 0.8, 0.4) = 0.56.
TIED_FP = {"m1": (5, 7, 8, 8, 0), "m2": (2, 4, 10, 8, 4), "m3": (10, 9, 9, 9, 9), "m4": (1, 1, 1, 1, 1)}


def tied_answers(fp=TIED_FP, n=10):
    """Real images all called real (rating 4); generated images rated 3 when called real, else 2."""
    rows = []
    for model, counts in fp.items():
        for rater, k in zip("abcde", counts):
            rows += answers(rater, model, [("real", 4)] * n, [("real", 3)] * k + [("generated", 2)] * (n - k))
    return rows


def test_equal_means_rank_equal_from_answers():
    agg = {
        a["model"]: a
        for a in aggregate_scores(
            score_answers(tied_answers()), criteria=criteria_from_names(["fpr", "diff", "accuracy"])
        )
    }
    # FPR: 14/25 for m1 and m2; float summation gave 0.5599999999999999 and 0.56, ranks 3 and 2
    assert agg["m1"]["mean_fpr"] == agg["m2"]["mean_fpr"] == 0.56
    assert [agg[m]["rank_fpr"] for m in ("m1", "m2", "m3", "m4")] == [2.5, 2.5, 1.0, 4.0]
    # Diff = 4 - (2 + k/10) per rater: 36/25 for both (floats: 1.44 and 1.4400000000000002)
    assert agg["m1"]["mean_diff"] == agg["m2"]["mean_diff"] == 1.44
    assert [agg[m]["rank_diff"] for m in ("m1", "m2", "m3", "m4")] == [2.5, 2.5, 1.0, 4.0]
    # accuracy = (20 - k) / 20 per rater: 18/25 for both (floats: 0.72 and 0.7200000000000001)
    assert agg["m1"]["mean_accuracy"] == agg["m2"]["mean_accuracy"] == 0.72
    assert [agg[m]["rank_accuracy"] for m in ("m1", "m2", "m3", "m4")] == [2.5, 2.5, 1.0, 4.0]
    # equal per-rater distributions also give bitwise-equal SDs
    assert agg["m1"]["sd_fpr"] == pytest.approx(np.std([0.5, 0.7, 0.8, 0.8, 0.0], ddof=1), rel=1e-14)


def test_undefined_t_test_counts_as_not_rejected():
    # Rater a on m3 and rater c on m2 call every image real: both groups constant and equal, t and p undefined (NaN).
    # That is no rejection: m3's four other raters (9 of 10 generated called real: t = 1, p = 0.33) are not rejected
    # either, so all five count; on m2 only d (8 of 10: p = 0.15) and c (undefined) are not rejected.
    scores = score_answers(tied_answers())
    undefined = [s for s in scores if math.isnan(s.t_pvalue)]
    assert [(s.rater, s.model) for s in undefined] == [("a", "m3"), ("c", "m2")]
    agg = {a["model"]: a for a in aggregate_scores(scores)}
    assert (agg["m3"]["t_not_rejected"], agg["m3"]["t_undefined"]) == (5, 1)
    assert (agg["m2"]["t_not_rejected"], agg["m2"]["t_undefined"]) == (2, 1)
    assert (agg["m4"]["t_not_rejected"], agg["m4"]["t_undefined"]) == (0, 0)


def typed_table(scale: int, fp=TIED_FP) -> list[dict[str, str]]:
    """Per-rater scores as typed into a CSV (strings), n = 10 generated images: FPR as fractions (scale 1: '0.7')
    or as percentages (scale 100: '70'), Diff likewise."""
    rows = []
    for model, counts in fp.items():
        for rater, k in zip("abcde", counts):
            fpr, diff = (f"{k / 10}", f"{(20 - k) / 10}") if scale == 1 else (f"{k * 10}", f"{(20 - k) * 10}")
            rows.append({"modality": "ct", "rater": rater, "model": model, "fpr": fpr, "diff": diff})
    return rows


@pytest.mark.parametrize("scale", [1, 100])
def test_equal_means_rank_equal_from_tables_as_fractions_or_percentages(scale):
    crits = criteria_from_names(["fpr", "diff"])
    agg = {a["model"]: a for a in aggregate_scores(score_rows_from_table(typed_table(scale)), criteria=crits)}
    assert agg["m1"]["mean_fpr"] == agg["m2"]["mean_fpr"] == {1: 0.56, 100: 56.0}[scale]
    assert [agg[m]["rank_fpr"] for m in ("m1", "m2", "m3", "m4")] == [2.5, 2.5, 1.0, 4.0]
    assert agg["m1"]["mean_diff"] == agg["m2"]["mean_diff"]
    assert [agg[m]["rank_diff"] for m in ("m1", "m2", "m3", "m4")] == [2.5, 2.5, 1.0, 4.0]


def test_scores_written_and_read_back_aggregate_exactly(tmp_path):
    # Three generated images per model: rates k/3 have no finite decimal. m1's raters call 1, 1, 1 and m2's 3, 0, 0
    # of them real: both 3 of 9. The CSV holds 0.3333333333333333 for 1/3; read back, the rates are rebuilt from
    # the denominators (n_generated), so the tie survives (the decimals alone sum to 0.9999999999999999 vs 1).
    from fidmed.analysis.scoring import RATER_SCORE_COLUMNS
    from fidmed.analysis.tabular import read_csv_rows, write_csv_rows

    rows = tied_answers({"m1": (1, 1, 1), "m2": (3, 0, 0), "m3": (2, 2, 3)}, n=3)
    scores = score_answers(rows)
    path = write_csv_rows(tmp_path / "vtt_scores.csv", [s.to_dict() for s in scores], RATER_SCORE_COLUMNS)
    back = score_rows_from_table(read_csv_rows(path))
    crits = criteria_from_names(["fpr", "diff", "accuracy", "ks_stat"])
    in_memory, read_back = aggregate_scores(scores, criteria=crits), aggregate_scores(back, criteria=crits)
    for a, b in zip(in_memory, read_back):
        for c in crits:
            assert a[f"mean_{c.column}"] == b[f"mean_{c.column}"] and a[f"rank_{c.name}"] == b[f"rank_{c.name}"]
    agg = {a["model"]: a for a in read_back}
    assert agg["m1"]["rank_fpr"] == agg["m2"]["rank_fpr"] == 2.5 and agg["m3"]["rank_fpr"] == 1.0

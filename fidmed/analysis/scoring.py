"""Visual Turing test (VTT) scores, per rater and model, as in the study (docs/vtt.md).

Each answer says whether a rater called an image "real" or "generated" and gives a Likert realism rating
(higher = more real). "Positive" means *real*, so, per rater and model, with TP = real images called real,
FN = real called generated, FP = generated called real, TN = generated called generated:

    precision = TP / (TP + FP)      recall = TP / (TP + FN)      accuracy = (TP + TN) / all
    FPR = FP / (FP + TN)  (share of generated images called real: higher = more convincing generator)
    FNR = FN / (TP + FN)

These definitions reproduce the study's per-participant tables (fid-med-eval ``additional_results``; e.g. ACDC
participant 1, no augmentation: TP = 10, FP = 7 gives Pre 59, Rec 100, Acc 65, FPR 70, FNR 0, t test p = .065).

* t test: independent two-sample t test (pooled variance, ``scipy.stats.ttest_ind`` defaults, two-sided) of the
  binary "called real" answers (1/0) for the real images against those for the generated images. When both groups
  are constant and equal (the rater gave one answer to everything) t and p are undefined: NaN, with a note.
* Diff = mean Likert(real images) - mean Likert(generated images); lower = generated images look as real.
* KS: two-sample Kolmogorov-Smirnov test of the Likert ratings (real vs generated), two-sided, exact p-values
  (``scipy.stats.ks_2samp(method='exact')``, what the study's ``stats.kstest`` call selects for n = m = 10);
  the asymptotic p only when a sample exceeds 10,000 ratings, as SciPy's 'auto' does. Note that the exact
  p-value assumes continuous data; with tied Likert ratings it is conservative, as in the study.

Per-model human scores are means over raters, computed exactly (``fractions.Fraction``) and only then rounded to a
float: a float sum makes 0.5599999999999999 of mean(0.5, 0.7, 0.8, 0.8, 0) and 0.56 of mean(0.2, 0.4, 1, 0.8, 0.4),
and would rank two equal means apart. Each rater's value is taken exactly (``exact_rater_value``): rates, D and Diff
are fractions with known denominators (n_generated, n_real, n_real * n_generated; Diff because Likert ratings are
integers), rebuilt from the row's float or typed decimal; any other score is the decimal it was typed as, or the
decimal fidmed writes for it. So answers, fidmed's own ``vtt_scores.csv`` read back, and tables typed as fractions
(0.56) or as percentages (56) give equal means where the means are equal.

Rankings put the most convincing model first (rank 1) and give tied values their average rank, comparing the exact
means, so two models tied for first both get 1.5; wherever fidmed displays a rank, ``=`` after it marks a tie
(``2.5=``). Which summary the study ranked by "KS" is not stated; fidmed's ``ks`` criterion is the mean KS p-value
(higher = harder to tell apart; for fixed n and m the exact p is a decreasing function of D), ``ks_stat`` the mean D.
An undefined t test (NaN: the rater gave one answer to everything) rejects nothing: it counts as not rejected.
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from fractions import Fraction
from typing import Any

import numpy as np
from scipy import stats

from fidmed.analysis.tabular import format_list, parse_exact, parse_float
from fidmed.errors import DataError, FidmedError

REAL = "real"
GENERATED = "generated"
TRUTHS = (REAL, GENERATED)
ANSWER_COLUMNS = ("modality", "rater", "model", "image_id", "truth", "answer", "rating")
KS_EXACT_MAX_N = 10_000  # SciPy's 'auto' switches from exact to asymptotic p-values above this sample size


@dataclass(frozen=True)
class Answer:
    """One rater's verdict on one image."""

    modality: str
    rater: str
    model: str
    image_id: str
    truth: str  # 'real' | 'generated': what the image is
    answer: str  # 'real' | 'generated': what the rater said
    rating: float  # Likert realism rating, higher = more real

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if float(self.rating).is_integer():
            d["rating"] = int(self.rating)
        return d


@dataclass(frozen=True)
class Criterion:
    """A per-model human score used to rank models: the mean over raters of ``column``."""

    name: str
    column: str
    higher_is_better: bool
    description: str


CRITERIA: dict[str, Criterion] = {
    c.name: c
    for c in (
        Criterion("fpr", "fpr", True, "mean FPR: share of generated images called real (higher = more convincing)"),
        Criterion("diff", "diff", False, "mean Diff = mean Likert(real) - mean Likert(generated) (lower = better)"),
        Criterion(
            "ks",
            "ks_pvalue",
            True,
            "mean exact KS p-value of the Likert ratings, real vs generated (higher = harder to tell apart)",
        ),
        Criterion("ks_stat", "ks_statistic", False, "mean KS statistic D of the Likert ratings (lower = better)"),
        Criterion("accuracy", "accuracy", False, "mean accuracy of the real/generated answers (lower = better)"),
    )
}
DEFAULT_CRITERIA = ("ks", "diff", "fpr")


def criteria_from_names(names: Iterable[str]) -> list[Criterion]:
    out = []
    for name in names:
        if name not in CRITERIA:
            raise FidmedError(f"unknown human criterion {name!r}; choose from {', '.join(CRITERIA)}.")
        out.append(CRITERIA[name])
    return out


@dataclass
class RaterScore:
    """The study's per-rater, per-model row."""

    modality: str
    rater: str
    model: str
    n_real: int
    n_generated: int
    tp: int
    fn: int
    fp: int
    tn: int
    precision: float
    recall: float
    accuracy: float
    fpr: float
    fnr: float
    t_statistic: float
    t_pvalue: float
    t_df: float
    mean_rating_real: float
    mean_rating_generated: float
    diff: float
    ks_statistic: float
    ks_pvalue: float
    ks_method: str
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


RATER_SCORE_COLUMNS = tuple(f.name for f in fields(RaterScore))


# ---------------------------------------------------------------------------------------------------------------
# The statistics on arrays (also used by the bootstrap in fidmed.analysis.alignment)


def ks_statistic(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sided two-sample KS statistic D = max |F_a - F_b| over the pooled values.

    Computed in integers, D = max |i m - j n| / (n m), so D is the correctly rounded value of the exact fraction
    (SciPy subtracts floats and may differ in the last bit, e.g. 0.33333333333333337 for 1/3)."""
    a = np.sort(np.asarray(a, dtype=np.float64))
    b = np.sort(np.asarray(b, dtype=np.float64))
    n, m = len(a), len(b)
    pooled = np.concatenate([a, b])
    count_a = np.searchsorted(a, pooled, side="right").astype(np.int64)
    count_b = np.searchsorted(b, pooled, side="right").astype(np.int64)
    return int(np.max(np.abs(count_a * m - count_b * n))) / (n * m)


def exact_ks_pvalue(n: int, m: int, h: int) -> float:
    """Exact two-sided P(D >= h / (n m)) under H0 (continuous data) by counting lattice paths from (0, 0) to
    (n, m) that keep |i m - j n| < h, in Python integers (no rounding until the final division)."""
    if h <= 0:
        return 1.0
    row = [1 if abs(j * n) < h else 0 for j in range(m + 1)]  # i = 0
    for j in range(1, m + 1):
        row[j] = row[j - 1] if row[j] else 0
    for i in range(1, n + 1):
        new = [0] * (m + 1)
        for j in range(m + 1):
            if abs(i * m - j * n) < h:
                new[j] = row[j] + (new[j - 1] if j else 0)
        row = new
    total = math.comb(n + m, n)
    return (total - row[m]) / total


@dataclass
class KSTest:
    """Two-sided two-sample KS test with SciPy's p-values, cached.

    SciPy's exact p-value depends only on (n, m, D), and D * n * m is an integer, so p-values are cached under
    that key: the bootstrap calls this thousands of times with few distinct D. Where SciPy's exact computation
    fails (it then warns and silently switches to the asymptotic p; e.g. n = m = 13, D = 1/13) fidmed counts the
    lattice paths exactly instead (``exact_ks_pvalue``, up to n * m = 250,000) and says so in ``ks_method``.
    """

    _cache: dict[tuple[int, int, int], tuple[float, str]] = field(default_factory=dict)

    def __call__(self, a: np.ndarray, b: np.ndarray) -> tuple[float, float, str]:
        n, m = len(a), len(b)
        d = ks_statistic(a, b)
        key = (n, m, int(round(d * n * m)))
        if key not in self._cache:
            method = "exact" if max(n, m) <= KS_EXACT_MAX_N else "asymp"
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", RuntimeWarning)
                res = stats.ks_2samp(a, b, alternative="two-sided", method=method)
            if not math.isclose(float(res.statistic), d, rel_tol=0, abs_tol=1e-12):
                raise AssertionError(f"KS statistic mismatch: SciPy {res.statistic} vs {d}")
            p = float(res.pvalue)
            if method == "exact" and any("Exact calculation unsuccessful" in str(w.message) for w in caught):
                if n * m <= 250_000:
                    p, method = exact_ks_pvalue(n, m, key[2]), "exact (lattice count; SciPy's exact failed)"
                else:
                    method = "asymp (SciPy's exact failed)"
            self._cache[key] = (p, method)
        p, method = self._cache[key]
        return d, p, method


def binary_t_test(real_called_real: np.ndarray, gen_called_real: np.ndarray) -> tuple[float, float, float, str]:
    """Pooled-variance t test of the 1/0 "called real" answers: (t, p, df, note)."""
    x = np.asarray(real_called_real, dtype=np.float64)
    y = np.asarray(gen_called_real, dtype=np.float64)
    df = float(len(x) + len(y) - 2)
    if df < 1:
        return math.nan, math.nan, df, "t test undefined: fewer than 3 images"
    if np.all(x == x[0]) and np.all(y == y[0]):  # no variance at all: decide without SciPy's precision warnings
        if x[0] == y[0]:
            return math.nan, math.nan, df, "t test undefined: the same answer for every image"
        t = math.inf if x[0] > y[0] else -math.inf
        return t, 0.0, df, ""
    with warnings.catch_warnings():  # one constant group makes SciPy warn about precision; the result is exact
        warnings.simplefilter("ignore", RuntimeWarning)
        res = stats.ttest_ind(x, y, equal_var=True, alternative="two-sided")
    return float(res.statistic), float(res.pvalue), df, ""


def _ratio(num: int, den: int) -> float:
    return num / den if den else math.nan


def exact_mean(values: np.ndarray) -> Fraction:
    """The mean of numbers (ratings) as an exact fraction: integers summed as integers, any other value taken as the
    decimal of its shortest repr (the decimal it was typed as)."""
    v = np.asarray(values, dtype=np.float64)
    if len(v) == 0:
        raise FidmedError("the mean of no values")
    if np.all(v == np.round(v)) and float(np.abs(v).sum()) < 2.0**53:  # integers: the float sum is exact
        return Fraction(int(v.sum()), len(v))
    return sum((Fraction(repr(float(x))) for x in v), Fraction(0)) / len(v)


def rater_scores(
    real_called_real: np.ndarray,
    gen_called_real: np.ndarray,
    real_ratings: np.ndarray,
    gen_ratings: np.ndarray,
    ks: KSTest | None = None,
) -> dict[str, Any]:
    """The study's scores from one rater's answers on one model's real and generated images."""
    real_called_real = np.asarray(real_called_real, dtype=bool)
    gen_called_real = np.asarray(gen_called_real, dtype=bool)
    tp = int(real_called_real.sum())
    fn = int(len(real_called_real) - tp)
    fp = int(gen_called_real.sum())
    tn = int(len(gen_called_real) - fp)
    notes = []
    if tp + fp == 0:
        notes.append("precision undefined: no image called real")
    t, p, df, t_note = binary_t_test(real_called_real, gen_called_real)
    if t_note:
        notes.append(t_note)
    real_ratings = np.asarray(real_ratings, dtype=np.float64)
    gen_ratings = np.asarray(gen_ratings, dtype=np.float64)
    d, ks_p, ks_method = (ks or KSTest())(real_ratings, gen_ratings)
    exact_real, exact_gen = exact_mean(real_ratings), exact_mean(gen_ratings)
    mean_real, mean_gen = float(exact_real), float(exact_gen)
    return dict(
        n_real=len(real_called_real),
        n_generated=len(gen_called_real),
        tp=tp,
        fn=fn,
        fp=fp,
        tn=tn,
        precision=_ratio(tp, tp + fp),
        recall=_ratio(tp, tp + fn),
        accuracy=_ratio(tp + tn, tp + fn + fp + tn),
        fpr=_ratio(fp, fp + tn),
        fnr=_ratio(fn, tp + fn),
        t_statistic=t,
        t_pvalue=p,
        t_df=df,
        mean_rating_real=mean_real,
        mean_rating_generated=mean_gen,
        diff=float(exact_real - exact_gen),
        ks_statistic=d,
        ks_pvalue=ks_p,
        ks_method=ks_method,
        note="; ".join(notes),
    )


# ---------------------------------------------------------------------------------------------------------------
# Answers: validation and scoring


def answers_from_rows(rows: Sequence[Mapping[str, Any]], source: str = "answers") -> list[Answer]:
    """Answers from a long table (columns ``ANSWER_COLUMNS``); checks values, not yet consistency."""
    out = []
    for i, row in enumerate(rows, start=2):  # line 1 is the header
        where = f"{source} line {i}"
        missing = [c for c in ANSWER_COLUMNS if c not in row]
        if missing:
            raise DataError(f"{source} lacks the column(s) {', '.join(missing)}.")
        values = {c: str(row[c]).strip() for c in ANSWER_COLUMNS if c != "rating"}
        empty = [c for c, v in values.items() if v == "" and c != "modality"]
        if empty:
            raise DataError(
                f"{where}: empty {', '.join(empty)}; every answer needs a rater, model, image_id, truth and answer."
            )
        for col in ("truth", "answer"):
            values[col] = values[col].lower()
            if values[col] not in TRUTHS:
                raise DataError(f"{where}: {col} is {row[col]!r}; use 'real' or 'generated'.")
        rating = parse_float(row["rating"], f"{where} column rating")
        out.append(Answer(rating=rating, **values))
    return out


def check_answers(answers: Sequence[Answer]) -> None:
    """Raise DataError naming exactly what is wrong: duplicates, inconsistent images, empty groups, and raters who
    did not see the same images of a model."""
    if not answers:
        raise DataError(
            "no answers to score; pass the raters' downloaded answer CSVs and the key file "
            "(vtt/<name>.key.json from `fidmed vtt make`)."
        )
    seen: dict[tuple[str, str, str], int] = defaultdict(int)
    for a in answers:
        seen[(a.modality, a.rater, a.image_id)] += 1
    dups = [f"rater {r} image {i}" + (f" ({m})" if m else "") + f" x{n}" for (m, r, i), n in seen.items() if n > 1]
    if dups:
        raise DataError(
            f"duplicate answers (each rater answers each image once): {format_list(dups)}. Remove "
            f"the extra rows or pass each answer file once."
        )
    image_info: dict[tuple[str, str], tuple[str, str]] = {}
    conflicts = []
    for a in answers:
        info = image_info.setdefault((a.modality, a.image_id), (a.model, a.truth))
        if info != (a.model, a.truth):
            conflicts.append(f"image {a.image_id}: {info[0]}/{info[1]} vs {a.model}/{a.truth} (rater {a.rater})")
    if conflicts:
        raise DataError(f"the same image has different models or truths in different rows: {format_list(conflicts)}.")
    groups: dict[tuple[str, str], dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    truths: dict[tuple[str, str, str], set[str]] = defaultdict(set)
    for a in answers:
        groups[(a.modality, a.model)][a.rater].add(a.image_id)
        truths[(a.modality, a.model, a.rater)].add(a.truth)
    lacking = [
        f"rater {r}, model {mo}" + (f" ({m})" if m else "") + f": no {t} images"
        for (m, mo, r), ts in truths.items()
        for t in TRUTHS
        if t not in ts
    ]
    if lacking:
        raise DataError(
            f"every rater needs real and generated images of every model they scored: {format_list(lacking)}."
        )
    raters_by_modality: dict[str, set[str]] = defaultdict(set)
    for (m, _), by_rater in groups.items():
        raters_by_modality[m].update(by_rater)
    for (m, model), by_rater in sorted(groups.items()):
        absent = sorted(raters_by_modality[m] - set(by_rater))
        if absent:
            raise DataError(
                f"model {model}" + (f" ({m})" if m else "") + f" has no answers from rater(s) "
                f"{', '.join(absent)}, who answered other models; every rater must score every model."
            )
        union = set().union(*by_rater.values())
        diffs = [
            f"rater {r} lacks {format_list(sorted(union - ims), 6)}"
            for r, ims in sorted(by_rater.items())
            if ims != union
        ]
        if diffs:
            raise DataError(
                f"raters saw different image sets for model {model}"
                + (f" ({m})" if m else "")
                + f": {'; '.join(diffs)}. Every rater must answer the same images of a model "
                f"(fidmed vtt make gives them the same images in different orders)."
            )


def score_answers(answers: Sequence[Answer], ks: KSTest | None = None) -> list[RaterScore]:
    """Validated answers -> one :class:`RaterScore` per (modality, rater, model), sorted by those keys."""
    check_answers(answers)
    ks = ks or KSTest()
    groups: dict[tuple[str, str, str], list[Answer]] = defaultdict(list)
    for a in answers:
        groups[(a.modality, a.rater, a.model)].append(a)
    out = []
    for (modality, rater, model), items in sorted(groups.items()):
        items = sorted(items, key=lambda a: a.image_id)
        real = [a for a in items if a.truth == REAL]
        gen = [a for a in items if a.truth == GENERATED]
        s = rater_scores(
            np.array([a.answer == REAL for a in real]),
            np.array([a.answer == REAL for a in gen]),
            np.array([a.rating for a in real]),
            np.array([a.rating for a in gen]),
            ks,
        )
        out.append(RaterScore(modality=modality, rater=rater, model=model, **s))
    return out


# ---------------------------------------------------------------------------------------------------------------
# Exact per-rater values, per-model aggregates and rankings

AGGREGATED = ("precision", "recall", "accuracy", "fpr", "fnr", "diff", "ks_statistic", "ks_pvalue", "t_pvalue")
COUNT_COLUMNS = ("n_real", "n_generated", "tp", "fn", "fp", "tn")
EXACT_COLUMNS = AGGREGATED + COUNT_COLUMNS  # read from tables as exact fractions
# A value "on a grid" of 1/q is rebuilt as that fraction when its float or decimal lies within this relative distance
# of it: far above float rounding (~1e-16), far below the spacing of values off the grid (Diff from ratings with
# decimals: 1/(q 10^d)).
_GRID_TOLERANCE = Fraction(1, 10**12)


def exact_number(value: Any) -> Fraction | None:
    """The exact number a score stands for; None when it is undefined (NaN or None).

    A Fraction or integer is itself, text is read exactly (``parse_exact``: '0.56' is 14/25), and a float is the
    decimal of its shortest repr: the decimal it was typed as, and the one fidmed writes to CSV, so that a score
    computed here and the same score read back from fidmed's table are the same number."""
    if value is None or (isinstance(value, (float, np.floating)) and math.isnan(value)):
        return None
    if isinstance(value, str) and value.strip().lower() == "nan":
        return None
    if isinstance(value, np.integer):
        value = int(value)
    elif isinstance(value, np.floating):
        value = float(value)
    return parse_exact(value, "a score")


def on_grid(value: Fraction, q: int) -> Fraction:
    """``value`` as the fraction k/q nearest to it when it lies within rounding of it (a float or a decimal written
    for k/q), else ``value`` unchanged."""
    k = round(value * q)
    candidate = Fraction(k, q)
    return candidate if abs(value - candidate) <= _GRID_TOLERANCE * max(1, abs(value)) else value


def _whole(row: Mapping[str, Any], name: str) -> int | None:
    """A non-negative integer field (a count) of a row, or None when absent or not a whole number."""
    if name not in row:
        return None
    try:
        v = exact_number(row[name])
    except DataError:
        return None
    return int(v) if v is not None and v.denominator == 1 and v >= 0 else None


def _denominator(row: Mapping[str, Any], column: str) -> int | None:
    """The q with value = k/q for integer k, when the row has the counts that say it."""
    tp, fn, fp, tn = (_whole(row, c) for c in ("tp", "fn", "fp", "tn"))
    n_real = _whole(row, "n_real")
    n_gen = _whole(row, "n_generated")
    if n_real is None and tp is not None and fn is not None:
        n_real = tp + fn
    if n_gen is None and fp is not None and tn is not None:
        n_gen = fp + tn
    q = {
        "fpr": n_gen,
        "fnr": n_real,
        "recall": n_real,
        "accuracy": n_real + n_gen if n_real is not None and n_gen is not None else None,
        "precision": tp + fp if tp is not None and fp is not None else None,
        "diff": n_real * n_gen if n_real is not None and n_gen is not None else None,  # integer Likert ratings
        "ks_statistic": n_real * n_gen if n_real is not None and n_gen is not None else None,
    }.get(column)
    return q if q else None


def exact_rater_value(row: Mapping[str, Any], column: str) -> Fraction | None:
    """One rater's score ``column`` (a :class:`RaterScore` dict or a parsed table row) as an exact fraction; None
    when undefined.

    Rates are k/q with q = n_generated (FPR), n_real (recall, FNR), n_real + n_generated (accuracy) or TP + FP
    (precision); D and Diff are k/(n_real n_generated) (Diff for integer ratings); where the row has those counts
    (fidmed's tables do) the value is rebuilt as that fraction (``on_grid``). Otherwise, and for p-values, the value
    is the decimal it was typed or written as (``exact_number``)."""
    value = exact_number(row[column])
    if value is None:
        return None
    q = _denominator(row, column)
    return on_grid(value, q) if q else value


def exact_average(values: Sequence[Fraction | None]) -> Fraction | None:
    """The exact mean; None when any value is undefined (or there are none)."""
    if not values or any(v is None for v in values):
        return None
    return sum(values, Fraction(0)) / len(values)


def _comparable(value: Any) -> Any:
    """None for undefined values (None, NaN), else a number that compares exactly with the others."""
    if value is None:
        return None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return None if math.isnan(value) else float(value)
    return value


def average_ranks(values: Sequence[Any]) -> np.ndarray:
    """Ascending ranks from 1, tied values sharing their average rank, compared exactly: numbers of any kind (int,
    float, Fraction; a Fraction equals a float only when their values are equal). None and NaN stay NaN."""
    keyed = sorted((v, i) for i, v in ((i, _comparable(v)) for i, v in enumerate(values)) if v is not None)
    ranks = np.full(len(values), np.nan)
    start = 0
    while start < len(keyed):
        end = start + 1
        while end < len(keyed) and keyed[end][0] == keyed[start][0]:
            end += 1
        for _, i in keyed[start:end]:
            ranks[i] = (start + 1 + end) / 2  # the mean of the positions start + 1 .. end
        start = end
    return ranks


def rank_best_first(values: Sequence[Any], higher_is_better: bool) -> np.ndarray:
    """Rank 1 = best; ties get their average rank, found by exact comparison (pass exact means: Fractions);
    undefined values (None, NaN) stay NaN."""
    keys = [_comparable(v) for v in values]
    return average_ranks([-v if higher_is_better and v is not None else v for v in keys])


def tied(ranks: Sequence[float]) -> list[bool]:
    """Whether each rank is shared with another (a tie); NaN ranks are not."""
    return [sum(1 for s in ranks if s == r) > 1 for r in ranks]


def score_rows_from_table(rows: Sequence[Mapping[str, Any]], source: str = "scores") -> list[dict[str, Any]]:
    """Per-rater score rows read from a CSV (typed by hand, or written by ``fidmed vtt score``): numbers parsed
    exactly, as fractions of the decimals written ('0.56' is 14/25, '56' is 56; ``parse_exact``); 'nan' is NaN.
    Rates may be fractions or percentages, consistently within a column (means and ranks do not depend on which).

    Needs modality, rater, model and at least one criterion column (fpr, diff, ks_pvalue, ...). Columns other than
    the scores and counts (t_statistic, t_df, mean ratings) are floats."""
    for col in ("modality", "rater", "model"):
        if rows and col not in rows[0]:
            raise DataError(f"{source} lacks the column {col}.")
    numeric = [
        c
        for c in RATER_SCORE_COLUMNS
        if rows and c in rows[0] and c not in ("modality", "rater", "model", "ks_method", "note")
    ]
    if not any(c.column in numeric for c in CRITERIA.values()):
        raise DataError(f"{source} has none of the score columns {', '.join(c.column for c in CRITERIA.values())}.")
    out, seen = [], set()
    for i, row in enumerate(rows, start=2):
        key = (row["modality"], row["rater"], row["model"])
        if key in seen:
            raise DataError(
                f"{source} line {i}: a second row for modality {key[0]!r}, rater {key[1]!r}, model "
                f"{key[2]!r}; each rater scores each model once."
            )
        seen.add(key)
        rec: dict[str, Any] = {"modality": row["modality"], "rater": row["rater"], "model": row["model"]}
        for c in numeric:
            text = str(row[c]).strip().lower()
            parse = parse_exact if c in EXACT_COLUMNS else parse_float  # t_statistic may be inf
            rec[c] = math.nan if text == "nan" else parse(row[c], f"{source} line {i} column {c}")
        out.append(rec)
    return out


def check_score_rows(rows: Sequence[Mapping[str, Any]], source: str = "scores") -> None:
    """Every rater of a modality scored every model of it."""
    by_modality: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    for r in rows:
        by_modality[r["modality"]][r["model"]].add(r["rater"])
    for m, by_model in by_modality.items():
        raters = set().union(*by_model.values())
        gaps = [
            f"model {model} lacks rater(s) {', '.join(sorted(raters - rs))}"
            for model, rs in sorted(by_model.items())
            if rs != raters
        ]
        if gaps:
            raise DataError(f"{source}, modality {m!r}: {'; '.join(gaps)}. Every rater must score every model.")


def _sd(values: Sequence[Fraction | None], mean: Fraction | None) -> float:
    """SD (ddof 1) from the exact values: equal sets of values give bitwise-equal SDs."""
    if mean is None or len(values) < 2:
        return math.nan
    return math.sqrt(sum(((v - mean) ** 2 for v in values), Fraction(0)) / (len(values) - 1))


def aggregate_scores(
    scores: Sequence[RaterScore | Mapping[str, Any]], alpha: float = 0.05, criteria: Sequence[Criterion] | None = None
) -> list[dict[str, Any]]:
    """Per (modality, model): number of raters, mean and SD (ddof 1) over raters of each score, how many raters'
    KS and t tests did not reject at ``alpha`` (the study's grey boxes), and per-modality ranks by each criterion.

    Means are exact (the mean of the raters' ``exact_rater_value`` as a fraction), rounded to a float once, and the
    ranks compare the exact means: equal means get equal floats and share their average rank. A mean is NaN when any
    rater's value is undefined (e.g. precision when nothing was called real). An undefined t test (p NaN: one
    answer to every image) counts as not rejected; ``t_undefined`` says how many there were."""
    criteria = list(criteria or CRITERIA.values())
    rows = [s.to_dict() if isinstance(s, RaterScore) else dict(s) for s in scores]
    check_score_rows(rows)
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[(r["modality"], r["model"])].append(r)
    out = []
    exact: list[dict[str, Fraction | None]] = []
    for (modality, model), items in sorted(groups.items()):
        agg: dict[str, Any] = {"modality": modality, "model": model, "n_raters": len(items)}
        means: dict[str, Fraction | None] = {}
        for col in AGGREGATED:
            if col not in items[0]:
                continue
            values = [exact_rater_value(i, col) for i in items]
            means[col] = exact_average(values)
            agg[f"mean_{col}"] = float(means[col]) if means[col] is not None else math.nan
            agg[f"sd_{col}"] = _sd(values, means[col])
        if "ks_pvalue" in items[0]:
            agg["ks_not_rejected"] = int(sum(float(i["ks_pvalue"]) > alpha for i in items))
        if "t_pvalue" in items[0]:
            p = [float(i["t_pvalue"]) for i in items]
            agg["t_not_rejected"] = int(sum(math.isnan(v) or v > alpha for v in p))
            agg["t_undefined"] = int(sum(math.isnan(v) for v in p))
        out.append(agg)
        exact.append(means)
    by_modality: dict[str, list[tuple[dict[str, Any], dict[str, Fraction | None]]]] = defaultdict(list)
    for agg, means in zip(out, exact):
        by_modality[agg["modality"]].append((agg, means))
    for items in by_modality.values():
        for c in criteria:
            if c.column not in items[0][1]:
                continue
            ranks = rank_best_first([means[c.column] for _, means in items], c.higher_is_better)
            for (agg, _), rank in zip(items, ranks):
                agg[f"rank_{c.name}"] = float(rank)
    return out


def human_scores(aggregates: Sequence[Mapping[str, Any]], criterion: Criterion) -> dict[tuple[str, str], float]:
    """(modality, model) -> the criterion's per-model value (mean over raters)."""
    return {(a["modality"], a["model"]): float(a[f"mean_{criterion.column}"]) for a in aggregates}

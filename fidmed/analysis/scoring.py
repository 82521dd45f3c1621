"""Visual Turing test (VTT) scores, per rater and model, as in the study (REFERENCE.md section 6).

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

Per-model human scores are means over raters. Rankings put the most convincing model first (rank 1) and give tied
values their average rank (``scipy.stats.rankdata(method='average')``), so two models tied for first both get 1.5.
Which summary the study ranked by "KS" is not stated; fidmed's ``ks`` criterion is the mean KS p-value (higher =
harder to tell apart; for fixed n and m the exact p is a decreasing function of D), ``ks_stat`` the mean D.
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from scipy import stats

from fidmed.analysis.tabular import format_list, parse_float
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


CRITERIA: dict[str, Criterion] = {c.name: c for c in (
    Criterion("fpr", "fpr", True, "mean FPR: share of generated images called real (higher = more convincing)"),
    Criterion("diff", "diff", False, "mean Diff = mean Likert(real) - mean Likert(generated) (lower = better)"),
    Criterion("ks", "ks_pvalue", True, "mean exact KS p-value of the Likert ratings, real vs generated "
                                       "(higher = harder to tell apart)"),
    Criterion("ks_stat", "ks_statistic", False, "mean KS statistic D of the Likert ratings (lower = better)"),
    Criterion("accuracy", "accuracy", False, "mean accuracy of the real/generated answers (lower = better)"),
)}
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


def rater_scores(real_called_real: np.ndarray, gen_called_real: np.ndarray, real_ratings: np.ndarray,
                 gen_ratings: np.ndarray, ks: KSTest | None = None) -> dict[str, Any]:
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
    mean_real, mean_gen = float(real_ratings.mean()), float(gen_ratings.mean())
    return dict(n_real=len(real_called_real), n_generated=len(gen_called_real), tp=tp, fn=fn, fp=fp, tn=tn,
                precision=_ratio(tp, tp + fp), recall=_ratio(tp, tp + fn),
                accuracy=_ratio(tp + tn, tp + fn + fp + tn), fpr=_ratio(fp, fp + tn), fnr=_ratio(fn, tp + fn),
                t_statistic=t, t_pvalue=p, t_df=df, mean_rating_real=mean_real, mean_rating_generated=mean_gen,
                diff=mean_real - mean_gen, ks_statistic=d, ks_pvalue=ks_p, ks_method=ks_method,
                note="; ".join(notes))


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
            raise DataError(f"{where}: empty {', '.join(empty)}; every answer needs a rater, model, image_id, "
                            f"truth and answer.")
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
        raise DataError("no answers to score.")
    seen: dict[tuple[str, str, str], int] = defaultdict(int)
    for a in answers:
        seen[(a.modality, a.rater, a.image_id)] += 1
    dups = [f"rater {r} image {i}" + (f" ({m})" if m else "") + f" x{n}" for (m, r, i), n in seen.items() if n > 1]
    if dups:
        raise DataError(f"duplicate answers (each rater answers each image once): {format_list(dups)}. Remove "
                        f"the extra rows or pass each answer file once.")
    image_info: dict[tuple[str, str], tuple[str, str]] = {}
    conflicts = []
    for a in answers:
        info = image_info.setdefault((a.modality, a.image_id), (a.model, a.truth))
        if info != (a.model, a.truth):
            conflicts.append(f"image {a.image_id}: {info[0]}/{info[1]} vs {a.model}/{a.truth} (rater {a.rater})")
    if conflicts:
        raise DataError(f"the same image has different models or truths in different rows: "
                        f"{format_list(conflicts)}.")
    groups: dict[tuple[str, str], dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    truths: dict[tuple[str, str, str], set[str]] = defaultdict(set)
    for a in answers:
        groups[(a.modality, a.model)][a.rater].add(a.image_id)
        truths[(a.modality, a.model, a.rater)].add(a.truth)
    lacking = [f"rater {r}, model {mo}" + (f" ({m})" if m else "") + f": no {t} images"
               for (m, mo, r), ts in truths.items() for t in TRUTHS if t not in ts]
    if lacking:
        raise DataError(f"every rater needs real and generated images of every model they scored: "
                        f"{format_list(lacking)}.")
    raters_by_modality: dict[str, set[str]] = defaultdict(set)
    for (m, _), by_rater in groups.items():
        raters_by_modality[m].update(by_rater)
    for (m, model), by_rater in sorted(groups.items()):
        absent = sorted(raters_by_modality[m] - set(by_rater))
        if absent:
            raise DataError(f"model {model}" + (f" ({m})" if m else "") + f" has no answers from rater(s) "
                            f"{', '.join(absent)}, who answered other models; every rater must score every model.")
        union = set().union(*by_rater.values())
        diffs = [f"rater {r} lacks {format_list(sorted(union - ims), 6)}"
                 for r, ims in sorted(by_rater.items()) if ims != union]
        if diffs:
            raise DataError(f"raters saw different image sets for model {model}" + (f" ({m})" if m else "")
                            + f": {'; '.join(diffs)}. Every rater must answer the same images of a model "
                              f"(fidmed vtt make gives them the same images in different orders).")


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
        s = rater_scores(np.array([a.answer == REAL for a in real]), np.array([a.answer == REAL for a in gen]),
                         np.array([a.rating for a in real]), np.array([a.rating for a in gen]), ks)
        out.append(RaterScore(modality=modality, rater=rater, model=model, **s))
    return out


# ---------------------------------------------------------------------------------------------------------------
# Per-model aggregates and rankings

AGGREGATED = ("precision", "recall", "accuracy", "fpr", "fnr", "diff", "ks_statistic", "ks_pvalue", "t_pvalue")


def rank_best_first(values: Sequence[float], higher_is_better: bool) -> np.ndarray:
    """Rank 1 = best; ties get their average rank (scipy.stats.rankdata 'average'); NaN stays NaN."""
    v = np.asarray(values, dtype=np.float64)
    return stats.rankdata(-v if higher_is_better else v, method="average", nan_policy="omit")


def score_rows_from_table(rows: Sequence[Mapping[str, Any]], source: str = "scores") -> list[dict[str, Any]]:
    """Per-rater score rows read from a CSV (typed by hand, or written by ``fidmed vtt score``): numbers parsed.

    Needs modality, rater, model and at least one criterion column (fpr, diff, ks_pvalue, ...)."""
    for col in ("modality", "rater", "model"):
        if rows and col not in rows[0]:
            raise DataError(f"{source} lacks the column {col}.")
    numeric = [c for c in RATER_SCORE_COLUMNS if rows and c in rows[0] and c not in
               ("modality", "rater", "model", "ks_method", "note")]
    if not any(c.column in numeric for c in CRITERIA.values()):
        raise DataError(f"{source} has none of the score columns {', '.join(c.column for c in CRITERIA.values())}.")
    out, seen = [], set()
    for i, row in enumerate(rows, start=2):
        key = (row["modality"], row["rater"], row["model"])
        if key in seen:
            raise DataError(f"{source} line {i}: a second row for modality {key[0]!r}, rater {key[1]!r}, model "
                            f"{key[2]!r}; each rater scores each model once.")
        seen.add(key)
        rec: dict[str, Any] = {"modality": row["modality"], "rater": row["rater"], "model": row["model"]}
        for c in numeric:
            text = str(row[c]).strip().lower()
            rec[c] = math.nan if text == "nan" else parse_float(row[c], f"{source} line {i} column {c}")
        out.append(rec)
    return out


def check_score_rows(rows: Sequence[Mapping[str, Any]], source: str = "scores") -> None:
    """Every rater of a modality scored every model of it."""
    by_modality: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    for r in rows:
        by_modality[r["modality"]][r["model"]].add(r["rater"])
    for m, by_model in by_modality.items():
        raters = set().union(*by_model.values())
        gaps = [f"model {model} lacks rater(s) {', '.join(sorted(raters - rs))}"
                for model, rs in sorted(by_model.items()) if rs != raters]
        if gaps:
            raise DataError(f"{source}, modality {m!r}: {'; '.join(gaps)}. Every rater must score every model.")


def aggregate_scores(scores: Sequence[RaterScore | Mapping[str, Any]], alpha: float = 0.05,
                     criteria: Sequence[Criterion] | None = None) -> list[dict[str, Any]]:
    """Per (modality, model): number of raters, mean and SD (ddof 1) over raters of each score, how many raters'
    KS and t tests did not reject at ``alpha`` (the study's grey boxes), and per-modality ranks by each criterion.

    A mean is NaN when any rater's value is undefined (e.g. precision when nothing was called real)."""
    criteria = list(criteria or CRITERIA.values())
    rows = [s.to_dict() if isinstance(s, RaterScore) else dict(s) for s in scores]
    check_score_rows(rows)
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[(r["modality"], r["model"])].append(r)
    out = []
    for (modality, model), items in sorted(groups.items()):
        agg: dict[str, Any] = {"modality": modality, "model": model, "n_raters": len(items)}
        for col in AGGREGATED:
            if col not in items[0]:
                continue
            v = np.array([float(i[col]) for i in items])
            agg[f"mean_{col}"] = float(v.mean())
            agg[f"sd_{col}"] = float(v.std(ddof=1)) if len(v) > 1 else math.nan
        for col, name in (("ks_pvalue", "ks"), ("t_pvalue", "t")):
            if col in items[0]:
                agg[f"{name}_not_rejected"] = int(sum(float(i[col]) > alpha for i in items))
        out.append(agg)
    by_modality: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for agg in out:
        by_modality[agg["modality"]].append(agg)
    for items in by_modality.values():
        for c in criteria:
            if f"mean_{c.column}" not in items[0]:
                continue
            ranks = rank_best_first([i[f"mean_{c.column}"] for i in items], c.higher_is_better)
            for i, rank in zip(items, ranks):
                i[f"rank_{c.name}"] = float(rank)
    return out


def human_scores(aggregates: Sequence[Mapping[str, Any]], criterion: Criterion) -> dict[tuple[str, str], float]:
    """(modality, model) -> the criterion's per-model value (mean over raters)."""
    return {(a["modality"], a["model"]): float(a[f"mean_{criterion.column}"]) for a in aggregates}

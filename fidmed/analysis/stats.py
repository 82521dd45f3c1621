"""The study's generic statistics (fid-med-eval ``utils/statistical_tests.py``), as a library and ``fidmed stats``.

Over any table: the values of ``num_col`` are split by the labels of ``split``; for every pair of labels (i < j,
labels in order of first appearance) the two groups are compared with

    ks       two-sample Kolmogorov-Smirnov test     scipy.stats.kstest(x, y, alternative)   (method 'auto': exact
                                                                                             for small samples)
    pair     paired t test                          scipy.stats.ttest_rel(x, y, alternative)
    ind_t    independent t test (pooled variance)   scipy.stats.ttest_ind(x, y, alternative)
    pearson  Pearson correlation                    scipy.stats.pearsonr(x, y, alternative)

``segments``: the test runs separately for each value of the first segment column (in order of appearance), and
within it for each value of the next, and so on. Paired tests and Pearson pair the i-th row of one label with the
i-th row of the other, in file order, as the study's script does; ``pair_by`` pairs rows by key columns instead
(safer: a row missing on one side is then an error, not a silent shift).

Unlike the study's script (which converts with ``astype(float)`` and lets SciPy meet NaN), empty or non-numeric
cells are errors naming the line.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import stats as sps

from fidmed.analysis.tabular import format_list, parse_float
from fidmed.errors import DataError, FidmedError

TESTS = ("ks", "pair", "ind_t", "pearson")
ALTERNATIVES = ("two-sided", "less", "greater")


@dataclass
class StatResult:
    test: str
    segment: str  # "col=value, col2=value2" or "" when not segmented
    label_1: str
    label_2: str
    n_1: int
    n_2: int
    statistic: float
    pvalue: float
    df: float  # t tests' degrees of freedom; NaN otherwise
    alternative: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _unique(values: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(values))


def _run(test: str, x: np.ndarray, y: np.ndarray, alternative: str) -> tuple[float, float, float]:
    if test == "ks":
        r = sps.kstest(x, y, alternative=alternative)
        return float(r.statistic), float(r.pvalue), math.nan
    if test == "pair":
        r = sps.ttest_rel(x, y, alternative=alternative)
        return float(r.statistic), float(r.pvalue), float(r.df)
    if test == "ind_t":
        r = sps.ttest_ind(x, y, alternative=alternative)
        return float(r.statistic), float(r.pvalue), float(r.df)
    r = sps.pearsonr(x, y, alternative=alternative)
    return float(r.statistic), float(r.pvalue), math.nan


def study_tests(
    rows: Sequence[Mapping[str, Any]],
    test: str,
    num_col: str,
    split: str,
    segments: Sequence[str] = (),
    alternative: str = "two-sided",
    pair_by: Sequence[str] = (),
) -> list[StatResult]:
    """Run ``test`` between every pair of ``split`` labels, per segment. See the module docstring."""
    test = test.lower()
    if test not in TESTS:
        raise FidmedError(f"unknown test {test!r}; choose one of KS, Pair, Ind_T, Pearson.")
    if alternative not in ALTERNATIVES:
        raise FidmedError(f"unknown alternative {alternative!r}; choose one of {', '.join(ALTERNATIVES)}.")
    if not rows:
        raise DataError("the table has no rows; pass a CSV with a header line and one row per observation.")
    needed = [num_col, split, *segments, *pair_by]
    missing = [c for c in dict.fromkeys(needed) if c not in rows[0]]
    if missing:
        raise DataError(f"the table lacks the column(s) {', '.join(missing)} (it has: {', '.join(rows[0])}).")
    if pair_by and test in ("ks", "ind_t"):
        raise FidmedError(f"pair_by applies to paired tests (pair, pearson), not {test}.")
    numbered = [(i, r) for i, r in enumerate(rows, start=2)]
    values = {i: parse_float(r[num_col], f"line {i} column {num_col}") for i, r in numbered}
    out: list[StatResult] = []

    def recurse(subset: list[tuple[int, Mapping[str, Any]]], segs: Sequence[str], where: list[str]) -> None:
        if segs:
            col = segs[0]
            for value in _unique([str(r[col]) for _, r in subset]):
                recurse([(i, r) for i, r in subset if str(r[col]) == value], segs[1:], where + [f"{col}={value}"])
            return
        labels = _unique([str(r[split]) for _, r in subset])
        for a in range(len(labels)):
            for b in range(a + 1, len(labels)):
                g1 = [(i, r) for i, r in subset if str(r[split]) == labels[a]]
                g2 = [(i, r) for i, r in subset if str(r[split]) == labels[b]]
                x, y = _pair(g1, g2, labels[a], labels[b], test, pair_by, where)
                x = np.array([values[i] for i in x])
                y = np.array([values[i] for i in y])
                stat, p, df = _run(test, x, y, alternative)
                out.append(
                    StatResult(test, ", ".join(where), labels[a], labels[b], len(x), len(y), stat, p, df, alternative)
                )

    recurse(numbered, list(segments), [])
    return out


def _pair(g1, g2, l1: str, l2: str, test: str, pair_by: Sequence[str], where: list[str]) -> tuple[list[int], list[int]]:
    seg = f" ({', '.join(where)})" if where else ""
    if test in ("ks", "ind_t"):
        return [i for i, _ in g1], [i for i, _ in g2]
    if not pair_by:
        if len(g1) != len(g2):
            raise DataError(
                f"{test} pairs rows, but label {l1!r} has {len(g1)} rows and {l2!r} has {len(g2)}{seg}; "
                f"give every label the same rows (or pair them by key columns with --pair-by)."
            )
        return [i for i, _ in g1], [i for i, _ in g2]

    def keyed(group, label):
        keys: dict[tuple, int] = {}
        for i, r in group:
            k = tuple(str(r[c]) for c in pair_by)
            if k in keys:
                raise DataError(
                    f"label {label!r}{seg} has two rows with {dict(zip(pair_by, k))} (lines {keys[k]} "
                    f"and {i}); --pair-by columns must identify a row."
                )
            keys[k] = i
        return keys

    k1, k2 = keyed(g1, l1), keyed(g2, l2)
    only1 = [dict(zip(pair_by, k)) for k in k1 if k not in k2]
    only2 = [dict(zip(pair_by, k)) for k in k2 if k not in k1]
    if only1 or only2:
        parts = []
        if only1:
            parts.append(f"{l2!r} lacks {format_list(only1, 5)}")
        if only2:
            parts.append(f"{l1!r} lacks {format_list(only2, 5)}")
        raise DataError(f"cannot pair {l1!r} with {l2!r}{seg}: {'; '.join(parts)}.")
    common = list(k1)
    return [k1[k] for k in common], [k2[k] for k in common]

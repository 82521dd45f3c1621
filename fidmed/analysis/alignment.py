"""Human alignment: do an extractor's FDs rank models the way human raters do? (docs/vtt.md)

Per modality and metric (FD, relative FD):

* rankings: each extractor's model ranking (lowest FD = rank 1) next to the human rankings (most convincing
  model = rank 1); ties get average ranks. Human scores are means over raters computed exactly (fractions; see
  :mod:`fidmed.analysis.scoring`), so models with equal means share a rank whichever way the VTT was given.
* correlations of the FD values with each human score over the models: Pearson, Spearman and Kendall (tau-b),
  statistics and p-values straight from ``scipy.stats.pearsonr / spearmanr / kendalltau`` (two-sided), and
  percentile bootstrap confidence intervals. Spearman and Kendall see the human scores' exact order (their ranks),
  Pearson the means rounded once to floats. The bootstrap resamples raters with replacement and, when the
  answers are given image by image, also each model's real and generated images with replacement (the same images
  for every rater, as they all saw the same images); the FDs stay fixed. Each replicate's means are exact too
  (integer counts, or the raters' exact values, summed before dividing). Replicates whose correlation is undefined
  (a constant resampled score, e.g. two models tied) are counted in ``boot_undefined`` and left out of the
  interval.
  Signs are raw: FD against FPR or KS p (higher = more convincing) should correlate negatively when an extractor
  agrees with humans, FD against Diff or KS D positively; ``expected_sign`` says which.
* agreement between extractors: pairwise Spearman and Kendall correlations of their FDs over the models, and
  Kendall's coefficient of concordance W (with the tie correction) with its chi-square test, for all extractors
  and for the ImageNet and RadImageNet groups.

Nothing is dropped silently: missing modalities, extractors, metrics or models, duplicated results and NaN FDs are
errors that list what is missing; results for models without human scores are kept in the rankings and listed in
``notes``; failed jobs (rows with ``status=failed`` from ``fidmed collect``) are listed in ``notes`` with their
error, and the models they leave without a number are named by the coverage check.

Rank confidence: where the results carry bootstrap replicates (``eval.uncertainty``: fidmed.metrics.uncertainty)
and every model of a modality was evaluated with the same real resample (equal ``real_resample_key``: replicate r
redrew the same real images for every model), each extractor's ranking gets the probability that each pairwise
order and the whole ranking hold over the paired replicates (``rank_confidence`` and ``ranking_confidence``), and
every correlation row the ranking's ``p_ranking`` and ``order`` verdict (``holds`` at 0.95 or more, ``mostly
noise`` below 0.5, else ``uncertain``), so that no agreement with humans is read from an order that is mostly noise.

Memorisation audit: the rows of the audit's numbers (authenticity, copies, ct, per extractor and ``pixels``) are not
ranked; they form the ``audit`` table, with the files of the closest pairs.

Random-init extractors: a number that came from a random-init extractor (``random_init`` true, or a label ending in
``[RANDOM-INIT]``, as results.json and ``fidmed collect`` record it) keeps that mark: every table row made from
such numbers has ``random_init`` true, :attr:`Analysis.labels` names the extractor ``swav [RANDOM-INIT]`` for the
report and its figures, and :attr:`Analysis.random_init` lists those extractors for the report's banner.
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from fidmed.analysis.collect import error_summary
from fidmed.analysis.scoring import (
    DEFAULT_CRITERIA,
    GENERATED,
    REAL,
    Answer,
    Criterion,
    KSTest,
    aggregate_scores,
    answers_from_rows,
    average_ranks,
    check_score_rows,
    criteria_from_names,
    exact_average,
    exact_mean,
    exact_number,
    exact_rater_value,
    on_grid,
    rank_best_first,
    score_answers,
    score_rows_from_table,
)
from fidmed.analysis.tabular import format_list, read_csv_rows
from fidmed.errors import DataError, FidmedError
from fidmed.evaluation.results import RANDOM_BANNER

METHODS = ("pearson", "spearman", "kendall")
AUDIT_NUMBERS = ("authenticity", "copies", "ct")  # the memorisation audit's numbers (fidmed.metrics.memorisation)
ORDER_HOLDS, ORDER_NOISE = 0.95, 0.5  # p_ranking at or above: "holds"; below: "mostly noise"


# ---------------------------------------------------------------------------------------------------------------
# Human data


@dataclass
class HumanData:
    """VTT results: image-level answers (bootstrap over raters and images) or per-rater scores (raters only)."""

    scores: list[dict[str, Any]]
    answers: list[Answer] | None = None

    @property
    def bootstrap_unit(self) -> str:
        return "raters+images" if self.answers is not None else "raters"

    def models(self) -> dict[str, list[str]]:
        out: dict[str, set[str]] = defaultdict(set)
        for s in self.scores:
            out[s["modality"]].add(s["model"])
        return {m: sorted(v) for m, v in sorted(out.items())}


def human_from_answers(answers: Sequence[Answer]) -> HumanData:
    return HumanData(scores=[s.to_dict() for s in score_answers(answers)], answers=list(answers))


def load_human(path: str | Path) -> HumanData:
    """An answers table (``fidmed vtt score`` writes ``vtt_answers.csv``: modality, rater, model, image_id, truth,
    answer, rating) or a per-rater scores table (``vtt_scores.csv``, or the study's published per-participant
    tables typed in: modality, rater, model and fpr / diff / ks_pvalue ...)."""
    rows = read_csv_rows(path, what="VTT table")
    if not rows:
        raise DataError(f"VTT table {path} has no rows.")
    if "modality" in rows[0]:
        blank = [i for i, r in enumerate(rows, start=2) if not str(r["modality"]).strip()]
        if blank:
            raise DataError(
                f"VTT table {path}: no modality on line(s) {format_list(blank, 8)}; the analysis joins "
                f"human scores with FD results by modality (`fidmed vtt make --modality`)."
            )
    if "truth" in rows[0] and "answer" in rows[0]:
        return human_from_answers(answers_from_rows(rows, str(path)))
    scores = score_rows_from_table(rows, str(path))
    check_score_rows(scores, str(path))
    return HumanData(scores=scores)


# ---------------------------------------------------------------------------------------------------------------
# Statistics


def correlation(x: Sequence[float], y: Sequence[float], y_order: Sequence[float] | None = None) -> dict[str, float]:
    """Pearson, Spearman and Kendall tau-b with two-sided p-values, as SciPy computes them (NaN when undefined).

    ``y_order``: numbers in the same order as ``y`` with the same ties (e.g. ranks of its exact values); Spearman and
    Kendall, which depend on the order alone, use it instead of ``y``."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    order = y if y_order is None else np.asarray(y_order, dtype=np.float64)
    out: dict[str, float] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # constant input: SciPy warns and returns NaN, which we keep
        for name, fn in (("pearson", stats.pearsonr), ("spearman", stats.spearmanr), ("kendall", stats.kendalltau)):
            if len(x) < 2:
                r, p = math.nan, math.nan
            else:
                res = fn(x, y if name == "pearson" else order)
                r, p = float(res.statistic), float(res.pvalue)
            out[name] = r
            out[f"{name}_p"] = p
    return out


def _pearson_rows(x: np.ndarray, Y: np.ndarray) -> np.ndarray:
    xc = x - x.mean()
    Yc = Y - Y.mean(axis=1, keepdims=True)
    den = np.sqrt((xc**2).sum() * (Yc**2).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (Yc @ xc) / den
    r[den == 0] = np.nan
    return np.clip(r, -1.0, 1.0)


def correlation_rows(x: Sequence[float], Y: np.ndarray, Y_order: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The three correlation statistics of ``x`` with every row of ``Y`` at once (for the bootstrap).

    Spearman = Pearson of average ranks; Kendall tau-b = sum sgn(dx) sgn(dy) / sqrt(sum sgn(dx)^2 sum sgn(dy)^2)
    over pairs, which equals (n_c - n_d) / sqrt((n0 - n1)(n0 - n2)) as in SciPy. ``Y_order`` (same shape as ``Y``,
    the same order and ties in each row, e.g. ranks of exact values) is what Spearman and Kendall use."""
    x = np.asarray(x, dtype=np.float64)
    Y = np.atleast_2d(np.asarray(Y, dtype=np.float64))
    order = Y if Y_order is None else np.atleast_2d(np.asarray(Y_order, dtype=np.float64))
    iu = np.triu_indices(len(x), k=1)
    sx = np.sign(x[:, None] - x[None, :])[iu]
    sy = np.sign(order[:, :, None] - order[:, None, :])[:, iu[0], iu[1]]
    den = np.sqrt((sx**2).sum() * (sy**2).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        tau = (sy @ sx) / den
    tau[den == 0] = np.nan
    return {
        "pearson": _pearson_rows(x, Y),
        "spearman": _pearson_rows(stats.rankdata(x), stats.rankdata(order, axis=1)),
        "kendall": tau,
    }


def kendalls_w(values: np.ndarray) -> dict[str, float]:
    """Kendall's W of ``values`` [m judges (extractors), n objects (models)], ranked within each judge with average
    ranks, with the tie correction: W = 12 S / (m^2 (n^3 - n) - m T), T = sum over judges and tie groups of
    t^3 - t; chi2 = m (n - 1) W on n - 1 degrees of freedom (equal to Friedman's tie-corrected statistic)."""
    values = np.asarray(values, dtype=np.float64)
    m, n = values.shape
    if m < 2 or n < 2:
        return {"m": m, "n": n, "W": math.nan, "chi2": math.nan, "df": n - 1, "p": math.nan}
    ranks = stats.rankdata(values, axis=1)
    totals = ranks.sum(axis=0)
    s = float(((totals - totals.mean()) ** 2).sum())
    t = 0.0
    for row in ranks:
        _, counts = np.unique(row, return_counts=True)
        t += float((counts**3 - counts).sum())
    den = m**2 * (n**3 - n) - m * t
    w = 12.0 * s / den if den > 0 else math.nan
    chi2 = m * (n - 1) * w
    return {"m": m, "n": n, "W": w, "chi2": chi2, "df": n - 1, "p": float(stats.chi2.sf(chi2, n - 1))}


# ---------------------------------------------------------------------------------------------------------------
# Results: lookup and coverage


def default_groups(extractors: Sequence[str]) -> dict[str, list[str]]:
    """All extractors, and the ImageNet / RadImageNet groups when both kinds are present."""
    groups = {"all": list(extractors)}
    rad = [e for e in extractors if e.startswith("radimagenet")]
    imagenet = [e for e in extractors if not e.startswith("radimagenet")]
    if rad and imagenet:
        groups["imagenet"] = imagenet
        groups["radimagenet"] = rad
    return groups


def fd_lookup(results: Sequence[Mapping[str, Any]], model_column: str) -> dict[tuple[str, str, str, str], float]:
    """(modality, metric, extractor, model) -> value; duplicates, empty keys and NaN values are errors."""
    if results and model_column not in results[0]:
        raise DataError(
            f"the results table has no column {model_column!r} to name models by (columns: "
            f"{', '.join(results[0])}); pass --model-column."
        )
    out: dict[tuple[str, str, str, str], float] = {}
    where: dict[tuple[str, str, str, str], str] = {}
    bad = []
    for i, r in enumerate(results):
        key = tuple(str(r.get(c) or "") for c in ("modality", "metric", "extractor", model_column))
        src = str(r.get("results_file") or f"row {i + 1}")
        empty = [c for c, v in zip(("modality", "metric", "extractor", model_column), key) if v == ""]
        if empty:
            raise DataError(f"results {src}: a row without {', '.join(empty)}.")
        if key in out:
            raise DataError(
                f"two results for modality {key[0]}, metric {key[1]}, extractor {key[2]}, model {key[3]}: "
                f"{where[key]} and {src}; keep one run per model (or filter the table)."
            )
        value = float(r["value"])
        if not math.isfinite(value):
            bad.append(f"{key[0]}/{key[3]}/{key[2]}/{key[1]} ({src})")
        out[key] = value
        where[key] = src
    if bad:
        raise DataError(f"non-finite values in the results (a failed evaluation?): {format_list(bad, 8)}.")
    return out


def is_random_init(row: Mapping[str, Any]) -> bool:
    """Whether a results row's number came from a random-init extractor: its ``random_init`` (a bool, or the text
    a CSV table holds) or its label (``swav [RANDOM-INIT]``)."""
    flag = row.get("random_init")
    if isinstance(flag, str):
        flag = flag.strip().lower() in ("true", "1", "yes")
    return bool(flag) or f"[{RANDOM_BANNER}]" in str(row.get("label") or "")


def random_init_label(extractor: str) -> str:
    """The extractor's name as people see it when its numbers came from a random-init network."""
    return f"{extractor} [{RANDOM_BANNER}]"


def is_failed(row: Mapping[str, Any]) -> bool:
    """A row that stands for a failed job (``fidmed collect``: ``status=failed``), not for a number."""
    return str(row.get("status") or "").strip().lower() == "failed"


def _failed_note(row: Mapping[str, Any]) -> str:
    what = "/".join(str(row.get(c)) for c in ("modality", "augmentation") if row.get(c))
    return (
        f"failed job {row.get('run_dir') or row.get('results_file') or '?'}"
        + (f" ({what})" if what else "")
        + f": {error_summary(str(row.get('error') or ''))}"
    )


@dataclass
class Coverage:
    modalities: list[str]
    metrics: list[str]
    extractors: list[str]
    models: dict[str, list[str]]  # modality -> models analysed (with human scores when VTT given)
    extra_models: dict[str, list[str]] = field(default_factory=dict)  # in the results, without human scores
    extra_modalities: list[str] = field(default_factory=list)


def check_coverage(
    lookup: Mapping[tuple[str, str, str, str], float],
    human_models: Mapping[str, Sequence[str]] | None,
    metrics: Sequence[str] | None = None,
    extractors: Sequence[str] | None = None,
    modalities: Sequence[str] | None = None,
) -> Coverage:
    """Work out what is analysed, and fail naming every (modality, metric, extractor, model) that is missing."""
    have_modalities = sorted({k[0] for k in lookup})
    have_metrics = sorted({k[1] for k in lookup}, key=lambda m: (m != "fd", m))
    have_extractors = sorted({k[2] for k in lookup}, key=lambda e: (e.startswith("radimagenet"), e))  # ImageNet first
    if modalities:
        wanted_modalities = list(modalities)
    elif human_models:
        wanted_modalities = list(human_models)
    else:
        wanted_modalities = have_modalities
    metrics = list(metrics) if metrics else have_metrics
    extractors = list(extractors) if extractors else have_extractors
    problems = []
    absent = [m for m in wanted_modalities if m not in have_modalities]
    if absent:
        problems.append(
            f"no results at all for modality {', '.join(absent)} (results have: {', '.join(have_modalities)})"
        )
    models: dict[str, list[str]] = {}
    extra: dict[str, list[str]] = {}
    for modality in wanted_modalities:
        if modality in absent:
            continue
        in_results = sorted({k[3] for k in lookup if k[0] == modality})
        if human_models is not None:
            if modality not in human_models:
                problems.append(f"modality {modality} has no human (VTT) scores")
                continue
            models[modality] = list(human_models[modality])
            extra[modality] = [m for m in in_results if m not in human_models[modality]]
        else:
            models[modality] = in_results
        for metric in metrics:
            for ex in extractors:
                lacking = [mo for mo in models[modality] if (modality, metric, ex, mo) not in lookup]
                if len(lacking) == len(models[modality]):
                    problems.append(f"modality {modality}: extractor {ex} has no {metric} results")
                elif lacking:
                    problems.append(
                        f"modality {modality}, extractor {ex}, {metric}: no result for model(s) {', '.join(lacking)}"
                    )
    if problems:
        raise DataError(
            "the results table is incomplete:\n  - "
            + "\n  - ".join(problems)
            + "\nEvaluate the missing runs (or name the extractors/metrics/modalities to analyse)."
        )
    return Coverage(
        modalities=wanted_modalities,
        metrics=metrics,
        extractors=extractors,
        models=models,
        extra_models={k: v for k, v in extra.items() if v},
        extra_modalities=[m for m in have_modalities if m not in wanted_modalities],
    )


# ---------------------------------------------------------------------------------------------------------------
# Bootstrap of the per-model human scores


@dataclass
class _ModalityAnswers:
    raters: list[str]
    models: list[str]
    real_called: list[np.ndarray]  # per model [raters, n_real] bool
    gen_called: list[np.ndarray]
    real_rating: list[np.ndarray]
    gen_rating: list[np.ndarray]
    integer_ratings: bool = True  # every rating a whole number (Likert): Diff sums stay in integers


def _answer_arrays(answers: Sequence[Answer], modality: str, models: Sequence[str]) -> _ModalityAnswers:
    rows = [a for a in answers if a.modality == modality]
    raters = sorted({a.rater for a in rows})
    index = {(a.rater, a.image_id): a for a in rows}
    out = _ModalityAnswers(raters, list(models), [], [], [], [])
    for model in models:
        ids = {t: sorted({a.image_id for a in rows if a.model == model and a.truth == t}) for t in (REAL, GENERATED)}
        for t, called, rating in (
            (REAL, out.real_called, out.real_rating),
            (GENERATED, out.gen_called, out.gen_rating),
        ):
            called.append(np.array([[index[(r, i)].answer == REAL for i in ids[t]] for r in raters]))
            rating.append(np.array([[index[(r, i)].rating for i in ids[t]] for r in raters], dtype=np.float64))
    out.integer_ratings = all(
        bool(np.all(r == np.round(r))) and float(np.abs(r).sum()) < 2.0**53 for r in out.real_rating + out.gen_rating
    )
    return out


def _mean_from_arrays(
    column: str,
    rc: np.ndarray,
    gc: np.ndarray,
    rr: np.ndarray,
    gr: np.ndarray,
    ks: KSTest,
    integer_ratings: bool,
    exact_p: dict[float, Fraction],
) -> Fraction:
    """The exact mean over raters (rows: [raters, images]) of a criterion, each rater's value the one
    ``exact_rater_value`` gives for their (resampled) answers on one model."""
    if column == "fpr":  # every rater saw the same number of images: sum of counts / (raters x images)
        return Fraction(int(gc.sum()), gc.size)
    if column == "accuracy":
        return Fraction(int(rc.sum()) + int((~gc).sum()), rc.size + gc.size)
    if column == "diff":
        if integer_ratings:  # mean over raters of S_real / n_real - S_gen / n_gen
            return Fraction(int(rr.sum()), rr.size) - Fraction(int(gr.sum()), gr.size)
        q = rr.shape[1] * gr.shape[1]
        return exact_average([on_grid(exact_number(float(exact_mean(a) - exact_mean(b))), q) for a, b in zip(rr, gr)])
    if column in ("ks_pvalue", "ks_statistic"):
        results = [ks(a, b) for a, b in zip(rr, gr)]
        if column == "ks_statistic":  # D = k / (n m) for integer k
            nm = rr.shape[1] * gr.shape[1]
            return Fraction(sum(round(d * nm) for d, _, _ in results), nm * len(results))
        for _, p, _ in results:
            if p not in exact_p:
                exact_p[p] = exact_number(p)
        return exact_average([exact_p[p] for _, p, _ in results])
    raise FidmedError(f"the bootstrap has no rule for the score {column!r}")


@dataclass
class BootstrapScores:
    """One criterion's resampled per-model human scores: ``values`` [n_boot, n_models] the exact means rounded to
    floats (NaN when undefined), ``ranks`` their ascending average ranks, from the exact means."""

    values: np.ndarray
    ranks: np.ndarray


def _boot_scores(means: Sequence[Sequence[Fraction | None]]) -> BootstrapScores:
    values = np.array([[float(m) if m is not None else math.nan for m in row] for row in means], dtype=np.float64)
    ranks = np.array([average_ranks(row) for row in means], dtype=np.float64).reshape(values.shape)
    return BootstrapScores(values, ranks)


def _resampled_means(exact: Sequence[Sequence[Fraction | None]], picks: np.ndarray) -> list[list[Fraction | None]]:
    """Exact means over resampled raters: ``exact`` [raters][models], ``picks`` [n_boot, raters] -> [n_boot][models].
    Numerators over a common denominator are summed as Python integers."""
    n_models = len(exact[0]) if exact else 0
    out: list[list[Fraction | None]] = [[None] * n_models for _ in range(len(picks))]
    for j in range(n_models):
        column = [row[j] for row in exact]
        undefined = np.array([v is None for v in column])
        defined = [v for v in column if v is not None]
        den = math.lcm(*(v.denominator for v in defined)) if defined else 1
        nums = np.array([int(v * den) if v is not None else 0 for v in column], dtype=object)
        sums = nums[picks].sum(axis=1)
        bad = undefined[picks].any(axis=1)
        for b in range(len(picks)):
            out[b][j] = None if bad[b] else Fraction(int(sums[b]), den * picks.shape[1])
    return out


def bootstrap_human(
    human: HumanData,
    modality: str,
    models: Sequence[str],
    criteria: Sequence[Criterion],
    n_boot: int,
    rng: np.random.Generator,
    ks: KSTest,
) -> dict[str, BootstrapScores]:
    """criterion name -> resampled per-model human scores (means over resampled raters, computed exactly)."""
    if human.answers is not None:
        arr = _answer_arrays(human.answers, modality, models)
        n_r = len(arr.raters)
        means: dict[str, list[list[Fraction | None]]] = {c.name: [] for c in criteria}
        exact_p: dict[float, Fraction] = {}
        for b in range(n_boot):
            raters = rng.integers(0, n_r, n_r)
            for c in criteria:
                means[c.name].append([None] * len(models))
            for j in range(len(models)):
                ri = rng.integers(0, arr.real_called[j].shape[1], arr.real_called[j].shape[1])
                gi = rng.integers(0, arr.gen_called[j].shape[1], arr.gen_called[j].shape[1])
                picked = [
                    a[j][np.ix_(raters, idx)]
                    for a, idx in (
                        (arr.real_called, ri),
                        (arr.gen_called, gi),
                        (arr.real_rating, ri),
                        (arr.gen_rating, gi),
                    )
                ]
                for c in criteria:
                    means[c.name][b][j] = _mean_from_arrays(c.column, *picked, ks, arr.integer_ratings, exact_p)
        return {name: _boot_scores(m) for name, m in means.items()}
    rows = [s for s in human.scores if s["modality"] == modality]
    raters = sorted({s["rater"] for s in rows})
    table = {(s["rater"], s["model"]): s for s in rows}
    out = {}
    for c in criteria:
        exact = [[exact_rater_value(table[(r, m)], c.column) for m in models] for r in raters]  # [raters][models]
        picks = rng.integers(0, len(raters), (n_boot, len(raters)))
        out[c.name] = _boot_scores(_resampled_means(exact, picks))
    return out


# ---------------------------------------------------------------------------------------------------------------
# Rank confidence (bootstrap replicates recorded with the results)


def parse_replicates(cell: Any) -> np.ndarray | None:
    """The replicates of a results row (``fidmed collect`` writes them space-separated); None when absent."""
    if cell is None or (isinstance(cell, float) and math.isnan(cell)):
        return None
    if isinstance(cell, (list, tuple, np.ndarray)):
        return np.array([math.nan if v is None else float(v) for v in cell], dtype=np.float64)
    text = str(cell).strip()
    if not text:
        return None
    try:
        return np.array([float(v) for v in text.split()], dtype=np.float64)
    except ValueError:
        raise DataError(f"a replicates cell is not a list of numbers: {text[:60]!r}...") from None


def replicate_lookup(
    results: Sequence[Mapping[str, Any]], model_column: str
) -> dict[tuple[str, str, str, str], tuple[np.ndarray, str]]:
    """(modality, metric, extractor, model) -> (replicates, real_resample_key) for rows that carry replicates."""
    out = {}
    for r in results:
        reps = parse_replicates(r.get("replicates"))
        if reps is None:
            continue
        key = tuple(str(r.get(c) or "") for c in ("modality", "metric", "extractor", model_column))
        out[key] = (reps, str(r.get("real_resample_key") or ""))
    return out


def parse_float_or_none(cell: Any) -> float | None:
    """A number from a results cell (float, or text from a CSV); None when empty or not a number."""
    if cell is None or (isinstance(cell, str) and not cell.strip()):
        return None
    try:
        v = float(cell)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def order_verdict(p_ranking: float) -> str:
    if not math.isfinite(p_ranking):
        return "n/a"
    return "holds" if p_ranking >= ORDER_HOLDS else "mostly noise" if p_ranking < ORDER_NOISE else "uncertain"


def _rank_confidence(
    values: np.ndarray, keys: list[tuple[str, str, str, str]], reps: Mapping[tuple, tuple[np.ndarray, str]]
) -> tuple[Any, str | None]:
    """The extractor's rank confidence over paired replicates, or (None, why not)."""
    from fidmed.metrics.uncertainty import rank_confidence

    missing = [k[3] for k in keys if k not in reps]
    if missing:
        return None, f"no replicates for model(s) {', '.join(missing)} (evaluate with eval.uncertainty)"
    resample = {reps[k][1] for k in keys}
    if len(resample) > 1 or "" in resample:
        return (
            None,
            "the models' replicates redrew different real images (eval.uncertainty seed, block size or real set)",
        )
    n = min(len(reps[k][0]) for k in keys)
    return rank_confidence(values, np.stack([reps[k][0][:n] for k in keys]), lower_is_better=True), None


def audit_table(rows: Sequence[Mapping[str, Any]], model_column: str) -> list[dict[str, Any]]:
    """One row per (modality, model, feature space) of the memorisation audit's numbers and files."""
    out: dict[tuple[str, str, str], dict[str, Any]] = {}
    for r in rows:
        key = (str(r.get("modality") or ""), str(r.get(model_column) or ""), str(r.get("extractor") or ""))
        row = out.setdefault(
            key,
            {
                "modality": key[0],
                "model": key[1],
                "extractor": key[2],
                "random_init": is_random_init(r),
                "grid": None,
                "per_image": None,
            },
        )
        row[str(r["metric"])] = float(r["value"])
        for col in ("grid", "per_image"):
            if r.get(col):
                row[col] = r.get(col)
    return [out[k] for k in sorted(out)]


# ---------------------------------------------------------------------------------------------------------------
# The analysis


@dataclass
class Analysis:
    """Everything ``fidmed analyze`` reports: tables (lists of dict rows) and notes."""

    tables: dict[str, list[dict[str, Any]]]
    coverage: Coverage
    criteria: list[Criterion]
    settings: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    #: extractors any of whose analysed numbers came from a random-init network
    random_init: list[str] = field(default_factory=list)
    #: extractor -> the name shown to people (``swav [RANDOM-INIT]`` for a random-init one)
    labels: dict[str, str] = field(default_factory=dict)

    def label(self, extractor: str) -> str:
        return self.labels.get(extractor, extractor)


def analyze(
    results: Sequence[Mapping[str, Any]],
    human: HumanData | None = None,
    *,
    model_column: str = "augmentation",
    metrics: Sequence[str] | None = None,
    extractors: Sequence[str] | None = None,
    modalities: Sequence[str] | None = None,
    criteria: Sequence[str] = DEFAULT_CRITERIA,
    n_boot: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
    alpha: float = 0.05,
    groups: Mapping[str, Sequence[str]] | None = None,
) -> Analysis:
    """Rankings, FD-human correlations with bootstrap CIs, and extractor agreement (see the module docstring)."""
    if not 0 < ci < 1:
        raise FidmedError(f"confidence level {ci} must be between 0 and 1 (e.g. 0.95).")
    if n_boot < 0:
        raise FidmedError(f"bootstrap replicates must be >= 0, got {n_boot}.")
    crits = criteria_from_names(criteria)
    failed = [r for r in results if is_failed(r)]
    results = [r for r in results if not is_failed(r)]
    audit_rows = [r for r in results if str(r.get("metric")) in AUDIT_NUMBERS]
    results = [r for r in results if str(r.get("metric")) not in AUDIT_NUMBERS]
    lookup = fd_lookup(results, model_column)
    replicates = replicate_lookup(results, model_column)
    spread = {  # (modality, metric, extractor, model) -> standard error, where the results have one
        tuple(str(r.get(c) or "") for c in ("modality", "metric", "extractor", model_column)): parse_float_or_none(
            r.get("se")
        )
        for r in results
    }
    cov = check_coverage(lookup, human.models() if human else None, metrics, extractors, modalities)
    # which analysed numbers came from random-init extractors: (modality, metric, extractor, model) keys
    analysed = {(m, met, ex) for m in cov.modalities for met in cov.metrics for ex in cov.extractors}
    random_keys = {
        tuple(str(r.get(c) or "") for c in ("modality", "metric", "extractor", model_column))
        for r in results
        if is_random_init(r)
    }
    random_keys = {k for k in random_keys if k[:3] in analysed and k[3] in cov.models.get(k[0], [])}
    random_exs = [ex for ex in cov.extractors if any(k[2] == ex for k in random_keys)]
    labels = {ex: random_init_label(ex) if ex in random_exs else ex for ex in cov.extractors}
    if human is not None:
        missing_cols = [c.column for c in crits if c.column not in human.scores[0]]
        if missing_cols:
            raise DataError(
                f"the VTT scores lack {', '.join(missing_cols)} needed for criteria "
                f"{', '.join(c.name for c in crits if c.column in missing_cols)}; choose the criteria "
                f"the table has (--criteria)."
            )
    groups = dict(groups) if groups else default_groups(cov.extractors)
    unknown = sorted({e for g in groups.values() for e in g} - set(cov.extractors))
    if unknown:
        raise FidmedError(f"extractor group(s) name extractors without results: {', '.join(unknown)}.")
    aggregates = aggregate_scores(human.scores, alpha, crits) if human else []
    agg = {(a["modality"], a["model"]): a for a in aggregates}
    rng = np.random.default_rng(seed)
    ks = KSTest()
    tables: dict[str, list[dict[str, Any]]] = defaultdict(list)
    notes = [_failed_note(r) for r in failed]
    for ex in random_exs:
        n_random = sum(k[2] == ex for k in random_keys)
        n_all = sum(len(cov.models[m]) for m in cov.modalities) * len(cov.metrics)
        if n_random < n_all:
            notes.append(
                f"{ex}: {n_random} of its {n_all} analysed numbers came from a random-init network and "
                f"the others from real weights; they are not comparable with each other."
            )
    for modality, extra in cov.extra_models.items():
        notes.append(
            f"{modality}: model(s) {', '.join(extra)} have results but no VTT scores; they are left out "
            f"of the rankings and correlations."
        )
    if cov.extra_modalities:
        notes.append(f"modalities in the results but not analysed: {', '.join(cov.extra_modalities)}.")
    if human is not None:
        skipped = [m for m in human.models() if m not in cov.modalities]
        if skipped:
            notes.append(f"modalities with VTT scores but not analysed: {', '.join(skipped)}.")
    if audit_rows:
        tables["audit"] = audit_table(audit_rows, model_column)
    unavailable: dict[str, list[str]] = defaultdict(list)  # why rank confidence is missing -> where
    tail = (1 - ci) / 2 * 100
    for modality in cov.modalities:
        models = cov.models[modality]
        boot = (
            bootstrap_human(human, modality, models, crits, n_boot, rng, ks) if human is not None and n_boot > 0 else {}
        )
        for model in models if human else []:
            a = agg[(modality, model)]
            row = {"modality": modality, "model": model}
            if a:
                row.update({c.name: a[f"mean_{c.column}"] for c in crits})
                row.update({f"rank_{c.name}": a[f"rank_{c.name}"] for c in crits})
                row["n_raters"] = a["n_raters"]
                for key in ("ks_not_rejected", "t_not_rejected", "t_undefined"):
                    if key in a:
                        row[key] = a[key]
            tables["human_scores"].append(row)
        for metric in cov.metrics:
            fd = {ex: np.array([lookup[(modality, metric, ex, m)] for m in models]) for ex in cov.extractors}
            confidence = {}
            for ex in cov.extractors if replicates else []:
                keys = [(modality, metric, ex, m) for m in models]
                conf, why = _rank_confidence(fd[ex], keys, replicates)
                if conf is None:
                    unavailable[why].append(f"{modality}/{metric}/{ex}")
                    continue
                confidence[ex] = conf
                tables["ranking_confidence"].append(
                    {
                        "modality": modality,
                        "metric": metric,
                        "extractor": ex,
                        "random_init": any((modality, metric, ex, m) in random_keys for m in models),
                        "n_models": len(models),
                        "p_ranking": conf.p_ranking,
                        "min_p_pair": min(conf.pairs.values(), default=math.nan),
                        "order": order_verdict(conf.p_ranking),
                        "n_replicates": conf.n_replicates,
                    }
                )
                for (a, b), p in conf.pairs.items():
                    tables["rank_confidence"].append(
                        {
                            "modality": modality,
                            "metric": metric,
                            "extractor": ex,
                            "ahead": models[a],
                            "behind": models[b],
                            "value_ahead": float(fd[ex][a]),
                            "value_behind": float(fd[ex][b]),
                            "p_order": p,
                            "n_replicates": conf.n_replicates,
                        }
                    )
            # an extractor's row is random-init when any number it was made from is
            rnd = {ex: any((modality, metric, ex, m) in random_keys for m in models) for ex in cov.extractors}
            for ex in cov.extractors:
                for model, value, rank in zip(models, fd[ex], rank_best_first(fd[ex], higher_is_better=False)):
                    is_rnd = (modality, metric, ex, model) in random_keys
                    tables["fd_values"].append(
                        {
                            "modality": modality,
                            "metric": metric,
                            "extractor": ex,
                            "model": model,
                            "value": float(value),
                            "se": spread.get((modality, metric, ex, model)),
                            "random_init": is_rnd,
                        }
                    )
                    tables["rankings"].append(
                        {
                            "modality": modality,
                            "metric": metric,
                            "ranker": ex,
                            "kind": "extractor",
                            "model": model,
                            "value": float(value),
                            "rank": float(rank),
                            "random_init": rnd[ex],
                        }
                    )
            for c in crits if human else []:
                for model in models:
                    a = agg[(modality, model)]
                    tables["rankings"].append(
                        {
                            "modality": modality,
                            "metric": metric,
                            "ranker": c.name,
                            "kind": "human",
                            "model": model,
                            "value": a[f"mean_{c.column}"],
                            "rank": a[f"rank_{c.name}"],
                            "random_init": False,
                        }
                    )
            # FD vs human
            for c in crits if human else []:
                h = np.array([agg[(modality, m)][f"mean_{c.column}"] for m in models])
                # the exact order of the means: their best-first ranks, turned back to ascending order
                order = [(-1 if c.higher_is_better else 1) * agg[(modality, m)][f"rank_{c.name}"] for m in models]
                for ex in cov.extractors:
                    row: dict[str, Any] = {
                        "modality": modality,
                        "metric": metric,
                        "extractor": ex,
                        "criterion": c.name,
                        "random_init": rnd[ex],
                        "n_models": len(models),
                        "expected_sign": -1 if c.higher_is_better else 1,
                    }
                    row.update(correlation(fd[ex], h, order))
                    if n_boot > 0 and len(models) >= 2:
                        reps = correlation_rows(fd[ex], boot[c.name].values, boot[c.name].ranks)
                        for method in METHODS:
                            r = reps[method]
                            ok = r[np.isfinite(r)]
                            row[f"{method}_ci_low"] = float(np.percentile(ok, tail)) if ok.size else math.nan
                            row[f"{method}_ci_high"] = float(np.percentile(ok, 100 - tail)) if ok.size else math.nan
                            row[f"{method}_boot_undefined"] = int(r.size - ok.size)
                    row["bootstrap"] = human.bootstrap_unit if n_boot > 0 else "none"
                    if ex in confidence:  # how often the extractor's own ranking holds (its bootstrap replicates)
                        row["p_ranking"] = confidence[ex].p_ranking
                        row["order"] = order_verdict(confidence[ex].p_ranking)
                    row["n_boot"] = n_boot
                    tables["correlations"].append(row)
            # Agreement between extractors
            for i, ea in enumerate(cov.extractors):
                for eb in cov.extractors[i + 1 :]:
                    cr = correlation(fd[ea], fd[eb])
                    tables["extractor_agreement"].append(
                        {
                            "modality": modality,
                            "metric": metric,
                            "extractor_a": ea,
                            "extractor_b": eb,
                            "random_init_a": rnd[ea],
                            "random_init_b": rnd[eb],
                            "n_models": len(models),
                            "spearman": cr["spearman"],
                            "spearman_p": cr["spearman_p"],
                            "kendall": cr["kendall"],
                            "kendall_p": cr["kendall_p"],
                        }
                    )
            for name, members in groups.items():
                w = kendalls_w(np.array([fd[ex] for ex in members]))
                tables["kendall_w"].append(
                    {
                        "modality": modality,
                        "metric": metric,
                        "group": name,
                        "extractors": " ".join(members),
                        "random_init_members": " ".join(ex for ex in members if rnd[ex]),
                        **w,
                    }
                )
    for why, where in unavailable.items():
        notes.append(f"rank confidence not available for {format_list(where, 6)}: {why}.")
    settings = {
        "rank_confidence": {"holds": ORDER_HOLDS, "mostly_noise_below": ORDER_NOISE},
        "model_column": model_column,
        "metrics": cov.metrics,
        "criteria": [c.name for c in crits],
        "n_boot": n_boot,
        "ci": ci,
        "seed": seed,
        "alpha": alpha,
        "bootstrap": (human.bootstrap_unit if human else "none"),
        "groups": groups,
        "tie_rule": "average ranks, comparing exact values (human scores: means over raters computed as "
        "fractions); rank 1 = best",
    }
    return Analysis(
        tables=dict(tables),
        coverage=cov,
        criteria=crits,
        settings=settings,
        notes=notes,
        random_init=random_exs,
        labels=labels,
    )

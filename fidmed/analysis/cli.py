"""``fidmed vtt make | vtt score``, ``fidmed collect``, ``fidmed analyze`` and ``fidmed stats``.

    fidmed vtt make --real DIR --model NAME=PATH ... --out PAGES/    blinded rater pages + sealed key (PAGES.key.json)
    fidmed vtt score ANSWERS.csv ... KEY.json [--out DIR]           the study's per-rater table, model means, ranks
    fidmed collect RUNS... [--out results.csv]                      every evaluated number in one tidy table
    fidmed analyze RESULTS... --vtt vtt_answers.csv [--out DIR]     rankings, FD-human correlations, agreement, report
    fidmed stats TABLE.csv --test KS --num-col C --split L          the study's statistical_tests.py

``add_analysis_parsers(subparsers)`` registers them on the ``fidmed`` command's subparsers.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fidmed.errors import FidmedError


def _print_rows(title: str, rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> None:
    from rich.console import Console
    from rich.table import Table

    from fidmed.analysis.report import fmt

    table = Table(title=title)
    for c in columns:
        table.add_column(c, overflow="fold")
    for r in rows:
        table.add_row(*(fmt(r.get(c)) for c in columns))
    Console(width=200).print(table)


def _pairs(items: Sequence[str], what: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            raise FidmedError(f"{what} {item!r}: write NAME=VALUE.")
        if name in out:
            raise FidmedError(f"{what} {name!r} given twice.")
        out[name] = value
    return out


# ---------------------------------------------------------------------------------------------------------------


def cmd_vtt_make(args: argparse.Namespace) -> int:
    from fidmed.analysis.vtt import LikertScale, make_vtt

    labels = tuple(s.strip() for s in args.likert_labels.split(",")) if args.likert_labels else ()
    likert = LikertScale(args.likert[0], args.likert[1], labels)
    raters = args.rater if args.rater else args.raters
    bundle = make_vtt(
        args.real,
        _pairs(args.model, "--model"),
        args.out,
        key_path=args.key,
        raters=raters,
        n_real=args.n_real,
        n_generated=args.n_generated,
        seed=args.seed,
        likert=likert,
        modality=args.modality,
        seed_pool=args.seed_pool,
        reuse_real=args.reuse_real,
        title=args.title,
        device=args.device,
        allow_modified_source=args.allow_modified_source,
    )
    for rater, page in bundle.pages.items():
        print(f"rater {rater}: {page}")
    print(
        f"sealed key (keep it away from the raters): {bundle.key_path}\n"
        f"test {bundle.key['test_id']}, key sha256 {bundle.key_sha256}"
    )
    return 0


def cmd_vtt_score(args: argparse.Namespace) -> int:
    from fidmed.analysis.report import mark_ties
    from fidmed.analysis.scoring import (
        RATER_SCORE_COLUMNS,
        aggregate_scores,
        answers_from_rows,
        criteria_from_names,
        score_answers,
    )
    from fidmed.analysis.tabular import read_csv_rows, write_csv_rows
    from fidmed.analysis.vtt import answers_from_pages, load_key

    keys = [p for p in args.files if Path(p).suffix.lower() == ".json"]
    answer_files = [p for p in args.files if Path(p).suffix.lower() != ".json"]
    if len(keys) > 1:
        raise FidmedError(f"more than one key given: {', '.join(keys)}; score one test at a time.")
    if not answer_files:
        raise FidmedError("no answers CSV given.")
    if keys:
        answers = answers_from_pages(answer_files, load_key(keys[0]), args.allow_missing_raters)
    else:  # a long table that carries model and truth itself
        answers = []
        for f in answer_files:
            answers.extend(answers_from_rows(read_csv_rows(f, what="VTT answers"), f))
    criteria = criteria_from_names(args.criteria)
    scores = score_answers(answers)
    models = aggregate_scores(scores, args.alpha, criteria)
    out = Path(args.out)
    write_csv_rows(out / "vtt_answers.csv", [a.to_dict() for a in answers])
    write_csv_rows(out / "vtt_scores.csv", [s.to_dict() for s in scores], RATER_SCORE_COLUMNS)
    write_csv_rows(out / "vtt_models.csv", models)
    # an undefined t test (one answer to every image) rejects nothing: shown, and counted, as not rejected
    per_rater = [
        s.to_dict() | ({"t_pvalue": "undefined (not rejected)"} if math.isnan(s.t_pvalue) else {}) for s in scores
    ]
    _print_rows(
        "VTT per rater and model",
        per_rater,
        [
            "modality",
            "rater",
            "model",
            "precision",
            "recall",
            "accuracy",
            "fpr",
            "fnr",
            "t_pvalue",
            "diff",
            "ks_statistic",
            "ks_pvalue",
            "note",
        ],
    )
    per_model = mark_ties(
        [
            m
            | (
                {"t_not_rejected": f"{m['t_not_rejected']} ({m['t_undefined']} undefined)"}
                if m.get("t_undefined")
                else {}
            )
            for m in models
        ],
        [f"rank_{c.name}" for c in criteria],
    )
    _print_rows(
        "VTT per model (means over raters, exact) and ranks (1 = most convincing; ties: average rank, marked '=')",
        per_model,
        [
            "modality",
            "model",
            "n_raters",
            "mean_fpr",
            "mean_diff",
            "mean_ks_pvalue",
            "ks_not_rejected",
            "t_not_rejected",
            *(f"rank_{c.name}" for c in criteria),
        ],
    )
    print(f"wrote {out / 'vtt_answers.csv'}, {out / 'vtt_scores.csv'}, {out / 'vtt_models.csv'}")
    return 0


def cmd_collect(args: argparse.Namespace) -> int:
    from fidmed.analysis.collect import FAILED, TIDY_COLUMNS, collect
    from fidmed.analysis.tabular import write_table
    from fidmed.evaluation.results import RANDOM_BANNER

    result = collect(args.runs)
    path = write_table(args.out, result.rows, TIDY_COLUMNS)
    failed = sum(r.get("status") == FAILED for r in result.rows)
    print(
        f"{len(result.rows) - failed} rows from {len(result.files)} results.json file(s)"
        + (f" and {failed} failed job(s) (rows with status=failed and their error)" if failed else "")
        + f" -> {path}"
    )
    if result.skipped:
        print(f"skipped {len(result.skipped)} folder(s) without results:")
        for s in result.skipped:
            print(f"  {s}")
    for f in result.empty:
        print(f"note: {f} holds no evaluated numbers (a training-only run?)")
    if any(r.get("random_init") for r in result.rows):
        print(
            f"!! {RANDOM_BANNER}: some numbers come from random-init extractors (label '... [{RANDOM_BANNER}]', "
            f"random_init=True); they test the plumbing only and are NOT comparable to any published FD."
        )
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    from fidmed.analysis.alignment import analyze, load_human
    from fidmed.analysis.collect import load_results
    from fidmed.analysis.report import build_report, labelled, log_report_to_wandb

    groups = None
    if args.group:
        groups = {name: [e for e in value.split(",") if e] for name, value in _pairs(args.group, "--group").items()}
    human = load_human(args.vtt) if args.vtt else None
    analysis = analyze(
        load_results(args.results),
        human,
        model_column=args.model_column,
        metrics=args.metric,
        extractors=args.extractor,
        modalities=args.modality,
        criteria=args.criteria,
        n_boot=args.bootstrap,
        ci=args.ci,
        seed=args.seed,
        alpha=args.alpha,
        groups=groups,
    )
    report = build_report(analysis, args.out, title=args.title)
    if "correlations" in analysis.tables:
        _print_rows(
            "FD vs human (Pearson, with bootstrap CI)",
            labelled(analysis, analysis.tables["correlations"]),
            [
                "modality",
                "metric",
                "extractor",
                "criterion",
                "pearson",
                "pearson_p",
                "pearson_ci_low",
                "pearson_ci_high",
                "spearman",
                "kendall",
                *(["p_ranking", "order"] if "ranking_confidence" in analysis.tables else []),
            ],
        )
    if "ranking_confidence" in analysis.tables:
        _print_rows(
            "How often each extractor's ranking holds (bootstrap replicates, same real resample for every model)",
            labelled(analysis, analysis.tables["ranking_confidence"]),
            ["modality", "metric", "extractor", "p_ranking", "order", "min_p_pair", "n_replicates"],
        )
    if "audit" in analysis.tables:
        _print_rows(
            "Memorisation audit",
            labelled(analysis, analysis.tables["audit"]),
            ["modality", "model", "extractor", "authenticity", "copies", "ct", "grid"],
        )
    _print_rows(
        "Agreement between extractors (Kendall's W)",
        analysis.tables["kendall_w"],
        ["modality", "metric", "group", "m", "n", "W", "p"],
    )
    for note in analysis.notes:
        print(f"note: {note}")
    for line in report.banner:
        print(f"\n{line}")
    print(f"report: {report.markdown_path} and {report.html_path}")
    if args.wandb:
        import wandb

        mode = os.environ.get("WANDB_MODE", "offline")
        run = wandb.init(
            project=args.wandb_project,
            job_type="analysis",
            dir=str(Path(args.out).resolve()),
            mode=mode,
            config={"analysis": analysis.settings},
        )
        try:
            log_report_to_wandb(report, run)
        finally:
            run.finish()
        print(f"logged to W&B ({mode}): {run.dir}")
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    from fidmed.analysis.stats import study_tests
    from fidmed.analysis.tabular import read_csv_rows, write_csv_rows

    rows = read_csv_rows(args.csv, what="table")
    results = study_tests(
        rows, args.test, args.num_col, args.split, args.segments or (), args.alternative, args.pair_by or ()
    )
    table = [r.to_dict() for r in results]
    _print_rows(
        f"{args.test} of {args.num_col} split by {args.split}",
        table,
        ["segment", "label_1", "label_2", "n_1", "n_2", "statistic", "pvalue", "df"],
    )
    if args.out:
        write_csv_rows(args.out, table)
        print(f"wrote {args.out}")
    return 0


# ---------------------------------------------------------------------------------------------------------------


def add_analysis_parsers(sub: argparse._SubParsersAction) -> None:
    """Register ``vtt``, ``collect``, ``analyze`` and ``stats`` on the ``fidmed`` command."""
    from fidmed.analysis.scoring import CRITERIA, DEFAULT_CRITERIA

    vtt = sub.add_parser("vtt", help="visual Turing tests: make the blinded pages, score the answers")
    vsub = vtt.add_subparsers(dest="vtt_command", required=True)
    p = vsub.add_parser("make", help="blinded self-contained HTML pages per rater and a sealed key")
    p.add_argument("--real", required=True, help="folder of prepared real images")
    p.add_argument(
        "--model",
        action="append",
        required=True,
        metavar="NAME=PATH",
        help="a model to test: generator file (.pt/.ckpt/.pkl) or folder of generated images; repeat. "
        "NAME is what `fidmed analyze` matches with the results (default: the augmentation)",
    )
    p.add_argument("--out", required=True, help="folder for the raters' pages")
    p.add_argument("--key", default=None, help="key file (default: <out>.key.json beside the folder)")
    p.add_argument("--raters", type=int, default=5, help="number of raters (default 5, as in the study)")
    p.add_argument("--rater", action="append", help="rater name (repeat; overrides --raters)")
    p.add_argument("--n-real", type=int, default=10, help="real images per model (default 10)")
    p.add_argument("--n-generated", type=int, default=10, help="generated images per model (default 10)")
    p.add_argument("--seed", type=int, default=0, help="draws images, generator seeds and orders")
    p.add_argument("--seed-pool", type=int, default=50_000, help="generator seeds are drawn from 0..POOL-1")
    p.add_argument(
        "--likert",
        type=int,
        nargs=2,
        default=(1, 5),
        metavar=("LOW", "HIGH"),
        help="Likert realism scale (digits, default 1 5)",
    )
    p.add_argument("--likert-labels", default="", help="comma-separated words, one per scale point")
    p.add_argument(
        "--modality",
        required=True,
        help="modality of the images (e.g. ct); `fidmed analyze` joins the human scores with the FD results by it",
    )
    p.add_argument("--reuse-real", action="store_true", help="allow one real image in several models' parts")
    p.add_argument("--title", default="Visual Turing test")
    p.add_argument("--device", default="cpu", help="device for generators (cpu, cuda)")
    p.add_argument(
        "--allow-modified-source",
        action="store_true",
        help="accept stylegan2-ada-pytorch pickles whose embedded network source differs from the "
        "reference (weights are still read without running anything from them)",
    )
    p.set_defaults(func=cmd_vtt_make)

    p = vsub.add_parser("score", help="score answers: per rater/model table, model means and rankings")
    p.add_argument(
        "files",
        nargs="+",
        metavar="ANSWERS.csv|KEY.json",
        help="answers CSVs exported by the pages, and the key (.json); without a key, one long table "
        "with columns modality, rater, model, image_id, truth, answer, rating",
    )
    p.add_argument("--out", default="vtt-scores", help="output folder (default ./vtt-scores)")
    p.add_argument("--alpha", type=float, default=0.05, help="level for counting non-rejected tests")
    p.add_argument("--criteria", nargs="+", default=list(DEFAULT_CRITERIA), choices=list(CRITERIA))
    p.add_argument(
        "--allow-missing-raters",
        action="store_true",
        help="score the raters present even if some raters of the key sent no answers",
    )
    p.set_defaults(func=cmd_vtt_score)

    p = sub.add_parser("collect", help="one tidy table of every evaluated number across runs and multiruns")
    p.add_argument("runs", nargs="+", help="run directories, multirun directories or results.json files")
    p.add_argument("--out", default="results.csv", help="output .csv (or .parquet with pyarrow)")
    p.set_defaults(func=cmd_collect)

    p = sub.add_parser("analyze", help="rankings, FD-vs-human correlations, extractor agreement, report")
    p.add_argument("results", nargs="+", help="results table (.csv from `fidmed collect`), run dirs or results.json")
    p.add_argument("--vtt", default=None, help="vtt_answers.csv (or vtt_scores.csv) from `fidmed vtt score`")
    p.add_argument("--out", default="analysis", help="report folder (default ./analysis)")
    p.add_argument("--model-column", default="augmentation", help="results column naming the models")
    p.add_argument("--metric", nargs="+", default=None, help="metrics (default: all in the table, e.g. fd rfd)")
    p.add_argument("--extractor", nargs="+", default=None, help="extractors (default: all in the table)")
    p.add_argument("--modality", nargs="+", default=None, help="modalities (default: those with VTT scores)")
    p.add_argument("--criteria", nargs="+", default=list(DEFAULT_CRITERIA), choices=list(CRITERIA))
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap replicates (0 = none)")
    p.add_argument("--ci", type=float, default=0.95, help="confidence level")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--alpha", type=float, default=0.05)
    p.add_argument(
        "--group",
        action="append",
        metavar="NAME=EX1,EX2",
        help="extractor group for Kendall's W (repeat; default: all, imagenet, radimagenet)",
    )
    p.add_argument("--title", default="fidmed: FD rankings and human judgement")
    p.add_argument("--wandb", action="store_true", help="log tables and figures to W&B (WANDB_MODE, default offline)")
    p.add_argument("--wandb-project", default="fidmed")
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("stats", help="the study's tests (KS, paired t, independent t, Pearson) over a CSV column")
    p.add_argument("csv", help="table (.csv)")
    p.add_argument("--test", required=True, type=str.lower, choices=["ks", "pair", "ind_t", "pearson"])
    p.add_argument("--num-col", "--num_col", dest="num_col", required=True, help="column of numbers to compare")
    p.add_argument("--split", required=True, help="column whose labels define the groups")
    p.add_argument("--segments", nargs="*", default=[], help="test separately per value of these columns")
    p.add_argument("--alternative", default="two-sided", choices=["two-sided", "less", "greater"])
    p.add_argument("--pair-by", nargs="*", default=[], help="pair rows by these key columns (pair, pearson)")
    p.add_argument("--out", default=None, help="write the results as CSV")
    p.set_defaults(func=cmd_stats)

"""collect, analyze (rankings, correlations, bootstrap, agreement), the study's generic tests, and the report."""

from __future__ import annotations

import csv
import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from fidmed.analysis.alignment import (
    HumanData,
    analyze,
    correlation,
    correlation_rows,
    human_from_answers,
    kendalls_w,
    load_human,
)
from fidmed.analysis.collect import TIDY_COLUMNS, collect, load_results
from fidmed.analysis.scoring import GENERATED, REAL, Answer
from fidmed.analysis.stats import study_tests
from fidmed.analysis.tabular import canonical_sha256, write_csv_rows
from fidmed.errors import DataError, FidmedError
from fidmed.evaluation.results import MetricRecord, write_results_json

MODELS = ["noaug", "ada", "apa", "diffaugment"]
EXTRACTORS = ["swav", "dino", "radimagenet_resnet"]
# FDs per modality/extractor, in MODELS order; dino has a tie (two models at 7.0).
FD = {
    "ct": {"swav": [10.0, 8.0, 12.0, 15.0], "dino": [5.0, 7.0, 7.0, 9.0], "radimagenet_resnet": [3.0, 1.0, 2.0, 0.5]},
    "mri": {"swav": [4.0, 6.0, 5.0], "dino": [9.0, 8.0, 7.0], "radimagenet_resnet": [1.0, 3.0, 2.0]},
}
# Generated images called real (of 4) per rater and model; real images all called real, ratings 4 (real images)
# and 2 + answer (generated images: 3 if called real, else 2).
FP = {
    "ct": {"noaug": (2, 3, 1), "ada": (3, 3, 4), "apa": (1, 2, 1), "diffaugment": (0, 1, 0)},
    "mri": {"noaug": (2, 2, 1), "ada": (0, 1, 0), "apa": (1, 1, 1)},
}


def make_answers(fp=FP) -> list[Answer]:
    out = []
    for modality, models in fp.items():
        for model, counts in models.items():
            for rater, k in zip(("r1", "r2", "r3"), counts):
                for i in range(4):
                    out.append(Answer(modality, rater, model, f"{modality}-{model}-r{i}", REAL, REAL, 4.0))
                for i in range(4):
                    said = REAL if i < k else GENERATED
                    out.append(
                        Answer(
                            modality,
                            rater,
                            model,
                            f"{modality}-{model}-g{i}",
                            GENERATED,
                            said,
                            3.0 if said == REAL else 2.0,
                        )
                    )
    return out


def results_rows(fd=FD, metrics=("fd", "rfd")) -> list[dict]:
    rows = []
    for modality, by_ex in fd.items():
        for ex, values in by_ex.items():
            for model, v in zip(MODELS, values):
                for metric in metrics:
                    rows.append(
                        {
                            "modality": modality,
                            "augmentation": model,
                            "extractor": ex,
                            "metric": metric,
                            "value": v if metric == "fd" else v / 4,
                            "results_file": f"{modality}/{model}",
                        }
                    )
    return rows


# ---------------------------------------------------------------------------------------------------------------
# collect


def write_run(
    run_dir: Path,
    modality: str,
    aug: str,
    values: dict[str, float],
    nan: bool = False,
    random_init: tuple[str, ...] = (),
) -> Path:
    recs = []
    for ex, v in values.items():
        protocol = {
            "extractor": ex,
            "n_gen": 100,
            "n_real": 50,
            "seeds": "0-99",
            "weights": f"{ex}.pth",
            "random_init": ex in random_init,
            "input_size": 224,
        }
        ctx = {"modality": modality, "augmentation": aug, "generator": str(run_dir / "g.pt"), "kimg": 2.0}
        recs.append(MetricRecord(ex, ex.upper(), "fd", float("nan") if nan else v, {}, protocol, ctx))
        recs.append(MetricRecord(ex, ex.upper(), "rfd", v / 2, {"fd_real_split": 2.0}, protocol, ctx))
    return write_results_json(
        run_dir / "results.json",
        recs,
        {"run_dir": str(run_dir), "modality": modality, "augmentation": aug, "model": "tiny"},
    )


def test_collect_run_dirs_and_multiruns(tmp_path):
    write_run(tmp_path / "single", "ct", "noaug", {"swav": 3.0, "dino": 4.0})
    for i, aug in enumerate(("ada", "apa")):
        write_run(
            tmp_path / "multirun" / "2026-01-01" / "12-00-00" / str(i),
            "ct",
            aug,
            {"swav": 5.0 + i, "dino": 1.0},
            nan=(aug == "apa"),
        )
    (tmp_path / "train_only").mkdir()
    write_results_json(tmp_path / "train_only" / "results.json", [], {"modality": "ct", "stage": "train"})
    # the same run reachable twice is read once
    c = collect(
        [tmp_path / "single", tmp_path / "multirun", tmp_path / "train_only", tmp_path / "single" / "results.json"]
    )
    assert len(c.files) == 4 and c.empty == [(tmp_path / "train_only" / "results.json").resolve()]
    assert len(c.rows) == 3 * 2 * 2
    row = next(r for r in c.rows if r["augmentation"] == "ada" and r["extractor"] == "swav" and r["metric"] == "fd")
    assert (row["modality"], row["value"], row["n_gen"], row["n_real"], row["kimg"], row["model"]) == (
        "ct",
        5.0,
        100,
        50,
        2.0,
        "tiny",
    )
    payload = json.loads((Path(row["results_file"])).read_text())
    assert row["protocol_sha256"] == canonical_sha256(payload["results"][0]["protocol"])
    nan_row = next(r for r in c.rows if r["augmentation"] == "apa" and r["metric"] == "fd")
    assert math.isnan(nan_row["value"])  # kept, not dropped
    # tidy CSV round trip through the analysis loader
    out = write_csv_rows(tmp_path / "results.csv", c.rows, TIDY_COLUMNS)
    back = load_results([out])
    assert len(back) == len(c.rows)
    assert sorted(r["value"] for r in back if not math.isnan(r["value"])) == sorted(
        r["value"] for r in c.rows if not math.isnan(r["value"])
    )
    with pytest.raises(DataError, match=r"no results.json in .*empty"):
        (tmp_path / "empty").mkdir()
        collect([tmp_path / "empty"])
    with pytest.raises(DataError, match=r"does not exist"):
        collect([tmp_path / "nowhere"])


def hydra_job(folder: Path, overrides: list[str], config: dict | None = None) -> Path:
    """What Hydra writes into a job folder before the job runs."""
    import yaml

    (folder / ".hydra").mkdir(parents=True, exist_ok=True)
    (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if config is not None:
        (folder / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return folder


def test_collect_lists_folders_without_results_and_keeps_failed_jobs_as_rows(tmp_path, capsys):
    import argparse

    from fidmed.analysis.cli import add_analysis_parsers

    runs = tmp_path / "outputs" / "runs"
    ok = runs / "2026-01-01" / "10-00-00"
    write_run(ok, "ct", "noaug", {"swav": 3.0, "dino": 4.0}, random_init=("dino",))
    hydra_job(ok, ["augmentation=noaug", "modality=ct"])
    failed = hydra_job(
        runs / "2026-01-01" / "11-00-00",
        ["augmentation=ada", "modality=ct"],
        {
            "modality": {"name": "ct"},
            "augmentation": {"name": "ada"},
            "model": {"name": "stylegan2"},
            "extractor": {"swav": {"name": "swav"}, "dino": {"name": "dino"}},
        },
    )
    (failed / "error.txt").write_text("no weights for 'swav' here: run `fidmed weights import FILE`\nsha256 abc\n")
    hydra_job(runs / "2026-01-01" / "12-00-00", ["augmentation=apa"])  # stopped before it evaluated
    broken = hydra_job(runs / "2026-01-02" / "08-00-00", ["augmentation=apa"])
    (broken / "results.json").write_text('{"results": [')
    (runs / "2026-01-02" / "09-00-00").mkdir()  # died before Hydra wrote anything
    multirun = tmp_path / "outputs" / "multiruns" / "2026-01-03" / "10-00-00"
    for i in range(11):  # job folders in numeric order, 10 after 9
        write_run(hydra_job(multirun / str(i), [f"seed={i}"]), "ct", f"m{i}", {"swav": float(i)})

    parser = argparse.ArgumentParser(prog="fidmed")
    add_analysis_parsers(parser.add_subparsers(dest="command", required=True))
    folders = sorted(runs.glob("*/*"))  # `fidmed collect outputs/runs/*/*`
    args = parser.parse_args(["collect", *map(str, folders), str(multirun), "--out", str(tmp_path / "results.csv")])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    skipped = [line.strip() for line in out.splitlines() if line.startswith("  ")]
    assert skipped == [
        f"{failed.resolve()}: failed: no weights for 'swav' here: run `fidmed weights import FILE`",
        f"{(runs / '2026-01-01' / '12-00-00').resolve()}: no results.json (not evaluated yet, stopped, or failed "
        f"outside a multirun)",
        f"{broken.resolve()}: unreadable results.json: cannot read {(broken / 'results.json').resolve()} "
        f"(Expecting value: line 1 column 14 (char 13)); it is not a complete results.json.",
        f"{(runs / '2026-01-02' / '09-00-00').resolve()}: no results.json (not evaluated yet, stopped, or failed "
        f"outside a multirun)",
    ]
    assert "26 rows from 12 results.json file(s) and 1 failed job(s)" in out and "!! RANDOM-INIT" in out
    with open(tmp_path / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == list(TIDY_COLUMNS)
    assert [r["status"] for r in rows[:6]] == ["ok", "ok", "ok", "ok", "failed", "ok"]
    assert [r["overrides"] for r in rows[:6]] == ["augmentation=noaug modality=ct"] * 4 + [
        "augmentation=ada modality=ct",
        "seed=0",
    ]
    assert [r["overrides"] for r in rows[-4:]] == ["seed=9", "seed=9", "seed=10", "seed=10"]
    dino = next(r for r in rows if r["extractor"] == "dino")
    assert (dino["label"], dino["random_init"]) == ("dino [RANDOM-INIT]", "True")  # kept in the table
    fail = rows[4]
    assert (
        fail["modality"],
        fail["augmentation"],
        fail["model"],
        fail["extractor"],
        fail["metric"],
        fail["value"],
    ) == ("ct", "ada", "stylegan2", "swav dino", "", "nan")
    assert fail["error"] == "no weights for 'swav' here: run `fidmed weights import FILE`\nsha256 abc"
    assert fail["run_dir"] == str(failed.resolve())
    # the table still loads for `fidmed analyze`, which lists the failed job
    back = load_results([tmp_path / "results.csv"])
    a = analyze([r for r in back if r["modality"] == "ct"], n_boot=0, metrics=["fd"], extractors=["swav"])
    assert any(n.startswith(f"failed job {failed.resolve()} (ct/ada): no weights for 'swav'") for n in a.notes)


# ---------------------------------------------------------------------------------------------------------------
# statistics


def test_correlations_equal_scipy_and_vectorised_rows_agree():
    rng = np.random.default_rng(0)
    x = np.array([3.0, 1.0, 2.0, 2.0, 5.0, 4.0])
    for _ in range(20):
        y = rng.integers(0, 4, 6).astype(float)  # many ties
        out = correlation(x, y)
        if np.all(y == y[0]):
            assert math.isnan(out["pearson"])
            continue
        for name, fn in (("pearson", stats.pearsonr), ("spearman", stats.spearmanr), ("kendall", stats.kendalltau)):
            ref = fn(x, y)
            assert out[name] == float(ref.statistic) and out[f"{name}_p"] == float(ref.pvalue)
    Y = rng.integers(0, 4, (50, 6)).astype(float)
    rows = correlation_rows(x, Y)
    for b in range(50):
        for name, fn in (("pearson", stats.pearsonr), ("spearman", stats.spearmanr), ("kendall", stats.kendalltau)):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # constant rows: SciPy warns and returns NaN
                ref = float(fn(x, Y[b]).statistic)
            if math.isnan(ref):
                assert math.isnan(rows[name][b])
            else:
                assert rows[name][b] == pytest.approx(ref, abs=1e-12)


def test_kendalls_w_by_hand_and_with_ties_against_friedman():
    # judges' ranks (1,2,3,4), (2,1,3,4), (1,3,2,4): rank sums 4, 6, 8, 12, mean 7.5, S = 35,
    # W = 12 S / (m^2 (n^3 - n)) = 420 / 540
    w = kendalls_w(np.array([[1, 2, 3, 4], [2, 1, 3, 4], [1, 3, 2, 4]], dtype=float))
    assert w["W"] == pytest.approx(420 / 540, rel=1e-14)
    assert w["chi2"] == pytest.approx(3 * 3 * 420 / 540, rel=1e-14)
    assert w["p"] == pytest.approx(stats.chi2.sf(7.0, 3), rel=1e-12)
    assert kendalls_w(np.array([[1.0, 2.0, 3.0], [10.0, 20.0, 30.0]]))["W"] == 1.0
    # ties: W = Friedman's tie-corrected chi-square / (m (n - 1))
    values = np.array([[1.0, 2.0, 2.0, 4.0], [3.0, 1.0, 2.0, 2.0], [5.0, 5.0, 1.0, 0.0], [1.0, 2.0, 3.0, 4.0]])
    ref = stats.friedmanchisquare(*values.T)
    w = kendalls_w(values)
    assert w["W"] == pytest.approx(ref.statistic / (4 * 3), rel=1e-12)
    assert w["p"] == pytest.approx(ref.pvalue, rel=1e-10)


# ---------------------------------------------------------------------------------------------------------------
# analyze


def test_analyze_rankings_and_correlations_match_independent_computation():
    human = human_from_answers(make_answers())
    a = analyze(results_rows(), human, n_boot=200, seed=1)
    assert a.coverage.modalities == ["ct", "mri"]
    assert a.coverage.extractors == ["dino", "swav", "radimagenet_resnet"]  # ImageNet first, then RadImageNet
    assert a.notes == []
    models_ct = sorted(MODELS)  # models are analysed in sorted order
    idx = [MODELS.index(m) for m in models_ct]
    # rankings: lowest FD first, ties averaged (dino: ada and apa at 7.0 share ranks 2 and 3 -> 2.5)
    ranks = {
        r["model"]: r["rank"]
        for r in a.tables["rankings"]
        if (r["modality"], r["metric"], r["ranker"]) == ("ct", "fd", "dino")
    }
    assert ranks == {"noaug": 1.0, "ada": 2.5, "apa": 2.5, "diffaugment": 4.0}
    # human FPR rank: highest FPR first. Means: noaug 0.5, ada 10/12, apa 1/3, diffaugment 1/12
    human_ranks = {
        r["model"]: r["rank"]
        for r in a.tables["rankings"]
        if (r["modality"], r["metric"], r["ranker"]) == ("ct", "fd", "fpr")
    }
    assert human_ranks == {"ada": 1.0, "noaug": 2.0, "apa": 3.0, "diffaugment": 4.0}
    # correlations: exactly SciPy on the FDs and the per-model means computed here from FP
    for modality in ("ct", "mri"):
        ms = sorted(FP[modality])
        fpr = [np.mean([k / 4 for k in FP[modality][m]]) for m in ms]
        # Diff = 4 - mean generated rating = 4 - (2 + k/4) per rater
        diff = [np.mean([4 - (2 + k / 4) for k in FP[modality][m]]) for m in ms]
        for metric, scale in (("fd", 1.0), ("rfd", 0.25)):
            for ex in EXTRACTORS:
                fd = [FD[modality][ex][MODELS.index(m)] * scale for m in ms]
                for crit, h in (("fpr", fpr), ("diff", diff)):
                    row = next(
                        r
                        for r in a.tables["correlations"]
                        if (r["modality"], r["metric"], r["extractor"], r["criterion"]) == (modality, metric, ex, crit)
                    )
                    assert row["pearson"] == pytest.approx(float(stats.pearsonr(fd, h).statistic), abs=1e-12)
                    assert row["pearson_p"] == pytest.approx(float(stats.pearsonr(fd, h).pvalue), rel=1e-9)
                    assert row["spearman"] == pytest.approx(float(stats.spearmanr(fd, h).statistic), abs=1e-12)
                    assert row["kendall_p"] == pytest.approx(float(stats.kendalltau(fd, h).pvalue), rel=1e-9)
                    assert row["pearson_ci_low"] <= row["pearson_ci_high"]
                    assert row["bootstrap"] == "raters+images" and row["n_boot"] == 200
                    assert row["expected_sign"] == (-1 if crit == "fpr" else 1)
    # Kendall's W in the analysis equals the function on the FD matrix
    wrow = next(r for r in a.tables["kendall_w"] if (r["modality"], r["metric"], r["group"]) == ("ct", "fd", "all"))
    matrix = np.array([[FD["ct"][ex][i] for i in idx] for ex in EXTRACTORS])
    assert wrow["W"] == pytest.approx(kendalls_w(matrix)["W"], rel=1e-14)
    groups = {r["group"] for r in a.tables["kendall_w"]}
    assert groups == {"all", "imagenet", "radimagenet"}
    pair = next(
        r
        for r in a.tables["extractor_agreement"]
        if (r["modality"], r["metric"], r["extractor_a"], r["extractor_b"]) == ("ct", "fd", "dino", "swav")
    )
    ref = stats.spearmanr([FD["ct"]["dino"][i] for i in idx], [FD["ct"]["swav"][i] for i in idx])
    assert pair["spearman"] == pytest.approx(float(ref.statistic), abs=1e-12)
    # reproducible bootstrap
    again = analyze(results_rows(), human, n_boot=200, seed=1)
    assert json.dumps(again.tables["correlations"]) == json.dumps(a.tables["correlations"])  # NaN-safe equality
    other_seed = analyze(results_rows(), human, n_boot=200, seed=2)
    assert json.dumps(other_seed.tables["correlations"]) != json.dumps(a.tables["correlations"])


def test_bootstrap_is_degenerate_when_resampling_cannot_change_the_scores():
    # every rater calls all generated images of noaug and ada real and none of apa / diffaugment: any resample of
    # raters or images gives the same FPR vector, so the interval collapses onto the point estimate.
    fp = {"ct": {"noaug": (4, 4, 4), "ada": (4, 4, 4), "apa": (0, 0, 0), "diffaugment": (0, 0, 0)}}
    a = analyze(results_rows({"ct": FD["ct"]}), human_from_answers(make_answers(fp)), criteria=["fpr"], n_boot=50)
    for row in a.tables["correlations"]:
        for method in ("pearson", "spearman", "kendall"):
            assert row[f"{method}_ci_low"] == pytest.approx(row[method], abs=1e-12)
            assert row[f"{method}_ci_high"] == pytest.approx(row[method], abs=1e-12)
            assert row[f"{method}_boot_undefined"] == 0


def test_bootstrap_resamples_images_not_only_raters():
    # One rater: resampling raters alone changes nothing, so any spread in the interval comes from the images.
    fp = {"ct": {"noaug": (2,), "ada": (3,), "apa": (1,), "diffaugment": (0,)}}
    answers = [a for a in make_answers({"ct": {m: c * 3 for m, c in fp["ct"].items()}}) if a.rater == "r1"]
    with_images = analyze(results_rows({"ct": FD["ct"]}), human_from_answers(answers), criteria=["fpr"], n_boot=200)
    scores_only = HumanData(scores=human_from_answers(answers).scores)  # same scores, no image-level answers
    raters_only = analyze(results_rows({"ct": FD["ct"]}), scores_only, criteria=["fpr"], n_boot=200)
    for a, b in zip(with_images.tables["correlations"], raters_only.tables["correlations"]):
        assert a["pearson"] == b["pearson"]
        assert a["pearson_ci_high"] - a["pearson_ci_low"] > 0.1
        assert b["pearson_ci_low"] == pytest.approx(b["pearson"])
        assert b["pearson_ci_high"] == pytest.approx(b["pearson"])


def test_scores_table_input_bootstraps_raters_only(tmp_path):
    # per-rater scores typed in (as the study publishes them): FPR per rater and model
    rows = [
        {"modality": "mri", "rater": r, "model": m, "fpr": k / 4, "diff": 2 - k / 4, "ks_pvalue": 0.5}
        for m, counts in FP["mri"].items()
        for r, k in zip(("r1", "r2", "r3"), counts)
    ]
    path = write_csv_rows(tmp_path / "scores.csv", rows)
    human = load_human(path)
    assert human.answers is None and human.bootstrap_unit == "raters"
    a = analyze(results_rows({"mri": FD["mri"]}), human, n_boot=100)
    row = next(
        r for r in a.tables["correlations"] if (r["extractor"], r["criterion"], r["metric"]) == ("swav", "fpr", "fd")
    )
    ms = sorted(FP["mri"])
    fd = [FD["mri"]["swav"][MODELS.index(m)] for m in ms]
    assert row["pearson"] == pytest.approx(float(stats.pearsonr(fd, [np.mean(FP["mri"][m]) / 4 for m in ms]).statistic))
    assert row["bootstrap"] == "raters"
    # KS p-values all 0.5: a constant human score -> correlation NaN, kept with the undefined count
    ks = next(
        r for r in a.tables["correlations"] if (r["extractor"], r["criterion"], r["metric"]) == ("swav", "ks", "fd")
    )
    assert math.isnan(ks["pearson"]) and ks["pearson_boot_undefined"] == 100


def test_analyze_names_exactly_what_is_missing():
    human = human_from_answers(make_answers())
    rows = results_rows()
    with pytest.raises(DataError, match=r"no results at all for modality mri"):
        analyze([r for r in rows if r["modality"] != "mri"], human, n_boot=0)
    with pytest.raises(DataError, match=r"modality mri: extractor dino has no fd results"):
        analyze(
            [r for r in rows if not (r["modality"], r["extractor"], r["metric"]) == ("mri", "dino", "fd")],
            human,
            n_boot=0,
        )
    with pytest.raises(DataError, match=r"modality ct, extractor swav, rfd: no result for model\(s\) apa"):
        analyze(
            [
                r
                for r in rows
                if not (r["modality"], r["extractor"], r["metric"], r["augmentation"]) == ("ct", "swav", "rfd", "apa")
            ],
            human,
            n_boot=0,
        )
    with pytest.raises(
        DataError,
        match=r"two results for modality ct, metric fd, extractor swav, model ada: ct/ada "
        r"and ct/ada",
    ):
        analyze(
            rows
            + [
                r
                for r in rows
                if (r["modality"], r["metric"], r["extractor"], r["augmentation"]) == ("ct", "fd", "swav", "ada")
            ],
            human,
            n_boot=0,
        )
    bad = [
        dict(r, value=float("nan"))
        if (r["modality"], r["extractor"], r["metric"], r["augmentation"]) == ("ct", "dino", "fd", "apa")
        else r
        for r in rows
    ]
    with pytest.raises(DataError, match=r"non-finite values .*ct/apa/dino/fd"):
        analyze(bad, human, n_boot=0)
    with pytest.raises(DataError, match=r"no column 'generator_name'"):
        analyze(rows, human, model_column="generator_name")
    # a model with results but no VTT: kept out of the correlations and said so
    only3 = make_answers({"ct": {m: FP["ct"][m] for m in ("noaug", "ada", "apa")}, "mri": FP["mri"]})
    a = analyze(rows, human_from_answers(only3), n_boot=0)
    assert a.notes == [
        "ct: model(s) diffaugment have results but no VTT scores; they are left out of the rankings and correlations."
    ]
    with pytest.raises(FidmedError, match=r"unknown human criterion 'vibes'"):
        analyze(rows, human, criteria=["vibes"])


def test_analyze_without_vtt_reports_agreement_only():
    a = analyze(results_rows(), None)
    assert "correlations" not in a.tables and a.tables["kendall_w"]
    assert {r["kind"] for r in a.tables["rankings"]} == {"extractor"}


# ---------------------------------------------------------------------------------------------------------------
# the study's generic tests


def test_study_tests_equal_scipy_calls_with_segments_and_pairs():
    rows = []
    for ds in ("ct", "mri"):
        for aug, base in (("noaug", 1.0), ("ada", 2.0), ("apa", 4.0)):
            for bb, scale in (("swav", 1.0), ("dino", 1.5), ("rad", -0.5)):
                rows.append(
                    {
                        "Dataset": ds,
                        "Augmentation": aug,
                        "Backbone": bb,
                        "Distance": str(base * scale + (0.3 if ds == "mri" else 0.0) + len(aug) * 0.01),
                    }
                )
    out = study_tests(rows, "pearson", "Distance", "Backbone", segments=["Dataset"])
    assert [(r.segment, r.label_1, r.label_2) for r in out] == [
        (f"Dataset={ds}", a, b) for ds in ("ct", "mri") for a, b in (("swav", "dino"), ("swav", "rad"), ("dino", "rad"))
    ]
    for r in out:
        ds = r.segment.split("=")[1]
        x = [float(q["Distance"]) for q in rows if q["Dataset"] == ds and q["Backbone"] == r.label_1]
        y = [float(q["Distance"]) for q in rows if q["Dataset"] == ds and q["Backbone"] == r.label_2]
        ref = stats.pearsonr(x, y)
        assert (r.statistic, r.pvalue) == (float(ref.statistic), float(ref.pvalue))
    for test, fn in (("ks", stats.kstest), ("ind_t", stats.ttest_ind), ("pair", stats.ttest_rel)):
        (r,) = [
            q
            for q in study_tests(rows, test, "Distance", "Backbone", alternative="less")
            if (q.label_1, q.label_2) == ("swav", "dino")
        ]
        x = [float(q["Distance"]) for q in rows if q["Backbone"] == "swav"]
        y = [float(q["Distance"]) for q in rows if q["Backbone"] == "dino"]
        ref = fn(x, y, alternative="less")
        assert (r.statistic, r.pvalue, r.n_1, r.n_2) == (float(ref.statistic), float(ref.pvalue), 6, 6)
    # pairing by key columns instead of file order: shuffle one label's rows, same result
    shuffled = [q for q in rows if q["Backbone"] != "dino"] + [q for q in rows if q["Backbone"] == "dino"][::-1]
    keyed = study_tests(shuffled, "pair", "Distance", "Backbone", pair_by=["Dataset", "Augmentation"])
    plain = study_tests(rows, "pair", "Distance", "Backbone")
    # (labels now appear in the order swav, rad, dino: compare pair by pair, the same orientation)
    keyed_by = {(r.label_1, r.label_2): (r.statistic, r.pvalue) for r in keyed}
    for r in plain:
        if (r.label_1, r.label_2) in keyed_by:
            assert keyed_by[(r.label_1, r.label_2)] == (r.statistic, r.pvalue)
        else:
            assert keyed_by[(r.label_2, r.label_1)] == (-r.statistic, r.pvalue)
    with pytest.raises(DataError, match=r"label 'swav' has 6 rows and 'dino' has 5"):
        study_tests(rows[:-2], "pair", "Distance", "Backbone")
    with pytest.raises(DataError, match=r"cannot pair 'swav' with 'dino'.*'dino' lacks .*'Augmentation': 'apa'"):
        study_tests(
            [q for q in rows if not (q["Backbone"] == "dino" and q["Augmentation"] == "apa")],
            "pair",
            "Distance",
            "Backbone",
            pair_by=["Dataset", "Augmentation"],
        )
    with pytest.raises(DataError, match=r"line 3 column Distance is empty"):
        study_tests([dict(q, Distance="") if i == 1 else q for i, q in enumerate(rows)], "ks", "Distance", "Backbone")
    with pytest.raises(DataError, match=r"lacks the column\(s\) Dist"):
        study_tests(rows, "ks", "Dist", "Backbone")


# ---------------------------------------------------------------------------------------------------------------
# report


def test_report_renders_and_logs_to_wandb(tmp_path, monkeypatch):
    from fidmed.analysis.report import build_report, log_report_to_wandb

    a = analyze(results_rows({"ct": FD["ct"]}), human_from_answers(make_answers({"ct": FP["ct"]})), n_boot=20)
    report = build_report(a, tmp_path / "report")
    assert report.markdown_path.is_file() and report.html_path.is_file()
    names = {f.name for f in report.figures}
    assert names == {"rankings_fd", "rankings_rfd", "scatter_ct_fd", "scatter_ct_rfd", "agreement_fd", "agreement_rfd"}
    for f in report.figures:
        data = f.path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
        import PIL.Image

        with PIL.Image.open(f.path) as im:
            assert im.size[0] > 200 and im.size[1] > 100
            assert len(np.unique(np.asarray(im.convert("L")))) > 10  # not a blank canvas
    md = report.markdown_path.read_text()
    assert "![" in md and "figures/rankings_fd.png" in md
    assert "| model | dino | swav | radimagenet_resnet | ks | diff | fpr |" in md
    assert "2.5= (7)" in md  # dino ties ada/apa at FD 7: rank 2.5, marked
    html = report.html_path.read_text()
    assert html.count("data:image/png;base64,") == len(report.figures)
    assert "http://" not in html and "https://" not in html
    for t in report.tables:
        if t.csv_path:
            with open(t.csv_path) as f:
                assert len(list(csv.DictReader(f))) == len(a.tables[t.name])

    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = wandb.init(project="fidmed-test", dir=str(tmp_path), mode="offline")
    try:
        logged = log_report_to_wandb(report, run)
    finally:
        run.finish()
    assert set(logged) == {f"analysis/{t.name}" for t in report.tables} | {
        f"analysis/figures/{f.name}" for f in report.figures
    } | {"analysis/report"}
    files = list((tmp_path / "wandb").glob("offline-run-*/files/media/**/*"))
    tables = [p for p in files if p.name.endswith(".table.json")]
    images = [p for p in files if p.suffix == ".png"]
    assert len(tables) == len(report.tables) and len(images) == len(report.figures)
    corr = next(p for p in tables if p.name.startswith("correlations"))
    payload = json.loads(corr.read_text())
    assert len(payload["data"]) == len(a.tables["correlations"])


def test_analyze_marks_every_random_init_number_in_tables_figures_and_report(tmp_path, monkeypatch):
    import matplotlib.figure

    from fidmed.analysis.report import build_report

    for i, model in enumerate(MODELS):  # swav had no weights: random-init, labelled so in results.json
        write_run(
            tmp_path / "runs" / model, "ct", model, {ex: FD["ct"][ex][i] for ex in EXTRACTORS}, random_init=("swav",)
        )
    table = write_csv_rows(tmp_path / "results.csv", collect([tmp_path / "runs"]).rows, TIDY_COLUMNS)
    a = analyze(load_results([table]), human_from_answers(make_answers({"ct": FP["ct"]})), n_boot=10)
    assert a.random_init == ["swav"] and a.label("swav") == "swav [RANDOM-INIT]" and a.label("dino") == "dino"
    for name in ("fd_values", "correlations"):
        assert a.tables[name] and all(r["random_init"] == (r["extractor"] == "swav") for r in a.tables[name])
    assert all(r["random_init"] == (r["ranker"] == "swav") for r in a.tables["rankings"])
    assert all(
        (r["random_init_a"], r["random_init_b"]) == (r["extractor_a"] == "swav", r["extractor_b"] == "swav")
        for r in a.tables["extractor_agreement"]
    )
    assert {r["group"]: r["random_init_members"] for r in a.tables["kendall_w"] if r["metric"] == "fd"} == {
        "all": "swav",
        "imagenet": "swav",
        "radimagenet": "",
    }

    texts: list[str] = []
    save = matplotlib.figure.Figure.savefig

    def record(fig, *args, **kwargs):
        texts.extend(t.get_text() for t in fig.findobj(matplotlib.text.Text))
        return save(fig, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", record)
    report = build_report(a, tmp_path / "report")
    # ranking and agreement figure tick labels, scatter panel titles
    assert texts.count("swav [RANDOM-INIT]") == 2 * 2 + 2 * 2 * 2  # per metric: ranking x1, agreement x and y
    assert sum(t.startswith("swav [RANDOM-INIT]\nr=") for t in texts) == 2 * 3  # per metric: one per criterion
    assert not any(t == "swav" or t.startswith("swav\n") for t in texts)
    md = report.markdown_path.read_text()
    assert md.index("> **!! RANDOM-INIT: the numbers of swav [RANDOM-INIT] come from random-init") < md.index(
        "## Settings"
    )
    assert "| model | dino | swav [RANDOM-INIT] | radimagenet_resnet | ks | diff | fpr |" in md
    assert "| ct | fd | swav [RANDOM-INIT] | ks |" in md  # the correlations table
    assert "| ct | fd | dino | swav [RANDOM-INIT] |" in md  # pairwise agreement
    html = report.html_path.read_text()
    assert "<p class='banner' role='alert'>!! RANDOM-INIT" in html
    with open(report.out_dir / "tables" / "correlations.csv") as f:  # full precision: plain name + the flag
        assert {(r["extractor"], r["random_init"]) for r in csv.DictReader(f)} == {
            ("swav", "True"),
            ("dino", "False"),
            ("radimagenet_resnet", "False"),
        }
    # without random-init numbers: no banner, plain names
    plain = analyze(results_rows({"ct": FD["ct"]}), human_from_answers(make_answers({"ct": FP["ct"]})), n_boot=0)
    assert plain.random_init == [] and build_report(plain, tmp_path / "plain").banner == []


# ---------------------------------------------------------------------------------------------------------------
# the commands


def test_cli_collect_analyze_stats(tmp_path, capsys):
    import argparse

    from fidmed.analysis.cli import add_analysis_parsers

    parser = argparse.ArgumentParser(prog="fidmed")
    add_analysis_parsers(parser.add_subparsers(dest="command", required=True))

    def run(*argv):
        args = parser.parse_args([str(a) for a in argv])
        return args.func(args)

    for model, i in zip(MODELS, range(4)):
        write_run(tmp_path / "runs" / model, "ct", model, {ex: FD["ct"][ex][i] for ex in EXTRACTORS})
    assert run("collect", tmp_path / "runs", "--out", tmp_path / "results.csv") == 0
    answers = write_csv_rows(tmp_path / "answers.csv", [a.to_dict() for a in make_answers({"ct": FP["ct"]})])
    assert run("vtt", "score", answers, "--out", tmp_path / "scores") == 0  # a long table needs no key
    assert (
        run(
            "analyze",
            tmp_path / "results.csv",
            "--vtt",
            tmp_path / "scores" / "vtt_answers.csv",
            "--out",
            tmp_path / "analysis",
            "--bootstrap",
            "20",
            "--metric",
            "fd",
        )
        == 0
    )
    with open(tmp_path / "analysis" / "tables" / "correlations.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(EXTRACTORS) * 3
    row = next(r for r in rows if (r["extractor"], r["criterion"]) == ("swav", "fpr"))
    ms = sorted(MODELS)
    expected = stats.pearsonr([FD["ct"]["swav"][MODELS.index(m)] for m in ms], fpr_means_sorted("ct"))
    assert float(row["pearson"]) == pytest.approx(float(expected.statistic), abs=1e-12)
    assert (tmp_path / "analysis" / "report.html").stat().st_size > 10_000
    assert (
        run(
            "stats",
            tmp_path / "results.csv",
            "--test",
            "Pearson",
            "--num_col",
            "value",
            "--split",
            "extractor",
            "--segments",
            "metric",
            "--out",
            tmp_path / "stats.csv",
        )
        == 0
    )
    with open(tmp_path / "stats.csv") as f:
        assert len(list(csv.DictReader(f))) == 2 * 3  # fd, rfd x 3 extractor pairs
    no_modality = write_csv_rows(
        tmp_path / "nomod.csv", [dict(a.to_dict(), modality="") for a in make_answers({"ct": FP["ct"]})]
    )
    with pytest.raises(DataError, match=r"nomod.csv: no modality on line\(s\) 2, 3, 4"):
        run("analyze", tmp_path / "results.csv", "--vtt", no_modality)
    with pytest.raises(DataError, match=r"no results at all for modality mri"):
        run("analyze", tmp_path / "results.csv", "--vtt", answers_with_mri(tmp_path), "--bootstrap", "0")
    with pytest.raises(FidmedError, match=r"pyarrow"):
        try:
            import pyarrow  # noqa: F401

            raise FidmedError("pyarrow")  # installed: nothing to test here
        except ImportError:
            run("collect", tmp_path / "runs", "--out", tmp_path / "results.parquet")


def fpr_means_sorted(modality: str) -> list[float]:
    return [np.mean([k / 4 for k in FP[modality][m]]) for m in sorted(FP[modality])]


def answers_with_mri(tmp_path: Path) -> Path:
    return write_csv_rows(tmp_path / "answers_mri.csv", [a.to_dict() for a in make_answers()])


# ---------------------------------------------------------------------------------------------------------------
# Equal means rank equal (exact aggregation): the issue's example, five raters and 10 generated images per model.
# m1 and m2 both have 28 of 50 generated images called real; float summation gives 0.5599999999999999 and 0.56.

TIED_FP = {"m1": (5, 7, 8, 8, 0), "m2": (2, 4, 10, 8, 4), "m3": (10, 9, 9, 9, 9), "m4": (1, 1, 1, 1, 1)}
# FDs with the same tie: m3 best, m1 = m2, m4 worst; the human FPR order reversed exactly (Spearman -1)
TIED_FD = {"m1": 2.0, "m2": 2.0, "m3": 1.0, "m4": 3.0}


def tied_answers(fp=TIED_FP, n=10, ratings=(4.0, 3.0, 2.0)) -> list[Answer]:
    """Real images all called real (rating ratings[0]); generated ones rated ratings[1] when called real, else
    ratings[2]."""
    out = []
    for model, counts in fp.items():
        for rater, k in zip("abcde", counts):
            for i in range(n):
                out.append(Answer("ct", rater, model, f"{model}-r{i}", REAL, REAL, ratings[0]))
                said = REAL if i < k else GENERATED
                out.append(
                    Answer(
                        "ct", rater, model, f"{model}-g{i}", GENERATED, said, ratings[1] if said == REAL else ratings[2]
                    )
                )
    return out


def tied_results(fd=TIED_FD) -> list[dict]:
    return [
        {
            "modality": "ct",
            "augmentation": m,
            "extractor": ex,
            "metric": "fd",
            "value": v * (1 + j),
            "results_file": f"{ex}/{m}",
        }
        for j, ex in enumerate(("swav", "dino"))
        for m, v in fd.items()
    ]


def test_equal_means_rank_equal_and_correlate_exactly(tmp_path):
    from fidmed.analysis.report import build_report

    a = analyze(tied_results(), human_from_answers(tied_answers()), criteria=["fpr", "diff"], n_boot=20)
    ranks = {(r["ranker"], r["model"]): r["rank"] for r in a.tables["rankings"]}
    assert [ranks[("fpr", m)] for m in ("m1", "m2", "m3", "m4")] == [2.5, 2.5, 1.0, 4.0]
    assert [ranks[("diff", m)] for m in ("m1", "m2", "m3", "m4")] == [2.5, 2.5, 1.0, 4.0]
    assert [ranks[("swav", m)] for m in ("m1", "m2", "m3", "m4")] == [2.5, 2.5, 1.0, 4.0]
    scores = {r["model"]: r for r in a.tables["human_scores"]}
    assert scores["m1"]["fpr"] == scores["m2"]["fpr"] == 0.56
    for row in a.tables["correlations"]:
        sign = -1 if row["criterion"] == "fpr" else 1
        # float means ranked m1 below m2 (FD: equal): Spearman -0.95 and Kendall -0.91 instead of -1
        assert row["spearman"] == pytest.approx(sign, abs=1e-12)
        assert row["kendall"] == pytest.approx(sign, abs=1e-12)
    md = build_report(a, tmp_path / "report").markdown_path.read_text()
    assert "| model | dino | swav | fpr | diff |" in md
    assert "| m1 | 2.5= (4) | 2.5= (2) | 2.5= (0.56) | 2.5= (1.44) |" in md
    assert "| m2 | 2.5= (4) | 2.5= (2) | 2.5= (0.56) | 2.5= (1.44) |" in md
    assert "| m3 | 1 (2) | 1 (1) | 1 (0.92) | 1 (1.08) |" in md
    # the per-model human table marks the tied ranks too
    human_table = md.split("### Human scores per model")[1].split("###")[0]
    assert "| ct | m1 | 5 | 0.56 | 1.44 | 2.5= | 2.5= |" in human_table
    assert "| ct | m2 | 5 | 0.56 | 1.44 | 2.5= | 2.5= |" in human_table
    assert "| ct | m3 | 5 | 0.92 | 1.08 | 1 | 1 |" in human_table


@pytest.mark.parametrize("typed", ["fractions", "percentages"])
def test_tables_typed_as_fractions_or_percentages_rank_alike(tmp_path, typed):
    rows = [
        {"modality": "ct", "rater": r, "model": m, "fpr": f"{k / 10}" if typed == "fractions" else f"{k * 10}"}
        for m, counts in TIED_FP.items()
        for r, k in zip("abcde", counts)
    ]
    human = load_human(write_csv_rows(tmp_path / "scores.csv", rows))
    a = analyze(tied_results(), human, criteria=["fpr"], n_boot=0)
    ranks = {r["model"]: r["rank"] for r in a.tables["rankings"] if r["ranker"] == "fpr"}
    assert ranks == {"m1": 2.5, "m2": 2.5, "m3": 1.0, "m4": 4.0}
    for row in a.tables["correlations"]:
        assert row["spearman"] == pytest.approx(-1, abs=1e-12) and row["kendall"] == pytest.approx(-1, abs=1e-12)


def boot_undefined(analysis) -> dict:
    return {
        (r["extractor"], r["criterion"], m): r[f"{m}_boot_undefined"]
        for r in analysis.tables["correlations"]
        for m in ("pearson", "spearman", "kendall")
    }


def test_bootstrap_keeps_exact_ties_over_raters(tmp_path):
    # Two models: a replicate whose resampled raters give m1 and m2 equal means makes every correlation with the
    # (distinct) FDs undefined. Typed as percentages the per-rater values are integers and float means are exact, so
    # the fractions table must give the same number of undefined replicates (float sums broke some of the ties).
    fp = {m: TIED_FP[m] for m in ("m1", "m2")}
    fd = {"m1": 1.0, "m2": 2.0}
    out = {}
    for typed in ("fractions", "percentages"):
        rows = [
            {"modality": "ct", "rater": r, "model": m, "fpr": f"{k / 10}" if typed == "fractions" else f"{k * 10}"}
            for m, counts in fp.items()
            for r, k in zip("abcde", counts)
        ]
        human = load_human(write_csv_rows(tmp_path / f"{typed}.csv", rows))
        out[typed] = boot_undefined(analyze(tied_results(fd), human, criteria=["fpr"], n_boot=400, seed=3))
    assert out["fractions"] == out["percentages"]
    assert min(out["percentages"].values()) > 20  # ties are common: the test tests something


def test_bootstrap_keeps_exact_ties_over_raters_and_images():
    # Answers: each rater gives all real images of a model one rating and all generated images another, so Diff
    # does not change when images are resampled. Ratings in tenths (1.3, 1.8, ...) against the same ratings times 10
    # (integers, exact in floats): the same Diff order in every replicate, so the same undefined count.
    d = {"m1": (5, 7, 8, 8, 0), "m2": (2, 4, 10, 8, 4)}
    fd = {"m1": 1.0, "m2": 2.0}
    out = {}
    for scale in (1, 10):
        answers = []
        for model, ks in d.items():
            for rater, k in zip("abcde", ks):
                for i in range(3):
                    answers.append(Answer("ct", rater, model, f"{model}-r{i}", REAL, REAL, (13 + k) * scale / 10))
                    answers.append(Answer("ct", rater, model, f"{model}-g{i}", GENERATED, GENERATED, 13 * scale / 10))
        a = analyze(tied_results(fd), human_from_answers(answers), criteria=["diff"], n_boot=400, seed=3)
        out[scale] = boot_undefined(a)
        assert {r["model"]: r["rank"] for r in a.tables["rankings"] if r["ranker"] == "diff"} == {"m1": 1.5, "m2": 1.5}
    assert out[1] == out[10]
    assert min(out[10].values()) > 20


# ---------------------------------------------------------------------------------------------------------------
# rank confidence and the memorisation audit (results evaluated with eval.uncertainty / eval.audit)


def _write_trust_run(run_dir: Path, model: str, fds: dict, reps: dict, key: str = "k1", grid: Path | None = None):
    from fidmed.metrics.uncertainty import RESAMPLERS, ResamplePlan, summarise

    plan = ResamplePlan(len(next(iter(reps.values()))), seed=0)
    info = RESAMPLERS.get("fd").info
    ctx = {"modality": "ct", "augmentation": model, "generator": "g.pt", "kimg": 1.0}
    recs = []
    for ex, v in fds.items():
        protocol = {"extractor": ex, "n_gen": 100, "n_real": 50, "random_init": False}
        details = {"uncertainty": summarise(v, np.asarray(reps[ex]), info, "fd", plan, key)}
        recs.append(MetricRecord(ex, ex.upper(), "fd", v, details, protocol, ctx))
    for name, value in (("authenticity", 0.5), ("copies", 0.25 if model == "ada" else 0.0), ("ct", -4.0)):
        recs.append(MetricRecord("pixels", "pixel space", name, value, {"grid": str(grid) if grid else None}, {}, ctx))
    return write_results_json(run_dir / "results.json", recs, {"run_dir": str(run_dir), "modality": "ct"})


def test_rank_confidence_beside_the_human_rankings(tmp_path):
    from fidmed.analysis.report import build_report
    from fidmed.metrics.uncertainty import rank_confidence

    rng = np.random.default_rng(0)
    fds = {"swav": FD["ct"]["swav"], "dino": [5.0, 5.1, 5.2, 5.3]}
    # swav's models lie far apart relative to their replicates (the order holds), dino's within their noise
    reps = {ex: [v + rng.normal(0, 0.05 if ex == "swav" else 1.0, 200) for v in fds[ex]] for ex in fds}
    import PIL.Image

    grid = tmp_path / "grid.png"
    PIL.Image.fromarray(np.full((8, 20), 128, np.uint8)).save(grid)
    for i, model in enumerate(MODELS):
        _write_trust_run(
            tmp_path / "runs" / model,
            model,
            {ex: fds[ex][i] for ex in fds},
            {ex: reps[ex][i] for ex in fds},
            grid=grid,
        )
    table = write_csv_rows(tmp_path / "results.csv", collect([tmp_path / "runs"]).rows, TIDY_COLUMNS)
    a = analyze(load_results([table]), human_from_answers(make_answers({"ct": FP["ct"]})), metrics=["fd"], n_boot=10)
    conf = {r["extractor"]: r for r in a.tables["ranking_confidence"]}
    for ex in fds:
        want = rank_confidence(fds[ex], np.stack(reps[ex]))
        assert conf[ex]["p_ranking"] == pytest.approx(want.p_ranking)
        pairs = [r for r in a.tables["rank_confidence"] if r["extractor"] == ex]
        assert len(pairs) == 6 and all(
            r["p_order"] == pytest.approx(want.pairs[(MODELS.index(r["ahead"]), MODELS.index(r["behind"]))])
            for r in pairs
        )
    assert conf["swav"]["order"] == "holds" and conf["dino"]["order"] == "mostly noise"
    corr = [r for r in a.tables["correlations"] if r["extractor"] == "dino"]
    assert corr and all(r["order"] == "mostly noise" and r["p_ranking"] < 0.5 for r in corr)
    assert {r["extractor"] for r in a.tables["audit"]} == {"pixels"} and len(a.tables["audit"]) == 4
    assert "authenticity" not in a.coverage.metrics and "pixels" not in a.coverage.extractors
    report = build_report(a, tmp_path / "report")
    md = report.markdown_path.read_text()
    assert "## Rank confidence" in md and "| P(ranking holds) |" in md and "(mostly noise)" in md
    assert "± " in md  # values shown with their standard error beside the ranks
    assert "## Memorisation audit" in md and "figures/audit_ct_ada_pixels.png" in md
    assert (tmp_path / "report" / "figures" / "audit_ct_ada_pixels.png").is_file()


def test_rank_confidence_needs_the_same_real_resample_for_every_model(tmp_path):
    rng = np.random.default_rng(1)
    for i, model in enumerate(MODELS):
        _write_trust_run(
            tmp_path / "runs" / model,
            model,
            {"swav": FD["ct"]["swav"][i]},
            {"swav": FD["ct"]["swav"][i] + rng.normal(0, 0.1, 50)},
            key="other" if model == "apa" else "k1",
        )
    a = analyze(collect([tmp_path / "runs"]).rows, metrics=["fd"])
    assert "ranking_confidence" not in a.tables
    assert any("redrew different real images" in n for n in a.notes)

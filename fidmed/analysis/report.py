"""The human-alignment report: Markdown and self-contained HTML, figures (matplotlib), tables (CSV), and W&B.

Ties: wherever a rank is displayed (the ranking figure and tables, the human scores table, the ``fidmed vtt score``
printout) ``=`` after it marks a rank shared with another model of the modality, e.g. ``2.5=`` for two models tied
for second (average ranks); the CSV tables keep plain numbers, where equal ranks are the ties.

Figures: the ranking figure (per modality: models x extractors and human criteria, cell = rank, ``=`` marks a tie),
FD-vs-human scatter plots (one panel per extractor and criterion, Pearson r and p in the title), and the pairwise
Spearman agreement between extractors. The HTML embeds its figures as ``data:`` URIs, so the file
can be mailed or archived alone. :func:`log_report_to_wandb` logs the same tables and figures to a W&B run.

Rank confidence (results with bootstrap replicates): the ranking tables end with the probability that each
extractor's whole ranking holds, values show their standard error (``12.3 ± 0.6``), a section lists every pairwise
order with its probability, and the correlation table says for each extractor whether its order ``holds``, is
``uncertain`` or ``mostly noise``. The memorisation audit (results with ``eval.audit``) gets a table and the grids
of the closest pairs (copied into the report's figures).

Random-init extractors: wherever an extractor is named (table cells and headings, figure labels) a random-init one
is shown as ``swav [RANDOM-INIT]`` (:attr:`Analysis.labels`), the CSV tables keep the plain name with a
``random_init`` column, and the report opens with a banner saying that those numbers test the plumbing only.
"""

from __future__ import annotations

import base64
import html
import math
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fidmed.analysis.alignment import Analysis
from fidmed.analysis.scoring import tied
from fidmed.analysis.tabular import columns_of, write_csv_rows
from fidmed.evaluation.results import RANDOM_BANNER


@dataclass
class Table:
    name: str
    title: str
    rows: list[dict[str, Any]]
    columns: list[str]
    csv_path: Path | None = None


@dataclass
class Figure:
    name: str
    caption: str
    path: Path


@dataclass
class Section:
    title: str
    text: list[str] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)


@dataclass
class Report:
    title: str
    out_dir: Path
    sections: list[Section]
    markdown_path: Path | None = None
    html_path: Path | None = None
    banner: list[str] = field(default_factory=list)  # warnings shown above everything (random-init numbers)

    @property
    def tables(self) -> list[Table]:
        return [t for s in self.sections for t in s.tables]

    @property
    def figures(self) -> list[Figure]:
        return [f for s in self.sections for f in s.figures]


# ---------------------------------------------------------------------------------------------------------------
# Formatting


def fmt(value: Any) -> str:
    """Numbers for people: 4 significant digits, p-values below 0.001 in scientific notation, NaN as 'n/a'."""
    if isinstance(value, bool) or value is None:
        return "" if value is None else str(value)
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        v = float(value)
        if math.isnan(v):
            return "n/a"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        if v != 0 and abs(v) < 1e-3:
            return f"{v:.2e}"
        return f"{v:.4g}"
    return str(value)


def fmt_rank(rank: float, is_tied: bool) -> str:
    """A rank for people: ``2.5=`` when tied (shared with another model), ``1`` when not, ``n/a`` when undefined."""
    text = f"{rank:g}" if not math.isnan(rank) else "n/a"
    return text + ("=" if is_tied else "")


def mark_ties(
    rows: Sequence[dict[str, Any]], rank_columns: Sequence[str], within: Sequence[str] = ("modality",)
) -> list[dict[str, Any]]:
    """Display copies of ``rows``: each of ``rank_columns`` as text by :func:`fmt_rank`, tied where another row with
    the same ``within`` values (the same modality) has the same rank."""
    out = [dict(r) for r in rows]
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in out:
        groups.setdefault(tuple(r.get(c) for c in within), []).append(r)
    for col in rank_columns:
        for items in groups.values():
            present = [r for r in items if col in r]
            ranks = [float(r[col]) for r in present]
            for r, rank, t in zip(present, ranks, tied(ranks)):
                r[col] = fmt_rank(rank, t)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Figures


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def ranking_figure(analysis: Analysis, metric: str, path: Path) -> Path:
    """Per modality a heatmap: rows = models, columns = extractors then human criteria; text = rank."""
    plt = _plt()
    rows = [r for r in analysis.tables["rankings"] if r["metric"] == metric]
    modalities = analysis.coverage.modalities
    ext_cols = analysis.coverage.extractors
    human_cols = [c.name for c in analysis.criteria] if any(r["kind"] == "human" for r in rows) else []
    cols = ext_cols + human_cols
    n_models = max(len(analysis.coverage.models[m]) for m in modalities)
    fig, axes = plt.subplots(
        len(modalities),
        1,
        squeeze=False,
        figsize=(1.0 + 0.75 * len(cols), 1.2 + (0.45 * n_models + 0.9) * len(modalities)),
    )
    for ax, modality in zip(axes[:, 0], modalities):
        models = analysis.coverage.models[modality]
        grid = np.full((len(models), len(cols)), np.nan)
        for r in rows:
            if r["modality"] == modality:
                grid[models.index(r["model"]), cols.index(r["ranker"])] = r["rank"]
        ax.imshow(grid, cmap="viridis_r", vmin=1, vmax=max(len(models), 2), aspect="auto")
        for j in range(len(cols)):
            ties = tied(list(grid[:, j]))
            for i in range(len(models)):
                ax.text(
                    j,
                    i,
                    fmt_rank(grid[i, j], ties[i]),
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if grid[i, j] > (len(models) + 1) / 2 else "black",
                )
        if human_cols:
            ax.axvline(len(ext_cols) - 0.5, color="red", linewidth=2)
        ax.set_xticks(
            range(len(cols)), [analysis.label(c) for c in ext_cols] + human_cols, rotation=60, ha="right", fontsize=8
        )
        ax.set_yticks(range(len(models)), models, fontsize=8)
        ax.set_title(
            f"{modality}: model ranks by {metric.upper()} per extractor"
            + (" | human criteria (right of the red line)" if human_cols else ""),
            fontsize=9,
        )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def scatter_figure(analysis: Analysis, modality: str, metric: str, path: Path) -> Path:
    """FD (x) against each human criterion (y), one panel per extractor and criterion, models labelled."""
    plt = _plt()
    models = analysis.coverage.models[modality]
    exts = analysis.coverage.extractors
    fd = {
        (r["extractor"], r["model"]): r["value"]
        for r in analysis.tables["fd_values"]
        if r["modality"] == modality and r["metric"] == metric
    }
    human = {r["model"]: r for r in analysis.tables["human_scores"] if r["modality"] == modality}
    corr = {
        (r["extractor"], r["criterion"]): r
        for r in analysis.tables["correlations"]
        if r["modality"] == modality and r["metric"] == metric
    }
    crits = analysis.criteria
    fig, axes = plt.subplots(
        len(crits), len(exts), squeeze=False, figsize=(0.4 + 2.3 * len(exts), 0.4 + 2.2 * len(crits))
    )
    for i, c in enumerate(crits):
        for j, ex in enumerate(exts):
            ax = axes[i, j]
            x = [fd[(ex, m)] for m in models]
            y = [human[m][c.name] for m in models]
            ax.scatter(x, y, s=18)
            for m, xv, yv in zip(models, x, y):
                ax.annotate(m, (xv, yv), fontsize=6, xytext=(2, 2), textcoords="offset points")
            r = corr[(ex, c.name)]
            ax.set_title(f"{analysis.label(ex)}\nr={fmt(r['pearson'])} p={fmt(r['pearson_p'])}", fontsize=7)
            ax.tick_params(labelsize=6)
            if i == len(crits) - 1:
                ax.set_xlabel(metric.upper(), fontsize=7)
            if j == 0:
                ax.set_ylabel(c.name, fontsize=7)
    fig.suptitle(f"{modality}: {metric.upper()} vs human scores (means over raters)", fontsize=9)
    # fixed margins: tight_layout costs seconds with dozens of panels
    fig.subplots_adjust(
        left=0.5 / fig.get_figwidth() + 0.03,
        right=0.98,
        bottom=0.5 / fig.get_figheight() + 0.05,
        top=1 - 0.45 / fig.get_figheight() - 0.05,
        wspace=0.35,
        hspace=0.75,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def agreement_figure(analysis: Analysis, metric: str, path: Path) -> Path:
    """Pairwise Spearman correlation between extractors' FDs over the models, per modality."""
    plt = _plt()
    exts = analysis.coverage.extractors
    modalities = analysis.coverage.modalities
    k = len(exts)
    fig, axes = plt.subplots(
        1, len(modalities), squeeze=False, figsize=(0.8 + (0.45 * k + 1.2) * len(modalities), 1.2 + 0.45 * k)
    )
    for ax, modality in zip(axes[0], modalities):
        grid = np.eye(k)
        for r in analysis.tables.get("extractor_agreement", []):
            if r["modality"] == modality and r["metric"] == metric:
                a, b = exts.index(r["extractor_a"]), exts.index(r["extractor_b"])
                grid[a, b] = grid[b, a] = r["spearman"]
        ax.imshow(grid, cmap="coolwarm_r", vmin=-1, vmax=1)
        for a in range(k):
            for b in range(k):
                ax.text(
                    b, a, fmt(grid[a, b]) if not math.isnan(grid[a, b]) else "n/a", ha="center", va="center", fontsize=6
                )
        names = [analysis.label(e) for e in exts]
        ax.set_xticks(range(k), names, rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(k), names, fontsize=7)
        ax.set_title(f"{modality}: Spearman of {metric.upper()} between extractors", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------------------------
# Tables for people


def ranking_table(analysis: Analysis, modality: str, metric: str) -> Table:
    rows = [r for r in analysis.tables["rankings"] if r["modality"] == modality and r["metric"] == metric]
    rankers = list(dict.fromkeys(r["ranker"] for r in rows))
    models = analysis.coverage.models[modality]
    by = {(r["ranker"], r["model"]): r for r in rows}
    heading = {rk: analysis.label(rk) if by[(rk, models[0])]["kind"] == "extractor" else rk for rk in rankers}
    se = {
        (r["extractor"], r["model"]): r.get("se")
        for r in analysis.tables["fd_values"]
        if r["modality"] == modality and r["metric"] == metric
    }
    out = []
    for model in models:
        row: dict[str, Any] = {"model": model}
        for rk in rankers:
            ranks = [by[(rk, m)]["rank"] for m in models]
            r = by[(rk, model)]
            spread = se.get((rk, model))
            value = fmt(r["value"]) + (f" ± {fmt(spread)}" if spread is not None else "")
            row[heading[rk]] = f"{fmt_rank(r['rank'], tied(ranks)[models.index(model)])} ({value})"
        out.append(row)
    confidence = {
        r["extractor"]: r
        for r in analysis.tables.get("ranking_confidence", [])
        if r["modality"] == modality and r["metric"] == metric
    }
    if confidence:
        row = {"model": "P(ranking holds)"}
        for rk in rankers:
            if rk in confidence:
                row[heading[rk]] = f"{fmt(confidence[rk]['p_ranking'])} ({confidence[rk]['order']})"
        out.append(row)
    return Table(
        f"rankings_{modality}_{metric}",
        f"{modality}: ranks by {metric.upper()} (value) and by humans",
        out,
        ["model", *heading.values()],
    )


def labelled(analysis: Analysis, rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Display copies of ``rows`` with every extractor named as people see it (``swav [RANDOM-INIT]``)."""
    out = []
    for r in rows:
        r = dict(r)
        for col in ("extractor", "extractor_a", "extractor_b"):
            if col in r:
                r[col] = analysis.label(r[col])
        if "extractors" in r:
            r["extractors"] = " ".join(analysis.label(e) for e in str(r["extractors"]).split())
        out.append(r)
    return out


def random_init_banner(analysis: Analysis) -> list[str]:
    """The report's opening warning when any analysed number came from a random-init extractor."""
    if not analysis.random_init:
        return []
    names = ", ".join(analysis.label(e) for e in analysis.random_init)
    return [
        f"!! {RANDOM_BANNER}: the numbers of {names} come from random-init extractors (no pretrained weights). "
        f"They test the plumbing only: they are NOT comparable to any published FD, and rankings, correlations "
        f"and agreement made with them say nothing about image quality. Install the weights (`fidmed weights "
        f"list`) and evaluate again for real scores."
    ]


def _table(name: str, title: str, rows: list[dict[str, Any]], first: Sequence[str] = ()) -> Table:
    return Table(name, title, rows, columns_of(rows, first))


def audit_section(analysis: Analysis, fig_dir: Path) -> Section:
    """The memorisation audit: its numbers per model and feature space, and the grids of the closest pairs."""
    rows = analysis.tables["audit"]
    section = Section(
        "Memorisation audit",
        [
            "For every generated image: its nearest training image and the ratio of that distance to the training "
            "image's own nearest-neighbour distance. `authenticity` (Alaa et al. 2022): share of generated images "
            "with ratio > 1; `copies`: share with ratio below the audit's threshold; `ct`: the data-copying test "
            "C_T of Meehan et al. 2020 (<< 0, e.g. below -3: copying; needs a held-out real split). The grids show "
            "the closest pairs, generated image left, nearest training image right.",
        ],
    )
    section.tables.append(
        _table(
            "audit",
            "Memorisation audit per model and feature space",
            labelled(analysis, rows),
            ["modality", "model", "extractor", "authenticity", "copies", "ct"],
        )
    )
    for r in rows:
        grid = Path(str(r.get("grid") or ""))
        if r.get("grid") and grid.is_file():
            name = "_".join(str(r[c]).replace("/", "_") for c in ("modality", "model", "extractor"))
            dest = fig_dir / f"audit_{name}.png"
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(grid, dest)
            section.figures.append(
                Figure(
                    f"audit_{name}",
                    f"{r['modality']} / {r['model']} / {analysis.label(r['extractor'])}: the generated images closest "
                    "to a training image (left) and that training image (right)",
                    dest,
                )
            )
    return section


def build_report(
    analysis: Analysis, out_dir: str | Path, title: str = "fidmed: FD rankings and human judgement", write: bool = True
) -> Report:
    """Figures and CSV tables under ``out_dir``, then (``write``) ``report.md`` and ``report.html``."""
    out_dir = Path(out_dir)
    fig_dir = out_dir / "figures"
    has_human = "correlations" in analysis.tables
    s = analysis.settings
    intro = Section(
        "Settings",
        [
            f"Metrics: {', '.join(s['metrics'])}. Models are named by the results column `{s['model_column']}`.",
            f"Ties: {s['tie_rule']}. Wherever a rank is shown, `=` after it marks a tie (e.g. `2.5=`).",
        ],
    )
    if has_human:
        intro.text.append(
            "Human criteria (means over raters): "
            + "; ".join(f"`{c.name}` = {c.description}" for c in analysis.criteria)
            + "."
        )
        intro.text.append(
            f"Correlations are over the models of a modality; p-values are SciPy's (two-sided). Confidence "
            f"intervals: {int(s['ci'] * 100)}% percentile bootstrap, {s['n_boot']} replicates resampling "
            f"{s['bootstrap']} (seed {s['seed']}). An extractor agrees with humans when the sign of r equals "
            f"`expected_sign` (FD lower = better; FPR and KS p higher = better)."
        )
    intro.text.extend(f"Note: {n}" for n in analysis.notes)
    sections = [intro]

    rank_section = Section("Rankings")
    for metric in analysis.coverage.metrics:
        path = ranking_figure(analysis, metric, fig_dir / f"rankings_{metric}.png")
        rank_section.figures.append(
            Figure(
                f"rankings_{metric}",
                f"Model ranks by {metric.upper()} per extractor"
                + (" and by human criteria" if has_human else "")
                + " (1 = best; = marks ties; average ranks).",
                path,
            )
        )
        for modality in analysis.coverage.modalities:
            rank_section.tables.append(ranking_table(analysis, modality, metric))
    sections.append(rank_section)

    if analysis.tables.get("ranking_confidence"):
        conf = Section(
            "Rank confidence",
            [
                "How often each ranking holds when the generated and real images are redrawn (bootstrap replicates "
                "recorded with the results; replicate r redrew the same real images for every model, so the models "
                "are compared on equal terms). `p_ranking`: the whole ranking holds; `p_order`: the model ahead stays "
                f"ahead. An order `holds` at {s['rank_confidence']['holds']} or more and is `mostly noise` below "
                f"{s['rank_confidence']['mostly_noise_below']}: agreement with humans read from such an order says "
                "little.",
            ],
        )
        conf.tables.append(
            _table(
                "ranking_confidence",
                "Probability that each extractor's ranking holds",
                labelled(analysis, analysis.tables["ranking_confidence"]),
                ["modality", "metric", "extractor", "p_ranking", "order", "min_p_pair", "n_replicates"],
            )
        )
        conf.tables.append(
            _table(
                "rank_confidence",
                "Probability that each pairwise order holds",
                labelled(analysis, analysis.tables["rank_confidence"]),
                ["modality", "metric", "extractor", "ahead", "behind", "p_order"],
            )
        )
        sections.append(conf)

    if has_human:
        corr_section = Section("FD against human judgement")
        corr_section.tables.append(
            _table(
                "correlations",
                "Correlations of FD with human scores",
                labelled(analysis, analysis.tables["correlations"]),
                [
                    "modality",
                    "metric",
                    "extractor",
                    "criterion",
                    "n_models",
                    "expected_sign",
                    "pearson",
                    "pearson_p",
                    "pearson_ci_low",
                    "pearson_ci_high",
                    "spearman",
                    "spearman_p",
                    "spearman_ci_low",
                    "spearman_ci_high",
                    "kendall",
                    "kendall_p",
                    "kendall_ci_low",
                    "kendall_ci_high",
                    *(["p_ranking", "order"] if analysis.tables.get("ranking_confidence") else []),
                ],
            )
        )
        human_rows = mark_ties(analysis.tables["human_scores"], [f"rank_{c.name}" for c in analysis.criteria])
        corr_section.tables.append(
            _table(
                "human_scores",
                "Human scores per model (means over raters) and ranks (= marks a tie)",
                human_rows,
                ["modality", "model", "n_raters"],
            )
        )
        if any("t_not_rejected" in r for r in human_rows):
            corr_section.text.append(
                "`ks_not_rejected` / `t_not_rejected`: raters whose KS / t test does not reject "
                f"at alpha = {s['alpha']}; an undefined t test (one answer to every image, "
                "counted in `t_undefined`) counts as not rejected."
            )
        for modality in analysis.coverage.modalities:
            for metric in analysis.coverage.metrics:
                path = scatter_figure(analysis, modality, metric, fig_dir / f"scatter_{modality}_{metric}.png")
                corr_section.figures.append(
                    Figure(f"scatter_{modality}_{metric}", f"{modality}: {metric.upper()} against human scores", path)
                )
        sections.append(corr_section)

    agree = Section("Agreement between extractors")
    agree.tables.append(
        _table(
            "kendall_w",
            "Kendall's W (tie-corrected) with chi-square test",
            labelled(analysis, analysis.tables["kendall_w"]),
            ["modality", "metric", "group", "m", "n", "W", "chi2", "df", "p"],
        )
    )
    if analysis.tables.get("extractor_agreement"):
        agree.tables.append(
            _table(
                "extractor_agreement",
                "Pairwise rank correlation of FDs between extractors",
                labelled(analysis, analysis.tables["extractor_agreement"]),
            )
        )
        for metric in analysis.coverage.metrics:
            path = agreement_figure(analysis, metric, fig_dir / f"agreement_{metric}.png")
            agree.figures.append(
                Figure(f"agreement_{metric}", f"Spearman correlation of {metric.upper()} between extractors", path)
            )
    sections.append(agree)

    if analysis.tables.get("audit"):
        sections.append(audit_section(analysis, fig_dir))

    report = Report(title, out_dir, sections, banner=random_init_banner(analysis))
    for name, rows in analysis.tables.items():  # full-precision CSVs of every analysis table
        path = write_csv_rows(out_dir / "tables" / f"{name}.csv", rows, columns_of(rows))
        for t in report.tables:
            if t.name == name:
                t.csv_path = path
    if write:
        write_markdown(report)
        write_html(report)
    return report


# ---------------------------------------------------------------------------------------------------------------
# Writers


def _md_cell(v: Any) -> str:
    return fmt(v).replace("|", "\\|").replace("\n", " ")


def write_markdown(report: Report) -> Path:
    lines = [f"# {report.title}", ""]
    lines += [line for b in report.banner for line in (f"> **{b}**", "")]
    for s in report.sections:
        lines += [f"## {s.title}", ""]
        lines += [*(f"{t}" for t in s.text), ""] if s.text else []
        for f in s.figures:
            lines += [f"![{f.caption}]({f.path.relative_to(report.out_dir).as_posix()})", "", f"*{f.caption}*", ""]
        for t in s.tables:
            lines += [f"### {t.title}", ""]
            if t.csv_path:
                lines += [f"Full precision: `{t.csv_path.relative_to(report.out_dir).as_posix()}`", ""]
            lines.append("| " + " | ".join(t.columns) + " |")
            lines.append("|" + "---|" * len(t.columns))
            lines += ["| " + " | ".join(_md_cell(r.get(c)) for c in t.columns) + " |" for r in t.rows]
            lines.append("")
    report.markdown_path = report.out_dir / "report.md"
    report.out_dir.mkdir(parents=True, exist_ok=True)
    report.markdown_path.write_text("\n".join(lines), encoding="utf-8")
    return report.markdown_path


def write_html(report: Report) -> Path:
    e = html.escape
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        "<meta http-equiv='Content-Security-Policy' content=\"default-src 'none'; img-src data:; "
        "style-src 'unsafe-inline'\">",
        f"<title>{e(report.title)}</title><style>body{{font-family:system-ui,sans-serif;margin:24px;}}"
        "table{border-collapse:collapse;font-size:12px;margin:8px 0 20px;}"
        "td,th{border:1px solid #ccc;padding:2px 6px;text-align:right;}th{background:#eee;}"
        "td:first-child,th:first-child{text-align:left;}img{max-width:100%;}figure{margin:12px 0;}"
        "figcaption{font-size:13px;color:#444;}.banner{background:#b71c1c;color:#fff;font-weight:bold;"
        "padding:10px 14px;border-radius:4px;}</style></head><body>",
        f"<h1>{e(report.title)}</h1>",
    ]
    parts += [f"<p class='banner' role='alert'>{e(b)}</p>" for b in report.banner]
    for s in report.sections:
        parts.append(f"<h2>{e(s.title)}</h2>")
        parts += [f"<p>{e(t)}</p>" for t in s.text]
        for f in s.figures:
            data = base64.b64encode(f.path.read_bytes()).decode("ascii")
            parts.append(
                f"<figure><img alt='{e(f.caption)}' src='data:image/png;base64,{data}'>"
                f"<figcaption>{e(f.caption)}</figcaption></figure>"
            )
        for t in s.tables:
            parts.append(
                f"<h3>{e(t.title)}</h3><table><thead><tr>"
                + "".join(f"<th>{e(c)}</th>" for c in t.columns)
                + "</tr></thead><tbody>"
            )
            parts += ["<tr>" + "".join(f"<td>{e(fmt(r.get(c)))}</td>" for c in t.columns) + "</tr>" for r in t.rows]
            parts.append("</tbody></table>")
    parts.append("</body></html>")
    report.html_path = report.out_dir / "report.html"
    report.out_dir.mkdir(parents=True, exist_ok=True)
    report.html_path.write_text("\n".join(parts), encoding="utf-8")
    return report.html_path


def _wandb_cell(v: Any) -> Any:
    if isinstance(v, (float, np.floating)) and not math.isfinite(float(v)):
        return None
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, (list, tuple, dict)):
        return str(v)
    return v


def log_report_to_wandb(report: Report, run: Any, prefix: str = "analysis") -> dict[str, Any]:
    """Log every table (``wandb.Table``), figure (``wandb.Image``) and the HTML page to an active run.

    Returns what was logged (key -> W&B object)."""
    import wandb

    payload: dict[str, Any] = {}
    for t in report.tables:
        payload[f"{prefix}/{t.name}"] = wandb.Table(
            columns=list(t.columns), data=[[_wandb_cell(r.get(c)) for c in t.columns] for r in t.rows]
        )
    for f in report.figures:
        payload[f"{prefix}/figures/{f.name}"] = wandb.Image(str(f.path), caption=f.caption)
    if report.banner:
        payload[f"{prefix}/banner"] = wandb.Html("".join(f"<p><b>{html.escape(b)}</b></p>" for b in report.banner))
    if report.html_path is not None and report.html_path.is_file():
        payload[f"{prefix}/report"] = wandb.Html(report.html_path.read_text(encoding="utf-8"))
    run.log(payload)
    return payload

"""One tidy table of every evaluated number across run directories, Hydra multiruns and local sweeps.

Each ``results.json`` (written by every evaluation run, :mod:`fidmed.evaluation.results`) contributes one row per
record: modality, augmentation, model, extractor, its ``label`` and ``random_init`` (a random-init extractor's
numbers say so: ``inception_tf [RANDOM-INIT]``), metric, value, N generated / N real, seeds, weights, the job's
overrides, and ``protocol_sha256``, the sha256 of the record's full protocol as canonical JSON: two numbers are
comparable only if their protocol hashes are equal.

A number evaluated with ``eval.uncertainty`` also has its standard error ``se``, its interval ``ci_low``/``ci_high``
(level ``ci_level``, kind ``ci_interval``), the sets resampled, the ``real_resample_key`` (equal for runs whose
replicates redrew the same real images, so that ``fidmed analyze`` may pair them) and its ``replicates`` (space-
separated, ``nan`` for a failed one). The memorisation audit's rows (metrics authenticity, copies, ct) name the
files with every generated image's nearest training image (``per_image``) and the grid of the closest pairs
(``grid``).

Nothing is dropped silently. Every job folder (a folder with ``.hydra/``, ``overrides.txt``, ``results.json`` or
``error.txt``) below the given paths is visited: a folder without results is skipped and listed with the reason (no
results.json; a failed job, with the first line of its ``error.txt``), and a failed job also becomes a row with
``status=failed``, its overrides and context (modality, augmentation, model, extractors) where its ``.hydra`` folder
tells them, and its error, so a sweep's table shows what is missing. A non-finite value stays as NaN, and a
results.json without records (a training-only run) is reported by name.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fidmed.analysis.tabular import canonical_sha256, format_list, parse_float, read_table
from fidmed.errors import DataError

RESULTS_FILE = "results.json"
ERROR_FILE = "error.txt"  # a failed job's message (run.py's multirun jobs, sweep.py's trials)
HYDRA_DIR = ".hydra"
OK, FAILED = "ok", "failed"
TIDY_COLUMNS = (
    "modality",
    "augmentation",
    "model",
    "extractor",
    "label",
    "study_name",
    "metric",
    "value",
    "se",
    "ci_low",
    "ci_high",
    "ci_level",
    "ci_interval",
    "status",
    "n_gen",
    "n_real",
    "seeds",
    "weights",
    "random_init",
    "protocol_sha256",
    "kimg",
    "generator",
    "run_dir",
    "results_file",
    "overrides",
    "error",
    "n_replicates",
    "resampled",
    "real_resample_key",
    "grid",
    "per_image",
    "replicates",
)
# What a results table needs for `fidmed analyze` (a hand-made table, e.g. the study's published FDs, may have
# only these).
REQUIRED_COLUMNS = ("modality", "extractor", "metric", "value")


@dataclass
class Skipped:
    """A job folder that contributed no numbers, and why (one line)."""

    folder: Path
    reason: str

    def __str__(self) -> str:
        return f"{self.folder}: {self.reason}"


@dataclass
class Collection:
    rows: list[dict[str, Any]]
    files: list[Path]
    empty: list[Path] = field(default_factory=list)  # results.json files without records
    skipped: list[Skipped] = field(default_factory=list)  # job folders without results (failed ones included)


def error_summary(error: str) -> str:
    """One line of a job's error for lists: its first line, continued by the next one when it ends with ':' (as in
    "1 of 2 extractors are not ready:")."""
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    if not lines:
        return "(no error text)"
    return f"{lines[0]} {lines[1]}" if lines[0].endswith(":") and len(lines) > 1 else lines[0]


def _is_job_folder(path: Path) -> bool:
    """A folder a job ran in: run.py's (``.hydra``), or a W&B agent trial's (``overrides.txt``), or any folder
    holding a job's results or error."""
    return any((path / name).exists() for name in (RESULTS_FILE, ERROR_FILE, HYDRA_DIR, "overrides.txt"))


def _natural(name: str) -> tuple:
    """Multirun job folders 0, 1, ..., 10 in numeric order."""
    return (0, int(name), "") if name.isdigit() else (1, 0, name)


def find_job_folders(paths: Sequence[str | os.PathLike]) -> tuple[list[Path], list[Path]]:
    """``results.json`` files given directly, and job folders: each given folder that is one, and every job folder
    below a given folder (symbolic links, e.g. a run's ``training`` link, are not followed). A given folder with
    no job folder below it counts as a job folder itself (it will be listed as having no results). Duplicates are
    read once."""
    files: dict[Path, None] = {}
    folders: dict[Path, None] = {}
    for p in map(Path, paths):
        if p.is_file():
            if p.name != RESULTS_FILE:
                raise DataError(f"{p} is not a {RESULTS_FILE} file; pass run directories or results.json files.")
            files[p.resolve()] = None
        elif p.is_dir():
            found = []
            for root, dirs, _ in os.walk(p):
                dirs[:] = sorted((d for d in dirs if d != "wandb" and not d.startswith(".")), key=_natural)
                if _is_job_folder(Path(root)):
                    found.append(Path(root).resolve())
            for f in found or [p.resolve()]:
                folders[f] = None
        else:
            raise DataError(
                f"{p} does not exist; pass run folders, multirun folders or results.json files (e.g. outputs/runs/*/*)."
            )
    folders = {f: None for f in folders if f / RESULTS_FILE not in files}
    return list(files), list(folders)


def find_results_files(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """Every ``results.json`` given or in a job folder below the given folders."""
    files, folders = find_job_folders(paths)
    return files + [f / RESULTS_FILE for f in folders if (f / RESULTS_FILE).is_file()]


def job_overrides(folder: Path) -> list[str] | None:
    """The job's command-line overrides: Hydra's ``.hydra/overrides.yaml`` (or a W&B agent trial's
    ``overrides.txt``); None when the folder does not say."""
    hydra = folder / HYDRA_DIR / "overrides.yaml"
    try:
        if hydra.is_file():
            found = yaml.safe_load(hydra.read_text(encoding="utf-8"))
            return [str(o) for o in found] if isinstance(found, list) else None
        if (folder / "overrides.txt").is_file():
            return [ln for ln in (folder / "overrides.txt").read_text(encoding="utf-8").splitlines() if ln.strip()]
    except (OSError, yaml.YAMLError):
        return None
    return None


def _overrides_cell(folder: Path) -> str | None:
    found = job_overrides(folder)
    return None if found is None else " ".join(found)


def job_context(folder: Path) -> dict[str, Any]:
    """Modality, augmentation, model and extractors of a job from its composed config (``.hydra/config.yaml``),
    where it was written; empty when not."""
    try:
        cfg = yaml.safe_load((folder / HYDRA_DIR / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return {}
    if not isinstance(cfg, dict):
        return {}

    def name(group: str) -> Any:
        node = cfg.get(group)
        return node.get("name") if isinstance(node, dict) else None

    extractors = cfg.get("extractor")
    return {
        "modality": name("modality"),
        "augmentation": name("augmentation"),
        "model": name("model"),
        "extractor": " ".join(extractors) if isinstance(extractors, dict) else None,
    }


def rows_from_results(path: Path) -> list[dict[str, Any]]:
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"cannot read {path} ({exc}); it is not a complete results.json.") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("results"), list):
        raise DataError(f"{path} has no 'results' list; it was not written by fidmed's evaluation.")
    generator = payload.get("generator") or {}
    overrides = _overrides_cell(path.parent)
    rows = []
    for i, rec in enumerate(payload["results"]):
        missing = [k for k in ("extractor", "metric", "value") if k not in rec]
        if missing:
            raise DataError(f"{path}: record {i} lacks {', '.join(missing)}.")
        protocol = rec.get("protocol") or {}
        context = rec.get("context") or {}
        value = rec["value"]
        rows.append(
            {
                "modality": context.get("modality", payload.get("modality")),
                "augmentation": context.get("augmentation", payload.get("augmentation")),
                "model": payload.get("model"),
                "extractor": rec["extractor"],
                "label": rec.get("label", rec["extractor"]),
                "study_name": rec.get("study_name"),
                "metric": rec["metric"],
                "value": math.nan if value is None else float(value),
                "status": OK,
                "n_gen": protocol.get("n_gen"),
                "n_real": protocol.get("n_real"),
                "seeds": protocol.get("seeds"),
                "weights": protocol.get("weights"),
                "random_init": bool(protocol.get("random_init", False)),
                "protocol_sha256": canonical_sha256(protocol),
                "kimg": context.get("kimg", generator.get("kimg")),
                "generator": context.get("generator", generator.get("path")),
                "run_dir": payload.get("run_dir", str(path.parent)),
                "results_file": str(path),
                "overrides": overrides,
                "error": None,
                **uncertainty_columns((rec.get("details") or {}).get("uncertainty")),
                "grid": (rec.get("details") or {}).get("grid"),
                "per_image": (rec.get("details") or {}).get("per_image"),
            }
        )
    return rows


def uncertainty_columns(entry: dict[str, Any] | None) -> dict[str, Any]:
    """The tidy columns of a number's ``uncertainty`` entry (empty without one)."""
    if not entry:
        return {}
    values = entry.get("values")
    return {
        "se": entry.get("se"),
        "ci_low": entry.get("ci_low"),
        "ci_high": entry.get("ci_high"),
        "ci_level": entry.get("level"),
        "ci_interval": entry.get("interval"),
        "n_replicates": entry.get("replicates"),
        "resampled": " ".join(entry.get("resampled") or []),
        "real_resample_key": entry.get("real_resample_key"),
        "replicates": None if values is None else " ".join("nan" if v is None else repr(float(v)) for v in values),
    }


def failed_job_row(folder: Path, error: str) -> dict[str, Any]:
    """The row of a job that failed: what it was (overrides, context) and its error; no number."""
    context = job_context(folder)
    return {
        "modality": context.get("modality"),
        "augmentation": context.get("augmentation"),
        "model": context.get("model"),
        "extractor": context.get("extractor"),
        "label": None,
        "metric": None,
        "value": math.nan,
        "status": FAILED,
        "run_dir": str(folder),
        "results_file": None,
        "overrides": _overrides_cell(folder),
        "error": error,
    }


def collect(paths: Sequence[str | os.PathLike]) -> Collection:
    """Every record of every results.json under ``paths``, a row per failed job, and the folders skipped."""
    files, folders = find_job_folders(paths)
    rows: list[dict[str, Any]] = []
    empty: list[Path] = []
    skipped: list[Skipped] = []
    read: list[Path] = []

    def add(results: Path) -> None:
        found = rows_from_results(results)
        read.append(results)
        if not found:
            empty.append(results)
        rows.extend(found)

    for f in files:
        add(f)
    for folder in folders:
        if (folder / RESULTS_FILE).is_file():
            try:
                add(folder / RESULTS_FILE)
            except DataError as exc:  # a broken file in a sweep must not hide the other jobs' numbers
                skipped.append(Skipped(folder, f"unreadable {RESULTS_FILE}: {exc}"))
        elif (folder / ERROR_FILE).is_file():
            error = (folder / ERROR_FILE).read_text(encoding="utf-8", errors="replace").strip()
            rows.append(failed_job_row(folder, error))
            skipped.append(Skipped(folder, f"failed: {error_summary(error) if error else '(empty error.txt)'}"))
        else:
            skipped.append(
                Skipped(folder, f"no {RESULTS_FILE} (not evaluated yet, stopped, or failed outside a multirun)")
            )
    if not read and not rows:
        raise DataError(
            f"no {RESULTS_FILE} in {format_list(map(str, paths))} or below; is it a fidmed run "
            f"directory (run.py writes results.json after evaluating)?"
        )
    return Collection(rows=rows, files=read, empty=empty, skipped=skipped)


def load_results(paths: Sequence[str | os.PathLike]) -> list[dict[str, Any]]:
    """Results for ``fidmed analyze``: a table (.csv/.parquet, e.g. from ``fidmed collect`` or typed in from a
    paper) or run directories / results.json files. Values are parsed to floats."""
    rows: list[dict[str, Any]] = []
    run_like = []
    for p in map(Path, paths):
        if p.is_file() and p.suffix.lower() in (".csv", ".parquet"):
            table = read_table(p, REQUIRED_COLUMNS, what="results table")
            for i, row in enumerate(table, start=2):
                row = dict(row)
                row["value"] = _value(row["value"], f"results table {p} line {i} column value")
                row.setdefault("results_file", str(p))
                rows.append(row)
        else:
            run_like.append(p)
    if run_like:
        rows.extend(collect(run_like).rows)
    if not rows:
        raise DataError(f"no results in {format_list(map(str, paths))}.")
    return rows


def _value(cell: Any, where: str) -> float:
    text = "" if cell is None else str(cell).strip().lower()
    if text in ("nan", ""):
        return math.nan if text == "nan" else parse_float(cell, where)
    return parse_float(cell, where)

"""One tidy table of every evaluated number across run directories and Hydra multiruns.

Each ``results.json`` (written by every evaluation run, :mod:`fidmed.evaluation.results`) contributes one row per
record: modality, augmentation, model, extractor, metric, value, N generated / N real, seeds, weights, and
``protocol_sha256``, the sha256 of the record's full protocol as canonical JSON: two numbers are comparable only if
their protocol hashes are equal. Nothing is dropped: a non-finite value stays as NaN, and a results.json without
records (a training-only run) is reported by name.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from fidmed.analysis.tabular import canonical_sha256, format_list, parse_float, read_table
from fidmed.errors import DataError

RESULTS_FILE = "results.json"
TIDY_COLUMNS = ("modality", "augmentation", "model", "extractor", "label", "study_name", "metric", "value",
                "n_gen", "n_real", "seeds", "weights", "random_init", "protocol_sha256", "kimg", "generator",
                "run_dir", "results_file")
# What a results table needs for `fidmed analyze` (a hand-made table, e.g. the study's published FDs, may have
# only these).
REQUIRED_COLUMNS = ("modality", "extractor", "metric", "value")


@dataclass
class Collection:
    rows: list[dict[str, Any]]
    files: list[Path]
    empty: list[Path] = field(default_factory=list)  # results.json files without records


def find_results_files(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """``results.json`` files: given directly, in a run directory, or anywhere below a (multi)run directory."""
    found: dict[Path, None] = {}
    for p in map(Path, paths):
        if p.is_file():
            if p.name != RESULTS_FILE:
                raise DataError(f"{p} is not a {RESULTS_FILE} file; pass run directories or results.json files.")
            found[p.resolve()] = None
        elif p.is_dir():
            below = sorted(p.rglob(RESULTS_FILE))
            if not below:
                raise DataError(f"no {RESULTS_FILE} in {p} or below; is it a fidmed run directory (run.py writes "
                                f"results.json after evaluating)?")
            found.update((f.resolve(), None) for f in below)
        else:
            raise DataError(f"{p} does not exist.")
    return list(found)


def rows_from_results(path: Path) -> list[dict[str, Any]]:
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"cannot read {path} ({exc}); it is not a complete results.json.") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("results"), list):
        raise DataError(f"{path} has no 'results' list; it was not written by fidmed's evaluation.")
    generator = payload.get("generator") or {}
    rows = []
    for i, rec in enumerate(payload["results"]):
        missing = [k for k in ("extractor", "metric", "value") if k not in rec]
        if missing:
            raise DataError(f"{path}: record {i} lacks {', '.join(missing)}.")
        protocol = rec.get("protocol") or {}
        context = rec.get("context") or {}
        value = rec["value"]
        rows.append({
            "modality": context.get("modality", payload.get("modality")),
            "augmentation": context.get("augmentation", payload.get("augmentation")),
            "model": payload.get("model"),
            "extractor": rec["extractor"], "label": rec.get("label", rec["extractor"]),
            "study_name": rec.get("study_name"), "metric": rec["metric"],
            "value": math.nan if value is None else float(value),
            "n_gen": protocol.get("n_gen"), "n_real": protocol.get("n_real"), "seeds": protocol.get("seeds"),
            "weights": protocol.get("weights"), "random_init": bool(protocol.get("random_init", False)),
            "protocol_sha256": canonical_sha256(protocol),
            "kimg": context.get("kimg", generator.get("kimg")),
            "generator": context.get("generator", generator.get("path")),
            "run_dir": payload.get("run_dir", str(path.parent)), "results_file": str(path),
        })
    return rows


def collect(paths: Sequence[str | os.PathLike]) -> Collection:
    """Every record of every results.json under ``paths`` (duplicated paths are read once)."""
    files = find_results_files(paths)
    rows, empty = [], []
    for f in files:
        found = rows_from_results(f)
        if not found:
            empty.append(f)
        rows.extend(found)
    return Collection(rows=rows, files=files, empty=empty)


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

"""``python sweep.py``: W&B sweep specs over run.py's Hydra overrides, run by a W&B agent or locally.

    python sweep.py conf/sweep/augmentation.yaml --count 20              # register with W&B, run an agent
    python sweep.py conf/sweep/augmentation.yaml --sweep-id ID --count 5  # one more agent on an existing sweep
    python sweep.py conf/sweep/study_grid.yaml --local                   # no W&B server: the grid here
    python sweep.py conf/sweep/augmentation.yaml --local --count 8       # bayes here, offline
    python sweep.py conf/sweep/augmentation.yaml --local --count 8 -- schedule.kimg=100   # extra fixed overrides

A spec is a W&B sweep configuration whose parameter names are Hydra override keys (``model.r1_gamma``,
``augmentation``, ``eval.num_gen``) and whose values are what those keys take; the metric is a number the job
logs, ``<metric>/<extractor>`` (``fd/swav``)::

    method: bayes                    # grid | random | bayes
    metric: {name: fd/swav, goal: minimize}
    parameters:
      extractor: {value: [swav]}     # fixed for every run
      augmentation: {values: [ada, apa]}
      model.r1_gamma: {distribution: log_uniform_values, min: 1, max: 16}

Every parameter value (a distribution's bounds) is composed with the typed config before any job starts, so a
misspelt key, an unknown group option or a value of the wrong type stops the sweep with one message, and a bayes
metric that the jobs would not produce (an extractor not selected, a metric not in ``eval.metrics``) too.

Online, each agent trial composes the job's config with the trial's overrides and runs
:func:`fidmed.job.run_job` in this process, logging into the trial's W&B run.

Locally (``--local`` or WANDB_MODE=offline) the methods mean what they mean on the W&B server:

* grid: every combination of the values, the last parameter varying fastest (at most ``--count``);
* random: ``--count`` independent draws from the parameters' distributions (reproducible from ``--seed``);
* bayes: ``--count`` trials, the first drawn at random, each later one proposed by a Gaussian-process model of
  the metric fitted to the finished trials (expected improvement).

Random and bayes trials come from Optuna (``RandomSampler``; ``GPSampler``, a Matern-5/2 Gaussian process with
log expected improvement, as W&B's bayes is a Matern Gaussian process with expected improvement). W&B's own engine
(the PyPI package ``sweeps``) cannot be installed beside fidmed: it requires numpy < 2. Each trial runs as its own
``run.py`` process in ``<sweep dir>/<n>`` with an offline W&B run (``wandb sync`` uploads it later); its metric is
read from the trial's ``results.json`` and reported back to the engine, so bayes learns from it. A failed trial
leaves ``error.txt`` in its folder, is reported to the engine as failed, and the sweep goes on;
``<sweep dir>/trials.csv`` lists every trial, and ``fidmed collect <sweep dir>`` makes the usual results table of
the sweep (failed trials included, as rows with their error).
"""

from __future__ import annotations

import argparse
import csv
import io
import itertools
import json
import math
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fidmed.errors import ConfigError, FidmedError

METHODS = ("grid", "random", "bayes")
# Distributions that a local (server-less) random or bayes sweep can sample; W&B names and meanings.
LOCAL_DISTRIBUTIONS = (
    "categorical",
    "constant",
    "uniform",
    "int_uniform",
    "q_uniform",
    "log_uniform",
    "log_uniform_values",
)
GOALS = ("minimize", "maximize")
_KEY_RE = re.compile(r"^[A-Za-z_][\w./@-]*$")
# Characters that end or split an unquoted Hydra value: such strings are quoted.
_SPECIAL = set(" ,=[]{}()'\"\\:$*?<>!~+")
RANDOM_INIT_SUFFIX = " [RANDOM-INIT]"  # how results.json labels a random-init extractor (fidmed.evaluation.results)
ERROR_FILE = "error.txt"  # a failed job's message, in its folder (as run.py's multirun jobs write it)
TRIALS_FILE = "trials.csv"
TRIAL_COLUMNS = ("trial", "status", "metric", "value", "random_init", "overrides", "run_dir", "error")


@dataclass(frozen=True)
class SweepSpec:
    """A parsed sweep spec. ``parameters`` maps an override key to its W&B parameter dict."""

    method: str
    parameters: dict[str, dict[str, Any]]
    metric: dict[str, Any] | None = None
    name: str | None = None
    description: str | None = None
    source: str = "<spec>"
    extra: dict[str, Any] = field(default_factory=dict)

    def wandb_config(self) -> dict[str, Any]:
        """What ``wandb.sweep`` receives (the agent runs a function, so no program/command)."""
        out: dict[str, Any] = {"method": self.method, "parameters": self.parameters}
        for key in ("metric", "name", "description"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        out.update(self.extra)
        return out

    @property
    def metric_name(self) -> str | None:
        return None if self.metric is None else str(self.metric["name"])

    @property
    def goal(self) -> str:
        return str((self.metric or {}).get("goal", "minimize")).lower()


def load_spec(path: str | Path) -> SweepSpec:
    """Read and check a sweep spec YAML file (structure only; :func:`validate_against_config` checks values)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"sweep spec {path} not found; the shipped ones are in conf/sweep/ "
            f"(e.g. python sweep.py conf/sweep/study_grid.yaml)."
        )
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"sweep spec {path} is not valid YAML ({first}); fix the file.") from None
    return parse_spec(raw, source=str(path))


def parse_spec(raw: Any, source: str = "<spec>") -> SweepSpec:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: a sweep spec is a mapping with method, parameters and metric.")
    method = str(raw.get("method", "")).lower()
    if method not in METHODS:
        raise ConfigError(f"{source}: method={raw.get('method')!r}; use one of {', '.join(METHODS)}.")
    params = raw.get("parameters")
    if not isinstance(params, dict) or not params:
        raise ConfigError(
            f"{source}: 'parameters' must map Hydra override keys (e.g. model.r1_gamma) to "
            f"{{values: [...]}}, {{value: x}} or {{distribution: ..., min: .., max: ..}}."
        )
    for key, p in params.items():
        if not isinstance(key, str) or not _KEY_RE.match(key):
            raise ConfigError(
                f"{source}: parameter name {key!r} is not a Hydra override key (like model.r1_gamma or augmentation)."
            )
        if not isinstance(p, dict) or not ({"value", "values", "distribution", "min"} & set(p)):
            raise ConfigError(
                f"{source}: parameter {key!r} needs 'values: [...]', 'value: x' or a distribution with min/max."
            )
        if "values" in p and (not isinstance(p["values"], list) or not p["values"]):
            raise ConfigError(f"{source}: parameter {key!r}: 'values' must be a non-empty list.")
        if method == "grid" and "values" not in p and "value" not in p:
            raise ConfigError(
                f"{source}: parameter {key!r}: a grid sweep needs 'values' or 'value' for every "
                f"parameter (distributions only make sense for random or bayes)."
            )
    metric = raw.get("metric")
    if metric is not None:
        if not isinstance(metric, dict) or "name" not in metric:
            raise ConfigError(f"{source}: metric must be {{name: fd/swav, goal: minimize}}.")
        split_metric_name(str(metric["name"]), source)
        if str(metric.get("goal", "minimize")).lower() not in GOALS:
            raise ConfigError(f"{source}: metric goal {metric.get('goal')!r}; use minimize or maximize.")
    if method == "bayes" and metric is None:
        raise ConfigError(f"{source}: a bayes sweep needs a metric to optimise (metric: {{name: ..., goal: ...}}).")
    known = {"method", "parameters", "metric", "name", "description"}
    extra = {k: v for k, v in raw.items() if k not in known}
    return SweepSpec(method, dict(params), metric, raw.get("name"), raw.get("description"), source, extra)


def split_metric_name(name: str, source: str = "<spec>") -> tuple[str, str]:
    """``fd/swav`` (or the label form ``fd/swav [RANDOM-INIT]``) -> ("fd", "swav"): the names the job logs."""
    metric, sep, extractor = name.partition("/")
    extractor = extractor.removesuffix(RANDOM_INIT_SUFFIX)
    if not sep or not metric or not extractor or "/" in extractor:
        raise ConfigError(
            f"{source}: metric name {name!r}: use <metric>/<extractor> as the jobs log it, e.g. "
            f"fd/swav or rfd/inception_tf."
        )
    return metric, extractor


# ------------------------------------------------------------------------------------------------------------
# Values -> overrides


def format_value(value: Any) -> str:
    """A Python value as Hydra override syntax (strings quoted where Hydra would split or reinterpret them)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{format_value(v)}" for k, v in value.items()) + "}"
    text = str(value)
    plain = (
        text
        and not (set(text) & _SPECIAL)
        and text.lower() not in ("null", "true", "false", "nan", "inf")
        and not _looks_numeric(text)
    )
    if plain:
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _looks_numeric(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def to_overrides(params: dict[str, Any]) -> list[str]:
    """One trial's parameters -> run.py overrides (``key=value``), in the spec's order."""
    return [f"{key}={format_value(value)}" for key, value in params.items()]


# ------------------------------------------------------------------------------------------------------------
# The search: which trials, in which order


def expand_grid(spec: SweepSpec) -> list[dict[str, Any]]:
    """Every combination of a grid spec, the last parameter varying fastest (as W&B's grid search)."""
    keys = list(spec.parameters)
    choices = [_choices(spec.parameters[k], k, spec) for k in keys]
    return [dict(zip(keys, combo)) for combo in itertools.product(*choices)]


def _choices(p: dict[str, Any], key: str, spec: SweepSpec) -> list[Any]:
    if "values" in p:
        return list(p["values"])
    if "value" in p:
        return [p["value"]]
    raise ConfigError(f"{spec.source}: parameter {key!r} has no 'values' list.")


def _distribution(p: dict[str, Any]) -> str:
    """W&B's distribution of a parameter, inferred as the server infers it when the spec names none."""
    if "distribution" in p:
        return str(p["distribution"])
    if "value" in p:
        return "constant"
    if "values" in p:
        return "categorical"
    ints = all(isinstance(p.get(k), int) and not isinstance(p.get(k), bool) for k in ("min", "max"))
    return "int_uniform" if ints else "uniform"


@dataclass
class Proposal:
    """One trial to run: its number (0, 1, ...), its parameters in the spec's order, and the engine's handle."""

    number: int
    params: dict[str, Any]
    handle: Any = None


class GridSearch:
    """W&B's grid: the combinations in order, at most ``count`` of them; results change nothing."""

    def __init__(self, spec: SweepSpec, count: int | None = None) -> None:
        trials = expand_grid(spec)
        self.trials = trials if count is None else trials[:count]
        self.count = len(self.trials)
        self._next = 0

    def propose(self) -> Proposal | None:
        if self._next >= len(self.trials):
            return None
        self._next += 1
        return Proposal(self._next - 1, dict(self.trials[self._next - 1]))

    def report(self, proposal: Proposal, value: float | None) -> None:
        """Nothing to learn in a grid."""


class OptunaSearch:
    """random and bayes through Optuna's ask-and-tell interface: ``propose`` asks for a trial, ``report`` tells
    the engine the trial's metric (``None``: the trial failed or made no metric), from which bayes proposes the
    next one. Distributions follow W&B's definitions (``log_uniform``: min/max are natural logs; ``q_uniform``:
    round(uniform / q) * q); a categorical parameter is sampled as the index of its value, so values of any type
    (lists, dicts, null) round-trip unchanged."""

    def __init__(self, spec: SweepSpec, count: int, seed: int = 0) -> None:
        import optuna
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

        optuna.logging.set_verbosity(optuna.logging.ERROR)
        self.spec, self.count = spec, count
        self.fixed: dict[str, Any] = {}
        self.space: dict[str, Any] = {}
        self.decode: dict[str, Any] = {}
        for key, p in spec.parameters.items():
            dist = _distribution(p)
            if dist == "constant":
                if "value" not in p:
                    raise ConfigError(f"{spec.source}: parameter {key!r}: distribution constant needs 'value'.")
                self.fixed[key] = p["value"]
                continue
            if dist == "categorical":
                values = _choices(p, key, spec)
                self.space[key] = CategoricalDistribution(tuple(range(len(values))))
                self.decode[key] = lambda i, values=values: values[i]
                continue
            if dist not in LOCAL_DISTRIBUTIONS:
                raise ConfigError(
                    f"{spec.source}: parameter {key!r}: distribution {dist!r} is not available "
                    f"locally; use one of {', '.join(LOCAL_DISTRIBUTIONS)} or run the sweep on the "
                    f"W&B server."
                )
            lo, hi = p.get("min"), p.get("max")
            if lo is None or hi is None or not float(lo) <= float(hi):
                raise ConfigError(f"{spec.source}: parameter {key!r}: distribution {dist} needs min <= max.")
            lo, hi = float(lo), float(hi)
            if dist == "int_uniform":
                self.space[key] = IntDistribution(int(lo), int(hi))
            elif dist == "uniform":
                self.space[key] = FloatDistribution(lo, hi)
            elif dist == "q_uniform":
                q = float(p.get("q", 1.0))
                if q <= 0:
                    raise ConfigError(f"{spec.source}: parameter {key!r}: q_uniform needs q > 0.")
                self.space[key] = FloatDistribution(lo, hi)
                self.decode[key] = lambda x, q=q: round(x / q) * q
            elif dist == "log_uniform":  # W&B: min/max are natural logs of the bounds
                self.space[key] = FloatDistribution(math.exp(lo), math.exp(hi), log=True)
            else:  # log_uniform_values
                if lo <= 0:
                    raise ConfigError(f"{spec.source}: parameter {key!r}: log_uniform_values needs min > 0.")
                self.space[key] = FloatDistribution(lo, hi, log=True)
        if spec.method == "random":
            sampler = optuna.samplers.RandomSampler(seed=seed)
        else:  # bayes: as W&B's engine, random until a trial has finished, then the Gaussian process
            sampler = optuna.samplers.GPSampler(seed=seed, n_startup_trials=1)
        self.study = optuna.create_study(
            direction="maximize" if spec.goal == "maximize" else "minimize", sampler=sampler
        )
        self._asked = 0

    def propose(self) -> Proposal | None:
        if self._asked >= self.count:
            return None
        import warnings

        with warnings.catch_warnings():  # e.g. GPSampler's note that an optional speed-up package is missing
            warnings.simplefilter("ignore")
            trial = self.study.ask(self.space)
        params = {}
        for key in self.spec.parameters:
            if key in self.fixed:
                params[key] = self.fixed[key]
            else:
                raw = trial.params[key]
                params[key] = self.decode[key](raw) if key in self.decode else raw
        self._asked += 1
        return Proposal(trial.number, params, trial)

    def report(self, proposal: Proposal, value: float | None) -> None:
        from optuna.trial import TrialState

        if value is None or not math.isfinite(value):
            self.study.tell(proposal.handle, state=TrialState.FAIL)
        else:
            self.study.tell(proposal.handle, float(value))


def local_search(spec: SweepSpec, count: int | None = None, seed: int = 0) -> GridSearch | OptunaSearch:
    """The engine of a local sweep (see the module docstring)."""
    if spec.method == "grid":
        return GridSearch(spec, count)
    if count is None:
        raise ConfigError(
            f"{spec.source}: a {spec.method} sweep needs --count N (the number of trials) to run locally."
        )
    if count < 1:
        raise ConfigError(f"--count {count}: run at least one trial.")
    return OptunaSearch(spec, count, seed)


def sample_random(spec: SweepSpec, count: int, seed: int = 0) -> list[dict[str, Any]]:
    """``count`` independent draws of a random spec, reproducible from ``seed`` (the trials a local random sweep
    runs: its draws do not depend on the results)."""
    search = OptunaSearch(spec, count, seed)
    return [p.params for p in iter(search.propose, None)]


def expand_local(spec: SweepSpec, count: int | None = None, seed: int = 0) -> list[dict[str, Any]]:
    """The trials a local grid or random sweep runs, listed in advance (``--dry-run``)."""
    if spec.method == "bayes":
        raise ConfigError(
            f"{spec.source}: a bayes sweep proposes each trial from the results of the trials "
            f"before it, so its trials cannot be listed in advance; run it (python sweep.py SPEC "
            f"--local --count N)."
        )
    search = local_search(spec, count, seed)
    return [p.params for p in iter(search.propose, None)]


# ------------------------------------------------------------------------------------------------------------
# Validation against the typed config


def probe_values(spec: SweepSpec) -> dict[str, list[Any]]:
    """Per parameter, the values whose composition proves every trial's override valid (all listed values, or a
    distribution's bounds)."""
    out = {}
    for key, p in spec.parameters.items():
        if "values" in p or "value" in p:
            out[key] = _choices(p, key, spec)
        else:
            lo, hi = p.get("min"), p.get("max")
            if p.get("distribution") == "log_uniform" and lo is not None and hi is not None:
                lo, hi = math.exp(float(lo)), math.exp(float(hi))
            out[key] = [v for v in (lo, hi) if v is not None]
    return out


def metric_problem(cfg: Any, metric_name: str) -> str | None:
    """Why a job of config ``cfg`` would not log ``metric_name`` (``fd/swav``), or None when it would."""
    from fidmed.metrics.base import METRICS, resolve_metrics

    metric, extractor = split_metric_name(metric_name)
    if str(getattr(cfg.stage, "value", cfg.stage)) == "train":
        return "stage=train evaluates nothing"
    selected = list(cfg.extractor or [])
    if extractor not in selected:
        return (
            f"the jobs evaluate extractor(s) {', '.join(selected) or 'none'}, not {extractor}; add "
            f"extractor=[{','.join([*selected, extractor])}] (a parameter, or after --)"
        )
    made = {col for name in resolve_metrics(list(cfg.eval.metrics)) for col in METRICS.get(name).info.columns}
    if metric not in made:
        makers = [e.name for e in METRICS.entries() if metric in e.info.columns]
        fix = (
            f"add {' or '.join(makers)} to eval.metrics"
            if makers
            else f"no registered metric makes {metric}; name one of {', '.join(sorted(made))}"
        )
        return f"eval.metrics={list(cfg.eval.metrics)} makes {', '.join(sorted(made))}, not {metric}; {fix}"
    return None


def validate_against_config(
    spec: SweepSpec, base_overrides: Iterable[str] = (), *, config_dir: str | Path | None = None
) -> list[str]:
    """Compose the config once per parameter value, before any job starts: a key that does not exist, a group
    option that does not exist or a value of the wrong type is a ConfigError naming the parameter. The metric is
    checked on every composition: a bayes sweep whose jobs would not make it is an error (it would have nothing to
    learn from); for grid and random the problems are returned as notes."""
    from fidmed.config import compose_config

    base = list(base_overrides)
    probes = probe_values(spec)
    fixed = [f"{k}={format_value(v[0])}" for k, v in probes.items() if v]
    notes: list[str] = []
    for key, values in probes.items():
        for value in values:
            override = f"{key}={format_value(value)}"
            others = [o for o in fixed if not o.startswith(f"{key}=")]
            try:
                cfg = compose_config([*base, *others, override], config_dir=config_dir)
            except Exception as exc:  # Hydra's composition/parse errors, the schemas' ConfigError
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise ConfigError(
                    f"{spec.source}: parameter {key!r} value {value!r} is not a valid override "
                    f"({override}): {first}. Fix the key or value in the spec; `python run.py "
                    f"--cfg job` shows the valid keys."
                ) from None
            problem = metric_problem(cfg, spec.metric_name) if spec.metric_name else None
            if problem and spec.method == "bayes":
                raise ConfigError(
                    f"{spec.source}: the bayes metric {spec.metric_name} would not be made ({override}: "
                    f"{problem}); fix the spec or the overrides after --."
                )
            if problem:
                note = f"metric {spec.metric_name} is not made by every trial ({problem}); trials.csv shows no value"
                if note not in notes:
                    notes.append(note)
    return notes


# ------------------------------------------------------------------------------------------------------------
# A trial's result


def metric_from_results(payload: dict[str, Any], metric_name: str) -> tuple[float | None, bool]:
    """The value of ``metric_name`` (``fd/swav``) in a results.json payload and whether it came from a random-init
    extractor; (None, False) when the job did not make it. A non-finite value is None too."""
    metric, extractor = split_metric_name(metric_name)
    for rec in payload.get("results") or []:
        if rec.get("metric") == metric and rec.get("extractor") == extractor:
            value = rec.get("value")
            random_init = bool((rec.get("protocol") or {}).get("random_init"))
            if value is None or not math.isfinite(float(value)):
                return None, random_init
            return float(value), random_init
    return None, False


@dataclass
class TrialResult:
    number: int
    overrides: list[str]
    run_dir: Path
    status: str  # ok | failed | no metric
    value: float | None = None
    random_init: bool = False
    error: str = ""

    def row(self, metric_name: str | None) -> dict[str, Any]:
        return {
            "trial": self.number,
            "status": self.status,
            "metric": metric_name or "",
            "value": "" if self.value is None else repr(self.value),
            "random_init": self.random_init,
            "overrides": " ".join(self.overrides),
            "run_dir": str(self.run_dir),
            "error": self.error,
        }


def error_from_stderr(text: str, returncode: int) -> str:
    """The message of a failed run.py: what follows ``fidmed: error:`` (a user-fixable error), else the last line
    of its output (e.g. a traceback's exception), with the exit status."""
    marker = "fidmed: error: "
    at = text.rfind(marker)
    if at >= 0:
        return text[at + len(marker) :].strip()
    lines = [ln.strip() for ln in text.replace("\r", "\n").splitlines() if ln.strip()]
    last = lines[-1] if lines else "no output"
    return f"run.py exited with status {returncode}: {last}"


def run_process_tee(cmd: Sequence[str], env: dict[str, str], keep: int = 1 << 18) -> tuple[int, str]:
    """Run ``cmd`` with its stderr passed through to ours (progress bars included) and its last ``keep`` bytes
    kept; returns the exit status and that tail."""
    proc = subprocess.Popen(list(cmd), env=env, stderr=subprocess.PIPE)
    tail = bytearray()
    out = getattr(sys.stderr, "buffer", None)
    try:
        while True:
            chunk = proc.stderr.read1(1 << 16)
            if not chunk:
                break
            if out is not None:
                out.write(chunk)
                out.flush()
            else:
                sys.stderr.write(chunk.decode(errors="replace"))
            tail += chunk
            del tail[:-keep]
    finally:
        proc.stderr.close()
        returncode = proc.wait()
    return returncode, tail.decode(errors="replace")


def write_trials(path: Path, results: Sequence[TrialResult], metric_name: str | None) -> None:
    from fidmed.atomic import atomic_write

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(TRIAL_COLUMNS), lineterminator="\n")
    writer.writeheader()
    for r in results:
        writer.writerow(r.row(metric_name))
    with atomic_write(path, "w") as f:
        f.write(buf.getvalue())


# ------------------------------------------------------------------------------------------------------------
# The command


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="sweep.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("spec", help="sweep spec YAML (conf/sweep/*.yaml)")
    p.add_argument("--count", type=int, default=None, help="trials to run (random and bayes: required locally)")
    p.add_argument("--project", default=None, help="W&B project (default: the spec's, else fidmed-sweeps)")
    p.add_argument("--entity", default=None, help="W&B entity (team or user)")
    p.add_argument("--local", action="store_true", help="no W&B server: run the trials here, offline W&B runs")
    p.add_argument("--sweep-id", default=None, help="join an existing W&B sweep instead of registering one")
    p.add_argument("--seed", type=int, default=0, help="seed of a local random or bayes sweep's proposals")
    p.add_argument("--sweep-dir", default=None, help="local sweep output folder (default outputs/sweeps/<time>)")
    p.add_argument("--dry-run", action="store_true", help="validate and list the local trials, run nothing")
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    args = p.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    args.overrides = extra  # fixed run.py overrides for every trial, after --
    return args


def main(argv: list[str] | None = None, run_script: str | Path | None = None) -> int:
    """``python sweep.py``; ``run_script`` is the run.py each local trial runs (default: beside the package)."""
    from fidmed.job import report_error

    args = parse_args(argv)
    try:
        return run(args, Path(run_script) if run_script else Path(__file__).resolve().parents[1] / "run.py")
    except FidmedError as exc:
        report_error(exc)
        return 2


def run(args: argparse.Namespace, run_script: Path) -> int:
    spec = load_spec(args.spec)
    offline = args.local or os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun")
    project = args.project or spec.extra.pop("project", None) or "fidmed-sweeps"
    entity = args.entity or spec.extra.pop("entity", None)
    search = local_search(spec, args.count, args.seed) if offline else None  # spec errors before composing
    notes = validate_against_config(spec, args.overrides)
    if not offline:
        return run_online(spec, args, project, entity)
    return run_local(spec, search, args, run_script, project, entity, notes)


def run_local(
    spec: SweepSpec,
    search: GridSearch | OptunaSearch,
    args: argparse.Namespace,
    run_script: Path,
    project: str,
    entity: str | None,
    notes: Sequence[str] = (),
) -> int:
    from fidmed.config import compose_config

    if not run_script.is_file():
        raise FidmedError(
            f"a local sweep runs each trial with run.py, which is not at {run_script}; run sweep.py "
            f"from a fidmed checkout."
        )
    sweep_dir = Path(args.sweep_dir or Path("outputs") / "sweeps" / time.strftime("%Y-%m-%d_%H-%M-%S"))
    if sweep_dir.exists() and (not sweep_dir.is_dir() or any(sweep_dir.iterdir())):
        raise ConfigError(
            f"sweep folder {sweep_dir} already exists and is not empty; its trials would mix with "
            f"this sweep's. Choose another --sweep-dir."
        )
    metric = spec.metric_name
    what = f"{search.count} trial(s)" + (f", optimising {metric} ({spec.goal})" if spec.method == "bayes" else "")
    print(f"local {spec.method} sweep {spec.name or args.spec}: {what} -> {sweep_dir}")
    for note in notes:
        print(f"note: {note}")
    if args.dry_run:
        if spec.method == "bayes":
            print("bayes proposes each trial from the results of the trials before it; nothing was run.")
            return 0
        for i, params in enumerate(iter(search.propose, None)):
            print(f"[{i + 1}/{search.count}] run.py {' '.join([*args.overrides, *to_overrides(params.params)])}")
        return 0
    results: list[TrialResult] = []
    wandb_runs = False
    for proposal in iter(search.propose, None):
        i = proposal.number
        overrides = [*args.overrides, *to_overrides(proposal.params)]
        run_dir = sweep_dir / str(i)
        print(f"[{i + 1}/{search.count}] run.py {' '.join(overrides)}", flush=True)
        extra = ["hydra.mode=RUN", f"hydra.run.dir={run_dir}"]
        try:
            logger = compose_config(overrides).logger.name
        except Exception:  # noqa: BLE001  (run.py reports the same composition error as the trial's failure)
            logger = None
        if logger == "wandb":  # the trial's own offline W&B run, for `wandb sync`
            wandb_runs = True
            extra += [f"logger.project={format_value(project)}", "logger.mode=offline"]
            if entity:
                extra.append(f"logger.entity={format_value(entity)}")
        env = {**os.environ, "WANDB_MODE": "offline"}
        returncode, stderr = run_process_tee([sys.executable, str(run_script), *overrides, *extra], env)
        result = TrialResult(i, overrides, run_dir, "ok")
        if returncode != 0:  # one failed trial does not stop the others; its folder says why
            result.status, result.error = "failed", error_from_stderr(stderr, returncode)
            run_dir.mkdir(parents=True, exist_ok=True)
            if not (run_dir / ERROR_FILE).is_file():
                (run_dir / ERROR_FILE).write_text(result.error + "\n", encoding="utf-8")
        elif metric:
            try:
                payload = json.loads((run_dir / "results.json").read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as exc:
                result.status, result.error = "failed", f"no readable results.json ({exc})"
            else:
                result.value, result.random_init = metric_from_results(payload, metric)
                if result.value is None:
                    result.status = "no metric"
                    result.error = f"results.json has no finite {metric}"
        search.report(proposal, result.value)
        results.append(result)
        write_trials(sweep_dir / TRIALS_FILE, results, metric)
        print(f"[{i + 1}/{search.count}] {_trial_line(result, metric)}", flush=True)
    return _summary(spec, results, sweep_dir, wandb_runs)


def _trial_line(r: TrialResult, metric: str | None) -> str:
    if r.status == "failed":
        from fidmed.analysis.collect import error_summary

        return f"failed: {error_summary(r.error)} (see {r.run_dir})"
    if r.value is not None:
        return f"{metric}{RANDOM_INIT_SUFFIX if r.random_init else ''} = {r.value:.6g}"
    return r.status + (f": {r.error}" if r.error else "")


def _summary(spec: SweepSpec, results: Sequence[TrialResult], sweep_dir: Path, wandb_runs: bool) -> int:
    failed = [r.number for r in results if r.status == "failed"]
    scored = [r for r in results if r.value is not None]
    if scored:
        best = (max if spec.goal == "maximize" else min)(scored, key=lambda r: r.value)
        label = spec.metric_name + (RANDOM_INIT_SUFFIX if best.random_init else "")
        print(f"best: trial {best.number}, {label} = {best.value:.6g}: {' '.join(best.overrides)}")
        if any(r.random_init for r in scored):
            print("!! RANDOM-INIT: some metrics come from random-init extractors; they test the plumbing only.")
    print(f"trials: {sweep_dir / TRIALS_FILE}; results table: fidmed collect {sweep_dir}")
    if wandb_runs:
        print(f"offline W&B runs: wandb sync {sweep_dir}/*/wandb/offline-run-*")
    if failed:
        print(
            f"{len(failed)} of {len(results)} trial(s) failed: {failed} (each folder's {ERROR_FILE} says why)",
            file=sys.stderr,
        )
    return 1 if failed else 0


def run_online(spec: SweepSpec, args: argparse.Namespace, project: str, entity: str | None) -> int:
    import wandb

    sweep_id = args.sweep_id or wandb.sweep(spec.wandb_config(), project=project, entity=entity)
    print(f"W&B sweep {sweep_id} (project {project}); more agents: python sweep.py {args.spec} --sweep-id {sweep_id}")
    wandb.agent(
        sweep_id,
        function=lambda: agent_trial(args.overrides, project, entity),
        project=project,
        entity=entity,
        count=args.count,
    )
    return 0


def agent_trial(base_overrides: list[str], project: str, entity: str | None) -> None:
    """One trial of a W&B agent: the trial's parameters as overrides, run_job in this process, logging into the
    trial's W&B run (Lightning's WandbLogger attaches to the active run; the job's tracker finishes it)."""
    import wandb
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf, open_dict, read_write

    from fidmed.config import compose_config
    from fidmed.job import report_error, run_job

    run = wandb.init(project=project, entity=entity)
    overrides = [*base_overrides, *to_overrides(dict(run.config)), "logger=wandb", "logger.mode=online"]
    run_dir = Path("outputs") / "sweeps" / str(run.sweep_id) / run.id
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        cfg = compose_config([*overrides, "hydra.mode=RUN"], return_hydra=True)
        with read_write(cfg.hydra), open_dict(cfg.hydra):  # Hydra composes its own node read-only
            cfg.hydra.runtime.output_dir = str(run_dir.resolve())
            cfg.hydra.runtime.cwd = os.getcwd()
        HydraConfig.instance().set_config(cfg)  # ${hydra:...} in paths resolve as under run.py
        job_cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
        (run_dir / "overrides.txt").write_text("\n".join(overrides) + "\n")
        run_job(job_cfg, run_dir, job_name=run.name or run.id)
    except FidmedError as exc:  # the tracker already finished the run as failed; the agent goes on
        report_error(exc)
        (run_dir / ERROR_FILE).write_text(f"{exc}\n", encoding="utf-8")
        if wandb.run is not None:
            wandb.run.finish(exit_code=1)


# ------------------------------------------------------------------------------------------------------------
# run.py -m: the jobs of a multirun, and its launcher plugins


def multirun_overrides(overrides: Iterable[str], config_dir: str | Path | None = None) -> list[list[str]]:
    """The jobs ``python run.py -m OVERRIDES`` would launch (each as its list of overrides), from the command-line
    sweep overrides and ``hydra.sweeper.params`` alike, without launching anything (a dry run)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from fidmed.config import compose_config

    overrides = list(overrides)
    parser = OverridesParser.create()
    plain = [o.input_line for o in parser.parse_overrides(overrides) if not o.is_sweep_override()]
    cfg = compose_config(plain, config_dir=config_dir, return_hydra=True)
    params = cfg.hydra.sweeper.get("params") or {}
    cli_keys = {o.split("=", 1)[0] for o in overrides}
    combined = [f"{k}={v}" for k, v in params.items() if k not in cli_keys] + overrides
    parsed = parser.parse_overrides(combined)
    batches = BasicSweeper.split_arguments(parsed, None)
    return [list(job) for batch in batches for job in batch]


LAUNCHER_PLUGINS = {
    "submitit_local": ("hydra_plugins.hydra_submitit_launcher", "hydra-submitit-launcher"),
    "submitit_slurm": ("hydra_plugins.hydra_submitit_launcher", "hydra-submitit-launcher"),
}


def check_launcher_available(name: str) -> None:
    """ConfigError naming the pip package when ``hydra/launcher=name`` needs a plugin that is not installed."""
    import importlib.util

    if name not in LAUNCHER_PLUGINS:
        return
    module, package = LAUNCHER_PLUGINS[name]
    try:
        found = importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        found = False
    if not found:
        raise ConfigError(
            f"hydra/launcher={name} needs Hydra's submitit launcher plugin, which is not installed: "
            f"pip install {package} (then run the same command again). Nothing was launched."
        )

"""W&B sweep specs for fidmed: parse, validate against the Hydra config, translate to overrides, expand locally.

A spec is a W&B sweep configuration whose parameter names are Hydra override keys (``model.r1_gamma``,
``augmentation``, ``eval.num_gen``) and whose values are what those keys take::

    method: grid                     # grid | random | bayes
    metric: {name: fd/swav, goal: minimize}
    parameters:
      experiment: {value: paper}     # fixed for every run
      modality: {values: [xray, ct]}
      model.r1_gamma: {distribution: log_uniform_values, min: 1, max: 16}

One trial's parameters become run.py's command-line overrides through :func:`to_overrides`, online (W&B agent)
and offline (:func:`expand_local`) alike, so a local sweep runs exactly the jobs the server would.
"""

from __future__ import annotations

import itertools
import math
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import yaml

from fidmed.errors import ConfigError

METHODS = ("grid", "random", "bayes")
LOCAL_METHODS = ("grid", "random")
# Distributions that a local (server-less) random sweep can sample; W&B names and meanings.
LOCAL_DISTRIBUTIONS = ("categorical", "constant", "uniform", "int_uniform", "q_uniform", "log_uniform",
                       "log_uniform_values")
_KEY_RE = re.compile(r"^[A-Za-z_][\w./@-]*$")
# Characters that end or split an unquoted Hydra value: such strings are quoted.
_SPECIAL = set(" ,=[]{}()'\"\\:$*?<>!~+")


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


def load_spec(path: str | Path) -> SweepSpec:
    """Read and check a sweep spec YAML file (structure only; :func:`validate_against_config` checks values)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep spec {path} not found; the shipped ones are in conf/sweep/ "
                          f"(e.g. python sweep.py conf/sweep/study_grid.yaml).")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"sweep spec {path} is not valid YAML ({exc}).") from None
    return parse_spec(raw, source=str(path))


def parse_spec(raw: Any, source: str = "<spec>") -> SweepSpec:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: a sweep spec is a mapping with method, parameters and metric.")
    method = str(raw.get("method", "")).lower()
    if method not in METHODS:
        raise ConfigError(f"{source}: method={raw.get('method')!r}; use one of {', '.join(METHODS)}.")
    params = raw.get("parameters")
    if not isinstance(params, dict) or not params:
        raise ConfigError(f"{source}: 'parameters' must map Hydra override keys (e.g. model.r1_gamma) to "
                          f"{{values: [...]}}, {{value: x}} or {{distribution: ..., min: .., max: ..}}.")
    for key, p in params.items():
        if not isinstance(key, str) or not _KEY_RE.match(key):
            raise ConfigError(f"{source}: parameter name {key!r} is not a Hydra override key "
                              f"(like model.r1_gamma or augmentation).")
        if not isinstance(p, dict) or not ({"value", "values", "distribution", "min"} & set(p)):
            raise ConfigError(f"{source}: parameter {key!r} needs 'values: [...]', 'value: x' or a distribution "
                              f"with min/max.")
        if "values" in p and (not isinstance(p["values"], list) or not p["values"]):
            raise ConfigError(f"{source}: parameter {key!r}: 'values' must be a non-empty list.")
        if method == "grid" and "values" not in p and "value" not in p:
            raise ConfigError(f"{source}: parameter {key!r}: a grid sweep needs 'values' or 'value' for every "
                              f"parameter (distributions only make sense for random or bayes).")
    metric = raw.get("metric")
    if metric is not None and (not isinstance(metric, dict) or "name" not in metric):
        raise ConfigError(f"{source}: metric must be {{name: fd/swav, goal: minimize}}.")
    if method == "bayes" and metric is None:
        raise ConfigError(f"{source}: a bayes sweep needs a metric to optimise (metric: {{name: ..., goal: ...}}).")
    known = {"method", "parameters", "metric", "name", "description"}
    extra = {k: v for k, v in raw.items() if k not in known}
    return SweepSpec(method, dict(params), metric, raw.get("name"), raw.get("description"), source, extra)


# ------------------------------------------------------------------------------------------------------------
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
    plain = (text and not (set(text) & _SPECIAL) and text.lower() not in ("null", "true", "false", "nan", "inf")
             and not _looks_numeric(text))
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


def expand_grid(spec: SweepSpec) -> list[dict[str, Any]]:
    """Every combination of a grid spec, the last parameter varying fastest (as W&B's grid search)."""
    keys = list(spec.parameters)
    choices = [_choices(spec.parameters[k], k, spec) for k in keys]
    return [dict(zip(keys, combo)) for combo in itertools.product(*choices)]


def sample_random(spec: SweepSpec, count: int, seed: int = 0) -> list[dict[str, Any]]:
    """``count`` independent draws of a random spec, reproducible from ``seed``."""
    rng = random.Random(seed)
    return [{k: _draw(p, k, spec, rng) for k, p in spec.parameters.items()} for _ in range(count)]


def expand_local(spec: SweepSpec, count: int | None = None, seed: int = 0) -> list[dict[str, Any]]:
    """The trials a local (server-less) sweep runs: all grid points (at most ``count``) or ``count`` draws."""
    if spec.method == "bayes":
        raise ConfigError(f"{spec.source}: method=bayes needs the W&B sweep server (it picks each trial from "
                          f"the results so far); run it online (`wandb login`, then sweep.py without --local) "
                          f"or use method: random / grid for a local sweep.")
    if spec.method == "grid":
        trials = expand_grid(spec)
        return trials if count is None else trials[:count]
    if count is None:
        raise ConfigError(f"{spec.source}: a random sweep needs --count N (the number of trials) to run locally.")
    return sample_random(spec, count, seed)


def _choices(p: dict[str, Any], key: str, spec: SweepSpec) -> list[Any]:
    if "values" in p:
        return list(p["values"])
    if "value" in p:
        return [p["value"]]
    raise ConfigError(f"{spec.source}: parameter {key!r} has no 'values' list.")


def _draw(p: dict[str, Any], key: str, spec: SweepSpec, rng: random.Random) -> Any:
    if "value" in p:
        return p["value"]
    dist = p.get("distribution", "categorical" if "values" in p else "uniform")
    if dist == "categorical" or ("values" in p and "distribution" not in p):
        return rng.choice(list(p["values"]))
    if dist not in LOCAL_DISTRIBUTIONS:
        raise ConfigError(f"{spec.source}: parameter {key!r}: distribution {dist!r} is not available locally; use "
                          f"one of {', '.join(LOCAL_DISTRIBUTIONS)} or run the sweep on the W&B server.")
    lo, hi = p.get("min"), p.get("max")
    if lo is None or hi is None or not float(lo) <= float(hi):
        raise ConfigError(f"{spec.source}: parameter {key!r}: distribution {dist} needs min <= max.")
    if dist == "int_uniform":
        return rng.randint(int(lo), int(hi))
    if dist == "uniform":
        return rng.uniform(float(lo), float(hi))
    if dist == "q_uniform":
        q = float(p.get("q", 1.0))
        return round(rng.uniform(float(lo), float(hi)) / q) * q
    if dist == "log_uniform":  # W&B: min/max are natural logs of the bounds
        return math.exp(rng.uniform(float(lo), float(hi)))
    if float(lo) <= 0:
        raise ConfigError(f"{spec.source}: parameter {key!r}: log_uniform_values needs min > 0.")
    return math.exp(rng.uniform(math.log(float(lo)), math.log(float(hi))))


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


def validate_against_config(spec: SweepSpec, config_dir: str | Path, base_overrides: Iterable[str] = ()) -> None:
    """Compose the config once per parameter value, before any job starts: a key that does not exist, a group
    option that does not exist or a value of the wrong type is a ConfigError naming the parameter."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    base = list(base_overrides)
    probes = probe_values(spec)
    fixed = [f"{k}={format_value(v[0])}" for k, v in probes.items() if v]
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(Path(config_dir).resolve()), version_base="1.3"):
        for key, values in probes.items():
            for value in values:
                override = f"{key}={format_value(value)}"
                others = [o for o in fixed if not o.startswith(f"{key}=")]
                try:
                    compose(config_name="config", overrides=[*base, *others, override])
                except Exception as exc:  # Hydra's composition/parse errors
                    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                    raise ConfigError(f"{spec.source}: parameter {key!r} value {value!r} is not a valid override "
                                      f"({override}): {first}. Fix the key or value in the spec; `python run.py "
                                      f"--cfg job` shows the valid keys.") from None


# ------------------------------------------------------------------------------------------------------------
def multirun_overrides(config_dir: str | Path, overrides: Iterable[str]) -> list[list[str]]:
    """The jobs ``python run.py -m OVERRIDES`` would launch (each as its list of overrides), from the command-line
    sweep overrides and ``hydra.sweeper.params`` alike, without launching anything (a dry run)."""
    from hydra import compose, initialize_config_dir
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides = list(overrides)
    parser = OverridesParser.create()
    plain = [o.input_line for o in parser.parse_overrides(overrides) if not o.is_sweep_override()]
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(Path(config_dir).resolve()), version_base="1.3"):
        cfg = compose(config_name="config", overrides=plain, return_hydra_config=True)
    params = cfg.hydra.sweeper.get("params") or {}
    cli_keys = {o.split("=", 1)[0] for o in overrides}
    combined = [f"{k}={v}" for k, v in params.items() if k not in cli_keys] + overrides
    parsed = parser.parse_overrides(combined)
    batches = BasicSweeper.split_arguments(parsed, None)
    return [list(job) for batch in batches for job in batch]


# ------------------------------------------------------------------------------------------------------------
LAUNCHER_PLUGINS = {"submitit_local": ("hydra_plugins.hydra_submitit_launcher", "hydra-submitit-launcher"),
                    "submitit_slurm": ("hydra_plugins.hydra_submitit_launcher", "hydra-submitit-launcher")}


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
        raise ConfigError(f"hydra/launcher={name} needs Hydra's submitit launcher plugin, which is not installed: "
                          f"pip install {package} (then run the same command again). Nothing was launched.")

"""The extractor registry: every extractor is one builder registered with its intrinsic facts, next to its code.

A builder module in ``fidmed.features.extractors`` (discovered: importing it registers its extractors; a plugin
registers its own the same way, see ``fidmed.registry``) registers each extractor with an :class:`ExtractorInfo`::

    @EXTRACTORS.register("inception_tf", info=ExtractorInfo(
        study_name="Incept", feature_dim=2048, input_size=299, resizer="clean", network="TF-FID InceptionV3",
        weights=WeightsFile("pt_inception-2015-12-05-6726825d.pth", "6726825d...", urls=(...))))
    def build(setup: ExtractorSetup, weights_path: Path | None) -> Extractor: ...

A user selects extractors by name and may override the knobs of an :class:`ExtractorConfig` (input size, resizer,
weights source, random-init seed): ``python run.py extractor=[inception_tf,swav] extractor.swav.resizer=nearest``
(one config node per registered extractor, made by :func:`default_config`), or ``fidmed evaluate --extractor a b``.
Everything else (feature size, channels, weights file and digests, architecture options) is a fact of the
registration and cannot be overridden. :func:`build_extractor` merges the config onto the facts into an
:class:`ExtractorSetup`, finds and verifies the weights file, and calls the builder with the setup and the file's
path (None for a random-init network, which the builder initialises from ``setup.seed`` alone).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from fidmed.errors import ConfigError, FidmedError, WeightsMissingError
from fidmed.features.base import RANDOM_CHOSEN, RANDOM_MISSING, RANDOM_REASONS, Extractor
from fidmed.features.preprocess import Preprocessing
from fidmed.features.weights import ImportedWeights, WeightsFile, import_weights, resolve_weights
from fidmed.registry import Registry, new_registry

EXTRACTORS: Registry[Any] = new_registry(
    "extractor",
    ("fidmed.features.extractors",),
    hint="extractor=[a,b] (run.py) or --extractor a b (fidmed evaluate)",
)

WEIGHTS_SOURCES = ("pretrained", "random")


@dataclass(frozen=True)
class ExtractorInfo:
    """The intrinsic facts of a registered extractor (what its builder and weights file fix).

    ``input_size`` and ``resizer`` are the defaults of the user's :class:`ExtractorConfig`; every other field is
    fixed. ``network`` names the architecture with its weights in a few words ("SwAV ResNet-50"; messages say
    "loaded into <network>"); ``description`` says what the study ran and how fidmed reproduces it; ``options``
    holds architecture-specific facts the builder reads (a Keras ``arch`` and ``normalization``, StudioGAN's
    ``study_backbone`` name, a transformer's ``depth``).
    """

    study_name: str  # what the study's tables call it
    feature_dim: int
    input_size: int
    resizer: str  # see fidmed.features.preprocess
    weights: WeightsFile | None  # None: no pretrained weights exist (random init only)
    network: str
    description: str = ""
    channels: str = "RGB"
    options: Mapping[str, Any] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        Preprocessing(self.resizer, self.input_size, self.channels)  # raises ConfigError when invalid
        if int(self.feature_dim) != self.feature_dim or self.feature_dim < 1:
            raise ConfigError(f"feature_dim must be a positive integer, got {self.feature_dim!r}")
        if self.weights is not None and not isinstance(self.weights, WeightsFile):
            raise TypeError(f"ExtractorInfo.weights must be a WeightsFile or None, got {type(self.weights).__name__}")
        object.__setattr__(self, "options", MappingProxyType(dict(self.options)))


@dataclass
class ExtractorConfig:
    """The user-facing, overridable knobs of one selected extractor (a Hydra node ``extractor.<name>``)."""

    name: str
    input_size: int
    resizer: str
    weights_source: str = "pretrained"  # "pretrained" | "random" (seeded random init: plumbing tests and demos)
    seed: int = 0  # the random-init seed (used only with weights_source=random)


CONFIG_KEYS = tuple(f.name for f in dataclasses.fields(ExtractorConfig))


@dataclass(frozen=True)
class ExtractorSetup:
    """What a builder receives: the registered facts of one extractor with the selected config applied.

    Tests and benchmarks may ``dataclasses.replace`` a setup (a self-made weights file, a shallower ``depth``
    option) and pass it to :func:`build_extractor`; the weights label records the digest of the file loaded.
    """

    name: str
    study_name: str
    feature_dim: int
    preprocessing: Preprocessing
    weights: WeightsFile | None
    network: str
    weights_source: str = "pretrained"
    seed: int = 0
    options: Mapping[str, Any] = field(default_factory=dict, hash=False)
    random_reason: str = RANDOM_CHOSEN  # why a random-init build is random: chosen on purpose, or weights missing

    def __post_init__(self) -> None:
        if self.weights_source not in WEIGHTS_SOURCES:
            raise ConfigError(
                f"extractor {self.name}: weights_source must be 'pretrained' or 'random', got {self.weights_source!r}"
            )
        if self.random_reason not in RANDOM_REASONS:
            raise ValueError(f"random_reason must be one of {RANDOM_REASONS}, got {self.random_reason!r}")
        object.__setattr__(self, "options", MappingProxyType(dict(self.options)))

    def with_options(self, **options: Any) -> ExtractorSetup:
        """A copy with some architecture options replaced (e.g. ``depth=1`` for a shallow test network)."""
        return dataclasses.replace(self, options={**self.options, **options})


# ------------------------------------------------------------------------------------------------ configs
def extractor_info(name: str) -> ExtractorInfo:
    """The registered facts of ``name`` (an unknown name raises a ConfigError listing the known ones)."""
    entry = EXTRACTORS.get(name)
    if not isinstance(entry.info, ExtractorInfo):
        raise ConfigError(
            f"extractor {name!r} ({entry.module}) was registered without an ExtractorInfo; "
            f"register it with EXTRACTORS.register({name!r}, info=ExtractorInfo(...))"
        )
    return entry.info


def default_config(name: str) -> ExtractorConfig:
    """The config of ``name`` with its registered defaults (what ``extractor=<name>`` selects); an extractor
    registered without a weights file defaults to ``weights_source=random``."""
    info = extractor_info(name)
    return ExtractorConfig(
        name=name,
        input_size=int(info.input_size),
        resizer=str(info.resizer),
        weights_source="pretrained" if info.weights is not None else "random",
    )


def _as_config(cfg: Any) -> ExtractorConfig:
    """An ExtractorConfig from an ExtractorConfig, a name, or a mapping / DictConfig with (some of) its keys."""
    if isinstance(cfg, ExtractorConfig):
        return cfg
    if isinstance(cfg, str):
        return default_config(cfg)
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            cfg = OmegaConf.to_container(cfg, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    if not isinstance(cfg, Mapping):
        raise ConfigError(
            f"an extractor config is a name or a mapping with the keys {', '.join(CONFIG_KEYS)}; "
            f"got {type(cfg).__name__}"
        )
    if not cfg.get("name"):
        raise ConfigError(
            f"an extractor config needs its name (one of {', '.join(EXTRACTORS.names())}); got {dict(cfg)}"
        )
    name = str(cfg["name"])
    unknown = sorted(set(cfg) - set(CONFIG_KEYS))
    if unknown:
        raise ConfigError(
            f"extractor {name}: unknown key(s) {', '.join(unknown)}; an extractor config sets only "
            f"{', '.join(CONFIG_KEYS)} (its feature size, weights file and architecture are fixed where it is "
            f"registered, {EXTRACTORS.get(name).module})"
        )
    out = default_config(name)
    for key in ("input_size", "seed"):
        if key in cfg:
            try:
                setattr(out, key, int(cfg[key]))
            except (TypeError, ValueError):
                raise ConfigError(f"extractor {name}: {key} must be an integer, got {cfg[key]!r}") from None
    for key in ("resizer", "weights_source"):
        if key in cfg:
            setattr(out, key, str(cfg[key]))
    return out


def extractor_setup(cfg: Any, random_reason: str = RANDOM_CHOSEN) -> ExtractorSetup:
    """The registered facts of ``cfg``'s extractor with ``cfg``'s overrides (a name, mapping or ExtractorConfig)."""
    config = _as_config(cfg)
    info = extractor_info(config.name)
    return ExtractorSetup(
        name=config.name,
        study_name=info.study_name,
        feature_dim=int(info.feature_dim),
        preprocessing=Preprocessing(config.resizer, config.input_size, info.channels),
        weights=info.weights,
        network=info.network,
        weights_source=config.weights_source,
        seed=config.seed,
        options=info.options,
        random_reason=random_reason,
    )


# ------------------------------------------------------------------------------------------------ building
def build_extractor(
    cfg: Any,
    weights_dir: Path | str | None = None,
    allow_download: bool = False,
    allow_random: bool = False,
    random_if_missing: bool = False,
) -> Extractor:
    """Build a frozen extractor in eval mode from a name, an ExtractorConfig, a mapping/DictConfig with its keys,
    or an ExtractorSetup.

    ``weights_source=random`` needs ``allow_random`` (plumbing tests and demos). ``random_if_missing`` (the demo's
    ``eval.weights=random_if_missing``) substitutes a random-init network when the pretrained weights file is
    missing, and labels it so; a file with the wrong digest is never substituted.
    """
    setup = cfg if isinstance(cfg, ExtractorSetup) else extractor_setup(cfg)
    builder = EXTRACTORS.get(setup.name).obj
    weights_path: Path | None
    if setup.weights_source == "random":
        if not allow_random:
            raise FidmedError(
                f"extractor {setup.name}: weights_source=random builds an untrained network whose FDs mean nothing; "
                "random weights are only for plumbing tests and demos (pass allow_random=True there). "
                "Use weights_source=pretrained for real evaluations."
            )
        weights_path = None
    elif setup.weights is None:
        raise ConfigError(
            f"extractor {setup.name} has no pretrained weights file; select it with "
            f"extractor.{setup.name}.weights_source=random (plumbing tests only)"
        )
    else:
        try:
            weights_path = resolve_weights(setup.weights, weights_dir, allow_download, extractor=setup.name)
        except WeightsMissingError:
            if not random_if_missing:
                raise
            setup = dataclasses.replace(setup, weights_source="random", random_reason=RANDOM_MISSING)
            weights_path = None
    extractor = builder(setup, weights_path)
    if extractor.feature_dim != setup.feature_dim or extractor.preprocessing != setup.preprocessing:
        raise ConfigError(
            f"extractor {setup.name}: its registration says feature_dim={setup.feature_dim}, preprocessing "
            f"{setup.preprocessing.key} but the builder made {extractor.feature_dim}, {extractor.preprocessing.key}"
        )
    extractor.eval()
    extractor.requires_grad_(False)
    return extractor


# ------------------------------------------------------------------------------------------------ up-front check
@dataclass(frozen=True)
class WeightsStatus:
    """Whether an extractor's weights are ready: state is 'found', 'random', 'missing' or 'invalid'."""

    name: str
    state: str
    path: Path | None = None
    filename: str | None = None
    sha256: str | None = None
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.state in ("found", "random")


def check_weights_available(
    cfgs: Iterable[Any],
    weights_dir: Path | str | None = None,
    allow_download: bool = False,
    allow_random: bool = False,
    raise_on_missing: bool = True,
) -> dict[str, WeightsStatus]:
    """Check (and, if allowed, download) every requested extractor's weights before any work starts.

    Returns a status per extractor name. With ``raise_on_missing`` (the default) any problem raises one
    ``WeightsMissingError`` (or ``FidmedError`` for a wrong hash / disallowed random init) naming every file.
    """
    statuses: dict[str, WeightsStatus] = {}
    for cfg in cfgs:
        setup = cfg if isinstance(cfg, ExtractorSetup) else extractor_setup(cfg)
        name = setup.name
        if setup.weights_source == "random":
            if allow_random:
                statuses[name] = WeightsStatus(name, "random", message="random init (plumbing only)")
            else:
                statuses[name] = WeightsStatus(
                    name, "invalid", message="weights_source=random is not allowed for this run"
                )
            continue
        w = setup.weights
        if w is None:
            statuses[name] = WeightsStatus(
                name,
                "invalid",
                message=f"extractor {name} has no pretrained weights file; use extractor.{name}.weights_source=random",
            )
            continue
        try:
            path = resolve_weights(w, weights_dir, allow_download, extractor=name)
            statuses[name] = WeightsStatus(name, "found", path, w.filename, w.sha256)
        except WeightsMissingError as e:
            statuses[name] = WeightsStatus(name, "missing", None, w.filename, w.sha256, str(e))
        except FidmedError as e:
            statuses[name] = WeightsStatus(name, "invalid", None, w.filename, w.sha256, str(e))
    bad = [s for s in statuses.values() if not s.ok]
    if bad and raise_on_missing:
        text = "\n\n".join(f"[{s.name}] {s.message}" for s in bad)
        header = f"{len(bad)} of {len(statuses)} extractors are not ready:\n\n" if len(bad) > 1 else ""
        if all(s.state == "missing" for s in bad):
            raise WeightsMissingError(header + text)
        raise FidmedError(header + text)
    return statuses


# ------------------------------------------------------------------------------------------------ weights files
def weights_files(names: Iterable[str] | None = None) -> dict[str, WeightsFile]:
    """Extractor name -> its registered weights file (all extractors that have one, or those of ``names``)."""
    wanted = list(names) if names else EXTRACTORS.names()
    infos = {name: extractor_info(name) for name in wanted}
    return {name: info.weights for name, info in infos.items() if info.weights is not None}


def check_weights_file(wfile: WeightsFile, path: Path | str) -> str:
    """Load ``path`` into the network of the extractor whose weights file is ``wfile``, as a real evaluation would
    (the builder is the check); say what was verified, or raise FidmedError."""
    names = [name for name, w in weights_files().items() if w.filename == wfile.filename]
    if not names:
        raise FidmedError(f"no registered extractor uses the weights file {wfile.filename}")
    info = extractor_info(names[0])
    setup = extractor_setup(names[0])
    net = EXTRACTORS.get(names[0]).obj(setup, Path(path))
    return f"loaded into {info.network}: {net.feature_dim}-d features"


def import_weights_file(src: Path | str, weights_dir: Path | str | None = None) -> ImportedWeights:
    """``fidmed weights import``: recognise ``src`` among the registered weights files by its content (published
    digests, else the architecture it loads into) and put it in the weights folder under its canonical name."""
    files = list(dict.fromkeys(weights_files().values()))
    return import_weights(src, files, check_weights_file, weights_dir)


__all__ = [
    "CONFIG_KEYS",
    "EXTRACTORS",
    "Extractor",
    "ExtractorConfig",
    "ExtractorInfo",
    "ExtractorSetup",
    "WEIGHTS_SOURCES",
    "WeightsStatus",
    "build_extractor",
    "check_weights_available",
    "check_weights_file",
    "default_config",
    "extractor_info",
    "extractor_setup",
    "import_weights_file",
    "weights_files",
]

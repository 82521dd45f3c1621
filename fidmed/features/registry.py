"""Feature extractors: the common interface, a name -> builder registry, and building from configs.

An extractor config (``conf/extractor/NAME.yaml``) holds:

    name: inception_tf                    # registry name
    module: fidmed.features.inception_tf  # module whose import registers the builder
    study_name: Incept                    # what the study's tables call it
    feature_dim: 2048
    input_size: 299
    resizer: clean                        # see fidmed.features.preprocess
    channels: RGB
    weights_source: pretrained            # or "random": seeded random init, plumbing tests/demos only
    seed: 0                               # the random-init seed
    weights: {filename, sha256, urls, description, how_to}
    ...                                   # anything else reaches the builder in ExtractorSpec.options

A builder is ``builder(spec: ExtractorSpec, weights_path: Path | None) -> Extractor``; ``weights_path`` is None
for a random-init network, which the builder must initialise from ``spec.seed`` alone (``seeded_init_``).
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fidmed.errors import ConfigError, FidmedError, WeightsMissingError
from fidmed.features.preprocess import Preprocessing
from fidmed.features.weights import WeightsSpec, resolve_weights

#: Modules that register the built-in extractors (imported by ``available_extractors``). A new extractor module
#: adds itself here, and its config names it under ``module:``.
BUILTIN_EXTRACTOR_MODULES: tuple[str, ...] = (
    "fidmed.features.inception_tf",
    "fidmed.features.torch_backbones",  # inception, resnet, swav, dino, swin
    "fidmed.features.modern_backbones",  # dinov2, clip (dgm-eval's extras)
    "fidmed.features.keras_nets",  # Keras-faithful InceptionV3, ResNet50, InceptionResNetV2, DenseNet121
)

_SPEC_KEYS = {"name", "module", "study_name", "feature_dim", "input_size", "resizer", "channels", "weights_source",
              "seed", "weights"}


@dataclass(frozen=True)
class ExtractorSpec:
    """An extractor config, parsed and checked."""

    name: str
    study_name: str
    feature_dim: int
    preprocessing: Preprocessing
    weights: WeightsSpec | None
    weights_source: str = "pretrained"  # "pretrained" | "random"
    seed: int = 0
    module: str | None = None
    options: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_config(cls, cfg: Any) -> "ExtractorSpec":
        d = _to_dict(cfg)
        try:
            name = str(d["name"])
            source = str(d.get("weights_source", "pretrained"))
            if source not in ("pretrained", "random"):
                raise ConfigError(f"extractor {name}: weights_source must be 'pretrained' or 'random', got {source!r}")
            weights = WeightsSpec.from_config(d["weights"]) if d.get("weights") else None
            if source == "pretrained" and weights is None:
                raise ConfigError(f"extractor {name}: weights_source is 'pretrained' but the config has no weights")
            return cls(
                name=name,
                study_name=str(d.get("study_name", name)),
                feature_dim=int(d["feature_dim"]),
                preprocessing=Preprocessing(str(d.get("resizer", "clean")), int(d["input_size"]),
                                            str(d.get("channels", "RGB"))),
                weights=weights,
                weights_source=source,
                seed=int(d.get("seed", 0)),
                module=str(d["module"]) if d.get("module") else None,
                options={k: v for k, v in d.items() if k not in _SPEC_KEYS},
            )
        except KeyError as e:
            raise ConfigError(f"extractor config lacks the key {e.args[0]!r}: {d}") from None


def _to_dict(cfg: Any) -> dict[str, Any]:
    if isinstance(cfg, ExtractorSpec):
        raise TypeError("already an ExtractorSpec")
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            return dict(OmegaConf.to_container(cfg, resolve=True))  # type: ignore[arg-type]
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    if isinstance(cfg, Mapping):
        return dict(cfg)
    raise ConfigError(f"an extractor config must be a mapping, got {type(cfg).__name__}")


def _as_spec(cfg: Any) -> ExtractorSpec:
    return cfg if isinstance(cfg, ExtractorSpec) else ExtractorSpec.from_config(cfg)


# ------------------------------------------------------------------------------------------------ interface
class Extractor(nn.Module):
    """A frozen feature extractor: float32 ``[N, 3, S, S]`` in [0, 255] (already preprocessed) -> ``[N, D]``.

    Each extractor normalises its input inside ``forward``. It is always in eval mode: ``train()`` is a no-op,
    so a LightningModule holding it cannot switch its BatchNorm layers to batch statistics.
    """

    def __init__(self, spec: ExtractorSpec, weights_path: Path | None) -> None:
        super().__init__()
        self.name = spec.name
        self.study_name = spec.study_name
        self.feature_dim = spec.feature_dim
        self.preprocessing = spec.preprocessing
        self.random_init = weights_path is None
        if self.random_init:
            self.weights_label = f"RANDOM-INIT(seed={spec.seed}) -- not a real extractor"
        else:
            # The digest of the file actually loaded (full, even where the spec pins only a prefix or nothing).
            from fidmed.features.weights import sha256_of

            pinned = spec.weights is not None and spec.weights.sha256 is not None
            self.weights_label = f"sha256:{sha256_of(weights_path)}" + ("" if pinned else " (unpinned)")

    def train(self, mode: bool = True) -> "Extractor":
        return super().train(False)

    def check_input(self, x: torch.Tensor) -> None:
        s = self.preprocessing.size
        if x.ndim != 4 or tuple(x.shape[1:]) != (3, s, s) or x.dtype != torch.float32:
            raise FidmedError(
                f"extractor {self.name} expects float32 [N, 3, {s}, {s}] in [0, 255] (preprocessing "
                f"{self.preprocessing.key}), got {x.dtype} {tuple(x.shape)}"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def protocol(self) -> dict[str, Any]:
        """What to record with every number this extractor produces."""
        return {
            "extractor": self.name,
            "study_name": self.study_name,
            "feature_dim": self.feature_dim,
            "preprocessing": self.preprocessing.key,
            "weights": self.weights_label,
            "random_init": self.random_init,
        }


def seeded_init_(module: nn.Module, seed: int) -> None:
    """Deterministic random init from ``seed`` alone (independent of torch's global RNG).

    Conv/Linear weights: normal with std sqrt(2 / fan_in) (keeps activations of a deep ReLU net in range); biases 0;
    BatchNorm: weight 1, bias 0, running mean 0, running var 1.
    """
    g = torch.Generator().manual_seed(int(seed))
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * math.sqrt(2.0 / fan_in))
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.reset_parameters()


# ------------------------------------------------------------------------------------------------ registry
Builder = Callable[[ExtractorSpec, "Path | None"], Extractor]
_REGISTRY: dict[str, Builder] = {}


def register_extractor(name: str) -> Callable[[Builder], Builder]:
    """Decorator: ``@register_extractor("inception_tf") def build(spec, weights_path): ...``."""

    def deco(builder: Builder) -> Builder:
        if name in _REGISTRY and _REGISTRY[name] is not builder:
            raise ValueError(f"extractor {name!r} is registered twice")
        _REGISTRY[name] = builder
        return builder

    return deco


def _import_module(module: str) -> None:
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name != module:  # a dependency of the module is missing: that is a real error
            raise


def available_extractors() -> list[str]:
    for module in BUILTIN_EXTRACTOR_MODULES:
        _import_module(module)
    return sorted(_REGISTRY)


def _builder_for(spec: ExtractorSpec) -> Builder:
    if spec.module:
        _import_module(spec.module)
    if spec.name not in _REGISTRY:
        available_extractors()
    if spec.name not in _REGISTRY:
        raise FidmedError(f"unknown extractor {spec.name!r}; available: {', '.join(available_extractors())}")
    return _REGISTRY[spec.name]


def build_extractor(
    cfg: Any,
    weights_dir: Path | str | None = None,
    allow_download: bool = False,
    allow_random: bool = False,
) -> Extractor:
    """Build a frozen extractor in eval mode from its config (DictConfig, dict or ExtractorSpec)."""
    spec = _as_spec(cfg)
    builder = _builder_for(spec)
    if spec.weights_source == "random":
        if not allow_random:
            raise FidmedError(
                f"extractor {spec.name}: weights_source=random builds an untrained network whose FDs mean nothing; "
                "random weights are only for plumbing tests and demos (pass allow_random=True there). "
                "Use weights_source=pretrained for real evaluations."
            )
        weights_path = None
    else:
        assert spec.weights is not None
        weights_path = resolve_weights(spec.weights, weights_dir, allow_download)
    extractor = builder(spec, weights_path)
    if extractor.feature_dim != spec.feature_dim or extractor.preprocessing != spec.preprocessing:
        raise ConfigError(
            f"extractor {spec.name}: the config says feature_dim={spec.feature_dim}, preprocessing "
            f"{spec.preprocessing.key} but the builder made {extractor.feature_dim}, {extractor.preprocessing.key}"
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
        spec = _as_spec(cfg)
        if spec.weights_source == "random":
            if allow_random:
                statuses[spec.name] = WeightsStatus(spec.name, "random", message="random init (plumbing only)")
            else:
                statuses[spec.name] = WeightsStatus(
                    spec.name, "invalid", message="weights_source=random is not allowed for this run"
                )
            continue
        assert spec.weights is not None
        w = spec.weights
        try:
            path = resolve_weights(w, weights_dir, allow_download)
            statuses[spec.name] = WeightsStatus(spec.name, "found", path, w.filename, w.sha256)
        except WeightsMissingError as e:
            statuses[spec.name] = WeightsStatus(spec.name, "missing", None, w.filename, w.sha256, str(e))
        except FidmedError as e:
            statuses[spec.name] = WeightsStatus(spec.name, "invalid", None, w.filename, w.sha256, str(e))
    bad = [s for s in statuses.values() if not s.ok]
    if bad and raise_on_missing:
        text = "\n\n".join(f"[{s.name}] {s.message}" for s in bad)
        header = f"{len(bad)} of {len(statuses)} extractors are not ready:\n\n"
        if all(s.state == "missing" for s in bad):
            raise WeightsMissingError(header + text)
        raise FidmedError(header + text)
    return statuses

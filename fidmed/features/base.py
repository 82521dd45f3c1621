"""What every extractor shares: the frozen ``Extractor`` module, seeded random init, checkpoint reading.

The builder modules in ``fidmed.features.extractors`` subclass :class:`Extractor`; they get their facts (name,
feature size, preprocessing, weights file) from an ``ExtractorSetup`` (fidmed.features.registry) and the path of a
verified weights file, or None for a random-init network, which they initialise from ``setup.seed`` alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from fidmed.errors import FidmedError

if TYPE_CHECKING:  # the registry imports this module; this one needs the registry's record for typing only
    from fidmed.features.registry import ExtractorSetup

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Why an extractor has random weights (``ExtractorSetup.random_reason``); the extractor's ``random_init_reason``
# says it in words, and the evaluator records it with every number (the results table's banner shows it).
RANDOM_CHOSEN = "chosen"  # weights_source=random / eval.weights=random / --weights random: on purpose
RANDOM_MISSING = "missing"  # build_extractor(random_if_missing=True), the demo: the weights file was not available
RANDOM_REASONS = (RANDOM_CHOSEN, RANDOM_MISSING)


def random_init_reason(reason: str, filename: str | None = None) -> str:
    """Why an extractor has random weights, in words: chosen on purpose, or substituted for a missing file."""
    if reason == RANDOM_CHOSEN:
        return "chosen on purpose (weights_source=random)"
    if reason == RANDOM_MISSING:
        return f"substituted: its weights file {filename or '(none)'} is missing"
    raise ValueError(f"random-init reason must be one of {RANDOM_REASONS}, got {reason!r}")


# ------------------------------------------------------------------------------------------------ interface
class Extractor(nn.Module):
    """A frozen feature extractor: float32 ``[N, 3, S, S]`` in [0, 255] (already preprocessed) -> ``[N, D]``.

    Each extractor normalises its input inside ``forward``. It is always in eval mode: ``train()`` is a no-op,
    so a LightningModule holding it cannot switch its BatchNorm layers to batch statistics.

    ``channels_last``: whether evaluation may run the network in the channels_last memory format (weights and
    input) when the user opts in with ``eval.channels_last=true`` (see :func:`set_forward_path`). A subclass
    sets it where measured not to change fp32 features beyond float32 rounding (:data:`CHANNELS_LAST_RTOL`;
    benchmarks/results/extractors.md, tests/test_eval_speed.py); an unmeasured network (a plugin's) stays
    contiguous. A network built by ``build_extractor`` is contiguous until an evaluator sets its forward path.
    """

    channels_last: bool = False

    def __init__(self, setup: ExtractorSetup, weights_path: Path | None) -> None:
        super().__init__()
        self.name = setup.name
        self.study_name = setup.study_name
        self.feature_dim = setup.feature_dim
        self.preprocessing = setup.preprocessing
        self.random_init = weights_path is None
        self.random_init_reason: str | None = None
        if self.random_init:
            filename = setup.weights.filename if setup.weights is not None else None
            self.random_init_reason = random_init_reason(setup.random_reason, filename)
            self.weights_label = f"RANDOM-INIT(seed={setup.seed}) -- not a real extractor"
        else:
            # The digest of the file actually loaded (full, even where the registration pins only a prefix or
            # nothing).
            from fidmed.features.weights import sha256_of

            pinned = setup.weights is not None and setup.weights.sha256 is not None
            self.weights_label = f"sha256:{sha256_of(weights_path)}" + ("" if pinned else " (unpinned)")

    def train(self, mode: bool = True) -> Extractor:
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
            "random_init_reason": self.random_init_reason,
        }


class NormalisedExtractor(Extractor):
    """[0, 255] -> x / 255 -> (x - mean) / std -> ``self.features`` (ToTensor + Normalize, the same float32 ops)."""

    def __init__(
        self,
        setup: ExtractorSetup,
        weights_path: Path | None,
        mean: tuple[float, ...] = IMAGENET_MEAN,
        std: tuple[float, ...] = IMAGENET_STD,
    ) -> None:
        super().__init__(setup, weights_path)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        return (x / 255.0 - self.mean) / self.std

    def features(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        return self.features(self.normalise(x))


# ------------------------------------------------------------------------------------------------ forward path
#: channels_last vs contiguous fp32 features of the same network and input: max |difference| / max |feature| at
#: most this. Float32 rounding of the same computation: the contiguous features themselves differ from a float64
#: run of the same network by 1e-7 to 1e-6 of that scale, and so do the channels_last ones (measured for every
#: registered extractor, benchmarks/results/extractors.md); the vision transformers are bit-identical.
CHANNELS_LAST_RTOL = 1e-5
#: torch.compile'd vs eager fp32 features, same measure (inductor fuses and reorders float32 operations).
COMPILE_RTOL = 1e-4


class ForwardPath:
    """How evaluation runs one extractor: the memory format of its weights and input, eager or ``torch.compile``.

    ``path.prepare(x)`` is the input in the path's memory format (the evaluator converts each shared
    preprocessed batch once per format); ``path(x)`` runs the extractor on it. The compiled forward is made on
    the first call (``torch.compile(extractor, dynamic=False)``: one graph per batch shape, reused afterwards).
    None of this changes what is computed, only the order of float32 operations (:data:`CHANNELS_LAST_RTOL`,
    :data:`COMPILE_RTOL`).
    """

    def __init__(
        self, module: Any, channels_last: bool = False, compiled: bool = False, compiled_fn: Any = None
    ) -> None:
        self.module = module
        self.channels_last = bool(channels_last)
        self.compiled = bool(compiled)
        #: ``torch.compile(module)``, made on the first call; pass an earlier path's to reuse its graphs
        self.compiled_fn: Any = compiled_fn if compiled else None

    @property
    def key(self) -> str:
        """``channels_last`` or ``contiguous``, ``+compiled`` when compiled (for logs and benchmarks)."""
        return ("channels_last" if self.channels_last else "contiguous") + ("+compiled" if self.compiled else "")

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.ndim == 4 else x

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self.compiled:
            return self.module(x)
        if self.compiled_fn is None:
            self.compiled_fn = torch.compile(self.module, dynamic=False)
        try:
            return self.compiled_fn(x)
        except FidmedError:
            raise
        except Exception as e:  # noqa: BLE001 - a compiler failure is the user's to fix, in one line
            from torch._dynamo.exc import TorchDynamoException

            if not isinstance(e, TorchDynamoException):
                raise
            cause = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            name = getattr(self.module, "name", type(self.module).__name__)
            raise FidmedError(
                f"eval.compile=true: torch.compile could not compile extractor {name} ({cause}); inductor needs a "
                "C++ compiler (gcc) on the CPU and triton on a GPU. Install it, or evaluate without compiling: "
                "eval.compile=false (fidmed evaluate: leave out --compile)."
            ) from None

    def __repr__(self) -> str:
        return f"ForwardPath({self.key})"


def set_forward_path(module: Any, channels_last: bool = False, compile: bool = False) -> ForwardPath:
    """Prepare ``module`` (an extractor, already on its device) for evaluation and return its forward path.

    ``channels_last``: use the channels_last memory format where the extractor declares it safe
    (``Extractor.channels_last``; anything else, e.g. a module without the attribute, stays contiguous): the
    weights are converted here, the input by ``path.prepare``. ``False`` makes every extractor contiguous, the
    layout of the reference implementations (``eval.channels_last=false``). ``compile``: run the extractor through
    ``torch.compile`` (``eval.compile=true``). Like the device, the path is a property of the module: the last
    evaluator made with it sets it.
    """
    use_cl = bool(channels_last) and bool(getattr(module, "channels_last", False))
    if isinstance(module, nn.Module):
        module.to(memory_format=torch.channels_last if use_cl else torch.contiguous_format)
    path = ForwardPath(module, use_cl, compile, forward_path(module).compiled_fn)  # an earlier compile is reused
    vars(module)["_fidmed_forward_path"] = path  # not an attribute nn.Module would register as a submodule
    return path


def forward_path(module: Any) -> ForwardPath:
    """The forward path :func:`set_forward_path` gave ``module``; else the module as it is, eager."""
    path = vars(module).get("_fidmed_forward_path") if hasattr(module, "__dict__") else None
    return path if isinstance(path, ForwardPath) else ForwardPath(module)


# ------------------------------------------------------------------------------------------------ helpers
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


def build_seeded(factory: Callable[[], nn.Module], seed: int) -> nn.Module:
    """Build a network under a private RNG seeded with ``seed`` (the global RNG is left untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        return factory()


def read_checkpoint(path: Path | str, what: str) -> dict[str, Any]:
    """A state dict from ``.pth``/``.bin`` (torch.load, weights only) or ``.safetensors``."""
    try:
        if str(path).endswith(".safetensors"):
            from safetensors.torch import load_file

            state: Any = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's to fix
        # torch's own text advises weights_only=False (running code from the file), which fidmed never does
        kind = (
            "not a PyTorch checkpoint of tensors"
            if "Weights only load failed" in str(e)
            else (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        )
        raise FidmedError(f"cannot read the {what} weights file {path} ({kind}); delete it and get it again") from None
    if not isinstance(state, Mapping):
        raise FidmedError(f"{path} is not a {what} checkpoint (a state dict was expected, got {type(state).__name__})")
    return dict(state)


def load_strict(net: nn.Module, state: Mapping[str, torch.Tensor], path: Path | str, what: str) -> None:
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise FidmedError(f"{path} does not fit the {what} network: {e}") from e


def check_input_size(setup: ExtractorSetup, minimum: int | None = None, exact: int | None = None) -> None:
    """Refuse an ``input_size`` the network cannot take (fixed position embeddings, or too small for its strides)."""
    s = setup.preprocessing.size
    if exact is not None and s != exact:
        raise FidmedError(
            f"extractor {setup.name} takes {exact}x{exact} inputs (its position embeddings / windows "
            f"are fixed), the config says input_size={s}; set extractor.{setup.name}.input_size={exact}, "
            f"its default"
        )
    if minimum is not None and s < minimum:
        raise FidmedError(
            f"extractor {setup.name} needs inputs of at least {minimum}x{minimum} (smaller inputs "
            f"vanish in its strided layers), the config says input_size={s}; set "
            f"extractor.{setup.name}.input_size={minimum} or more"
        )

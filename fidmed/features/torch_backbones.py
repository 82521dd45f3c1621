"""The study's PyTorch (StudioGAN) backbones: ``inception``, ``resnet``, ``swav``, ``dino``, ``swin``.

What the study ran (its StudioGAN fork, ``src/metrics/preparation.py``, class ``LoadEvalModel``), per backbone:

- ``inception`` ("InceptionV3_torch"): ``torch.hub.load("pytorch/vision:v0.10.0", "inception_v3", pretrained=True)``.
  torchvision's ``inception_v3(pretrained=True)`` defaults to ``transform_input=True``: the network re-maps its
  ImageNet-normalised input to (x - 0.5)/0.5 per channel with its own arithmetic. We build the same torchvision
  network with ``transform_input=True`` (and the auxiliary classifier, so the file loads strictly). Feature: the
  input of ``fc`` (a forward pre-hook in StudioGAN) = the 2048-d global average pool (dropout is off in eval).
- ``resnet`` ("ResNet50_torch"): torchvision resnet50, ImageNet V1 weights (``resnet50-0676ba61.pth``); input of fc.
- ``swav`` ("SwAV_torch"): ``torch.hub.load("facebookresearch/swav:main", "resnet50")``: a torchvision resnet50
  given ``swav_800ep_pretrain.pth.tar`` with the ``module.`` prefix removed and ``strict=False`` (so the
  projection head and prototypes are ignored); StudioGAN then loads SwAV's linear classifier into ``fc``, which
  does not change the feature (input of fc, 2048-d). We load the trunk strictly: every trunk key must be present.
- ``dino`` ("DINO_torch"): DINO ViT-S/8 (``dino_deitsmall8_pretrain.pth``), feature = concatenation of the CLS
  tokens of the last 4 blocks, each passed through the final LayerNorm (DINO's eval_linear ``n_last_blocks=4``):
  1536-d. The network is timm's ``vit_small_patch8_224`` (same layout and key names as DINO's ViT: qkv bias,
  LayerNorm eps 1e-6, exact GELU).
- ``swin`` ("Swin-T_torch"): despite the name, StudioGAN's default ``SwinTransformer()`` is Swin-B (embed 128,
  depths 2-2-18-2, window 7) with ``swin_base_patch4_window7_224_22kto1k.pth``; feature = average over tokens of
  the final LayerNorm output (1024-d). The network is timm's ``swin_base_patch4_window7_224``; the official
  checkpoint's keys are mapped with timm's ``checkpoint_filter_fn`` (downsample layers move one stage on).

Every extractor takes float32 [N, 3, S, S] in [0, 255] (8-bit RGB, gray copied, "clean" resize) and normalises
inside ``forward`` exactly as StudioGAN's ``resize_images``: ``(x / 255 - mean) / std`` with ImageNet mean/std.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fidmed.errors import FidmedError
from fidmed.features.registry import Extractor, ExtractorSpec, register_extractor, seeded_init_

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ------------------------------------------------------------------------------------------------ helpers
def read_checkpoint(path: Path | str, what: str) -> dict[str, Any]:
    """A state dict from ``.pth``/``.bin`` (torch.load, weights only) or ``.safetensors``."""
    try:
        if str(path).endswith(".safetensors"):
            from safetensors.torch import load_file

            state: Any = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's to fix
        raise FidmedError(f"cannot read the {what} weights file {path}: {e}; delete it and get it again") from e
    if not isinstance(state, Mapping):
        raise FidmedError(f"{path} is not a {what} checkpoint (a state dict was expected, got {type(state).__name__})")
    return dict(state)


def _load_strict(net: nn.Module, state: Mapping[str, torch.Tensor], path: Path | str, what: str) -> None:
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise FidmedError(f"{path} does not fit the {what} network: {e}") from e


def _build_seeded(factory: Callable[[], nn.Module], seed: int) -> nn.Module:
    """Build a network under a private RNG seeded with ``seed`` (the global RNG is left untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        return factory()


class _ImageNetExtractor(Extractor):
    """Common part: [0, 255] -> x/255 -> (x - mean)/std -> ``self.features``."""

    def __init__(self, spec: ExtractorSpec, weights_path: Path | None) -> None:
        super().__init__(spec, weights_path)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        return (x / 255.0 - self.mean) / self.std

    def features(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        return self.features(self.normalise(x))


def _check_size(spec: ExtractorSpec, minimum: int | None = None, exact: int | None = None) -> None:
    s = spec.preprocessing.size
    if exact is not None and s != exact:
        raise FidmedError(f"extractor {spec.name} takes {exact}x{exact} inputs (its position embeddings / windows "
                          f"are fixed), the config says input_size={s}; set input_size: {exact}")
    if minimum is not None and s < minimum:
        raise FidmedError(f"extractor {spec.name} needs inputs of at least {minimum}x{minimum} (smaller inputs "
                          f"vanish in its strided layers), the config says input_size={s}")


# ------------------------------------------------------------------------------------------------ torchvision CNNs
def make_inception_v3() -> nn.Module:
    """torchvision Inception3 as ``inception_v3(pretrained=True)`` of torchvision 0.10 built it."""
    from torchvision.models import inception_v3

    return inception_v3(weights=None, aux_logits=True, transform_input=True, init_weights=False)


def make_resnet50() -> nn.Module:
    from torchvision.models import resnet50

    return resnet50(weights=None)


class TorchvisionCNN(_ImageNetExtractor):
    """A torchvision classifier whose ``fc`` is replaced by Identity: its output is the input of fc."""

    def __init__(self, spec: ExtractorSpec, weights_path: Path | None, factory: Callable[[], nn.Module],
                 loader: Callable[[nn.Module, Path], None]) -> None:
        super().__init__(spec, weights_path)
        net = _build_seeded(factory, spec.seed)
        if weights_path is None:
            seeded_init_(net, spec.seed)
        else:
            loader(net, weights_path)
        net.fc = nn.Identity()
        if getattr(net, "AuxLogits", None) is not None:  # unused in eval; dropped as torchvision does
            net.aux_logits = False
            net.AuxLogits = None
        self.net = net

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def load_torchvision_weights(net: nn.Module, path: Path | str) -> None:
    """A torchvision ``*.pth`` state dict (e.g. ``resnet50-0676ba61.pth``), loaded strictly with its fc."""
    _load_strict(net, read_checkpoint(path, "torchvision"), path, type(net).__name__)


def swav_trunk_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SwAV's checkpoint -> torchvision resnet50 keys: strip ``module.``, drop the projection head and prototypes."""
    state = state.get("state_dict", state) if isinstance(state.get("state_dict"), Mapping) else state
    out = {}
    for k, v in state.items():
        k = k[len("module."):] if k.startswith("module.") else k
        if k.startswith(("projection_head.", "prototypes.", "fc.")):
            continue
        out[k] = v
    return out


def load_swav_weights(net: nn.Module, path: Path | str) -> None:
    """``swav_800ep_pretrain.pth.tar`` into a torchvision resnet50; every trunk key must be present (fc stays)."""
    trunk = swav_trunk_state_dict(read_checkpoint(path, "SwAV"))
    expected = {k for k in net.state_dict() if not k.startswith("fc.")}
    missing, unexpected = sorted(expected - set(trunk)), sorted(set(trunk) - expected)
    if missing or unexpected:
        raise FidmedError(f"{path} is not a SwAV ResNet-50 checkpoint: missing {missing[:5]}"
                          f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}")
    try:
        net.load_state_dict(trunk, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise FidmedError(f"{path} does not fit a ResNet-50: {e}") from e


@register_extractor("inception")
def build_inception(spec: ExtractorSpec, weights_path: Path | None) -> TorchvisionCNN:
    _check_size(spec, minimum=75)  # torchvision's Inception3 rejects smaller inputs
    return TorchvisionCNN(spec, weights_path, make_inception_v3, load_torchvision_weights)


@register_extractor("resnet")
def build_resnet(spec: ExtractorSpec, weights_path: Path | None) -> TorchvisionCNN:
    _check_size(spec, minimum=32)
    return TorchvisionCNN(spec, weights_path, make_resnet50, load_torchvision_weights)


@register_extractor("swav")
def build_swav(spec: ExtractorSpec, weights_path: Path | None) -> TorchvisionCNN:
    _check_size(spec, minimum=32)
    return TorchvisionCNN(spec, weights_path, make_resnet50, load_swav_weights)


# ------------------------------------------------------------------------------------------------ DINO ViT-S/8
def make_dino_vits8() -> nn.Module:
    import timm

    return timm.create_model("vit_small_patch8_224", pretrained=False, num_classes=0)


def dino_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """DINO checkpoint -> timm ViT keys (identical names); a full training checkpoint's teacher is used."""
    if isinstance(state.get("teacher"), Mapping):
        state = state["teacher"]
    out = {}
    for k, v in state.items():
        k = k.replace("module.", "").replace("backbone.", "")
        if k.startswith("head."):  # DINO projection head of a training checkpoint
            continue
        out[k] = v
    return out


class DINOViT(_ImageNetExtractor):
    """DINO's linear-eval feature: the last ``n_last_blocks`` CLS tokens, each layer-normed, concatenated."""

    n_last_blocks = 4

    def __init__(self, spec: ExtractorSpec, weights_path: Path | None) -> None:
        super().__init__(spec, weights_path)
        self.net = _build_seeded(make_dino_vits8, spec.seed)
        if weights_path is not None:
            _load_strict(self.net, dino_state_dict(read_checkpoint(weights_path, "DINO")), weights_path,
                         "DINO ViT-S/8")

    def features(self, x: torch.Tensor) -> torch.Tensor:
        net = self.net
        x = net.norm_pre(net.patch_drop(net._pos_embed(net.patch_embed(x))))
        cls = []
        depth = len(net.blocks)
        for i, blk in enumerate(net.blocks):
            x = blk(x)
            if i >= depth - self.n_last_blocks:
                cls.append(net.norm(x)[:, 0])
        return torch.cat(cls, dim=-1)


@register_extractor("dino")
def build_dino(spec: ExtractorSpec, weights_path: Path | None) -> DINOViT:
    _check_size(spec, exact=224)
    return DINOViT(spec, weights_path)


# ------------------------------------------------------------------------------------------------ Swin-B
def make_swin_base() -> nn.Module:
    import timm

    return timm.create_model("swin_base_patch4_window7_224", pretrained=False, num_classes=0)


def swin_state_dict(state: Mapping[str, torch.Tensor], net: nn.Module) -> dict[str, torch.Tensor]:
    """Official Swin checkpoint (``{"model": ...}``) -> timm keys, with timm's own converter; classifier dropped."""
    from timm.models.swin_transformer import checkpoint_filter_fn

    if isinstance(state.get("model"), Mapping):
        state = state["model"]
    state = {k: v for k, v in state.items() if not k.startswith("head.")}
    return dict(checkpoint_filter_fn(state, net))


class SwinB(_ImageNetExtractor):
    """Swin-B: mean over tokens of the final LayerNorm output (StudioGAN's ``forward_features``)."""

    def __init__(self, spec: ExtractorSpec, weights_path: Path | None) -> None:
        super().__init__(spec, weights_path)
        self.net = _build_seeded(make_swin_base, spec.seed)
        if weights_path is not None:
            state = read_checkpoint(weights_path, "Swin")
            _load_strict(self.net, swin_state_dict(state, self.net), weights_path, "Swin-B")

    def features(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.net.forward_features(x)  # [N, H, W, C], final LayerNorm applied
        return tokens.flatten(1, 2).mean(dim=1)


@register_extractor("swin")
def build_swin(spec: ExtractorSpec, weights_path: Path | None) -> SwinB:
    _check_size(spec, exact=224)
    return SwinB(spec, weights_path)

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
Which torchvision networks the study's "Incept" and "Res" columns used is unconfirmed
(docs/extractors.md#which-inception-and-resnet); see docs/extractors.md#studiogan-backbones for all five.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn

from fidmed.errors import FidmedError
from fidmed.features.base import (
    NormalisedExtractor,
    build_seeded,
    check_input_size,
    load_strict,
    read_checkpoint,
    seeded_init_,
)
from fidmed.features.registry import EXTRACTORS, ExtractorInfo, ExtractorSetup
from fidmed.features.weights import WeightsFile


# ------------------------------------------------------------------------------------------------ torchvision CNNs
def make_inception_v3() -> nn.Module:
    """torchvision Inception3 as ``inception_v3(pretrained=True)`` of torchvision 0.10 built it."""
    from torchvision.models import inception_v3

    return inception_v3(weights=None, aux_logits=True, transform_input=True, init_weights=False)


def make_resnet50() -> nn.Module:
    from torchvision.models import resnet50

    return resnet50(weights=None)


class TorchvisionCNN(NormalisedExtractor):
    """A torchvision classifier whose ``fc`` is replaced by Identity: its output is the input of fc."""

    channels_last = True  # fp32 features within float32 rounding of contiguous (fidmed.features.base)

    def __init__(
        self,
        setup: ExtractorSetup,
        weights_path: Path | None,
        factory: Callable[[], nn.Module],
        loader: Callable[[nn.Module, Path], None],
    ) -> None:
        super().__init__(setup, weights_path)
        net = build_seeded(factory, setup.seed)
        if weights_path is None:
            seeded_init_(net, setup.seed)
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
    load_strict(net, read_checkpoint(path, "torchvision"), path, type(net).__name__)


def swav_trunk_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SwAV's checkpoint -> torchvision resnet50 keys: strip ``module.``, drop the projection head and prototypes."""
    state = state.get("state_dict", state) if isinstance(state.get("state_dict"), Mapping) else state
    out = {}
    for k, v in state.items():
        k = k[len("module.") :] if k.startswith("module.") else k
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
        raise FidmedError(
            f"{path} is not a SwAV ResNet-50 checkpoint: missing {missing[:5]}"
            f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
        )
    try:
        net.load_state_dict(trunk, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise FidmedError(f"{path} does not fit a ResNet-50: {e}") from e


@EXTRACTORS.register(
    "inception",
    info=ExtractorInfo(
        # The study's "Incept" column may be this network, inception_tf or a Keras InceptionV3 (unconfirmed).
        study_name="Incept",
        feature_dim=2048,
        input_size=299,
        resizer="clean",
        weights=WeightsFile(
            filename="inception_v3_google-0cc3c7bd.pth",
            # Only the sha256 prefix is published: torchvision names its files <name>-<first 8 hex digits of the
            # sha256>.pth and torch.hub checks that prefix on download. No full digest was found in a trustworthy
            # public source.
            sha256="0cc3c7bd",
            urls=("https://download.pytorch.org/models/inception_v3_google-0cc3c7bd.pth",),
            description="torchvision InceptionV3 ImageNet weights (IMAGENET1K_V1, about 104 MB)",
            how_to='It is the file torchvision downloads for inception_v3(weights="IMAGENET1K_V1"); if torchvision '
            "fetched it on this machine before, it is already in ~/.cache/torch/hub/checkpoints and fidmed finds "
            "it there.",
        ),
        network="torchvision InceptionV3 (ImageNet)",
        description="torchvision InceptionV3 with ImageNet weights (IMAGENET1K_V1), as StudioGAN's InceptionV3_torch "
        'backbone ran it: torch.hub "pytorch/vision:v0.10.0" inception_v3(pretrained=True), which sets '
        "transform_input=True (the network re-maps its ImageNet-normalised input to (x - 0.5)/0.5 itself). "
        "Clean resize to 299, x/255 then ImageNet mean/std; feature: input of fc (2048-d average pool).",
        options={"study_backbone": "InceptionV3_torch"},  # StudioGAN's --eval_backbone name (provenance only)
    ),
)
def build_inception(setup: ExtractorSetup, weights_path: Path | None) -> TorchvisionCNN:
    check_input_size(setup, minimum=75)  # torchvision's Inception3 rejects smaller inputs
    return TorchvisionCNN(setup, weights_path, make_inception_v3, load_torchvision_weights)


@EXTRACTORS.register(
    "resnet",
    info=ExtractorInfo(
        # The study's "Res" column may be this network or a Keras ResNet50 (unconfirmed).
        study_name="Res",
        feature_dim=2048,
        input_size=224,
        resizer="clean",
        weights=WeightsFile(
            filename="resnet50-0676ba61.pth",
            # Full sha256 recorded independently by several public projects (each with the file size 102,530,333
            # bytes); its first 8 digits are the "0676ba61" in the file name that torch.hub checks.
            sha256="0676ba61b6795bbe1773cffd859882e5e297624d384b6993f7c9e683e722fb8a",
            urls=("https://download.pytorch.org/models/resnet50-0676ba61.pth",),
            description="torchvision ResNet-50 ImageNet weights (IMAGENET1K_V1, 102.5 MB)",
            how_to='It is the file torchvision downloads for resnet50(weights="IMAGENET1K_V1"); if torchvision fetched '
            "it on this machine before, it is already in ~/.cache/torch/hub/checkpoints and fidmed finds it "
            "there.",
        ),
        network="torchvision ResNet-50 (ImageNet)",
        description="torchvision ResNet-50 with ImageNet V1 weights, as StudioGAN's ResNet50_torch backbone (torch.hub "
        '"pytorch/vision:v0.10.0" resnet50(pretrained=True)). Clean resize to 224, x/255 then ImageNet '
        "mean/std; feature: input of fc (2048-d average pool).",
        options={"study_backbone": "ResNet50_torch"},
    ),
)
def build_resnet(setup: ExtractorSetup, weights_path: Path | None) -> TorchvisionCNN:
    check_input_size(setup, minimum=32)
    return TorchvisionCNN(setup, weights_path, make_resnet50, load_torchvision_weights)


@EXTRACTORS.register(
    "swav",
    info=ExtractorInfo(
        study_name="SwAV",
        feature_dim=2048,
        input_size=224,
        resizer="clean",
        weights=WeightsFile(
            filename="swav_800ep_pretrain.pth.tar",
            sha256=None,  # UNPINNED: no published sha256 (full or prefix) was found for this file
            urls=("https://dl.fbaipublicfiles.com/deepcluster/swav_800ep_pretrain.pth.tar",),
            description="SwAV ResNet-50 pretrained 800 epochs (facebookresearch/swav)",
            how_to='It is the file torch.hub.load("facebookresearch/swav:main", "resnet50") downloads into '
            "~/.cache/torch/hub/checkpoints, where fidmed finds it.",
        ),
        network="SwAV ResNet-50",
        description=(
            "SwAV ResNet-50 (800 epochs), as StudioGAN's SwAV_torch backbone: torch.hub "
            '"facebookresearch/swav:main" resnet50, i.e. a torchvision resnet50 trunk given '
            'swav_800ep_pretrain.pth.tar without its "module." prefix (projection head and prototypes unused). '
            "Clean resize to 224, x/255 then ImageNet mean/std; feature: input of fc (2048-d average pool). The "
            "study found this extractor significantly correlated with experts."
        ),
        options={"study_backbone": "SwAV_torch"},
    ),
)
def build_swav(setup: ExtractorSetup, weights_path: Path | None) -> TorchvisionCNN:
    check_input_size(setup, minimum=32)
    return TorchvisionCNN(setup, weights_path, make_resnet50, load_swav_weights)


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


class DINOViT(NormalisedExtractor):
    """DINO's linear-eval feature: the last ``n_last_blocks`` CLS tokens, each layer-normed, concatenated."""

    channels_last = True  # only the patch embedding is a convolution: fp32 features bit-identical

    n_last_blocks = 4

    def __init__(self, setup: ExtractorSetup, weights_path: Path | None) -> None:
        super().__init__(setup, weights_path)
        self.net = build_seeded(make_dino_vits8, setup.seed)
        if weights_path is not None:
            load_strict(self.net, dino_state_dict(read_checkpoint(weights_path, "DINO")), weights_path, "DINO ViT-S/8")

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


@EXTRACTORS.register(
    "dino",
    info=ExtractorInfo(
        study_name="DINO",
        feature_dim=1536,
        input_size=224,
        resizer="clean",
        weights=WeightsFile(
            filename="dino_deitsmall8_pretrain.pth",
            sha256=None,  # UNPINNED: no published sha256 (full or prefix) was found for this file
            urls=("https://dl.fbaipublicfiles.com/dino/dino_deitsmall8_pretrain/dino_deitsmall8_pretrain.pth",),
            description="DINO ViT-S/8 backbone weights (facebookresearch/dino, about 87 MB)",
            how_to='It is the file torch.hub.load("facebookresearch/dino:main", "dino_vits8") downloads into '
            "~/.cache/torch/hub/checkpoints, where fidmed finds it.",
        ),
        network="DINO ViT-S/8",
        description="DINO ViT-S/8 (not ViT-B/16), as StudioGAN's DINO_torch backbone: feature = the CLS tokens of the "
        "last 4 blocks, each through the final LayerNorm, concatenated (DINO's linear-evaluation feature), "
        "1536-d. Clean resize to 224, x/255 then ImageNet mean/std. Network: timm vit_small_patch8_224 "
        "(same layout).",
        options={"study_backbone": "DINO_torch"},
    ),
)
def build_dino(setup: ExtractorSetup, weights_path: Path | None) -> DINOViT:
    check_input_size(setup, exact=224)
    return DINOViT(setup, weights_path)


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


class SwinB(NormalisedExtractor):
    """Swin-B: mean over tokens of the final LayerNorm output (StudioGAN's ``forward_features``)."""

    channels_last = True  # only the patch embedding is a convolution: fp32 features bit-identical

    def __init__(self, setup: ExtractorSetup, weights_path: Path | None) -> None:
        super().__init__(setup, weights_path)
        self.net = build_seeded(make_swin_base, setup.seed)
        if weights_path is not None:
            state = read_checkpoint(weights_path, "Swin")
            load_strict(self.net, swin_state_dict(state, self.net), weights_path, "Swin-B")

    def features(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.net.forward_features(x)  # [N, H, W, C], final LayerNorm applied
        return tokens.flatten(1, 2).mean(dim=1)


@EXTRACTORS.register(
    "swin",
    info=ExtractorInfo(
        study_name="Swin-T",  # the study's (and StudioGAN's) name; the network is Swin-B
        feature_dim=1024,
        input_size=224,
        resizer="clean",
        weights=WeightsFile(
            filename="swin_base_patch4_window7_224_22kto1k.pth",
            sha256=None,  # UNPINNED: no published sha256 (full or prefix) was found for this file
            urls=(
                "https://github.com/SwinTransformer/storage/releases/download/v1.0.0/"
                "swin_base_patch4_window7_224_22kto1k.pth",
            ),
            description="Swin-B 22k->1k weights (microsoft/Swin-Transformer release v1.0.0)",
            how_to="StudioGAN downloads this file into ~/.cache/torch/hub/checkpoints, where fidmed finds it.",
        ),
        network="Swin-B (22k->1k)",
        description='StudioGAN\'s "Swin-T_torch" backbone is really Swin-B (embed 128, depths 2-2-18-2, window 7) '
        "fine-tuned ImageNet-22k -> 1k. Feature: average over tokens of the final LayerNorm output, 1024-d. "
        "Clean resize to 224, x/255 then ImageNet mean/std. Network: timm swin_base_patch4_window7_224, the "
        "official checkpoint mapped with timm's checkpoint_filter_fn.",
        options={"study_backbone": "Swin-T_torch"},
    ),
)
def build_swin(setup: ExtractorSetup, weights_path: Path | None) -> SwinB:
    check_input_size(setup, exact=224)
    return SwinB(setup, weights_path)

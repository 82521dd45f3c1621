"""dgm-eval's extractors (Stein et al. 2023, layer6ai-labs/dgm-eval), beyond the study: ``dinov2``, ``clip``.

Not study extractors (the study predates them); see docs/extractors.md#beyond-the-study.

What dgm-eval computes with its defaults (``clean_resize=False``, ``depth=0``, ``arch=None``):

- ``dinov2`` (``dgm_eval/models/dinov2.py``, its recommended extractor): ``torch.hub.load("facebookresearch/dinov2",
  "dinov2_vitl14")``: ViT-L/14 built for 518 px (37 x 37 patch position embeddings), LayerScale, LayerNorm eps 1e-6,
  exact GELU, no register tokens, weights ``dinov2_vitl14_pretrain.pth``. Input: torchvision
  ``Resize((224, 224), BICUBIC)`` on the 8-bit RGB PIL image (PIL's 8-bit bicubic; our resizer ``pil_bicubic``),
  ``ToTensor`` (x / 255), ImageNet mean/std. At 224 px the hub model interpolates its position embeddings on every
  call (``interpolate_pos_encoding``: float32 bicubic, no antialias, ``scale_factor = (16 + 0.1) / 37``, not
  ``size=16``); they do not depend on the image, so we do that once when loading, onto timm's
  ``vit_large_patch14_dinov2`` built at 224 (same modules and key names). Feature: the model's output, the final
  LayerNorm's CLS token (``x_norm_clstoken``), 1024-d.
- ``clip`` (``dgm_eval/models/clip.py``): an open_clip model; dgm-eval's default architecture is ViT-L-14 (DataComp),
  this extractor is the ViT-B/32 variant with dgm-eval's weights for that architecture, ``laion2b_s34b_b79k``.
  Input: ``TF.resize(img, (224, 224), BICUBIC)`` on the PIL image (again PIL's 8-bit bicubic), ``to_tensor``,
  ``center_crop`` to 224 (a no-op), CLIP mean/std. Feature (dgm-eval's own forward with ``depth=0``): ``ln_post`` of
  the CLS token WITHOUT the projection ``proj`` (which dgm-eval applies only with ``--depth 1``), 768-d. The network
  is timm's ``vit_base_patch32_clip_224`` (pre-norm ``ln_pre``, no patch-embedding bias, LayerNorm eps 1e-5, exact
  GELU as open_clip's "ViT-B-32" config; not the quickgelu variant), loaded with timm's open_clip converter.

Every extractor takes float32 [N, 3, 224, 224] in [0, 255] (already resized by ``pil_bicubic``) and normalises inside
``forward``: ``(x / 255 - mean) / std``, the same float32 operations as ``ToTensor`` + ``Normalize``.
Numerical note: dgm-eval installs xformers, whose memory-efficient attention the hub DINOv2 uses on a GPU; that
changes rounding only (we use timm's attention, PyTorch's scaled-dot-product attention).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fidmed.errors import FidmedError
from fidmed.features.base import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    NormalisedExtractor,
    build_seeded,
    check_input_size,
    load_strict,
    read_checkpoint,
)
from fidmed.features.registry import EXTRACTORS, ExtractorInfo, ExtractorSetup
from fidmed.features.weights import WeightsFile

#: open_clip's OPENAI_DATASET_MEAN / OPENAI_DATASET_STD, the values dgm-eval's CLIPEncoder.transform hard-codes.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

DINOV2_PATCH = 14
DINOV2_DEPTH = 24
#: The hub's ``dinov2_vitl14`` keyword ``interpolate_offset`` (dinov2/hub/backbones.py).
DINOV2_POS_OFFSET = 0.1
CLIP_DEPTH = 12


# ------------------------------------------------------------------------------------------------ helpers


def _depth_option(setup: ExtractorSetup, full: int) -> int:
    """The ``depth`` option: the number of transformer blocks (tests build shallow networks; real ones are full)."""
    depth = int(setup.options.get("depth", full))
    if not 1 <= depth <= full:
        raise FidmedError(f"extractor {setup.name}: depth must be between 1 and {full}, got {depth}")
    return depth


# ------------------------------------------------------------------------------------------------ DINOv2 ViT-L/14
def interpolate_pos_embed_like_hub(
    pos_embed: torch.Tensor, grid: int, offset: float = DINOV2_POS_OFFSET
) -> torch.Tensor:
    """The hub DINOv2's ``interpolate_pos_encoding`` for a square ``grid`` x ``grid`` patch input.

    ``pos_embed`` is ``[1, 1 + M*M, D]`` (class token first). The patch part is resized in float32 with
    ``F.interpolate(mode="bicubic", antialias=False)`` given the scale factor ``(grid + offset) / M`` (the hub's
    historical kludge; the output has ``grid`` cells but the sampling positions follow the scale factor, so this is
    not ``size=grid``). With ``grid == M`` the hub returns the embeddings unchanged, and so does this function.
    """
    n = pos_embed.shape[1] - 1
    m = math.isqrt(n)
    if m * m != n:
        raise FidmedError(f"DINOv2 position embeddings of {n} patches do not form a square grid")
    if grid == m:
        return pos_embed
    dim = pos_embed.shape[-1]
    pos = pos_embed.float()
    patch = pos[:, 1:].reshape(1, m, m, dim).permute(0, 3, 1, 2)
    scale = float(grid + offset) / m
    patch = F.interpolate(patch, scale_factor=(scale, scale), mode="bicubic", antialias=False)
    if tuple(patch.shape[-2:]) != (grid, grid):  # the hub asserts the same
        raise FidmedError(f"DINOv2 position-embedding interpolation gave {tuple(patch.shape[-2:])}, not {grid}x{grid}")
    patch = patch.permute(0, 2, 3, 1).reshape(1, grid * grid, dim)
    return torch.cat([pos[:, :1], patch], dim=1).to(pos_embed.dtype)


def make_dinov2_vitl14(img_size: int = 224, depth: int = DINOV2_DEPTH) -> nn.Module:
    """timm's DINOv2 ViT-L/14 (LayerScale, LayerNorm eps 1e-6, exact GELU) with position embeddings for ``img_size``."""
    import timm

    return timm.create_model(
        "vit_large_patch14_dinov2", pretrained=False, num_classes=0, img_size=img_size, depth=depth
    )


def dinov2_state_dict(state: Mapping[str, torch.Tensor], grid: int) -> dict[str, torch.Tensor]:
    """The hub checkpoint (``dinov2_vitl14_pretrain.pth``) -> timm keys at ``grid`` x ``grid`` patches.

    The key names are the same; ``mask_token`` (used only in training) is dropped and ``pos_embed`` is interpolated
    once as the hub does at run time. A checkpoint with register tokens (``*_reg4_*``) is another model: refused.
    """
    state = dict(state)
    if any(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    if "register_tokens" in state:
        raise FidmedError(
            "this DINOv2 checkpoint has register tokens (a *_reg4 model); dinov2 uses "
            "dinov2_vitl14_pretrain.pth, the model without registers that dgm-eval loads"
        )
    if "pos_embed" not in state:
        raise FidmedError("not a DINOv2 checkpoint: it has no pos_embed")
    state.pop("mask_token", None)
    state["pos_embed"] = interpolate_pos_embed_like_hub(state["pos_embed"], grid)
    return state


class DINOv2ViT(NormalisedExtractor):
    """dgm-eval's DINOv2 feature: the final LayerNorm's CLS token."""

    channels_last = True  # only the patch embedding is a convolution: fp32 features bit-identical

    def __init__(self, setup: ExtractorSetup, weights_path: Path | None) -> None:
        super().__init__(setup, weights_path, IMAGENET_MEAN, IMAGENET_STD)
        size = setup.preprocessing.size
        depth = _depth_option(setup, DINOV2_DEPTH)
        self.net = build_seeded(lambda: make_dinov2_vitl14(size, depth), setup.seed)
        if weights_path is not None:
            state = dinov2_state_dict(read_checkpoint(weights_path, "DINOv2"), size // DINOV2_PATCH)
            load_strict(self.net, state, weights_path, "DINOv2 ViT-L/14")

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.forward_features(x)[:, 0]  # final norm applied to every token; take the class token


@EXTRACTORS.register(
    "dinov2",
    info=ExtractorInfo(
        study_name="DINOv2",
        feature_dim=1024,
        input_size=224,
        resizer="pil_bicubic",
        weights=WeightsFile(
            filename="dinov2_vitl14_pretrain.pth",
            sha256=None,  # UNPINNED: no published sha256 (full or prefix) was found for this file
            urls=("https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/dinov2_vitl14_pretrain.pth",),
            description="DINOv2 ViT-L/14 backbone weights, LVD-142M (facebookresearch/dinov2, about 1.2 GB)",
            how_to='It is the file torch.hub.load("facebookresearch/dinov2", "dinov2_vitl14") (what dgm-eval calls) '
            "downloads into ~/.cache/torch/hub/checkpoints, where fidmed finds it; or download the URL into the "
            "fidmed weights folder.",
        ),
        network="DINOv2 ViT-L/14",
        description="DINOv2 ViT-L/14 as dgm-eval runs it by default, its recommended extractor: torch.hub "
        '"facebookresearch/dinov2" dinov2_vitl14 (no registers). Feature: the final LayerNorm\'s CLS token, '
        "1024-d. Input: dgm-eval's default resize (clean_resize=False), PIL 8-bit bicubic to 224 "
        "(pil_bicubic), x/255, ImageNet mean/std. The hub's 37x37 position embeddings are interpolated to "
        "16x16 exactly as the hub does at run time, once at load. Network: timm vit_large_patch14_dinov2. "
        "Not a study extractor.",
        options={"depth": DINOV2_DEPTH},  # transformer blocks (tests replace it to build shallow networks)
    ),
)
def build_dinov2(setup: ExtractorSetup, weights_path: Path | None) -> DINOv2ViT:
    check_input_size(setup, exact=224)  # dgm-eval resizes to 224 x 224 (16 x 16 patches of 14 px)
    return DINOv2ViT(setup, weights_path)


# ------------------------------------------------------------------------------------------------ CLIP ViT-B/32
def make_clip_vitb32(depth: int = CLIP_DEPTH) -> nn.Module:
    """timm's CLIP ViT-B/32 image tower at 224 (open_clip's "ViT-B-32" layout)."""
    import timm

    return timm.create_model("vit_base_patch32_clip_224", pretrained=False, num_classes=0, depth=depth)


def open_clip_visual_state_dict(state: Mapping[str, torch.Tensor], net: nn.Module) -> dict[str, torch.Tensor]:
    """An open_clip checkpoint (``visual.*`` image tower plus the text tower) -> timm keys, with timm's converter.

    The text tower and ``visual.proj`` (the image projection, unused by dgm-eval's default feature) are dropped.
    """
    from timm.models.vision_transformer import checkpoint_filter_fn

    state = dict(state)
    if isinstance(state.get("state_dict"), Mapping):  # an open_clip training checkpoint
        state = dict(state["state_dict"])
    if "visual.class_embedding" not in state and "module.visual.class_embedding" not in state:
        raise FidmedError(
            "not an open_clip CLIP checkpoint: it has no visual.class_embedding "
            "(expected open_clip_pytorch_model.bin of laion/CLIP-ViT-B-32-laion2B-s34B-b79K)"
        )
    out = checkpoint_filter_fn(state, net)
    return {k: v for k, v in out.items() if not k.startswith("head.")}


class CLIPViT(NormalisedExtractor):
    """dgm-eval's CLIP feature (depth=0): ``ln_post`` of the CLS token, before the projection."""

    channels_last = True  # only the patch embedding is a convolution: fp32 features bit-identical

    def __init__(self, setup: ExtractorSetup, weights_path: Path | None) -> None:
        super().__init__(setup, weights_path, CLIP_MEAN, CLIP_STD)
        depth = _depth_option(setup, CLIP_DEPTH)
        self.net = build_seeded(lambda: make_clip_vitb32(depth), setup.seed)
        if weights_path is not None:
            state = open_clip_visual_state_dict(read_checkpoint(weights_path, "CLIP"), self.net)
            load_strict(self.net, state, weights_path, "CLIP ViT-B/32")

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.forward_features(x)[:, 0]  # ln_post is per token: norm(all)[:, 0] == ln_post(CLS)


@EXTRACTORS.register(
    "clip",
    info=ExtractorInfo(
        study_name="CLIP",
        feature_dim=768,
        input_size=224,
        resizer="pil_bicubic",
        weights=WeightsFile(
            filename="open_clip_pytorch_model.bin",
            # UNPINNED: no sha256 from a trustworthy source was found (the HF repo's LFS oid would be it)
            sha256=None,
            urls=(
                "https://huggingface.co/laion/CLIP-ViT-B-32-laion2B-s34B-b79K/resolve/main/open_clip_pytorch_model.bin",
            ),
            description="open_clip ViT-B-32 laion2b_s34b_b79k (image and text towers, about 605 MB; the image tower is "
            "used)",
            how_to='open_clip.create_model("ViT-B-32", "laion2b_s34b_b79k") (what dgm-eval calls) keeps it in the '
            "Hugging Face cache, ~/.cache/huggingface/hub/models--laion--CLIP-ViT-B-32-laion2B-s34B-b79K/"
            "snapshots/*/open_clip_pytorch_model.bin, where fidmed finds it; or download the URL into the fidmed "
            "weights folder.",
        ),
        network="CLIP ViT-B/32 image tower (laion2b_s34b_b79k)",
        description="CLIP ViT-B/32 image tower as dgm-eval's CLIPEncoder computes it with --arch ViT-B-32 (dgm-eval's "
        "own default arch is ViT-L-14) and dgm-eval's weights for that arch, open_clip laion2b_s34b_b79k. "
        "Feature: dgm-eval's default (depth=0), ln_post of the CLS token WITHOUT the projection visual.proj, "
        "so 768-d, not the 512-d CLIP embedding. Input: PIL 8-bit bicubic to 224 (pil_bicubic), x/255, "
        "CLIP mean/std (not ImageNet's). Network: timm vit_base_patch32_clip_224 (exact GELU, not "
        "quickgelu), loaded with timm's open_clip converter. Not a study extractor.",
        options={"depth": CLIP_DEPTH},  # transformer blocks (tests replace it to build shallow networks)
    ),
)
def build_clip(setup: ExtractorSetup, weights_path: Path | None) -> CLIPViT:
    check_input_size(setup, exact=224)  # open_clip's ViT-B-32 has fixed 7 x 7 position embeddings
    return CLIPViT(setup, weights_path)


__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "CLIPViT",
    "DINOv2ViT",
    "build_clip",
    "build_dinov2",
    "dinov2_state_dict",
    "interpolate_pos_embed_like_hub",
    "make_clip_vitb32",
    "make_dinov2_vitl14",
    "open_clip_visual_state_dict",
]

"""``inception_tf``: the TF-FID InceptionV3 (the 2015-12-05 TensorFlow graph of the original FID code), pool3.

What the study ran: StudioGAN's "InceptionV3_tf" backbone, for its ImageNet FDs
(docs/extractors.md#studiogan-backbones); the same network as pytorch-fid and clean-fid. Whether the study's
"Incept" column came from this network or from a Keras InceptionV3 is unconfirmed
(docs/extractors.md#which-inception-and-resnet), so ``keras_inception`` carries the same ``study_name``.

Architecture of the pytorch-fid port (``fid_inception_v3()``), re-implemented here with the same module and
parameter names, so its weights file ``pt_inception-2015-12-05-6726825d.pth`` loads unchanged (strictly). It
differs from torchvision's inception_v3 in three places that TensorFlow's graph dictates:
  - 1008 classes in ``fc`` (unused for features, kept so the file loads strictly);
  - the 3x3 average pools in the A, C and first E blocks ignore the zero padding (``count_include_pad=False``);
  - the last E block (Mixed_7c) pools with a 3x3 max pool instead of an average pool.

Input: float32 [N, 3, 299, 299] in [0, 255]: 8-bit RGB (gray copied to 3 channels), already resized by the
"clean" resizer (PIL bicubic on float32, no clipping; no resize in here); ``resizer=torch_bilinear`` reproduces
``python -m pytorch_fid`` (its bilinear resize to 299). Normalised inside ``forward`` as the study's StudioGAN did:
x / 255, then (x - 0.5) / 0.5. Output: the 2048-d global average pool of Mixed_7c ("pool3").
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fidmed.errors import FidmedError
from fidmed.features.base import Extractor, seeded_init_
from fidmed.features.registry import EXTRACTORS, ExtractorInfo, ExtractorSetup
from fidmed.features.weights import WeightsFile

NUM_CLASSES_TF = 1008
FEATURE_DIM = 2048


class ConvBN(nn.Module):
    """Conv (no bias) -> BatchNorm (eps 1e-3, TensorFlow's) -> ReLU; attributes named ``conv`` and ``bn``."""

    def __init__(
        self, c_in: int, c_out: int, kernel: int | tuple[int, int], stride: int = 1, padding: int | tuple[int, int] = 0
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(c_out, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)), inplace=True)  # in place, as torchvision: no extra tensor


def _avg_pool_tf(x: torch.Tensor) -> torch.Tensor:
    # TensorFlow's SAME average pool divides by the number of real (unpadded) pixels
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


def _max_pool_reduce(x: torch.Tensor) -> torch.Tensor:
    return F.max_pool2d(x, kernel_size=3, stride=2)


class BlockA(nn.Module):
    """35x35 block (Mixed_5b/5c/5d): 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1."""

    def __init__(self, c_in: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = ConvBN(c_in, 64, 1)
        self.branch5x5_1 = ConvBN(c_in, 48, 1)
        self.branch5x5_2 = ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = ConvBN(c_in, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, padding=1)
        self.branch_pool = ConvBN(c_in, pool_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(
            [
                self.branch1x1(x),
                self.branch5x5_2(self.branch5x5_1(x)),
                self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                self.branch_pool(_avg_pool_tf(x)),
            ],
            dim=1,
        )


class BlockB(nn.Module):
    """Grid reduction 35 -> 17 (Mixed_6a): 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2."""

    def __init__(self, c_in: int) -> None:
        super().__init__()
        self.branch3x3 = ConvBN(c_in, 384, 3, stride=2)
        self.branch3x3dbl_1 = ConvBN(c_in, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(
            [
                self.branch3x3(x),
                self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                _max_pool_reduce(x),
            ],
            dim=1,
        )


class BlockC(nn.Module):
    """17x17 block with factorised 7x7 convolutions (Mixed_6b..6e)."""

    def __init__(self, c_in: int, c7: int) -> None:
        super().__init__()
        row, col = ((1, 7), (0, 3)), ((7, 1), (3, 0))  # (kernel, padding) of 1x7 and 7x1 convolutions
        self.branch1x1 = ConvBN(c_in, 192, 1)
        self.branch7x7_1 = ConvBN(c_in, c7, 1)
        self.branch7x7_2 = ConvBN(c7, c7, row[0], padding=row[1])
        self.branch7x7_3 = ConvBN(c7, 192, col[0], padding=col[1])
        self.branch7x7dbl_1 = ConvBN(c_in, c7, 1)
        self.branch7x7dbl_2 = ConvBN(c7, c7, col[0], padding=col[1])
        self.branch7x7dbl_3 = ConvBN(c7, c7, row[0], padding=row[1])
        self.branch7x7dbl_4 = ConvBN(c7, c7, col[0], padding=col[1])
        self.branch7x7dbl_5 = ConvBN(c7, 192, row[0], padding=row[1])
        self.branch_pool = ConvBN(c_in, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        single = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        double = self.branch7x7dbl_1(x)
        for conv in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            double = conv(double)
        return torch.cat([self.branch1x1(x), single, double, self.branch_pool(_avg_pool_tf(x))], dim=1)


class BlockD(nn.Module):
    """Grid reduction 17 -> 8 (Mixed_7a)."""

    def __init__(self, c_in: int) -> None:
        super().__init__()
        self.branch3x3_1 = ConvBN(c_in, 192, 1)
        self.branch3x3_2 = ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = ConvBN(c_in, 192, 1)
        self.branch7x7x3_2 = ConvBN(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = ConvBN(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = ConvBN(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tower = x
        for conv in (self.branch7x7x3_1, self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            tower = conv(tower)
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), tower, _max_pool_reduce(x)], dim=1)


class BlockE(nn.Module):
    """8x8 block with split 1x3/3x1 outputs (Mixed_7b with TF average pool, Mixed_7c with max pool)."""

    def __init__(self, c_in: int, max_pool: bool) -> None:
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = ConvBN(c_in, 320, 1)
        self.branch3x3_1 = ConvBN(c_in, 384, 1)
        self.branch3x3_2a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = ConvBN(c_in, 448, 1)
        self.branch3x3dbl_2 = ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = ConvBN(c_in, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.branch3x3_1(x)
        b = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        if self.max_pool:  # the TF graph's quirk in its last block
            pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        else:
            pooled = _avg_pool_tf(x)
        return torch.cat(
            [
                self.branch1x1(x),
                self.branch3x3_2a(a),
                self.branch3x3_2b(a),
                self.branch3x3dbl_3a(b),
                self.branch3x3dbl_3b(b),
                self.branch_pool(pooled),
            ],
            dim=1,
        )


class FIDInceptionV3(nn.Module):
    """The network; state-dict keys equal those of pytorch-fid's ``fid_inception_v3()``.

    ``forward`` takes inputs already normalised to [-1, 1] and returns pool3 features [N, 2048].
    """

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = ConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = ConvBN(80, 192, 3)
        self.Mixed_5b = BlockA(192, 32)
        self.Mixed_5c = BlockA(256, 64)
        self.Mixed_5d = BlockA(288, 64)
        self.Mixed_6a = BlockB(288)
        self.Mixed_6b = BlockC(768, 128)
        self.Mixed_6c = BlockC(768, 160)
        self.Mixed_6d = BlockC(768, 160)
        self.Mixed_6e = BlockC(768, 192)
        self.Mixed_7a = BlockD(768)
        self.Mixed_7b = BlockE(1280, max_pool=False)
        self.Mixed_7c = BlockE(2048, max_pool=True)
        self.fc = nn.Linear(FEATURE_DIM, NUM_CLASSES_TF)  # logits head of the TF graph; not used for features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = _max_pool_reduce(x)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = _max_pool_reduce(x)
        for block in (
            self.Mixed_5b,
            self.Mixed_5c,
            self.Mixed_5d,
            self.Mixed_6a,
            self.Mixed_6b,
            self.Mixed_6c,
            self.Mixed_6d,
            self.Mixed_6e,
            self.Mixed_7a,
            self.Mixed_7b,
            self.Mixed_7c,
        ):
            x = block(x)
        return F.adaptive_avg_pool2d(x, (1, 1)).flatten(1)


class InceptionTF(Extractor):
    """Extractor wrapper: [0, 255] input -> x/255 -> (x - 0.5)/0.5 -> FIDInceptionV3 pool3."""

    channels_last = True  # fp32 features within float32 rounding of contiguous (fidmed.features.base)

    def __init__(self, setup: ExtractorSetup, weights_path: Path | None) -> None:
        super().__init__(setup, weights_path)
        self.net = FIDInceptionV3()
        if weights_path is None:
            seeded_init_(self.net, setup.seed)
        else:
            load_fid_inception_weights(self.net, weights_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        x = x / 255.0
        x = (x - 0.5) / 0.5
        return self.net(x)


def load_fid_inception_weights(net: FIDInceptionV3, path: Path | str) -> None:
    """Load pytorch-fid's weights file (strict: every key must match)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's to fix
        raise FidmedError(f"cannot read weights file {path}: {e}; delete it and get it again") from e
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise FidmedError(
            f"{path} is not pytorch-fid's FID Inception weights file (pt_inception-2015-12-05-6726825d.pth): {e}"
        ) from e


WEIGHTS = WeightsFile(
    filename="pt_inception-2015-12-05-6726825d.pth",
    # Full sha256 as published by two independent public sources (genforce's metrics/inception.py lists it with
    # this URL; another project records it with the file size 95,628,359 bytes); its first 8 digits are the
    # "6726825d" in the file name, which torch.hub checks as the sha256 prefix.
    sha256="6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2",
    urls=(
        "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth",
    ),
    description="pytorch-fid's FID InceptionV3 weights (TensorFlow inception-2015-12-05, 95.6 MB)",
    how_to="It is the file pytorch-fid downloads; if pytorch-fid ran on this machine before, it is already in "
    "~/.cache/torch/hub/checkpoints and fidmed finds it there.",
)


@EXTRACTORS.register(
    "inception_tf",
    info=ExtractorInfo(
        study_name="Incept",
        feature_dim=FEATURE_DIM,
        input_size=299,
        resizer="clean",
        weights=WEIGHTS,
        network="TF-FID InceptionV3",
        description="TF-FID InceptionV3: pytorch-fid's port of TensorFlow's 2015-12-05 Inception graph (the network of "
        "the original FID), as StudioGAN's InceptionV3_tf backbone that the study used for its ImageNet FDs; "
        "clean resize to 299, x/255 then (x - 0.5)/0.5; feature: pool3, 2048-d.",
        options={"study_backbone": "InceptionV3_tf"},  # StudioGAN's --eval_backbone name (provenance only)
    ),
)
def build_inception_tf(setup: ExtractorSetup, weights_path: Path | None) -> InceptionTF:
    if setup.preprocessing.size != 299:
        raise FidmedError(
            f"inception_tf takes 299x299 inputs (the TF graph's size), the config says {setup.preprocessing.size}; "
            f"set extractor.inception_tf.input_size=299, its default"
        )
    return InceptionTF(setup, weights_path)

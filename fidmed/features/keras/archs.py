"""The four Keras application architectures (``include_top=False, pooling='avg'``) as ``KerasGraph``s.

Each builder follows ``keras.applications`` layer by layer, with the same inputs in the same argument order
(concatenations, additions), because that order decides the layer order of Keras' weight files. Layers without
weights (activations, pooling, padding, merges) are recorded too: they change the depths that order depends on.
BatchNormalization epsilons and ``scale`` flags are those of each Keras architecture:
  InceptionV3, InceptionResNetV2: eps 1e-3 (Keras' default), scale=False, bias-free convolutions;
  ResNet50 (Keras' v1 layout of ``resnet.py``): eps 1.001e-5, biased convolutions, the stride of each stage's
    first block in its 1x1 convolutions (shortcut and first), ``Add([shortcut, x])``;
  DenseNet121: eps 1.001e-5, bias-free convolutions, blocks (6, 12, 24, 16), growth 32, compression 0.5.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from fidmed.features.keras.graph import KerasGraph


# ------------------------------------------------------------------------------------------------ InceptionV3
def _iv3_conv_bn(g: KerasGraph, x: int, filters: int, kh: int, kw: int, stride: int = 1, padding: str = "same") -> int:
    x = g.conv(x, filters, (kh, kw), stride, padding, bias=False)
    return g.relu(g.bn(x, eps=1e-3, scale=False))


def inception_v3() -> KerasGraph:
    g = KerasGraph()
    cb = _iv3_conv_bn
    x = cb(g, g.input, 32, 3, 3, 2, "valid")
    x = cb(g, x, 32, 3, 3, padding="valid")
    x = cb(g, x, 64, 3, 3)
    x = g.max_pool(x, 3, 2)
    x = cb(g, x, 80, 1, 1, padding="valid")
    x = cb(g, x, 192, 3, 3, padding="valid")
    x = g.max_pool(x, 3, 2)
    for pool_filters in (32, 64, 64):  # mixed0..2
        b1 = cb(g, x, 64, 1, 1)
        b5 = cb(g, cb(g, x, 48, 1, 1), 64, 5, 5)
        b3 = cb(g, cb(g, cb(g, x, 64, 1, 1), 96, 3, 3), 96, 3, 3)
        bp = cb(g, g.avg_pool(x, 3, 1, "same"), pool_filters, 1, 1)
        x = g.concat([b1, b5, b3, bp])
    b3 = cb(g, x, 384, 3, 3, 2, "valid")  # mixed3
    bd = cb(g, cb(g, cb(g, x, 64, 1, 1), 96, 3, 3), 96, 3, 3, 2, "valid")
    x = g.concat([b3, bd, g.max_pool(x, 3, 2)])
    for c7 in (128, 160, 160, 192):  # mixed4..7
        b1 = cb(g, x, 192, 1, 1)
        b7 = cb(g, cb(g, cb(g, x, c7, 1, 1), c7, 1, 7), 192, 7, 1)
        bd = cb(g, x, c7, 1, 1)
        for kh, kw, f in ((7, 1, c7), (1, 7, c7), (7, 1, c7), (1, 7, 192)):
            bd = cb(g, bd, f, kh, kw)
        bp = cb(g, g.avg_pool(x, 3, 1, "same"), 192, 1, 1)
        x = g.concat([b1, b7, bd, bp])
    b3 = cb(g, cb(g, x, 192, 1, 1), 320, 3, 3, 2, "valid")  # mixed8
    b7 = cb(g, cb(g, cb(g, x, 192, 1, 1), 192, 1, 7), 192, 7, 1)
    b7 = cb(g, b7, 192, 3, 3, 2, "valid")
    x = g.concat([b3, b7, g.max_pool(x, 3, 2)])
    for _ in range(2):  # mixed9, mixed10
        b1 = cb(g, x, 320, 1, 1)
        b3 = cb(g, x, 384, 1, 1)
        b3 = g.concat([cb(g, b3, 384, 1, 3), cb(g, b3, 384, 3, 1)])
        bd = cb(g, cb(g, x, 448, 1, 1), 384, 3, 3)
        bd = g.concat([cb(g, bd, 384, 1, 3), cb(g, bd, 384, 3, 1)])
        bp = cb(g, g.avg_pool(x, 3, 1, "same"), 192, 1, 1)
        x = g.concat([b1, b3, bd, bp])
    g.set_output(g.global_avg_pool(x))
    return g


# ------------------------------------------------------------------------------------------------ ResNet50
_RESNET_EPS = 1.001e-5


def _resnet_block(g: KerasGraph, x: int, filters: int, stride: int, conv_shortcut: bool, name: str) -> int:
    if conv_shortcut:
        shortcut = g.bn(g.conv(x, 4 * filters, 1, stride, name=f"{name}_0_conv"), _RESNET_EPS, name=f"{name}_0_bn")
    else:
        shortcut = x
    y = g.relu(g.bn(g.conv(x, filters, 1, stride, name=f"{name}_1_conv"), _RESNET_EPS, name=f"{name}_1_bn"))
    y = g.relu(g.bn(g.conv(y, filters, 3, 1, "same", name=f"{name}_2_conv"), _RESNET_EPS, name=f"{name}_2_bn"))
    y = g.bn(g.conv(y, 4 * filters, 1, name=f"{name}_3_conv"), _RESNET_EPS, name=f"{name}_3_bn")
    return g.relu(g.add([shortcut, y]))


def resnet50() -> KerasGraph:
    g = KerasGraph()
    x = g.conv(g.zero_pad(g.input, 3), 64, 7, 2, name="conv1_conv")
    x = g.relu(g.bn(x, _RESNET_EPS, name="conv1_bn"))
    x = g.max_pool(g.zero_pad(x, 1), 3, 2)
    for stage, (filters, blocks, stride) in enumerate(((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)), start=2):
        x = _resnet_block(g, x, filters, stride, True, f"conv{stage}_block1")
        for b in range(2, blocks + 1):
            x = _resnet_block(g, x, filters, 1, False, f"conv{stage}_block{b}")
    g.set_output(g.global_avg_pool(x))
    return g


# ------------------------------------------------------------------------------------------------ DenseNet121
_DENSENET_EPS = 1.001e-5


def densenet121() -> KerasGraph:
    g = KerasGraph()
    x = g.conv(g.zero_pad(g.input, 3), 64, 7, 2, bias=False, name="conv1_conv")
    x = g.relu(g.bn(x, _DENSENET_EPS, name="conv1_bn"))
    x = g.max_pool(g.zero_pad(x, 1), 3, 2)
    blocks = (6, 12, 24, 16)
    for stage, n in enumerate(blocks, start=2):
        for b in range(1, n + 1):  # conv_block: BN-ReLU-1x1(128)-BN-ReLU-3x3(32), concatenated to the input
            name = f"conv{stage}_block{b}"
            y = g.relu(g.bn(x, _DENSENET_EPS, name=f"{name}_0_bn"))
            y = g.conv(y, 128, 1, bias=False, name=f"{name}_1_conv")
            y = g.relu(g.bn(y, _DENSENET_EPS, name=f"{name}_1_bn"))
            y = g.conv(y, 32, 3, 1, "same", bias=False, name=f"{name}_2_conv")
            x = g.concat([x, y])
        if stage < 1 + len(blocks):  # transition_block
            y = g.relu(g.bn(x, _DENSENET_EPS, name=f"pool{stage}_bn"))
            y = g.conv(y, int(g.channels(y) * 0.5), 1, bias=False, name=f"pool{stage}_conv")
            x = g.avg_pool(y, 2, 2)
    x = g.relu(g.bn(x, _DENSENET_EPS, name="bn"))
    g.set_output(g.global_avg_pool(x))
    return g


# ------------------------------------------------------------------------------------------------ InceptionResNetV2
def _irv2_conv_bn(
    g: KerasGraph,
    x: int,
    filters: int,
    kernel: int | tuple[int, int],
    stride: int = 1,
    padding: str = "same",
    relu: bool = True,
) -> int:
    x = g.bn(g.conv(x, filters, kernel, stride, padding, bias=False), eps=1e-3, scale=False)
    return g.relu(x) if relu else x


def _irv2_block(g: KerasGraph, x: int, block_type: str, idx: int, scale: float, relu: bool = True) -> int:
    cb = _irv2_conv_bn
    if block_type == "block35":
        branches = [cb(g, x, 32, 1), cb(g, cb(g, x, 32, 1), 32, 3), cb(g, cb(g, cb(g, x, 32, 1), 48, 3), 64, 3)]
    elif block_type == "block17":
        branches = [cb(g, x, 192, 1), cb(g, cb(g, cb(g, x, 128, 1), 160, (1, 7)), 192, (7, 1))]
    else:  # block8
        branches = [cb(g, x, 192, 1), cb(g, cb(g, cb(g, x, 192, 1), 224, (1, 3)), 256, (3, 1))]
    up = g.conv(g.concat(branches), g.channels(x), 1, 1, "same", bias=True, name=f"{block_type}_{idx}_conv")
    x = g.scale_add(x, up, scale)
    return g.relu(x) if relu else x


def inception_resnet_v2() -> KerasGraph:
    g = KerasGraph()
    cb = _irv2_conv_bn
    x = cb(g, g.input, 32, 3, 2, "valid")
    x = cb(g, x, 32, 3, padding="valid")
    x = cb(g, x, 64, 3)
    x = g.max_pool(x, 3, 2)
    x = cb(g, x, 80, 1, padding="valid")
    x = cb(g, x, 192, 3, padding="valid")
    x = g.max_pool(x, 3, 2)
    b0 = cb(g, x, 96, 1)  # mixed_5b
    b1 = cb(g, cb(g, x, 48, 1), 64, 5)
    b2 = cb(g, cb(g, cb(g, x, 64, 1), 96, 3), 96, 3)
    bp = cb(g, g.avg_pool(x, 3, 1, "same"), 64, 1)
    x = g.concat([b0, b1, b2, bp])
    for i in range(1, 11):
        x = _irv2_block(g, x, "block35", i, 0.17)
    b0 = cb(g, x, 384, 3, 2, "valid")  # mixed_6a
    b1 = cb(g, cb(g, cb(g, x, 256, 1), 256, 3), 384, 3, 2, "valid")
    x = g.concat([b0, b1, g.max_pool(x, 3, 2)])
    for i in range(1, 21):
        x = _irv2_block(g, x, "block17", i, 0.1)
    b0 = cb(g, cb(g, x, 256, 1), 384, 3, 2, "valid")  # mixed_7a
    b1 = cb(g, cb(g, x, 256, 1), 288, 3, 2, "valid")
    b2 = cb(g, cb(g, cb(g, x, 256, 1), 288, 3), 320, 3, 2, "valid")
    x = g.concat([b0, b1, b2, g.max_pool(x, 3, 2)])
    for i in range(1, 10):
        x = _irv2_block(g, x, "block8", i, 0.2)
    x = _irv2_block(g, x, "block8", 10, 1.0, relu=False)
    x = g.conv(x, 1536, 1, 1, "same", bias=False, name="conv_7b")
    x = g.relu(g.bn(x, eps=1e-3, scale=False, name="conv_7b_bn"))
    g.set_output(g.global_avg_pool(x))
    return g


# ------------------------------------------------------------------------------------------------ table
@dataclass(frozen=True)
class KerasArch:
    """A Keras application: builder, Keras class name, feature dimension, smallest input Keras accepts."""

    name: str
    keras_class: str
    build: Callable[[], KerasGraph]
    feature_dim: int
    min_size: int


ARCHS: dict[str, KerasArch] = {
    "inception_v3": KerasArch("inception_v3", "InceptionV3", inception_v3, 2048, 75),
    "resnet50": KerasArch("resnet50", "ResNet50", resnet50, 2048, 32),
    "densenet121": KerasArch("densenet121", "DenseNet121", densenet121, 1024, 32),
    "inception_resnet_v2": KerasArch("inception_resnet_v2", "InceptionResNetV2", inception_resnet_v2, 1536, 75),
}

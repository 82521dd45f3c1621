"""Extractors on Keras-faithful networks: RadImageNet and Keras ImageNet InceptionV3, ResNet50, DenseNet121, IRV2.

What the study's radfid ran: ``keras.applications.<Arch>(include_top=False, pooling='avg', weights=FILE)`` on
images read by Keras' loader (RGB, nearest-neighbour resize to ``input_size``; fidmed's resizer ``nearest``),
after the architecture's ``preprocess_input``. Here the networks are ``KerasGraph``s (fidmed.features.keras)
that compute the same in PyTorch and load the Keras .h5 files directly with h5py (or a safetensors file that
``convert_keras_h5`` made from one).

Normalisation inside ``forward`` (input float32 [N, 3, S, S] in [0, 255], RGB), option ``normalization``:
  - ``tf`` (Keras' 'tf' mode; InceptionV3, InceptionResNetV2): x / 127.5 - 1;
  - ``torch`` (Keras' 'torch' mode; DenseNet121): x / 255, then (x - ImageNet mean) / ImageNet std, RGB;
  - ``caffe`` (Keras' 'caffe' mode; ResNet50): RGB -> BGR, minus (103.939, 116.779, 123.68), no scaling;
  - ``radimagenet`` (radfid's RadImageNet preprocessing, REFERENCE.md section 4): 'caffe' mode, then x / 255.
Config options (besides the common ones): ``arch`` (inception_v3 | resnet50 | densenet121 | inception_resnet_v2),
``normalization`` and ``weights_md5`` (Keras publishes md5 digests only; checked on every load of an .h5 file).
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import torch

from fidmed.errors import ConfigError, FidmedError
from fidmed.features.keras.archs import ARCHS, KerasArch
from fidmed.features.keras.graph import KerasBatchNorm, KerasGraph, TFConv2d
from fidmed.features.keras.h5 import h5_to_state_dict
from fidmed.features.registry import Extractor, ExtractorSpec, register_extractor
from fidmed.features.weights import sha256_of

NORMALIZATIONS = ("tf", "torch", "caffe", "radimagenet")
# Keras' imagenet_utils constants ('caffe' means are in BGR order; 'torch' mean/std in RGB order)
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
TORCH_MEAN_RGB = (0.485, 0.456, 0.406)
TORCH_STD_RGB = (0.229, 0.224, 0.225)

#: extractor name -> (architecture, normalisation); the configs in conf/extractor say the same
KERAS_EXTRACTORS: dict[str, tuple[str, str]] = {
    "irv2": ("inception_resnet_v2", "tf"),
    "densenet": ("densenet121", "torch"),
    "keras_inception": ("inception_v3", "tf"),
    "keras_resnet": ("resnet50", "caffe"),
    "radimagenet_inception": ("inception_v3", "radimagenet"),
    "radimagenet_resnet": ("resnet50", "radimagenet"),
    "radimagenet_irv2": ("inception_resnet_v2", "radimagenet"),
    "radimagenet_densenet": ("densenet121", "radimagenet"),
}


#: The Keras .h5 files the configs name: file name -> (architecture, md5 that Keras publishes, or None). The md5s
#: are those keras.applications passes to get_file (keras 3.15 source); RadImageNet publishes no digest.
KNOWN_H5_FILES: dict[str, tuple[str, str | None]] = {
    "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5": ("inception_v3", "bcbd6486424b2319ff4ef7d526e38f63"),
    "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5": ("resnet50", "4d473c1dd8becc155b73f8504c6f6626"),
    "densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5": ("densenet121", "30ee3e1110167f948a6b9946edeeb738"),
    "inception_resnet_v2_weights_tf_dim_ordering_tf_kernels_notop.h5":
        ("inception_resnet_v2", "d19885ff4a710c122648d3b5c3b684e4"),
    "RadImageNet-InceptionV3_notop.h5": ("inception_v3", None),
    "RadImageNet-ResNet50_notop.h5": ("resnet50", None),
    "RadImageNet-IRV2_notop.h5": ("inception_resnet_v2", None),
    "RadImageNet-DenseNet121_notop.h5": ("densenet121", None),
}


def md5_of(path: Path | str) -> str:
    h = hashlib.md5()  # noqa: S324 - Keras publishes md5 digests; this is a comparison, not security
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify_md5(path: Path | str, md5: str) -> None:
    actual = md5_of(path)
    if actual != md5.lower():
        raise FidmedError(f"weights file {path} has the wrong md5:\n  expected {md5} (published by Keras)\n"
                          f"  actual   {actual}\nThe file is corrupt, truncated or another file; get it again.")


def check_keras_h5(path: Path | str, filename: str | None = None) -> str:
    """Check that ``path`` is a Keras .h5 file that loads into one of the four architectures; return its name.

    With ``filename`` one of ``KNOWN_H5_FILES``, the file must hold that architecture and match Keras' md5 where
    one is published. Used by ``fidmed weights import`` before a file enters the weights folder.
    """
    path = Path(path)
    expected = KNOWN_H5_FILES.get(filename or path.name)
    if expected is not None and expected[1] is not None:
        verify_md5(path, expected[1])
    candidates = [expected[0]] if expected is not None else list(ARCHS)
    errors = []
    for name in candidates:
        try:
            h5_to_state_dict(ARCHS[name].build(), path, ARCHS[name].keras_class)
            return name
        except FidmedError as e:
            errors.append(str(e))
    if expected is not None:
        raise FidmedError(errors[0])
    raise FidmedError(f"{path} holds none of the Keras architectures {', '.join(ARCHS)} (include_top=False):\n"
                      + "\n".join(e.splitlines()[0] + "\n" + "\n".join(e.splitlines()[1:4]) for e in errors))


def normalize(x: torch.Tensor, mode: str) -> torch.Tensor:
    """Keras' ``preprocess_input`` for ``mode`` on float32 RGB [N, 3, H, W] in [0, 255] (plus 'radimagenet')."""
    if mode == "tf":
        return x / 127.5 - 1.0
    if mode == "torch":
        mean = x.new_tensor(TORCH_MEAN_RGB).view(1, 3, 1, 1)
        std = x.new_tensor(TORCH_STD_RGB).view(1, 3, 1, 1)
        return (x / 255.0 - mean) / std
    if mode in ("caffe", "radimagenet"):
        x = x.flip(1) - x.new_tensor(CAFFE_MEAN_BGR).view(1, 3, 1, 1)
        return x / 255.0 if mode == "radimagenet" else x
    raise ConfigError(f"unknown Keras normalisation {mode!r}; choose one of {', '.join(NORMALIZATIONS)}")


def load_keras_weights(graph: KerasGraph, path: Path | str, arch: KerasArch) -> None:
    """Load a Keras .h5 file (by layer order, see fidmed.features.keras.h5) or a converted .safetensors file."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except Exception as e:  # noqa: BLE001 - any unreadable file is the user's to fix
            raise FidmedError(f"cannot read {path}: {e}; delete it and import the .h5 file again") from e
    else:
        state = h5_to_state_dict(graph, path, arch.keras_class)
    try:
        graph.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise FidmedError(f"{path} does not hold {arch.keras_class} weights: {e}") from e


def seeded_init_keras_(graph: KerasGraph, seed: int) -> None:
    """``seeded_init_``'s recipe for the Keras layers: conv weights normal(0, sqrt(2 / fan_in)) from ``seed`` alone,
    biases 0; BatchNorm gamma 1, beta 0, moving mean 0, moving variance 1."""
    g = torch.Generator().manual_seed(int(seed))
    with torch.no_grad():
        for m in graph.modules():
            if isinstance(m, TFConv2d):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * math.sqrt(2.0 / fan_in))
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, KerasBatchNorm):
                if m.weight is not None:
                    m.weight.fill_(1.0)
                m.bias.zero_()
                m.running_mean.zero_()
                m.running_var.fill_(1.0)


def convert_keras_h5(src: Path | str, dest: Path | str, arch_name: str | None = None) -> str:
    """Write the network's state dict from a Keras .h5 file as safetensors (metadata: source name and sha256,
    architecture); the architecture is detected when not given. Returns the architecture's name."""
    from safetensors.torch import save_file

    src, dest = Path(src), Path(dest)
    arch_name = arch_name or check_keras_h5(src)
    arch = ARCHS[arch_name]
    state = h5_to_state_dict(arch.build(), src, arch.keras_class)
    tmp = dest.with_name(f".{dest.name}.partial")
    save_file(state, str(tmp), metadata={"source": src.name, "source_sha256": sha256_of(src, use_cache=False),
                                         "keras_arch": arch.keras_class})
    tmp.replace(dest)
    return arch_name


class KerasNetExtractor(Extractor):
    """Keras-faithful network: normalise as Keras' ``preprocess_input`` does, then the pooled features."""

    def __init__(self, spec: ExtractorSpec, weights_path: Path | None, arch: KerasArch, mode: str) -> None:
        super().__init__(spec, weights_path)
        self.arch_name = arch.name
        self.normalization = mode
        self.net = arch.build()
        if weights_path is None:
            seeded_init_keras_(self.net, spec.seed)
        else:
            if spec.options.get("weights_md5") and Path(weights_path).suffix == ".h5":
                verify_md5(weights_path, str(spec.options["weights_md5"]))
            load_keras_weights(self.net, weights_path, arch)
            if spec.weights is not None and spec.weights.sha256 is None:  # unpinned: record the file's own digest
                self.weights_label = f"sha256:{sha256_of(weights_path)} (unpinned)"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        return self.net(normalize(x, self.normalization))

    def protocol(self) -> dict[str, object]:
        return {**super().protocol(), "keras_arch": ARCHS[self.arch_name].keras_class,
                "normalization": self.normalization}


def build_keras_extractor(spec: ExtractorSpec, weights_path: Path | None) -> KerasNetExtractor:
    """Builder for every Keras-faithful extractor; ``arch`` and ``normalization`` come from the config."""
    default_arch, default_mode = KERAS_EXTRACTORS.get(spec.name, (None, None))
    arch_name = spec.options.get("arch", default_arch)
    mode = spec.options.get("normalization", default_mode)
    if arch_name not in ARCHS:
        raise ConfigError(f"extractor {spec.name}: arch must be one of {', '.join(ARCHS)}, got {arch_name!r}")
    if mode not in NORMALIZATIONS:
        raise ConfigError(f"extractor {spec.name}: normalization must be one of {', '.join(NORMALIZATIONS)}, "
                          f"got {mode!r}")
    arch = ARCHS[arch_name]
    if spec.preprocessing.size < arch.min_size:
        raise FidmedError(f"extractor {spec.name}: Keras' {arch.keras_class} needs inputs of at least "
                          f"{arch.min_size}x{arch.min_size}, the config says input_size={spec.preprocessing.size}")
    if spec.preprocessing.channels != "RGB":
        raise ConfigError(f"extractor {spec.name}: set channels: RGB (the network reorders channels itself)")
    if spec.feature_dim != arch.feature_dim:
        raise ConfigError(f"extractor {spec.name}: {arch.keras_class} gives {arch.feature_dim}-d features, "
                          f"the config says feature_dim={spec.feature_dim}")
    return KerasNetExtractor(spec, weights_path, arch, mode)


for _name in KERAS_EXTRACTORS:
    register_extractor(_name)(build_keras_extractor)

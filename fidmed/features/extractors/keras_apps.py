"""Keras applications as radfid ran them: RadImageNet and Keras ImageNet InceptionV3, ResNet50, DenseNet121, IRV2.

What the study's radfid ran (docs/extractors.md#keras-models-radfid): ``keras.applications.<Arch>(include_top=False,
pooling='avg', weights=FILE)`` on images read by Keras' loader (8-bit RGB, gray copied to 3 channels,
nearest-neighbour resize to ``input_size``; fidmed's resizer ``nearest``), after the architecture's
``preprocess_input``. Here the networks are ``KerasGraph``s (fidmed.features.keras: TF "same" padding, Keras
BatchNorm epsilons and scale flags, global average pool; docs/extractors.md#keras-faithfulness) that compute the
same in PyTorch and load the Keras .h5 files directly with h5py by layer order (or a safetensors file that
``convert_keras_h5`` made from one); tests/test_keras_parity.py: equal to Keras 3 within 1e-5.

Normalisation inside ``forward`` (input float32 [N, 3, S, S] in [0, 255], RGB), option ``normalization``:
  - ``tf`` (Keras' 'tf' mode; InceptionV3, InceptionResNetV2): x / 127.5 - 1;
  - ``torch`` (Keras' 'torch' mode; DenseNet121): x / 255, then (x - ImageNet mean) / ImageNet std, RGB;
  - ``caffe`` (Keras' 'caffe' mode; ResNet50): RGB -> BGR, minus (103.939, 116.779, 123.68), no scaling;
  - ``radimagenet`` (radfid's RadImageNet preprocessing): 'caffe' mode, then x / 255.

Input size: radfid's default 512; the size the study used is unconfirmed (docs/extractors.md#keras-models-radfid).
Any size at least Keras' minimum for the architecture works (75 for InceptionV3 and InceptionResNetV2, 32 for
ResNet50 and DenseNet121): ``extractor.<name>.input_size=N``.

Weights: Keras publishes md5 digests only for its ImageNet files (those keras.applications passes to get_file,
keras 3.15 source); they are checked wherever the file is found, but no sha256 was published (never guessed), so
the files are UNPINNED. The RadImageNet project publishes no digest at all; ``fidmed weights import`` recognises its
files, under any name, by the architecture they load into.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fidmed.errors import ConfigError, FidmedError
from fidmed.features.base import Extractor
from fidmed.features.keras.archs import ARCHS, KerasArch
from fidmed.features.keras.loading import load_keras_weights, seeded_init_keras_
from fidmed.features.registry import EXTRACTORS, ExtractorInfo, ExtractorSetup
from fidmed.features.weights import WeightsFile

NORMALIZATIONS = ("tf", "torch", "caffe", "radimagenet")
# Keras' imagenet_utils constants ('caffe' means are in BGR order; 'torch' mean/std in RGB order)
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
TORCH_MEAN_RGB = (0.485, 0.456, 0.406)
TORCH_STD_RGB = (0.229, 0.224, 0.225)

NORMALIZATION_TEXT = {
    "tf": "'tf' mode: x/127.5 - 1",
    "torch": "'torch' mode: x/255, then ImageNet mean/std (RGB)",
    "caffe": "'caffe' mode: RGB->BGR, minus (103.939, 116.779, 123.68)",
    "radimagenet": "radfid's RadImageNet preprocessing: RGB->BGR, minus (103.939, 116.779, 123.68), then x/255",
}


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


class KerasNetExtractor(Extractor):
    """Keras-faithful network: normalise as Keras' ``preprocess_input`` does, then the pooled features."""

    channels_last = True  # fp32 features within float32 rounding of contiguous (fidmed.features.base)

    def __init__(self, setup: ExtractorSetup, weights_path: Path | None, arch: KerasArch, mode: str) -> None:
        super().__init__(setup, weights_path)
        self.arch_name = arch.name
        self.normalization = mode
        self.net = arch.build()
        if weights_path is None:
            seeded_init_keras_(self.net, setup.seed)
        else:
            load_keras_weights(self.net, weights_path, arch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        return self.net(normalize(x, self.normalization))

    def protocol(self) -> dict[str, object]:
        return {
            **super().protocol(),
            "keras_arch": ARCHS[self.arch_name].keras_class,
            "normalization": self.normalization,
        }


def build_keras_extractor(setup: ExtractorSetup, weights_path: Path | None) -> KerasNetExtractor:
    """Builder of every Keras-faithful extractor; ``arch`` and ``normalization`` are options of its registration."""
    arch_name = setup.options.get("arch")
    mode = setup.options.get("normalization")
    if arch_name not in ARCHS:
        raise ConfigError(f"extractor {setup.name}: option arch must be one of {', '.join(ARCHS)}, got {arch_name!r}")
    if mode not in NORMALIZATIONS:
        raise ConfigError(
            f"extractor {setup.name}: option normalization must be one of {', '.join(NORMALIZATIONS)}, got {mode!r}"
        )
    arch = ARCHS[arch_name]
    if setup.preprocessing.size < arch.min_size:
        raise FidmedError(
            f"extractor {setup.name}: Keras' {arch.keras_class} needs inputs of at least "
            f"{arch.min_size}x{arch.min_size}, the config says input_size={setup.preprocessing.size}; "
            f"set extractor.{setup.name}.input_size={arch.min_size} or more"
        )
    if setup.preprocessing.channels != "RGB":
        raise ConfigError(
            f"extractor {setup.name}: register it with channels RGB (the network reorders channels itself)"
        )
    if setup.feature_dim != arch.feature_dim:
        raise ConfigError(
            f"extractor {setup.name}: {arch.keras_class} gives {arch.feature_dim}-d features, "
            f"its registration says feature_dim={setup.feature_dim}"
        )
    return KerasNetExtractor(setup, weights_path, arch, mode)


# ------------------------------------------------------------------------------------------------ weights files
_KERAS_URL = "https://storage.googleapis.com/tensorflow/keras-applications"


def _keras_imagenet_file(arch: str, folder: str, md5: str) -> WeightsFile:
    """Keras' own ImageNet notop file of ``arch`` (md5 as keras.applications passes it to get_file)."""
    keras_class = ARCHS[arch].keras_class
    filename = f"{arch}_weights_tf_dim_ordering_tf_kernels_notop.h5"
    return WeightsFile(
        filename=filename,
        sha256=None,  # UNPINNED: Keras publishes only the md5; no published sha256 was found (never guessed)
        md5=md5,
        urls=(f"{_KERAS_URL}/{folder}/{filename}",),
        description=f"Keras ImageNet {keras_class} weights without the classifier (notop)",
        how_to=f"Keras' own ImageNet file (keras.applications.{keras_class}(weights='imagenet', include_top=False) "
        f"downloads it into ~/.keras/models/); `fidmed weights import ~/.keras/models/{filename}` copies it "
        f"after checking its md5 (Keras' published {md5}) and its layers.",
    )


def _radimagenet_file(arch: str, label: str) -> WeightsFile:
    """A RadImageNet notop .h5 (Mei et al. 2022): no URL, no published digest."""
    keras_class = ARCHS[arch].keras_class
    filename = f"RadImageNet-{label}_notop.h5"
    return WeightsFile(
        filename=filename,
        sha256=None,  # UNPINNED: the RadImageNet project publishes no digest; results record the local file's
        urls=(),
        description=f"RadImageNet {keras_class} weights without the classifier (Keras .h5)",
        how_to="RadImageNet's weights are not downloadable by URL: request them through the Google Drive link in "
        "the README of github.com/BMEII-AI/RadImageNet (the 'RadImageNet_models' folder), then run "
        f"`fidmed weights import PATH` on the downloaded file (under any name, e.g. "
        f"RadImageNet-{label}-notop.h5: it is recognised by checking, layer by layer, that it holds "
        f"{keras_class} weights, and stored as {filename}).",
    )


def _register(
    name: str, *, arch: str, normalization: str, study_name: str, weights: WeightsFile, network: str, what: str
) -> None:
    keras_class = ARCHS[arch].keras_class
    EXTRACTORS.add(
        name,
        build_keras_extractor,
        info=ExtractorInfo(
            study_name=study_name,
            feature_dim=ARCHS[arch].feature_dim,
            input_size=512,  # radfid's default; the study's size is unconfirmed
            resizer="nearest",  # Keras' image loader
            weights=weights,
            network=network,
            description=f"{what} Network: keras.applications.{keras_class}(include_top=False, pooling='avg') "
            f"re-implemented in PyTorch. Input: 8-bit RGB, nearest resize to 512 (radfid's default; any "
            f"size >= {ARCHS[arch].min_size}); normalisation inside the network: "
            f"{NORMALIZATION_TEXT[normalization]}.",
            options={"arch": arch, "normalization": normalization},
        ),
    )


# ------------------------------------------------------------------------------------------------ ImageNet (Keras)
_register(
    "irv2",
    arch="inception_resnet_v2",
    normalization="tf",
    study_name="IRV2",  # label only; the study's exact column name for this extractor is unconfirmed
    weights=_keras_imagenet_file("inception_resnet_v2", "inception_resnet_v2", "d19885ff4a710c122648d3b5c3b684e4"),
    network="Keras InceptionResNetV2 (ImageNet)",
    what="InceptionResNetV2 with Keras' ImageNet weights, as the study's radfid ran it (one of its ImageNet "
    "extractors).",
)
_register(
    "densenet",
    arch="densenet121",
    normalization="torch",
    study_name="DenseNet",  # label only; the study's exact column name for this extractor is unconfirmed
    weights=_keras_imagenet_file("densenet121", "densenet", "30ee3e1110167f948a6b9946edeeb738"),
    network="Keras DenseNet121 (ImageNet)",
    what="DenseNet121 with Keras' ImageNet weights, as the study's radfid ran it (one of its ImageNet extractors).",
)
_register(
    "keras_inception",
    arch="inception_v3",
    normalization="tf",
    study_name="Incept",
    weights=_keras_imagenet_file("inception_v3", "inception_v3", "bcbd6486424b2319ff4ef7d526e38f63"),
    network="Keras InceptionV3 (ImageNet)",
    what="Keras InceptionV3 with Keras' ImageNet weights: an alternative reading of the study's \"Incept\" "
    "column, which may have come from StudioGAN's network (inception_tf) or from radfid's Keras model "
    "(unconfirmed).",
)
_register(
    "keras_resnet",
    arch="resnet50",
    normalization="caffe",
    study_name="Res",
    weights=_keras_imagenet_file("resnet50", "resnet", "4d473c1dd8becc155b73f8504c6f6626"),
    network="Keras ResNet50 (ImageNet)",
    what="Keras ResNet50 (v1 layout, BN eps 1.001e-5) with Keras' ImageNet weights: an alternative reading of "
    "the study's \"Res\" column, which may have come from StudioGAN's torchvision ResNet50 (resnet) or "
    "from radfid (unconfirmed).",
)

# ------------------------------------------------------------------------------------------------ RadImageNet
_RADIMAGENET = (
    "with RadImageNet weights (Mei et al. 2022, trained on 1.35M CT/MRI/US images), as the study's radfid ran it."
)
# study_name: labels only; the study's exact column names for these extractors are unconfirmed
_register(
    "radimagenet_inception",
    arch="inception_v3",
    normalization="radimagenet",
    study_name="RadImageNet InceptionV3",
    weights=_radimagenet_file("inception_v3", "InceptionV3"),
    network="RadImageNet InceptionV3 (Keras)",
    what=f"Keras InceptionV3 {_RADIMAGENET}",
)
_register(
    "radimagenet_resnet",
    arch="resnet50",
    normalization="radimagenet",
    study_name="RadImageNet ResNet50",
    weights=_radimagenet_file("resnet50", "ResNet50"),
    network="RadImageNet ResNet50 (Keras)",
    what=f"Keras ResNet50 {_RADIMAGENET}",
)
_register(
    "radimagenet_irv2",
    arch="inception_resnet_v2",
    normalization="radimagenet",
    study_name="RadImageNet IRV2",
    weights=_radimagenet_file("inception_resnet_v2", "IRV2"),
    network="RadImageNet InceptionResNetV2 (Keras)",
    what=f"Keras InceptionResNetV2 {_RADIMAGENET}",
)
_register(
    "radimagenet_densenet",
    arch="densenet121",
    normalization="radimagenet",
    study_name="RadImageNet DenseNet121",
    weights=_radimagenet_file("densenet121", "DenseNet121"),
    network="RadImageNet DenseNet121 (Keras)",
    what=f"Keras DenseNet121 {_RADIMAGENET}",
)

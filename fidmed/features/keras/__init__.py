"""Keras-faithful PyTorch networks (InceptionV3, ResNet50, DenseNet121, InceptionResNetV2) and an h5py loader."""

from fidmed.features.keras.archs import ARCHS, KerasArch
from fidmed.features.keras.graph import KerasGraph
from fidmed.features.keras.h5 import h5_to_state_dict, read_h5_layers

__all__ = ["ARCHS", "KerasArch", "KerasGraph", "h5_to_state_dict", "read_h5_layers"]

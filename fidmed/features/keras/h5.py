"""Read Keras .h5 weight files with h5py (no TensorFlow) and load them into a ``KerasGraph`` by layer order.

Two Keras 2 layouts carry the same structure: a weights file (``model.save_weights('x.h5')``: the root has a
``layer_names`` attribute) and a whole-model file (``model.save('x.h5')``: the same under ``model_weights``; the
RadImageNet ``*_notop.h5`` files are of this kind). Each layer group lists its arrays in its ``weight_names``
attribute (``conv2d_94/kernel:0``, or ``conv2d_94/kernel`` from Keras 3's legacy writer), in Keras' order:
Conv2D kernel [kh, kw, in, out] then bias; BatchNormalization gamma (absent with ``scale=False``), beta,
moving_mean, moving_variance.

Loading follows Keras' own ``load_weights`` for .h5 files: the file's layers that have weights, in ``layer_names``
order, pair one-to-one with the network's weighted layers in Keras' order; the layer names are ignored (Keras
numbers them from process-wide counters). Each pair must agree in type (from the weight names) and shapes;
otherwise the file is of another architecture and the error lists the layers that do not match.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fidmed.errors import FidmedError
from fidmed.features.keras.graph import KerasBatchNorm, KerasGraph, TFConv2d

_BN_KEYS = ("gamma", "beta", "moving_mean", "moving_variance")


@dataclass
class H5Layer:
    """A layer of a Keras .h5 file that has weights: its name and (short weight name, array) pairs in order."""

    name: str
    weights: list[tuple[str, np.ndarray]]

    @property
    def kind(self) -> str:
        keys = [k for k, _ in self.weights]
        if keys in (["kernel"], ["kernel", "bias"]):
            return "conv" if self.weights[0][1].ndim == 4 else "dense"
        if keys in (list(_BN_KEYS), list(_BN_KEYS[1:])):
            return "bn"
        return "other"

    def describe(self) -> str:
        shapes = ", ".join(f"{k} {tuple(a.shape)}" for k, a in self.weights)
        return f"{self.name!r} [{shapes}]"


def _text(value: object) -> str:
    return value.decode("utf8") if isinstance(value, bytes) else str(value)


def _short(weight_name: str) -> str:
    """``conv2d_94/kernel:0`` -> ``kernel``."""
    return weight_name.rsplit("/", 1)[-1].split(":", 1)[0]


def read_h5_layers(path: Path | str) -> list[H5Layer]:
    """The layers with weights of a Keras 2-style .h5 file, in the file's ``layer_names`` order."""
    try:
        import h5py
    except ModuleNotFoundError as e:
        raise FidmedError("reading Keras .h5 weights needs h5py: pip install h5py") from e

    path = Path(path)
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise FidmedError(f"{path} is not a readable HDF5 (.h5) file: {e}") from e
    with f:
        group = f
        if "layer_names" not in group.attrs and "model_weights" in group:
            group = group["model_weights"]
        if "layer_names" not in group.attrs:
            raise FidmedError(
                f"{path} is not a Keras 2-style .h5 weights file (no 'layer_names' attribute). Keras 3's "
                "'.weights.h5' format is not supported: save with model.save('x.h5') or legacy h5 saving."
            )
        layers = []
        for name in (_text(n) for n in group.attrs["layer_names"]):
            g = group[name]
            names = [_text(w) for w in g.attrs.get("weight_names", [])]
            if names:
                layers.append(H5Layer(name, [(_short(w), np.asarray(g[w])) for w in names]))
    return layers


def _expected(module: torch.nn.Module) -> tuple[str, list[tuple[str, tuple[int, ...]]]]:
    if isinstance(module, TFConv2d):
        o, i, kh, kw = module.weight.shape
        shapes = [("kernel", (kh, kw, i, o))] + ([("bias", (o,))] if module.bias is not None else [])
        return "conv", shapes
    if isinstance(module, KerasBatchNorm):
        c = module.bias.numel()
        keys = _BN_KEYS if module.weight is not None else _BN_KEYS[1:]
        return "bn", [(k, (c,)) for k in keys]
    raise TypeError(f"not a Keras-equivalent layer: {type(module).__name__}")


def _describe_expected(kind: str, shapes: list[tuple[str, tuple[int, ...]]]) -> str:
    label = {"conv": "Conv2D", "bn": "BatchNormalization"}[kind]
    return f"{label} [" + ", ".join(f"{k} {s}" for k, s in shapes) + "]"


def h5_to_state_dict(graph: KerasGraph, path: Path | str, arch_label: str = "the network") -> dict[str, torch.Tensor]:
    """Map a Keras .h5 file onto ``graph``'s state dict (conv kernels transposed to OIHW); checks everything."""
    file_layers = read_h5_layers(path)
    net_layers = graph.weighted_layers_in_keras_order()
    module_names = {id(m): name for name, m in graph.named_modules()}
    file_names = {fl.name for fl in file_layers}
    problems: list[str] = []
    state: dict[str, torch.Tensor] = {}
    for pos, ((node_id, module), fl) in enumerate(zip(net_layers, file_layers)):
        kind, shapes = _expected(module)
        got = [(k, tuple(a.shape)) for k, a in fl.weights]
        if got != shapes:
            expected = _describe_expected(kind, shapes)
            problems.append(f"  layer #{pos}: file {fl.describe()} but {arch_label} has {expected}")
            continue
        # Layers Keras names explicitly (ResNet50, DenseNet121, some of IRV2) must sit where Keras' order puts
        # them: this catches two equally shaped layers in swapped order, which shapes alone cannot.
        expected_name = graph.nodes[node_id].keras_name
        if expected_name and fl.name != expected_name and expected_name in file_names:
            problems.append(f"  layer #{pos}: file has {fl.name!r} where Keras' layer order puts {expected_name!r}")
            continue
        prefix = module_names[id(module)]
        arrays = dict(fl.weights)
        if kind == "conv":
            state[f"{prefix}.weight"] = torch.from_numpy(np.ascontiguousarray(arrays["kernel"].transpose(3, 2, 0, 1)))
            if "bias" in arrays:
                state[f"{prefix}.bias"] = torch.from_numpy(np.array(arrays["bias"]))
        else:
            if "gamma" in arrays:
                state[f"{prefix}.weight"] = torch.from_numpy(np.array(arrays["gamma"]))
            state[f"{prefix}.bias"] = torch.from_numpy(np.array(arrays["beta"]))
            state[f"{prefix}.running_mean"] = torch.from_numpy(np.array(arrays["moving_mean"]))
            state[f"{prefix}.running_var"] = torch.from_numpy(np.array(arrays["moving_variance"]))
    if len(file_layers) != len(net_layers):
        problems.insert(0, f"  the file has {len(file_layers)} layers with weights, {arch_label} has {len(net_layers)}")
    if problems:
        shown = problems[:12] + ([f"  ... and {len(problems) - 12} more"] if len(problems) > 12 else [])
        raise FidmedError(
            f"{path} does not hold weights for {arch_label} (include_top=False); the layers that do not match "
            "(in Keras' layer order):\n"
            + "\n".join(shown)
            + "\nUse the .h5 file made for this architecture (a '_notop' file, without the classifier)."
        )
    for name, t in state.items():
        state[name] = t.to(torch.float32)
    return state

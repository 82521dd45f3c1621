"""Weights for the Keras-faithful networks: load a Keras .h5 (or a safetensors file made from one), seeded random
init, architecture detection and conversion to safetensors."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from fidmed.errors import FidmedError
from fidmed.features.keras.archs import ARCHS, KerasArch
from fidmed.features.keras.graph import KerasBatchNorm, KerasGraph, TFConv2d
from fidmed.features.keras.h5 import h5_to_state_dict


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


def detect_keras_arch(path: Path | str) -> str:
    """The architecture (a key of ``ARCHS``) whose layers the Keras .h5 file ``path`` holds; FidmedError if none."""
    path = Path(path)
    errors = []
    for name, arch in ARCHS.items():
        try:
            h5_to_state_dict(arch.build(), path, arch.keras_class)
            return name
        except FidmedError as e:
            errors.append(str(e))
    raise FidmedError(
        f"{path} holds none of the Keras architectures {', '.join(ARCHS)} (include_top=False):\n"
        + "\n".join(e.splitlines()[0] + "\n" + "\n".join(e.splitlines()[1:4]) for e in errors)
    )


def convert_keras_h5(src: Path | str, dest: Path | str, arch_name: str | None = None) -> str:
    """Write the network's state dict from a Keras .h5 file as safetensors (metadata: source name and sha256,
    architecture); the architecture is detected when not given. Returns the architecture's name."""
    from safetensors.torch import save_file

    from fidmed.features.weights import sha256_of

    src, dest = Path(src), Path(dest)
    arch_name = arch_name or detect_keras_arch(src)
    arch = ARCHS[arch_name]
    state = h5_to_state_dict(arch.build(), src, arch.keras_class)
    tmp = dest.with_name(f".{dest.name}.partial")
    save_file(
        state,
        str(tmp),
        metadata={"source": src.name, "source_sha256": sha256_of(src, use_cache=False), "keras_arch": arch.keras_class},
    )
    tmp.replace(dest)
    return arch_name

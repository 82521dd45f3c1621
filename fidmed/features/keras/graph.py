"""A small layer graph that computes what a Keras functional model computes, in PyTorch.

Keras applications are functional models: a DAG of layers. ``KerasGraph`` records the same DAG (one node per
Keras layer, with the same inputs in the same order), runs it in PyTorch with TensorFlow's semantics, and
reproduces the order in which Keras lists the model's layers (``model.layers``; the order of ``layer_names`` in
an .h5 weights file). That order is not the creation order: Keras sorts layers by their depth from the output
(deepest first) and breaks ties by the order a depth-first walk from the output first reaches them (see
``keras_layer_order``). Loading weights by that order, and by layer type and shape, is what Keras' own
``load_weights`` does for an .h5 file, so the names inside the file (which depend on process-wide counters) never
matter.

TensorFlow semantics kept here:
  - "same" padding is computed from the actual input size: total = max((ceil(n/s) - 1) * s + k - n, 0), split
    with the extra pixel at the end (bottom/right), so even inputs with stride 2 pad asymmetrically;
  - "valid" pooling and convolution drop the remainder (floor), as PyTorch does;
  - a "same" max pool pads with -inf and a "same" average pool divides by the number of real pixels;
  - BatchNormalization in inference mode: (x - moving_mean) / sqrt(moving_variance + eps) * gamma + beta,
    with gamma absent (1) for ``scale=False`` layers.
Weights use PyTorch layouts (conv OIHW); the h5 reader transposes Keras' HWIO kernels.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

WEIGHTED_KINDS = ("conv", "bn")


def tf_same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow's "same" padding (before, after) along one axis for an input of ``size`` pixels."""
    out = -(-size // stride)  # ceil
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class TFConv2d(nn.Module):
    """Keras Conv2D (channels first): ``weight`` [out, in, kh, kw], optional ``bias``, "same" or "valid"."""

    def __init__(self, c_in: int, c_out: int, kernel: tuple[int, int], stride: int, padding: str, bias: bool) -> None:
        super().__init__()
        if padding not in ("same", "valid"):
            raise ValueError(f"padding must be 'same' or 'valid', got {padding!r}")
        self.kernel, self.stride, self.padding = kernel, stride, padding
        self.weight = nn.Parameter(torch.zeros(c_out, c_in, *kernel))
        self.bias = nn.Parameter(torch.zeros(c_out)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.padding == "valid":
            return F.conv2d(x, self.weight, self.bias, self.stride)
        ph = tf_same_padding(x.shape[-2], self.kernel[0], self.stride)
        pw = tf_same_padding(x.shape[-1], self.kernel[1], self.stride)
        if ph[0] == ph[1] and pw[0] == pw[1]:
            return F.conv2d(x, self.weight, self.bias, self.stride, padding=(ph[0], pw[0]))
        return F.conv2d(F.pad(x, (pw[0], pw[1], ph[0], ph[1])), self.weight, self.bias, self.stride)

    def extra_repr(self) -> str:
        o, i, kh, kw = self.weight.shape
        bias = self.bias is not None
        return f"{i}, {o}, kernel=({kh}, {kw}), stride={self.stride}, padding={self.padding}, bias={bias}"


class KerasBatchNorm(nn.Module):
    """Keras BatchNormalization in inference mode; without ``weight`` (gamma) when Keras has ``scale=False``."""

    def __init__(self, channels: int, eps: float, scale: bool) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels)) if scale else None
        self.bias = nn.Parameter(torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)

    def extra_repr(self) -> str:
        return f"{self.bias.numel()}, eps={self.eps}, scale={self.weight is not None}"


def _pool(x: torch.Tensor, kind: str, k: int, s: int, padding: str) -> torch.Tensor:
    if padding == "valid":
        return F.max_pool2d(x, k, s) if kind == "max" else F.avg_pool2d(x, k, s)
    ph, pw = tf_same_padding(x.shape[-2], k, s), tf_same_padding(x.shape[-1], k, s)
    pad = (pw[0], pw[1], ph[0], ph[1])
    if kind == "max":
        return F.max_pool2d(F.pad(x, pad, value=float("-inf")), k, s)
    if ph[0] == ph[1] and pw[0] == pw[1] and max(ph[0], pw[0]) <= k // 2:
        return F.avg_pool2d(x, k, s, padding=(ph[0], pw[0]), count_include_pad=False)
    ones = torch.ones((1, 1) + tuple(x.shape[-2:]), dtype=x.dtype, device=x.device)
    return F.avg_pool2d(F.pad(x, pad), k, s) / F.avg_pool2d(F.pad(ones, pad), k, s)


@dataclass
class Node:
    """One Keras layer: its kind, the nodes it reads (in Keras' argument order), its parameters."""

    kind: str
    inputs: tuple[int, ...]
    channels: int
    layer: int | None = None  # index into KerasGraph.layers for weighted kinds
    params: dict[str, Any] = field(default_factory=dict)
    keras_name: str | None = None  # the layer's name where Keras names it explicitly (e.g. "conv2_block1_0_conv")


class KerasGraph(nn.Module):
    """A Keras-like functional network: build it with the layer methods, then call it on [N, C, H, W]."""

    def __init__(self, in_channels: int = 3) -> None:
        super().__init__()
        self.layers = nn.ModuleList()
        self.nodes: list[Node] = [Node("input", (), in_channels)]
        self.output_node: int | None = None
        self._last_use: list[int] = []

    # -- building ---------------------------------------------------------------------------------------------
    @property
    def input(self) -> int:
        return 0

    def _add(
        self,
        kind: str,
        inputs: tuple[int, ...],
        channels: int,
        module: nn.Module | None = None,
        keras_name: str | None = None,
        **params: Any,
    ) -> int:
        for i in inputs:
            if not 0 <= i < len(self.nodes):
                raise ValueError(f"unknown input node {i}")
        layer = None
        if module is not None:
            self.layers.append(module)
            layer = len(self.layers) - 1
        self.nodes.append(Node(kind, inputs, channels, layer, params, keras_name))
        return len(self.nodes) - 1

    def channels(self, x: int) -> int:
        return self.nodes[x].channels

    def conv(
        self,
        x: int,
        filters: int,
        kernel: int | tuple[int, int],
        stride: int = 1,
        padding: str = "valid",
        bias: bool = True,
        name: str | None = None,
    ) -> int:
        k = (kernel, kernel) if isinstance(kernel, int) else tuple(kernel)
        return self._add("conv", (x,), filters, TFConv2d(self.channels(x), filters, k, stride, padding, bias), name)

    def bn(self, x: int, eps: float, scale: bool = True, name: str | None = None) -> int:
        return self._add("bn", (x,), self.channels(x), KerasBatchNorm(self.channels(x), eps, scale), name)

    def relu(self, x: int) -> int:
        return self._add("relu", (x,), self.channels(x))

    def max_pool(self, x: int, k: int, s: int, padding: str = "valid") -> int:
        return self._add("max_pool", (x,), self.channels(x), k=k, s=s, padding=padding)

    def avg_pool(self, x: int, k: int, s: int, padding: str = "valid") -> int:
        return self._add("avg_pool", (x,), self.channels(x), k=k, s=s, padding=padding)

    def zero_pad(self, x: int, p: int) -> int:
        return self._add("zero_pad", (x,), self.channels(x), p=p)

    def concat(self, xs: list[int]) -> int:
        return self._add("concat", tuple(xs), sum(self.channels(i) for i in xs))

    def add(self, xs: list[int]) -> int:
        return self._add("add", tuple(xs), self.channels(xs[0]))

    def scale_add(self, x: int, residual: int, scale: float) -> int:
        """IRV2's residual layer: ``x + residual * scale`` (Keras' CustomScaleLayer / Lambda)."""
        return self._add("scale_add", (x, residual), self.channels(x), scale=scale)

    def global_avg_pool(self, x: int) -> int:
        return self._add("gap", (x,), self.channels(x))

    def set_output(self, x: int) -> None:
        self.output_node = x
        last = list(range(len(self.nodes)))
        for i, node in enumerate(self.nodes):
            for j in node.inputs:
                last[j] = i
        self._last_use = last

    # -- running ----------------------------------------------------------------------------------------------
    def _run(self, node: Node, args: list[torch.Tensor]) -> torch.Tensor:
        k, p = node.kind, node.params
        if k in WEIGHTED_KINDS:
            return self.layers[node.layer](args[0])  # type: ignore[index]
        if k == "relu":
            return F.relu(args[0])
        if k in ("max_pool", "avg_pool"):
            return _pool(args[0], k[:3], p["k"], p["s"], p["padding"])
        if k == "zero_pad":
            return F.pad(args[0], (p["p"],) * 4)
        if k == "concat":
            return torch.cat(args, dim=1)
        if k == "add":
            out = args[0]
            for a in args[1:]:
                out = out + a
            return out
        if k == "scale_add":
            return args[0] + args[1] * p["scale"]
        if k == "gap":
            return args[0].mean(dim=(2, 3))
        raise ValueError(f"unknown node kind {k!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.output_node is None:
            raise RuntimeError("KerasGraph has no output; call set_output")
        values: list[torch.Tensor | None] = [None] * len(self.nodes)
        values[0] = x
        for i in range(1, self.output_node + 1):
            node = self.nodes[i]
            values[i] = self._run(node, [values[j] for j in node.inputs])  # type: ignore[misc]
            for j in node.inputs:  # free what no later node reads
                if self._last_use[j] <= i and j != self.output_node:
                    values[j] = None
        return values[self.output_node]  # type: ignore[return-value]

    # -- Keras' layer order -----------------------------------------------------------------------------------
    def keras_layer_order(self) -> list[int]:
        """Node ids in the order Keras lists the equivalent model's layers (``model.layers``, ``layer_names``).

        As Keras' functional graph mapping: a depth-first walk from the output visits each layer's inputs in
        argument order; a layer's traversal index is the moment it is first reached; its depth is the longest
        path from it to the output. Layers are sorted by depth, deepest (the input) first, then by traversal
        index.
        """
        if self.output_node is None:
            raise RuntimeError("KerasGraph has no output; call set_output")
        index: dict[int, int] = {self.output_node: 0}
        post: list[int] = []
        finished: set[int] = set()
        stack = [(self.output_node, iter(self.nodes[self.output_node].inputs))]
        while stack:
            n, children = stack[-1]
            child = next((c for c in children if c not in finished), None)
            if child is None:
                finished.add(n)
                post.append(n)
                stack.pop()
            else:
                index.setdefault(child, len(index))
                stack.append((child, iter(self.nodes[child].inputs)))
        depth: dict[int, int] = {}
        for n in reversed(post):
            d = depth.setdefault(n, 0)
            for parent in self.nodes[n].inputs:
                depth[parent] = max(d + 1, depth.get(parent, 0))
        return sorted(post, key=lambda n: (-depth[n], index[n]))

    def weighted_layers_in_keras_order(self) -> list[tuple[int, nn.Module]]:
        """(node id, module) of every layer with weights, in Keras' order."""
        return [
            (n, self.layers[self.nodes[n].layer])
            for n in self.keras_layer_order()  # type: ignore[index]
            if self.nodes[n].kind in WEIGHTED_KINDS
        ]

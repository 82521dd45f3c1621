"""StyleGAN2 generator and discriminator, state-dict compatible with stylegan2-ada-pytorch.

Every class has the constructor signature, submodule names and parameter/buffer names and shapes of the
classes in stylegan2-ada-pytorch's ``training/networks.py``, so a ``state_dict`` moves between the two
unchanged; that is how the study's released pickles are imported. The forward passes compute the same
functions with the same floating-point operations (checked against the reference on CPU).

Two differences in behaviour, both deliberate:

- Mixed precision (float16 in the ``num_fp16_res`` highest resolutions) is used only for tensors on CUDA. On
  CPU every block runs in float32, as if ``force_fp32=True`` were passed; ``conv_clamp`` still applies.
- Everything is plain PyTorch (``fidmed.gan.ops``); nothing is compiled and nothing is pickled with source code.

``build_networks`` makes the G and D of stylegan2-ada-pytorch ``train.py --cfg stylegan2``.

Conventions: images are ``[N, C, H, W]`` float tensors in [-1, 1]; ``c`` is a ``[N, c_dim]`` label tensor (or
``None``/empty when ``c_dim == 0``); ``w`` latents are ``[N, num_ws, w_dim]``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch

from fidmed.errors import ConfigError
from fidmed.gan import ops

ARCHITECTURES = ("orig", "skip", "resnet")
NOISE_MODES = ("random", "const", "none")
DEFAULT_FILTER = (1, 3, 3, 1)


def _check_architecture(architecture: str) -> None:
    if architecture not in ARCHITECTURES:
        raise ConfigError(f"unknown StyleGAN2 architecture {architecture!r}; use one of {ARCHITECTURES}")


def _check_shape(tensor: torch.Tensor | None, shape: Sequence[int | None], what: str) -> None:
    """Raise ValueError unless ``tensor`` has ``shape`` (``None`` matches any size)."""
    if tensor is None:
        raise ValueError(f"{what}: expected a tensor of shape {list(shape)} (None = any), got None")
    if tensor.ndim != len(shape) or any(s is not None and t != s for t, s in zip(tensor.shape, shape, strict=True)):
        raise ValueError(f"{what}: expected shape {list(shape)} (None = any), got {list(tensor.shape)}")


def _block_dtype(use_fp16: bool, force_fp32: bool, device: torch.device) -> torch.dtype:
    """float16 for a block marked ``use_fp16`` on CUDA unless ``force_fp32``; float32 otherwise."""
    return torch.float16 if use_fp16 and not force_fp32 and device.type == "cuda" else torch.float32


def normalize_2nd_moment(x: torch.Tensor, dim: int = 1, eps: float = 1e-8) -> torch.Tensor:
    """Scale ``x`` to unit mean square along ``dim`` (the "pixel norm" applied to z)."""
    return x * (x.square().mean(dim=dim, keepdim=True) + eps).rsqrt()


# ---------------------------------------------------------------------------------------------------------------------
# Modulated convolution


def modulated_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    styles: torch.Tensor,
    noise: torch.Tensor | None = None,
    up: int = 1,
    down: int = 1,
    padding: int = 0,
    resample_filter: torch.Tensor | None = None,
    demodulate: bool = True,
    flip_weight: bool = True,
    fused_modconv: bool = True,
) -> torch.Tensor:
    """StyleGAN2's style-modulated convolution, optionally demodulated, optionally adding noise.

    Per sample n, the weights are scaled per input channel: ``w_n[o, i] = weight[o, i] * styles[n, i]``;
    demodulation then rescales each output channel to unit L2 norm, ``w_n[o] /= ||w_n[o]||``.

    - ``fused_modconv=True`` builds the per-sample weights and runs one grouped convolution over the batch
      (fast for inference); ``False`` scales the activations before and after a shared-weight convolution
      instead (cheaper to differentiate; the reference uses it in training and in float16).
    - With float16 activations and demodulation, ``weight`` and ``styles`` are first divided by their largest
      absolute values. Demodulation cancels any positive rescaling of the weights per output channel and of the
      styles per sample, so this changes nothing mathematically, but it bounds ``x * styles`` and the modulated
      weights by 1 and so keeps float16 from overflowing.
    - ``flip_weight`` selects correlation (True, like ``torch.nn.functional.conv2d``) or true convolution. The
      reference layers pass ``flip_weight=(up == 1)`` because that saves a weight flip in the transposed
      convolution of the upsampling path. The two give different outputs for the same weights, so the trained
      networks depend on the choice, and the layers below keep it.
    """
    batch_size = x.shape[0]
    out_channels, in_channels, kh, kw = weight.shape
    _check_shape(x, [batch_size, in_channels, None, None], "modulated_conv2d input")
    _check_shape(styles, [batch_size, in_channels], "modulated_conv2d styles")

    if x.dtype == torch.float16 and demodulate:
        weight = weight * (1 / math.sqrt(in_channels * kh * kw) / weight.abs().amax(dim=[1, 2, 3], keepdim=True))
        styles = styles / styles.abs().amax(dim=1, keepdim=True)

    modulated = None  # [N, O, I, kh, kw]
    demod = None  # [N, O]
    if demodulate or fused_modconv:
        modulated = weight.unsqueeze(0) * styles.reshape(batch_size, 1, -1, 1, 1)
    if demodulate:
        demod = (modulated.square().sum(dim=[2, 3, 4]) + 1e-8).rsqrt()

    if not fused_modconv:
        x = x * styles.to(x.dtype).reshape(batch_size, -1, 1, 1)
        x = ops.conv2d_resample(
            x, weight.to(x.dtype), f=resample_filter, up=up, down=down, padding=padding, flip_weight=flip_weight
        )
        if demod is not None and noise is not None:
            return ops.fma(x, demod.to(x.dtype).reshape(batch_size, -1, 1, 1), noise.to(x.dtype))
        if demod is not None:
            return x * demod.to(x.dtype).reshape(batch_size, -1, 1, 1)
        if noise is not None:
            return x.add_(noise.to(x.dtype))
        return x

    # Fused: fold the batch into the channel axis and convolve each sample with its own weights (groups=N).
    if demod is not None:
        modulated = modulated * demod.reshape(batch_size, -1, 1, 1, 1)
    x = x.reshape(1, -1, *x.shape[2:])
    grouped_weight = modulated.reshape(-1, in_channels, kh, kw).to(x.dtype)
    x = ops.conv2d_resample(
        x,
        grouped_weight,
        f=resample_filter,
        up=up,
        down=down,
        padding=padding,
        groups=batch_size,
        flip_weight=flip_weight,
    )
    x = x.reshape(batch_size, -1, *x.shape[2:])
    if noise is not None:
        x = x.add_(noise)
    return x


# ---------------------------------------------------------------------------------------------------------------------
# Equalised-learning-rate layers


class FullyConnectedLayer(torch.nn.Module):
    """Dense layer with equalised learning rate.

    Parameters are stored divided by their runtime scale (``weight_gain``, ``bias_gain``), so Adam's per-parameter
    step sizes are uniform across layers; ``lr_multiplier`` slows a layer down (the mapping network uses 0.01).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        activation: str = "linear",
        lr_multiplier: float = 1,
        bias_init: float = 0,
    ) -> None:
        super().__init__()
        self.activation = activation
        self.weight = torch.nn.Parameter(torch.randn([out_features, in_features]) / lr_multiplier)
        self.bias = torch.nn.Parameter(torch.full([out_features], float(bias_init))) if bias else None
        self.weight_gain = lr_multiplier / math.sqrt(in_features)
        self.bias_gain = lr_multiplier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.to(x.dtype) * self.weight_gain
        b = self.bias
        if b is not None:
            b = b.to(x.dtype)
            if self.bias_gain != 1:
                b = b * self.bias_gain
        if self.activation == "linear" and b is not None:
            return torch.addmm(b.unsqueeze(0), x, w.t())
        return ops.bias_act(x.matmul(w.t()), b, act=self.activation)


class Conv2dLayer(torch.nn.Module):
    """Convolution with equalised learning rate, optional FIR up/downsampling, bias, activation and clamp.

    ``trainable=False`` stores weight and bias as buffers (Freeze-D); the state-dict names stay the same.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        bias: bool = True,
        activation: str = "linear",
        up: int = 1,
        down: int = 1,
        resample_filter: Sequence[float] = DEFAULT_FILTER,
        conv_clamp: float | None = None,
        channels_last: bool = False,
        trainable: bool = True,
    ) -> None:
        super().__init__()
        self.activation = activation
        self.up = up
        self.down = down
        self.conv_clamp = conv_clamp
        self.register_buffer("resample_filter", ops.setup_filter(resample_filter))
        self.padding = kernel_size // 2
        self.weight_gain = 1 / math.sqrt(in_channels * kernel_size**2)
        self.act_gain = ops.activation(activation).default_gain

        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        weight = torch.randn([out_channels, in_channels, kernel_size, kernel_size]).to(memory_format=memory_format)
        bias_value = torch.zeros([out_channels]) if bias else None
        if trainable:
            self.weight = torch.nn.Parameter(weight)
            self.bias = torch.nn.Parameter(bias_value) if bias_value is not None else None
        else:
            self.register_buffer("weight", weight)
            if bias_value is not None:
                self.register_buffer("bias", bias_value)
            else:
                self.bias = None

    def forward(self, x: torch.Tensor, gain: float = 1) -> torch.Tensor:
        w = self.weight * self.weight_gain
        b = self.bias.to(x.dtype) if self.bias is not None else None
        x = ops.conv2d_resample(
            x,
            w.to(x.dtype),
            f=self.resample_filter,
            up=self.up,
            down=self.down,
            padding=self.padding,
            flip_weight=(self.up == 1),  # see modulated_conv2d
        )
        clamp = self.conv_clamp * gain if self.conv_clamp is not None else None
        return ops.bias_act(x, b, act=self.activation, gain=self.act_gain * gain, clamp=clamp)


# ---------------------------------------------------------------------------------------------------------------------
# Generator


class MappingNetwork(torch.nn.Module):
    """z (and label c) -> w: an MLP of ``num_layers`` layers, output broadcast to ``num_ws`` copies.

    During training it tracks the running mean ``w_avg`` of w, the centre that truncation pulls towards.
    """

    def __init__(
        self,
        z_dim: int,
        c_dim: int,
        w_dim: int,
        num_ws: int | None,
        num_layers: int = 8,
        embed_features: int | None = None,
        layer_features: int | None = None,
        activation: str = "lrelu",
        lr_multiplier: float = 0.01,
        w_avg_beta: float | None = 0.995,
    ) -> None:
        super().__init__()
        self.z_dim = z_dim
        self.c_dim = c_dim
        self.w_dim = w_dim
        self.num_ws = num_ws
        self.num_layers = num_layers
        self.w_avg_beta = w_avg_beta

        embed_features = 0 if c_dim == 0 else (w_dim if embed_features is None else embed_features)
        layer_features = w_dim if layer_features is None else layer_features
        widths = [z_dim + embed_features] + [layer_features] * (num_layers - 1) + [w_dim]

        if c_dim > 0:
            self.embed = FullyConnectedLayer(c_dim, embed_features)
        for idx in range(num_layers):
            layer = FullyConnectedLayer(
                widths[idx], widths[idx + 1], activation=activation, lr_multiplier=lr_multiplier
            )
            setattr(self, f"fc{idx}", layer)
        if num_ws is not None and w_avg_beta is not None:
            self.register_buffer("w_avg", torch.zeros([w_dim]))

    def forward(
        self,
        z: torch.Tensor | None,
        c: torch.Tensor | None,
        truncation_psi: float = 1,
        truncation_cutoff: int | None = None,
        skip_w_avg_update: bool = False,
    ) -> torch.Tensor:
        """Map to ``[N, num_ws, w_dim]`` (or ``[N, w_dim]`` when ``num_ws is None``).

        Truncation: ``w = w_avg + psi * (w - w_avg)``, for the first ``truncation_cutoff`` ws only if given.
        """
        x = None
        if self.z_dim > 0:
            _check_shape(z, [None, self.z_dim], "z")
            x = normalize_2nd_moment(z.to(torch.float32))
        if self.c_dim > 0:
            _check_shape(c, [None, self.c_dim], "c")
            y = normalize_2nd_moment(self.embed(c.to(torch.float32)))
            x = y if x is None else torch.cat([x, y], dim=1)

        for idx in range(self.num_layers):
            x = getattr(self, f"fc{idx}")(x)

        if self.w_avg_beta is not None and self.training and not skip_w_avg_update:
            self.w_avg.copy_(x.detach().mean(dim=0).lerp(self.w_avg, self.w_avg_beta))

        if self.num_ws is not None:
            x = x.unsqueeze(1).repeat([1, self.num_ws, 1])

        if truncation_psi != 1:
            if self.w_avg_beta is None:
                raise ValueError("truncation needs w_avg, which this mapping network does not track")
            if self.num_ws is None or truncation_cutoff is None:
                x = self.w_avg.lerp(x, truncation_psi)
            else:
                x[:, :truncation_cutoff] = self.w_avg.lerp(x[:, :truncation_cutoff], truncation_psi)
        return x


class SynthesisLayer(torch.nn.Module):
    """One modulated 3x3 convolution of the synthesis network (optionally upsampling), plus noise and bias."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        w_dim: int,
        resolution: int,
        kernel_size: int = 3,
        up: int = 1,
        use_noise: bool = True,
        activation: str = "lrelu",
        resample_filter: Sequence[float] = DEFAULT_FILTER,
        conv_clamp: float | None = None,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        self.resolution = resolution
        self.up = up
        self.use_noise = use_noise
        self.activation = activation
        self.conv_clamp = conv_clamp
        self.register_buffer("resample_filter", ops.setup_filter(resample_filter))
        self.padding = kernel_size // 2
        self.act_gain = ops.activation(activation).default_gain

        self.affine = FullyConnectedLayer(w_dim, in_channels, bias_init=1)
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        weight = torch.randn([out_channels, in_channels, kernel_size, kernel_size]).to(memory_format=memory_format)
        self.weight = torch.nn.Parameter(weight)
        if use_noise:
            self.register_buffer("noise_const", torch.randn([resolution, resolution]))
            self.noise_strength = torch.nn.Parameter(torch.zeros([]))
        self.bias = torch.nn.Parameter(torch.zeros([out_channels]))

    def forward(
        self,
        x: torch.Tensor,
        w: torch.Tensor,
        noise_mode: str = "random",
        fused_modconv: bool = True,
        gain: float = 1,
    ) -> torch.Tensor:
        """``noise_mode``: 'random' draws fresh noise, 'const' uses the stored ``noise_const``, 'none' adds none."""
        if noise_mode not in NOISE_MODES:
            raise ValueError(f"noise_mode must be one of {NOISE_MODES}, got {noise_mode!r}")
        in_resolution = self.resolution // self.up
        _check_shape(x, [None, self.weight.shape[1], in_resolution, in_resolution], "SynthesisLayer input")
        styles = self.affine(w)

        noise = None
        if self.use_noise and noise_mode == "random":
            shape = [x.shape[0], 1, self.resolution, self.resolution]
            noise = torch.randn(shape, device=x.device) * self.noise_strength
        if self.use_noise and noise_mode == "const":
            noise = self.noise_const * self.noise_strength

        x = modulated_conv2d(
            x,
            self.weight,
            styles,
            noise=noise,
            up=self.up,
            padding=self.padding,
            resample_filter=self.resample_filter,
            flip_weight=(self.up == 1),
            fused_modconv=fused_modconv,
        )
        clamp = self.conv_clamp * gain if self.conv_clamp is not None else None
        return ops.bias_act(x, self.bias.to(x.dtype), act=self.activation, gain=self.act_gain * gain, clamp=clamp)


class ToRGBLayer(torch.nn.Module):
    """Modulated (not demodulated) 1x1 convolution from features to image channels."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        w_dim: int,
        kernel_size: int = 1,
        conv_clamp: float | None = None,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        self.conv_clamp = conv_clamp
        self.affine = FullyConnectedLayer(w_dim, in_channels, bias_init=1)
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        weight = torch.randn([out_channels, in_channels, kernel_size, kernel_size]).to(memory_format=memory_format)
        self.weight = torch.nn.Parameter(weight)
        self.bias = torch.nn.Parameter(torch.zeros([out_channels]))
        self.weight_gain = 1 / math.sqrt(in_channels * kernel_size**2)

    def forward(self, x: torch.Tensor, w: torch.Tensor, fused_modconv: bool = True) -> torch.Tensor:
        styles = self.affine(w) * self.weight_gain  # without demodulation the equalised-lr gain goes here
        x = modulated_conv2d(x, self.weight, styles, demodulate=False, fused_modconv=fused_modconv)
        return ops.bias_act(x, self.bias.to(x.dtype), clamp=self.conv_clamp)


class SynthesisBlock(torch.nn.Module):
    """One resolution of the synthesis network: (upsampling) conv0, conv1 and, where needed, toRGB.

    The first block (``in_channels == 0``) starts from a learned constant. Architectures: 'orig' passes features
    only, 'skip' sums upsampled toRGB outputs of every resolution, 'resnet' adds a 1x1 upsampling shortcut
    around the two convolutions (each branch scaled by sqrt(1/2)).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        w_dim: int,
        resolution: int,
        img_channels: int,
        is_last: bool,
        architecture: str = "skip",
        resample_filter: Sequence[float] = DEFAULT_FILTER,
        conv_clamp: float | None = None,
        use_fp16: bool = False,
        fp16_channels_last: bool = False,
        **layer_kwargs,
    ) -> None:
        _check_architecture(architecture)
        super().__init__()
        self.in_channels = in_channels
        self.w_dim = w_dim
        self.resolution = resolution
        self.img_channels = img_channels
        self.is_last = is_last
        self.architecture = architecture
        self.use_fp16 = use_fp16
        self.channels_last = use_fp16 and fp16_channels_last
        self.register_buffer("resample_filter", ops.setup_filter(resample_filter))
        self.num_conv = 0
        self.num_torgb = 0

        if in_channels == 0:
            self.const = torch.nn.Parameter(torch.randn([out_channels, resolution, resolution]))
        else:
            self.conv0 = SynthesisLayer(
                in_channels,
                out_channels,
                w_dim=w_dim,
                resolution=resolution,
                up=2,
                resample_filter=resample_filter,
                conv_clamp=conv_clamp,
                channels_last=self.channels_last,
                **layer_kwargs,
            )
            self.num_conv += 1

        self.conv1 = SynthesisLayer(
            out_channels,
            out_channels,
            w_dim=w_dim,
            resolution=resolution,
            conv_clamp=conv_clamp,
            channels_last=self.channels_last,
            **layer_kwargs,
        )
        self.num_conv += 1

        if is_last or architecture == "skip":
            self.torgb = ToRGBLayer(
                out_channels, img_channels, w_dim=w_dim, conv_clamp=conv_clamp, channels_last=self.channels_last
            )
            self.num_torgb += 1

        if in_channels != 0 and architecture == "resnet":
            self.skip = Conv2dLayer(
                in_channels,
                out_channels,
                kernel_size=1,
                bias=False,
                up=2,
                resample_filter=resample_filter,
                channels_last=self.channels_last,
            )

    def forward(
        self,
        x: torch.Tensor | None,
        img: torch.Tensor | None,
        ws: torch.Tensor,
        force_fp32: bool = False,
        fused_modconv: bool | None = None,
        **layer_kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Return (features, image so far). ``ws`` holds ``num_conv + num_torgb`` latents for this block.

        ``fused_modconv=None`` fuses in eval mode unless float16 with a batch larger than one (as the reference).
        """
        _check_shape(ws, [None, self.num_conv + self.num_torgb, self.w_dim], "SynthesisBlock ws")
        w_iter: Iterator[torch.Tensor] = iter(ws.unbind(dim=1))
        dtype = _block_dtype(self.use_fp16, force_fp32, ws.device)
        fp16 = dtype == torch.float16
        memory_format = torch.channels_last if self.channels_last and fp16 else torch.contiguous_format
        if fused_modconv is None:
            fused_modconv = (not self.training) and (dtype == torch.float32 or int(ws.shape[0]) == 1)

        if self.in_channels == 0:
            x = self.const.to(dtype=dtype, memory_format=memory_format)
            x = x.unsqueeze(0).repeat([ws.shape[0], 1, 1, 1])
        else:
            half = self.resolution // 2
            _check_shape(x, [None, self.in_channels, half, half], "SynthesisBlock input")
            x = x.to(dtype=dtype, memory_format=memory_format)

        if self.in_channels == 0:
            x = self.conv1(x, next(w_iter), fused_modconv=fused_modconv, **layer_kwargs)
        elif self.architecture == "resnet":
            shortcut = self.skip(x, gain=math.sqrt(0.5))
            x = self.conv0(x, next(w_iter), fused_modconv=fused_modconv, **layer_kwargs)
            x = self.conv1(x, next(w_iter), fused_modconv=fused_modconv, gain=math.sqrt(0.5), **layer_kwargs)
            x = shortcut.add_(x)
        else:
            x = self.conv0(x, next(w_iter), fused_modconv=fused_modconv, **layer_kwargs)
            x = self.conv1(x, next(w_iter), fused_modconv=fused_modconv, **layer_kwargs)

        if img is not None:
            half = self.resolution // 2
            _check_shape(img, [None, self.img_channels, half, half], "SynthesisBlock image")
            img = ops.upsample2d(img, self.resample_filter)
        if self.is_last or self.architecture == "skip":
            y = self.torgb(x, next(w_iter), fused_modconv=fused_modconv)
            y = y.to(dtype=torch.float32, memory_format=torch.contiguous_format)
            img = y if img is None else img.add_(y)
        return x, img


def _channels(res: int, channel_base: int, channel_max: int) -> int:
    """Feature maps at a resolution: inversely proportional to it, capped at ``channel_max``."""
    return min(channel_base // res, channel_max)


def _fp16_resolution(img_resolution_log2: int, num_fp16_res: int) -> int:
    """Lowest resolution that runs in float16 (never below 8)."""
    return max(2 ** (img_resolution_log2 + 1 - num_fp16_res), 8)


class SynthesisNetwork(torch.nn.Module):
    """w latents -> image: one ``SynthesisBlock`` per resolution 4, 8, ..., ``img_resolution``, named ``b{res}``."""

    def __init__(
        self,
        w_dim: int,
        img_resolution: int,
        img_channels: int,
        channel_base: int = 32768,
        channel_max: int = 512,
        num_fp16_res: int = 0,
        **block_kwargs,
    ) -> None:
        if img_resolution < 4 or img_resolution & (img_resolution - 1):
            raise ConfigError(f"image resolution must be a power of two >= 4, got {img_resolution}")
        super().__init__()
        self.w_dim = w_dim
        self.img_resolution = img_resolution
        self.img_resolution_log2 = int(math.log2(img_resolution))
        self.img_channels = img_channels
        self.block_resolutions = [2**i for i in range(2, self.img_resolution_log2 + 1)]
        fp16_resolution = _fp16_resolution(self.img_resolution_log2, num_fp16_res)

        self.num_ws = 0
        for res in self.block_resolutions:
            in_channels = _channels(res // 2, channel_base, channel_max) if res > 4 else 0
            out_channels = _channels(res, channel_base, channel_max)
            is_last = res == img_resolution
            block = SynthesisBlock(
                in_channels,
                out_channels,
                w_dim=w_dim,
                resolution=res,
                img_channels=img_channels,
                is_last=is_last,
                use_fp16=res >= fp16_resolution,
                **block_kwargs,
            )
            self.num_ws += block.num_conv + (block.num_torgb if is_last else 0)
            setattr(self, f"b{res}", block)

    def forward(
        self,
        ws: torch.Tensor,
        noise_mode: str = "random",
        force_fp32: bool = False,
        fused_modconv: bool | None = None,
    ) -> torch.Tensor:
        """Render ``[N, num_ws, w_dim]`` latents to ``[N, img_channels, R, R]`` float32 images.

        Block k reads its conv latents and, for toRGB, the next one: a toRGB layer shares its w with the first
        conv of the following block, which is why ``num_ws`` counts only the last block's toRGB.
        """
        _check_shape(ws, [None, self.num_ws, self.w_dim], "ws")
        ws = ws.to(torch.float32)
        x = img = None
        w_idx = 0
        for res in self.block_resolutions:
            block = getattr(self, f"b{res}")
            block_ws = ws.narrow(1, w_idx, block.num_conv + block.num_torgb)
            w_idx += block.num_conv
            x, img = block(x, img, block_ws, force_fp32=force_fp32, fused_modconv=fused_modconv, noise_mode=noise_mode)
        return img


class Generator(torch.nn.Module):
    """StyleGAN2 generator: ``mapping`` (z, c -> w) followed by ``synthesis`` (w -> image)."""

    def __init__(
        self,
        z_dim: int,
        c_dim: int,
        w_dim: int,
        img_resolution: int,
        img_channels: int,
        mapping_kwargs: dict | None = None,
        synthesis_kwargs: dict | None = None,
    ) -> None:
        super().__init__()
        self.z_dim = z_dim
        self.c_dim = c_dim
        self.w_dim = w_dim
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.synthesis = SynthesisNetwork(
            w_dim=w_dim, img_resolution=img_resolution, img_channels=img_channels, **(synthesis_kwargs or {})
        )
        self.num_ws = self.synthesis.num_ws
        self.mapping = MappingNetwork(
            z_dim=z_dim, c_dim=c_dim, w_dim=w_dim, num_ws=self.num_ws, **(mapping_kwargs or {})
        )

    def forward(
        self,
        z: torch.Tensor,
        c: torch.Tensor | None,
        truncation_psi: float = 1,
        truncation_cutoff: int | None = None,
        noise_mode: str = "random",
        force_fp32: bool = False,
        fused_modconv: bool | None = None,
    ) -> torch.Tensor:
        """Generate ``[N, img_channels, R, R]`` images in about [-1, 1] from ``[N, z_dim]`` latents."""
        ws = self.mapping(z, c, truncation_psi=truncation_psi, truncation_cutoff=truncation_cutoff)
        return self.synthesis(ws, noise_mode=noise_mode, force_fp32=force_fp32, fused_modconv=fused_modconv)


# ---------------------------------------------------------------------------------------------------------------------
# Discriminator


class DiscriminatorBlock(torch.nn.Module):
    """One resolution of the discriminator: (fromRGB) conv0 and a downsampling conv1.

    Architectures: 'orig' reads the image only in the first block, 'skip' reads a downsampled copy of it in
    every block, 'resnet' adds a 1x1 downsampling shortcut (each branch scaled by sqrt(1/2)).
    Layers with index below ``freeze_layers`` (counted across blocks from ``first_layer_idx``) are frozen.
    """

    def __init__(
        self,
        in_channels: int,
        tmp_channels: int,
        out_channels: int,
        resolution: int,
        img_channels: int,
        first_layer_idx: int,
        architecture: str = "resnet",
        activation: str = "lrelu",
        resample_filter: Sequence[float] = DEFAULT_FILTER,
        conv_clamp: float | None = None,
        use_fp16: bool = False,
        fp16_channels_last: bool = False,
        freeze_layers: int = 0,
    ) -> None:
        _check_architecture(architecture)
        if in_channels not in (0, tmp_channels):
            raise ConfigError(f"DiscriminatorBlock: in_channels must be 0 or tmp_channels, got {in_channels}")
        super().__init__()
        self.in_channels = in_channels
        self.resolution = resolution
        self.img_channels = img_channels
        self.first_layer_idx = first_layer_idx
        self.architecture = architecture
        self.use_fp16 = use_fp16
        self.channels_last = use_fp16 and fp16_channels_last
        self.register_buffer("resample_filter", ops.setup_filter(resample_filter))
        self.num_layers = 0

        def next_trainable() -> bool:
            trainable = self.first_layer_idx + self.num_layers >= freeze_layers
            self.num_layers += 1
            return trainable

        common = dict(activation=activation, conv_clamp=conv_clamp, channels_last=self.channels_last)
        if in_channels == 0 or architecture == "skip":
            self.fromrgb = Conv2dLayer(img_channels, tmp_channels, kernel_size=1, trainable=next_trainable(), **common)
        self.conv0 = Conv2dLayer(tmp_channels, tmp_channels, kernel_size=3, trainable=next_trainable(), **common)
        self.conv1 = Conv2dLayer(
            tmp_channels,
            out_channels,
            kernel_size=3,
            down=2,
            resample_filter=resample_filter,
            trainable=next_trainable(),
            **common,
        )
        if architecture == "resnet":
            self.skip = Conv2dLayer(
                tmp_channels,
                out_channels,
                kernel_size=1,
                bias=False,
                down=2,
                resample_filter=resample_filter,
                trainable=next_trainable(),
                channels_last=self.channels_last,
            )

    def forward(
        self, x: torch.Tensor | None, img: torch.Tensor | None, force_fp32: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Return (features at half resolution, downsampled image for 'skip' else None)."""
        device = (x if x is not None else img).device
        dtype = _block_dtype(self.use_fp16, force_fp32, device)
        fp16 = dtype == torch.float16
        memory_format = torch.channels_last if self.channels_last and fp16 else torch.contiguous_format

        if x is not None:
            _check_shape(x, [None, self.in_channels, self.resolution, self.resolution], "DiscriminatorBlock input")
            x = x.to(dtype=dtype, memory_format=memory_format)

        if self.in_channels == 0 or self.architecture == "skip":
            _check_shape(img, [None, self.img_channels, self.resolution, self.resolution], "discriminator image")
            img = img.to(dtype=dtype, memory_format=memory_format)
            y = self.fromrgb(img)
            x = y if x is None else x + y
            img = ops.downsample2d(img, self.resample_filter) if self.architecture == "skip" else None

        if self.architecture == "resnet":
            shortcut = self.skip(x, gain=math.sqrt(0.5))
            x = self.conv0(x)
            x = self.conv1(x, gain=math.sqrt(0.5))
            x = shortcut.add_(x)
        else:
            x = self.conv1(self.conv0(x))
        return x, img


class MinibatchStdLayer(torch.nn.Module):
    """Append the standard deviation across groups of ``group_size`` samples as ``num_channels`` extra features.

    Sample i belongs to group i % (N / G): the batch is split into G consecutive chunks and a group takes one
    sample from each chunk. N must be divisible by min(group_size, N). The statistic lets D see variety (mode
    collapse) in a batch, which is why the group size is part of the training recipe.
    """

    def __init__(self, group_size: int | None, num_channels: int = 1) -> None:
        super().__init__()
        self.group_size = group_size
        self.num_channels = num_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        g = n if self.group_size is None else min(self.group_size, n)
        if n % g:
            raise ConfigError(
                f"minibatch-std group size {g} does not divide the batch of {n} images; "
                "use a per-device batch size that is a multiple of the group size"
            )
        f = self.num_channels
        y = x.reshape(g, -1, f, c // f, h, w)  # [G, n, F, c, H, W]
        y = y - y.mean(dim=0)
        y = (y.square().mean(dim=0) + 1e-8).sqrt()  # std over each group: [n, F, c, H, W]
        y = y.mean(dim=[2, 3, 4]).reshape(-1, f, 1, 1)  # averaged over channels and pixels: [n, F, 1, 1]
        y = y.repeat(g, 1, h, w)  # back to [N, F, H, W]
        return torch.cat([x, y], dim=1)


class DiscriminatorEpilogue(torch.nn.Module):
    """The discriminator's 4x4 head: minibatch std, conv, fc, output (projected onto the label map if any)."""

    def __init__(
        self,
        in_channels: int,
        cmap_dim: int,
        resolution: int,
        img_channels: int,
        architecture: str = "resnet",
        mbstd_group_size: int | None = 4,
        mbstd_num_channels: int = 1,
        activation: str = "lrelu",
        conv_clamp: float | None = None,
    ) -> None:
        _check_architecture(architecture)
        super().__init__()
        self.in_channels = in_channels
        self.cmap_dim = cmap_dim
        self.resolution = resolution
        self.img_channels = img_channels
        self.architecture = architecture

        if architecture == "skip":
            self.fromrgb = Conv2dLayer(img_channels, in_channels, kernel_size=1, activation=activation)
        self.mbstd = MinibatchStdLayer(mbstd_group_size, mbstd_num_channels) if mbstd_num_channels > 0 else None
        self.conv = Conv2dLayer(
            in_channels + mbstd_num_channels, in_channels, kernel_size=3, activation=activation, conv_clamp=conv_clamp
        )
        self.fc = FullyConnectedLayer(in_channels * resolution**2, in_channels, activation=activation)
        self.out = FullyConnectedLayer(in_channels, 1 if cmap_dim == 0 else cmap_dim)

    def forward(
        self, x: torch.Tensor, img: torch.Tensor | None, cmap: torch.Tensor | None, force_fp32: bool = False
    ) -> torch.Tensor:
        """Return ``[N, 1]`` float32 logits. Always float32 (``force_fp32`` is accepted for symmetry)."""
        _check_shape(x, [None, self.in_channels, self.resolution, self.resolution], "DiscriminatorEpilogue input")
        x = x.to(dtype=torch.float32, memory_format=torch.contiguous_format)
        if self.architecture == "skip":
            _check_shape(img, [None, self.img_channels, self.resolution, self.resolution], "discriminator image")
            img = img.to(dtype=torch.float32, memory_format=torch.contiguous_format)
            x = x + self.fromrgb(img)

        if self.mbstd is not None:
            x = self.mbstd(x)
        x = self.conv(x)
        x = self.fc(x.flatten(1))
        x = self.out(x)

        if self.cmap_dim > 0:
            _check_shape(cmap, [None, self.cmap_dim], "cmap")
            x = (x * cmap).sum(dim=1, keepdim=True) * (1 / math.sqrt(self.cmap_dim))
        return x


class Discriminator(torch.nn.Module):
    """StyleGAN2 discriminator: blocks ``b{res}`` from ``img_resolution`` down to 8, then the 4x4 epilogue ``b4``.

    With labels (``c_dim > 0``) a ``mapping`` network embeds c into ``cmap`` and the output is a projection.
    """

    def __init__(
        self,
        c_dim: int,
        img_resolution: int,
        img_channels: int,
        architecture: str = "resnet",
        channel_base: int = 32768,
        channel_max: int = 512,
        num_fp16_res: int = 0,
        conv_clamp: float | None = None,
        cmap_dim: int | None = None,
        block_kwargs: dict | None = None,
        mapping_kwargs: dict | None = None,
        epilogue_kwargs: dict | None = None,
    ) -> None:
        if img_resolution < 4 or img_resolution & (img_resolution - 1):
            raise ConfigError(f"image resolution must be a power of two >= 4, got {img_resolution}")
        super().__init__()
        self.c_dim = c_dim
        self.img_resolution = img_resolution
        self.img_resolution_log2 = int(math.log2(img_resolution))
        self.img_channels = img_channels
        self.block_resolutions = [2**i for i in range(self.img_resolution_log2, 2, -1)]
        fp16_resolution = _fp16_resolution(self.img_resolution_log2, num_fp16_res)

        channels_at_4 = _channels(4, channel_base, channel_max)
        if c_dim == 0:
            cmap_dim = 0
        elif cmap_dim is None:
            cmap_dim = channels_at_4

        common = dict(img_channels=img_channels, architecture=architecture, conv_clamp=conv_clamp)
        layer_idx = 0
        for res in self.block_resolutions:
            tmp_channels = _channels(res, channel_base, channel_max)
            block = DiscriminatorBlock(
                tmp_channels if res < img_resolution else 0,
                tmp_channels,
                _channels(res // 2, channel_base, channel_max),
                resolution=res,
                first_layer_idx=layer_idx,
                use_fp16=res >= fp16_resolution,
                **(block_kwargs or {}),
                **common,
            )
            setattr(self, f"b{res}", block)
            layer_idx += block.num_layers
        if c_dim > 0:
            self.mapping = MappingNetwork(
                z_dim=0, c_dim=c_dim, w_dim=cmap_dim, num_ws=None, w_avg_beta=None, **(mapping_kwargs or {})
            )
        self.b4 = DiscriminatorEpilogue(
            channels_at_4, cmap_dim=cmap_dim, resolution=4, **(epilogue_kwargs or {}), **common
        )

    def forward(self, img: torch.Tensor, c: torch.Tensor | None, force_fp32: bool = False) -> torch.Tensor:
        """Return ``[N, 1]`` float32 logits (real > 0) for ``[N, img_channels, R, R]`` images."""
        x = None
        for res in self.block_resolutions:
            x, img = getattr(self, f"b{res}")(x, img, force_fp32=force_fp32)
        cmap = self.mapping(None, c) if self.c_dim > 0 else None
        return self.b4(x, img, cmap)


# ---------------------------------------------------------------------------------------------------------------------
# The study's configuration


def build_networks(
    resolution: int,
    channels: int,
    z_dim: int = 512,
    w_dim: int = 512,
    mapping_layers: int = 8,
    channel_base: int = 32768,
    channel_max: int = 512,
    num_fp16_res: int = 4,
    conv_clamp: float | None = 256,
    mbstd_group: int | None = 4,
    c_dim: int = 0,
) -> tuple[Generator, Discriminator]:
    """G and D as stylegan2-ada-pytorch ``train.py --cfg stylegan2`` builds them (the defaults are that config).

    That config leaves every other constructor argument at its default: G 'skip', D 'resnet', mapping
    lr_multiplier 0.01, w_avg_beta 0.995, FIR filter [1, 3, 3, 1], one minibatch-std feature. ``channels`` is the
    number of image channels (1 for the study's grayscale images). Both networks come in training mode with
    gradients enabled; the training loop decides which of them to freeze.
    """
    if resolution < 4 or resolution & (resolution - 1):
        raise ConfigError(f"model resolution must be a power of two >= 4 (e.g. 256), got {resolution}")
    if channels < 1:
        raise ConfigError(f"image channels must be >= 1 (1 = grayscale, 3 = RGB), got {channels}")
    G = Generator(
        z_dim=z_dim,
        c_dim=c_dim,
        w_dim=w_dim,
        img_resolution=resolution,
        img_channels=channels,
        mapping_kwargs=dict(num_layers=mapping_layers),
        synthesis_kwargs=dict(
            channel_base=channel_base, channel_max=channel_max, num_fp16_res=num_fp16_res, conv_clamp=conv_clamp
        ),
    )
    D = Discriminator(
        c_dim=c_dim,
        img_resolution=resolution,
        img_channels=channels,
        channel_base=channel_base,
        channel_max=channel_max,
        num_fp16_res=num_fp16_res,
        conv_clamp=conv_clamp,
        epilogue_kwargs=dict(mbstd_group_size=mbstd_group),
    )
    return G, D

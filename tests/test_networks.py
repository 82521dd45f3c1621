"""StyleGAN2 ops and networks (fidmed.gan.ops, fidmed.gan.networks).

Pinned constants were measured by instantiating stylegan2-ada-pytorch at commit
d72cc7d041b42ec8e806021a205ed9349f87c6a4 (training/networks.py) on CPU with the kwargs stated next to them, the
way train.py --cfg stylegan2 builds G and D: Generator(z_dim, c_dim, w_dim, img_resolution, img_channels,
mapping_kwargs=dict(num_layers=...), synthesis_kwargs=dict(channel_base, channel_max, num_fp16_res=4,
conv_clamp=256)) and Discriminator(c_dim, img_resolution, img_channels, channel_base, channel_max, num_fp16_res=4,
conv_clamp=256, epilogue_kwargs=dict(mbstd_group_size=4)); counts are sum(p.numel() for p in net.parameters()).
Outputs of these classes were also compared with the reference's on CPU during development: equal bit for bit
(max abs difference 0) for every architecture, train/eval, noise mode, with labels, fp16 code paths and at the
study size (256 and 512).
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest
import scipy.signal
import torch
import torch.nn.functional as F

from fidmed.errors import ConfigError
from fidmed.gan import ops
from fidmed.gan.networks import (
    Discriminator,
    Generator,
    MinibatchStdLayer,
    build_networks,
    modulated_conv2d,
)

# ---------------------------------------------------------------------------------------------------------------------
# Helpers


pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def tiny_generator(arch: str = "skip", c_dim: int = 0, channels: int = 1, res: int = 16, fp16_res: int = 0):
    return Generator(
        z_dim=32,
        c_dim=c_dim,
        w_dim=32,
        img_resolution=res,
        img_channels=channels,
        mapping_kwargs=dict(num_layers=2),
        synthesis_kwargs=dict(
            channel_base=512, channel_max=32, architecture=arch, num_fp16_res=fp16_res, conv_clamp=256
        ),
    )


def tiny_discriminator(arch: str = "resnet", c_dim: int = 0, channels: int = 1, res: int = 16, fp16_res: int = 0):
    return Discriminator(
        c_dim=c_dim,
        img_resolution=res,
        img_channels=channels,
        architecture=arch,
        channel_base=512,
        channel_max=32,
        num_fp16_res=fp16_res,
        conv_clamp=256,
        mapping_kwargs=dict(num_layers=2),
        epilogue_kwargs=dict(mbstd_group_size=4),
    )


def set_noise_strength(G: Generator, value: float) -> None:
    """noise_strength starts at zero, which would hide the noise; give it a value."""
    with torch.no_grad():
        for name, p in G.named_parameters():
            if name.endswith("noise_strength"):
                p.fill_(value)


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def state_dict_key_hash(module: torch.nn.Module) -> str:
    lines = sorted(f"{k}:{list(v.shape)}" for k, v in module.state_dict().items())
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------------------------------
# Ops: upfirdn2d family against scipy


def upfirdn2d_numpy(x, f, up, down, pad, flip_filter=False, gain=1.0):
    """Direct computation: zero-stuff, pad/crop, scipy 'valid' convolution, decimate (per image, float64)."""
    upx, upy = up
    downx, downy = down
    px0, px1, py0, py1 = pad
    n, c, h, w = x.shape
    out = []
    for img in x.reshape(n * c, h, w):
        stuffed = np.zeros((h * upy, w * upx))
        stuffed[::upy, ::upx] = img
        padded = np.pad(stuffed, ((max(py0, 0), max(py1, 0)), (max(px0, 0), max(px1, 0))))
        padded = padded[max(-py0, 0) : padded.shape[0] - max(-py1, 0), max(-px0, 0) : padded.shape[1] - max(-px1, 0)]
        filt = f * gain
        if flip_filter:
            res = scipy.signal.correlate2d(padded, filt, mode="valid")
        else:
            res = scipy.signal.convolve2d(padded, filt, mode="valid")
        out.append(res[::downy, ::downx])
    return np.stack(out).reshape(n, c, *out[0].shape)


@pytest.mark.parametrize(
    "up,down,pad,flip_filter,gain",
    [
        ((1, 1), (1, 1), (0, 0, 0, 0), False, 1.0),
        ((2, 2), (1, 1), (2, 1, 2, 1), False, 4.0),
        ((1, 1), (2, 2), (1, 1, 1, 1), True, 1.0),
        ((3, 2), (2, 1), (1, -1, 3, 0), False, 2.5),
        ((2, 2), (2, 2), (-1, 2, 0, 1), True, 1.0),
    ],
)
def test_upfirdn2d_matches_scipy(up, down, pad, flip_filter, gain):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 7, 9))
    f = rng.standard_normal((3, 4))  # asymmetric, so a flip would be caught
    got = ops.upfirdn2d(
        torch.tensor(x, dtype=torch.float32),
        torch.tensor(f, dtype=torch.float32),
        up=list(up),
        down=list(down),
        padding=list(pad),
        flip_filter=flip_filter,
        gain=gain,
    )
    expected = upfirdn2d_numpy(x, f, up, down, pad, flip_filter, gain)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-5)


def test_separable_filter_equals_its_outer_product():
    taps = [1.0, 2.0, 5.0, 3.0, 3.0, 1.0, 4.0, 2.0]  # >= 8 taps: setup_filter keeps it separable
    sep = ops.setup_filter(taps)
    full = ops.setup_filter(taps, separable=False)
    assert sep.ndim == 1 and full.ndim == 2
    torch.testing.assert_close(full, torch.outer(sep, sep))
    x = torch.randn(2, 2, 12, 10)
    torch.testing.assert_close(ops.upsample2d(x, sep), ops.upsample2d(x, full), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ops.downsample2d(x, sep), ops.downsample2d(x, full), rtol=1e-5, atol=1e-5)


def test_setup_filter_stylegan_default():
    f = ops.setup_filter([1, 3, 3, 1])
    expected = np.outer([1, 3, 3, 1], [1, 3, 3, 1]) / 64.0
    np.testing.assert_array_equal(f.numpy(), expected.astype(np.float32))
    taps = torch.tensor([1.0, 3.0, 3.0, 1.0])
    ops.setup_filter(taps)
    assert taps.tolist() == [1.0, 3.0, 3.0, 1.0], "setup_filter must not modify its argument"


def test_resampling_sizes_and_unit_dc_gain():
    f = ops.setup_filter([1, 3, 3, 1])
    x = torch.full([1, 1, 8, 8], 2.5)
    up = ops.upsample2d(x, f)
    down = ops.downsample2d(x, f)
    same = ops.filter2d(x, f)
    assert up.shape[-2:] == (16, 16) and down.shape[-2:] == (4, 4) and same.shape[-2:] == (8, 8)
    # Away from the zero-padded border a constant image stays constant.
    torch.testing.assert_close(up[..., 4:-4, 4:-4], torch.full_like(up[..., 4:-4, 4:-4], 2.5))
    torch.testing.assert_close(down[..., 1:-1, 1:-1], torch.full_like(down[..., 1:-1, 1:-1], 2.5))
    torch.testing.assert_close(same[..., 2:-2, 2:-2], torch.full_like(same[..., 2:-2, 2:-2], 2.5))


@pytest.mark.parametrize("up,down,k", [(2, 1, 3), (1, 2, 3), (2, 1, 1), (1, 2, 1), (1, 1, 3)])
@pytest.mark.parametrize("flip_weight", [True, False])
def test_conv2d_resample_equals_explicit_pipeline(up, down, k, flip_weight):
    """Each fast path equals the plain definition: zero-stuff, pad, FIR filter -> conv -> FIR filter, decimate.

    The padding (conv padding plus what centres the filter) is applied once, to the upsampled input.
    """
    f = ops.setup_filter([1, 3, 3, 1])
    fw = 4
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    w = torch.randn(5, 4, k, k, dtype=torch.float64)
    p = k // 2
    got = ops.conv2d_resample(x, w, f=f, up=up, down=down, padding=p, flip_weight=flip_weight)

    kernel = w if flip_weight else w.flip([2, 3])  # F.conv2d correlates
    if up > 1:
        before, after = p + (fw + up - 1) // 2, p + (fw - up) // 2
        y = upfirdn2d_torch_via_numpy(x, f, up=up, pad=[before, after, before, after], gain=up**2)
        expected = F.conv2d(y, kernel)
    elif down > 1:
        before, after = p + (fw - down + 1) // 2, p + (fw - down) // 2
        y = F.conv2d(F.pad(x, [before, after, before, after]), kernel)
        expected = upfirdn2d_torch_via_numpy(y, f, down=down, pad=[0, 0, 0, 0])
    else:
        expected = F.conv2d(x, kernel, padding=p)
    assert got.shape == expected.shape == (2, 5, 8 * up // down, 8 * up // down)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


def upfirdn2d_torch_via_numpy(x, f, up=1, down=1, pad=(0, 0, 0, 0), gain=1.0):
    out = upfirdn2d_numpy(x.numpy(), f.numpy().astype(np.float64), (up, up), (down, down), pad, gain=gain)
    return torch.from_numpy(out)


def test_fma():
    a, b, c = torch.randn(3, 1, 4), torch.randn(1, 5, 4), torch.randn(3, 5, 1)
    torch.testing.assert_close(ops.fma(a, b, c), a * b + c)


# ---------------------------------------------------------------------------------------------------------------------
# Ops: bias_act


def test_activation_table_gains():
    # Default gains and alphas of stylegan2-ada-pytorch's bias_act.activation_funcs.
    expected = {
        "linear": 1.0,
        "relu": math.sqrt(2),
        "lrelu": math.sqrt(2),
        "tanh": 1.0,
        "sigmoid": 1.0,
        "elu": 1.0,
        "selu": 1.0,
        "softplus": 1.0,
        "swish": math.sqrt(2),
    }
    assert {name: spec.default_gain for name, spec in ops.ACTIVATIONS.items()} == expected
    assert ops.ACTIVATIONS["lrelu"].default_alpha == 0.2
    with pytest.raises(ValueError, match="lrelu"):
        ops.bias_act(torch.zeros(1), act="leaky")


def test_bias_act_lrelu_gain_and_clamp():
    x = torch.linspace(-1000, 1000, 61).reshape(1, 61, 1) * torch.ones(2, 61, 3)
    b = torch.randn(61)
    got = ops.bias_act(x, b, dim=1, act="lrelu", clamp=256)
    pre = x.numpy() + b.numpy()[None, :, None]
    expected = np.clip(np.where(pre > 0, pre, 0.2 * pre) * math.sqrt(2), -256, 256)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-6, atol=1e-4)
    assert got.max().item() == 256 and got.min().item() == -256  # both bounds are reached
    # Explicit gain, no clamp; linear keeps values.
    torch.testing.assert_close(ops.bias_act(x, None, act="linear", gain=3.0), x * 3.0)
    with pytest.raises(ValueError):
        ops.bias_act(x, b, clamp=-1)


def test_bias_act_is_twice_differentiable():
    x = torch.randn(4, 3, requires_grad=True)
    y = ops.bias_act(x, torch.randn(3), act="swish", clamp=2.0)
    (g,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    g.sum().backward()
    assert torch.isfinite(x.grad).all()


# ---------------------------------------------------------------------------------------------------------------------
# Modulated convolution and minibatch std against direct computations


@pytest.mark.parametrize("demodulate", [True, False])
@pytest.mark.parametrize("fused", [True, False])
def test_modulated_conv2d_matches_per_sample_conv(demodulate, fused):
    torch.manual_seed(0)
    x = torch.randn(3, 4, 6, 6)
    weight = torch.randn(5, 4, 3, 3)
    styles = torch.randn(3, 4)
    noise = torch.randn(3, 1, 6, 6)
    got = modulated_conv2d(x, weight, styles, noise=noise, padding=1, demodulate=demodulate, fused_modconv=fused)
    expected = []
    for n in range(3):
        wn = weight * styles[n].reshape(1, 4, 1, 1)
        if demodulate:
            wn = wn / (wn.square().sum(dim=[1, 2, 3], keepdim=True) + 1e-8).sqrt()
        expected.append(F.conv2d(x[n : n + 1], wn, padding=1) + noise[n : n + 1])
    torch.testing.assert_close(got, torch.cat(expected), rtol=1e-4, atol=1e-4)


def test_minibatch_std_matches_numpy():
    x = torch.randn(8, 6, 4, 4)
    got = MinibatchStdLayer(group_size=4, num_channels=2)(x)
    assert got.shape == (8, 8, 4, 4)
    xn = x.numpy().astype(np.float64)
    for i in range(8):
        group = xn[i % 2 :: 2]  # sample i is grouped with samples of the same index modulo N / G
        for f in range(2):
            chans = group[:, 3 * f : 3 * f + 3]
            std = np.sqrt(chans.var(axis=0) + 1e-8).mean()
            np.testing.assert_allclose(got[i, 6 + f].numpy(), np.full((4, 4), std), rtol=1e-5)
    with pytest.raises(ConfigError, match="multiple of the group size"):
        MinibatchStdLayer(group_size=4)(torch.randn(6, 2, 4, 4))


# ---------------------------------------------------------------------------------------------------------------------
# Networks: structure pinned to the reference

# build_networks(res, channels) with the study's defaults (z = w = 512, 8 mapping layers, channel_base 32768,
# channel_max 512): (G parameters, D parameters) of the reference classes.
STUDY_PARAM_COUNTS = {
    (256, 1): (30028436, 28863873),
    (512, 1): (30270551, 28982721),
    (1024, 1): (30363962, 29012449),
    (256, 3): (30034338, 28864129),
    (512, 3): (30276583, 28982849),
    (1024, 3): (30370060, 29012513),
}


@pytest.mark.parametrize("resolution,channels", sorted(STUDY_PARAM_COUNTS))
def test_study_parameter_counts(resolution, channels):
    G, D = build_networks(resolution, channels)
    assert (n_params(G), n_params(D)) == STUDY_PARAM_COUNTS[(resolution, channels)]


# Small config: resolution 32, 1 channel, z = w = 512, 2 mapping layers, channel_base 4096, channel_max 128,
# num_fp16_res 4, conv_clamp 256, mbstd group 4 (and mapping num_layers=2 for D's label mapping when c_dim > 0).
# Value: (parameter count, sha256 of the sorted lines "name:[shape]" over the state_dict, joined by "\n").
SMALL_REFERENCE = {
    ("G", "orig", 0): (2085896, "a72a4f6df70b7a0ca3824116b1f8e173bf7ae043e787956d59870899d6e5871a"),
    ("G", "orig", 3): (2350088, "e066b8994b14761ed245ac26886b206d344c5ea09824cae9123c3e8a39a68a71"),
    ("G", "skip", 0): (2283275, "610697ab7ab81cc5e8ef7b4c1fc116ac7ef4b6fd77e8b5015b78d0cc0accf420"),
    ("G", "skip", 3): (2547467, "d2796fd37a9d0dd9847f7d46d076083cb8530e236bb1f3dd23524b2060b74a89"),
    ("G", "resnet", 0): (2135048, "5323389e403ffc80a9692a827229ee14b9ec3f838521a60bb4d48ac6327b8136"),
    ("G", "resnet", 3): (2399240, "8e6af39d2517c5075bb536cbbe1a1babf1705a7a5fbd8115e30c9069c480bfb7"),
    ("D", "orig", 0): (1296897, "83140e403ef366adf9af05fd910d0471261df9d348a16499695b1007b7f5caa5"),
    ("D", "orig", 3): (1346816, "5f1bfd35b74a2d3ef826b3c0de8878b14dc17ae9dd2501750bafd653c6e1ba69"),
    ("D", "skip", 0): (1297665, "c00962c3211ebb0cf34a1011426fef6a34b82d1e8cb39a20097665f287d0ae78"),
    ("D", "skip", 3): (1347584, "4ca271fb8fdbcb049404d9cc2ebaed896ec7e086f8b40a9c982fa8c2bfb32d5f"),
    ("D", "resnet", 0): (1346049, "3bb8ef58abd3c7e17aafc5759cc15c4fb282cc5d3baf53fb18d95547fc908dc3"),
    ("D", "resnet", 3): (1395968, "976d57aab6f14b41048bc8f3fbd8b0ca9f321e0a8e71f035b456ae548412b31b"),
}


@pytest.mark.parametrize("net,arch,c_dim", sorted(SMALL_REFERENCE))
def test_small_config_state_dict_matches_reference(net, arch, c_dim):
    if net == "G":
        module = Generator(
            z_dim=512,
            c_dim=c_dim,
            w_dim=512,
            img_resolution=32,
            img_channels=1,
            mapping_kwargs=dict(num_layers=2),
            synthesis_kwargs=dict(
                channel_base=4096, channel_max=128, num_fp16_res=4, conv_clamp=256, architecture=arch
            ),
        )
    else:
        module = Discriminator(
            c_dim=c_dim,
            img_resolution=32,
            img_channels=1,
            architecture=arch,
            channel_base=4096,
            channel_max=128,
            num_fp16_res=4,
            conv_clamp=256,
            mapping_kwargs=dict(num_layers=2),
            epilogue_kwargs=dict(mbstd_group_size=4),
        )
    count, key_hash = SMALL_REFERENCE[(net, arch, c_dim)]
    assert n_params(module) == count
    assert state_dict_key_hash(module) == key_hash


def test_build_networks_is_the_study_recipe():
    G, D = build_networks(32, 1, channel_base=4096, channel_max=128, mapping_layers=2)
    assert n_params(G) == SMALL_REFERENCE[("G", "skip", 0)][0]
    assert n_params(D) == SMALL_REFERENCE[("D", "resnet", 0)][0]
    assert state_dict_key_hash(G) == SMALL_REFERENCE[("G", "skip", 0)][1]
    assert state_dict_key_hash(D) == SMALL_REFERENCE[("D", "resnet", 0)][1]
    assert G.mapping.fc0.bias_gain == 0.01 and D.b4.mbstd.group_size == 4 and D.b4.mbstd.num_channels == 1
    assert G.synthesis.b32.use_fp16 and G.synthesis.b8.use_fp16 and not G.synthesis.b4.use_fp16
    assert G.synthesis.b32.conv1.conv_clamp == 256 and D.b32.conv0.conv_clamp == 256
    with pytest.raises(ConfigError, match="power of two"):
        build_networks(48, 1)


def test_state_dict_transfers_between_instances():
    a, b = tiny_generator(), tiny_generator()
    b.load_state_dict(a.state_dict())
    a.eval(), b.eval()
    z = torch.randn(2, 32)
    torch.testing.assert_close(a(z, None, noise_mode="const"), b(z, None, noise_mode="const"), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------------------
# Networks: behaviour


@pytest.mark.parametrize("arch", ["orig", "skip", "resnet"])
@pytest.mark.parametrize("c_dim,channels", [(0, 1), (3, 3)])
@pytest.mark.parametrize("training", [False, True])
def test_output_shapes(arch, c_dim, channels, training):
    G = tiny_generator(arch, c_dim, channels).train(training)
    D = tiny_discriminator(arch, c_dim, channels).train(training)
    z = torch.randn(4, 32)
    c = torch.randn(4, c_dim) if c_dim else None
    img = G(z, c)
    assert img.shape == (4, channels, 16, 16) and img.dtype == torch.float32
    assert torch.isfinite(img).all()
    logits = D(img, c)
    assert logits.shape == (4, 1) and logits.dtype == torch.float32 and torch.isfinite(logits).all()


def test_fused_and_unfused_modconv_agree():
    G = tiny_generator("skip").eval()
    set_noise_strength(G, 0.3)
    z = torch.randn(3, 32)
    fused = G(z, None, noise_mode="const", fused_modconv=True)
    unfused = G(z, None, noise_mode="const", fused_modconv=False)
    torch.testing.assert_close(fused, unfused, rtol=1e-4, atol=1e-4)


def test_noise_modes():
    G = tiny_generator().eval()
    set_noise_strength(G, 0.5)
    z = torch.randn(2, 32)
    const_a = G(z, None, noise_mode="const")
    const_b = G(z, None, noise_mode="const")
    assert torch.equal(const_a, const_b)
    random_a = G(z, None, noise_mode="random")
    random_b = G(z, None, noise_mode="random")
    none = G(z, None, noise_mode="none")
    assert not torch.allclose(random_a, random_b)
    assert not torch.allclose(const_a, none)
    with pytest.raises(ValueError, match="noise_mode"):
        G(z, None, noise_mode="fixed")


def test_truncation():
    G = tiny_generator().eval()
    with torch.no_grad():
        G.mapping.w_avg.copy_(torch.randn(32))
    z = torch.randn(3, 32)
    ws = G.mapping(z, None, truncation_psi=0)
    torch.testing.assert_close(ws, G.mapping.w_avg.expand(3, G.num_ws, 32))
    # psi = 0.5 halves the distance to w_avg; a cutoff leaves the later ws alone.
    full = G.mapping(z, None)
    half = G.mapping(z, None, truncation_psi=0.5, truncation_cutoff=2)
    torch.testing.assert_close(half[:, :2], G.mapping.w_avg + 0.5 * (full[:, :2] - G.mapping.w_avg))
    torch.testing.assert_close(half[:, 2:], full[:, 2:])
    # psi = 0: every z gives the same image.
    img = G(z, None, truncation_psi=0, noise_mode="const")
    torch.testing.assert_close(img, img[:1].expand_as(img))


def test_w_avg_tracks_the_mean_of_w_in_training():
    G = tiny_generator().train()
    z = torch.randn(5, 32)
    w_avg0 = torch.randn(32)
    with torch.no_grad():
        G.mapping.w_avg.copy_(w_avg0)
        w = G.mapping(z, None, skip_w_avg_update=True)[:, 0]
    assert torch.equal(G.mapping.w_avg, w_avg0)
    G.mapping(z, None)
    torch.testing.assert_close(G.mapping.w_avg, w.mean(0) + 0.995 * (w_avg0 - w.mean(0)))
    G.eval()
    G.mapping(z, None)
    torch.testing.assert_close(G.mapping.w_avg, w.mean(0) + 0.995 * (w_avg0 - w.mean(0)))


def test_fp16_blocks_run_in_float32_on_cpu():
    G = tiny_generator(fp16_res=2).eval()
    D = tiny_discriminator(fp16_res=2)
    assert G.synthesis.b16.use_fp16 and D.b16.use_fp16
    dtypes = []
    G.synthesis.b16.conv1.register_forward_hook(lambda module, inputs, output: dtypes.append(output.dtype))
    D.b16.conv1.register_forward_hook(lambda module, inputs, output: dtypes.append(output.dtype))
    z = torch.randn(4, 32)
    img = G(z, None, noise_mode="const")
    assert torch.equal(img, G(z, None, noise_mode="const", force_fp32=True))
    assert torch.equal(D(img, None), D(img, None, force_fp32=True))
    assert dtypes == [torch.float32] * 4


def test_discriminator_and_generator_are_differentiable_twice():
    G, D = tiny_generator(), tiny_discriminator(arch="resnet")
    img = G(torch.randn(4, 32), None).detach().requires_grad_(True)
    (g,) = torch.autograd.grad(D(img, None).sum(), img, create_graph=True)
    g.square().sum().backward()
    without_grad = {name for name, p in D.named_parameters() if p.grad is None}
    assert without_grad == {"b4.out.bias"}  # the only parameter that cannot change dD/dimg
    assert all(torch.isfinite(p.grad).all() for p in D.parameters() if p.grad is not None)
    # Biases after the last nonlinearity that is not piecewise linear (minibatch std) legitimately get zero.
    assert all(p.grad.abs().sum() > 0 for name, p in D.named_parameters() if name.endswith("weight"))


def test_bad_architecture_is_a_config_error():
    with pytest.raises(ConfigError, match="architecture"):
        tiny_generator(arch="unet")
    with pytest.raises(ConfigError, match="architecture"):
        tiny_discriminator(arch="unet")


# Outputs of the reference classes, measured with stylegan2-ada-pytorch (commit above) on CPU: torch.manual_seed(0),
# then the same Generator/Discriminator kwargs as tiny_generator/tiny_discriminator with the given architectures,
# G.eval(), every noise_strength filled with 0.1, z = torch.randn(4, 32), img = G(z, None, noise_mode='const'),
# logits = D(img, None). Because parameters are created in the reference's order, the same seed gives the same
# initial weights here. Values: (sum of img in float64, img[0, 0, 0, :3], logits).
REFERENCE_OUTPUTS = {
    ("skip", "resnet"): (
        203.1534692645073,
        [0.8945046067237854, 1.2532153129577637, 1.3533152341842651],
        [-2.5620687007904053, -2.0752508640289307, -1.1938905715942383, -0.652716875076294],
    ),
    ("orig", "orig"): (
        25.262813583409297,
        [-0.09201588481664658, 0.02525646798312664, -0.04561696946620941],
        [-0.06596817821264267, -0.07219058275222778, -0.11776813119649887, -0.02233174443244934],
    ),
    ("resnet", "skip"): (
        237.7932849387289,
        [0.21252237260341644, 0.35128453373908997, 0.6465063095092773],
        [0.18216553330421448, -0.019404426217079163, 0.803268313407898, -0.1348342001438141],
    ),
}


@pytest.mark.parametrize("arch_g,arch_d", sorted(REFERENCE_OUTPUTS))
def test_outputs_equal_the_reference(arch_g, arch_d):
    torch.manual_seed(0)
    G = tiny_generator(arch_g).eval()
    D = tiny_discriminator(arch_d)
    set_noise_strength(G, 0.1)
    z = torch.randn(4, 32)
    with torch.no_grad():
        img = G(z, None, noise_mode="const")
        logits = D(img, None)
    img_sum, first_pixels, expected_logits = REFERENCE_OUTPUTS[(arch_g, arch_d)]
    # Tolerances allow for a different CPU's float32 summation order; on the measuring machine they are equal.
    assert img.double().sum().item() == pytest.approx(img_sum, rel=1e-5)
    np.testing.assert_allclose(img[0, 0, 0, :3].numpy(), first_pixels, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(logits.flatten().numpy(), expected_logits, rtol=1e-5, atol=1e-6)

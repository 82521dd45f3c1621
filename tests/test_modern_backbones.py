"""dgm-eval's extras, ``dinov2`` and ``clip``: resizer, checkpoint layouts and features against independent code.

- ``pil_bicubic`` equals torchvision ``Resize((S, S), BICUBIC)`` on the PIL image (dgm-eval's default) bit for bit.
- The hub DINOv2's run-time position-embedding interpolation (scale factor (g + 0.1)/M, bicubic, no antialias) is
  checked against a float64 NumPy bicubic written here from PyTorch's documented sampling convention.
- DINOv2: a fake ``dinov2_vitl14_pretrain.pth`` (hub key names, 37 x 37 position embeddings, ``mask_token``) loads,
  and the features equal timm's forward (final norm, CLS token) with the NumPy-interpolated embeddings.
- CLIP: a fake ``open_clip_pytorch_model.bin`` (open_clip key names, text tower included) loads, and the features
  equal a plain-torch forward of the open_clip image tower written here (dgm-eval's ``CLIPEncoder.forward`` with
  depth=0: ``ln_post`` of the CLS token, no projection).
Random weights only, no network.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from PIL import Image

from fidmed.errors import FidmedError
from fidmed.features.extractors.dgm_eval import interpolate_pos_embed_like_hub
from fidmed.features.preprocess import Preprocessing, preprocess
from fidmed.features.registry import build_extractor, extractor_setup

from conftest import extractor_cfg

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
# open_clip's OPENAI_DATASET_MEAN / _STD (open_clip/constants.py), which dgm-eval's clip.py writes out.
CLIP_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
CLIP_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)


_cfg = extractor_cfg


def _randomise(state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Random weights with norm scales and layer-scale gammas far from their init, so every term matters."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, t in state.items():
        if t.ndim == 0:  # open_clip's logit_scale
            out[k] = t.clone()
        elif t.ndim == 1 and k.endswith(("weight", "gamma")):
            out[k] = 0.5 + torch.rand(t.shape, generator=g)
        elif t.ndim == 1:
            out[k] = 0.2 * (torch.rand(t.shape, generator=g) - 0.5)
        else:
            out[k] = torch.randn(t.shape, generator=g) * (1.0 / t[0].numel()) ** 0.5
    return out


def _images(n: int, size: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=g).float()


def _close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> None:
    assert a.shape == b.shape
    err = (a - b).abs().max().item() / b.abs().max().item()
    assert err <= rel, f"max relative error {err:.3g}"


# ------------------------------------------------------------------------------------------------ resizer
@pytest.mark.parametrize("h,w,s", [(300, 257, 224), (97, 131, 224), (40, 40, 61)])
def test_pil_bicubic_equals_torchvision_resize_bitwise(h, w, s) -> None:
    from torchvision import transforms as T

    g = torch.Generator().manual_seed(h)
    rgb = torch.randint(0, 256, (1, 3, h, w), generator=g, dtype=torch.uint8)
    gray = torch.randint(0, 256, (1, 1, h, w), generator=g, dtype=torch.uint8)
    resize = T.Resize((s, s), interpolation=T.InterpolationMode.BICUBIC)  # dgm-eval's, on a PIL image
    for x in (rgb, gray):
        pil = Image.fromarray(
            x[0].permute(1, 2, 0).numpy().squeeze(-1) if x.shape[1] == 1 else x[0].permute(1, 2, 0).numpy()
        ).convert("RGB")  # dgm-eval's loader
        want = T.ToTensor()(resize(pil))  # what dgm-eval feeds Normalize
        got = preprocess(x, Preprocessing("pil_bicubic", s))
        assert got.shape == (1, 3, s, s)
        assert torch.equal(got[0] / 255.0, want)  # bit-exact after ToTensor's division
        assert torch.equal(got, got.round())  # PIL's 8-bit resampling: integer values


# ------------------------------------------------------------------------------------------------ DINOv2
def _bicubic_matrix(m: int, g: int, scale: float) -> np.ndarray:
    """[g, m] weights of PyTorch's bicubic (align_corners=False, a=-0.75, edge-clamped) for a given scale factor.

    Output cell i samples the input at (i + 0.5) / scale - 0.5 (PyTorch uses 1/scale_factor when one is given).
    """
    a = -0.75

    def cubic(t: float) -> float:
        t = abs(t)
        if t <= 1:
            return (a + 2) * t**3 - (a + 3) * t**2 + 1
        if t < 2:
            return a * t**3 - 5 * a * t**2 + 8 * a * t - 4 * a
        return 0.0

    w = np.zeros((g, m))
    for i in range(g):
        src = (i + 0.5) / scale - 0.5
        x0 = math.floor(src)
        for j in range(x0 - 1, x0 + 3):
            w[i, min(max(j, 0), m - 1)] += cubic(src - j)
    return w


def _hub_pos_embed_numpy(pos: torch.Tensor, grid: int, offset: float = 0.1) -> torch.Tensor:
    """The hub's interpolate_pos_encoding, in float64 NumPy (separable bicubic)."""
    p = pos[0].double().numpy()
    m = int(round(math.sqrt(p.shape[0] - 1)))
    wmat = _bicubic_matrix(m, grid, (grid + offset) / m)
    patch = p[1:].reshape(m, m, -1)
    out = np.einsum("ik,jl,klc->ijc", wmat, wmat, patch).reshape(grid * grid, -1)
    return torch.from_numpy(np.concatenate([p[:1], out], 0)[None]).float()


def test_hub_pos_embed_interpolation() -> None:
    g = torch.Generator().manual_seed(0)
    pos = torch.randn(1, 1 + 37 * 37, 8, generator=g)
    got = interpolate_pos_embed_like_hub(pos, 16)
    assert got.shape == (1, 257, 8)
    _close(got, _hub_pos_embed_numpy(pos, 16), rel=1e-5)
    # the 0.1 offset matters: interpolating to size=16 (timm's resampling) gives other embeddings
    by_size = F.interpolate(pos[:, 1:].reshape(1, 37, 37, 8).permute(0, 3, 1, 2), size=(16, 16), mode="bicubic")
    assert (got[:, 1:] - by_size.permute(0, 2, 3, 1).reshape(1, 256, 8)).abs().max() > 1e-2
    assert got is not None and interpolate_pos_embed_like_hub(pos, 37) is pos  # the hub's no-op case


def _dinov2_hub_checkpoint(depth: int, seed: int) -> dict[str, torch.Tensor]:
    """Random weights under the hub's key names (the same as timm's), 518 px position embeddings, mask_token."""
    import timm

    net = timm.create_model("vit_large_patch14_dinov2", pretrained=False, num_classes=0, img_size=518, depth=depth)
    state = _randomise(net.state_dict(), seed)
    state["mask_token"] = torch.randn(1, 1024, generator=torch.Generator().manual_seed(seed))
    for key in (
        "cls_token",
        "pos_embed",
        "mask_token",
        "patch_embed.proj.weight",
        "blocks.0.attn.qkv.weight",
        "blocks.0.ls1.gamma",
        "blocks.0.ls2.gamma",
        "blocks.0.mlp.fc1.weight",
        "norm.weight",
    ):
        assert key in state  # names of dinov2's DinoVisionTransformer (hub checkpoint, block_chunks=0)
    assert state["pos_embed"].shape == (1, 1 + 37 * 37, 1024)
    return state


def _check_dinov2(depth: int, tmp_path: Path) -> None:
    import timm

    ckpt = _dinov2_hub_checkpoint(depth, seed=1)
    path = tmp_path / "dinov2_vitl14_pretrain.pth"
    torch.save(ckpt, path)
    ours = build_extractor(_cfg("dinov2", path, depth=depth), weights_dir=tmp_path)
    ref = timm.create_model(
        "vit_large_patch14_dinov2", pretrained=False, num_classes=0, img_size=224, depth=depth
    ).eval()
    ref_state = {k: v for k, v in ckpt.items() if k != "mask_token"}
    ref_state["pos_embed"] = _hub_pos_embed_numpy(ckpt["pos_embed"], 16)
    ref.load_state_dict(ref_state)
    x = _images(1, 224, seed=2)
    with torch.no_grad():
        got = ours(x)
        want = ref.forward_head(ref.forward_features((x / 255.0 - IMAGENET_MEAN) / IMAGENET_STD), pre_logits=True)
    assert got.shape == (1, 1024) and ours.feature_dim == 1024
    _close(got, want, rel=1e-4)  # the reference's embeddings went through float64, ours through float32


def test_dinov2_hub_checkpoint_shallow(tmp_path) -> None:
    """The real code path with 2 of the 24 blocks (the full network is the slow test below)."""
    _check_dinov2(2, tmp_path)


@pytest.mark.slow
def test_dinov2_hub_checkpoint_full_depth(tmp_path) -> None:
    _check_dinov2(24, tmp_path)


def test_dinov2_bad_checkpoints(tmp_path) -> None:
    ckpt = _dinov2_hub_checkpoint(1, seed=3)
    reg = dict(ckpt, register_tokens=torch.zeros(1, 4, 1024))
    torch.save(reg, tmp_path / "reg.pth")
    with pytest.raises(FidmedError, match="register tokens"):
        build_extractor(_cfg("dinov2", tmp_path / "reg.pth", depth=1), weights_dir=tmp_path)
    del ckpt["blocks.0.ls2.gamma"]
    torch.save(ckpt, tmp_path / "trunc.pth")
    with pytest.raises(FidmedError, match="ls2.gamma"):
        build_extractor(_cfg("dinov2", tmp_path / "trunc.pth", depth=1), weights_dir=tmp_path)


# ------------------------------------------------------------------------------------------------ CLIP
def _open_clip_checkpoint(seed: int) -> dict[str, torch.Tensor]:
    """Random open_clip ViT-B-32 weights under open_clip's key names (image tower shapes; part of the text tower)."""
    g = torch.Generator().manual_seed(seed)
    d, hidden, tokens = 768, 3072, 50
    shapes: dict[str, tuple[int, ...]] = {
        "visual.class_embedding": (d,),
        "visual.positional_embedding": (tokens, d),
        "visual.proj": (d, 512),
        "visual.conv1.weight": (d, 3, 32, 32),
        "visual.ln_pre.weight": (d,),
        "visual.ln_pre.bias": (d,),
        "visual.ln_post.weight": (d,),
        "visual.ln_post.bias": (d,),
        # text tower and logit scale: present in the file, ignored by the image feature
        "positional_embedding": (77, 512),
        "token_embedding.weight": (49408, 8),
        "ln_final.weight": (512,),
        "text_projection": (512, 512),
        "logit_scale": (),
        "transformer.resblocks.0.ln_1.weight": (512,),
    }
    for i in range(12):
        b = f"visual.transformer.resblocks.{i}."
        shapes.update(
            {
                b + "ln_1.weight": (d,),
                b + "ln_1.bias": (d,),
                b + "ln_2.weight": (d,),
                b + "ln_2.bias": (d,),
                b + "attn.in_proj_weight": (3 * d, d),
                b + "attn.in_proj_bias": (3 * d,),
                b + "attn.out_proj.weight": (d, d),
                b + "attn.out_proj.bias": (d,),
                b + "mlp.c_fc.weight": (hidden, d),
                b + "mlp.c_fc.bias": (hidden,),
                b + "mlp.c_proj.weight": (d, hidden),
                b + "mlp.c_proj.bias": (d,),
            }
        )
    state = {}
    for k, s in shapes.items():
        if k.endswith(("ln_1.weight", "ln_2.weight", "ln_pre.weight", "ln_post.weight")):
            state[k] = 0.5 + torch.rand(s, generator=g)
        elif len(s) <= 1 and k != "visual.class_embedding":
            state[k] = 0.2 * (torch.rand(s, generator=g) - 0.5)
        else:
            fan_in = s[-1] if k != "visual.conv1.weight" else 3 * 32 * 32
            state[k] = torch.randn(s, generator=g) * (1.0 / fan_in) ** 0.5
    return state


def _open_clip_image_feature(st: dict[str, torch.Tensor], x: torch.Tensor, project: bool = False) -> torch.Tensor:
    """open_clip's VisionTransformer as dgm-eval's CLIPEncoder.forward runs it (depth=0), in plain torch."""
    v = lambda k: st[f"visual.{k}"]  # noqa: E731
    n, d, heads = x.shape[0], 768, 12
    t = F.conv2d(x, v("conv1.weight"), stride=32).flatten(2).transpose(1, 2)  # no bias in open_clip's conv1
    t = torch.cat([v("class_embedding").expand(n, 1, d), t], 1) + v("positional_embedding")
    t = F.layer_norm(t, (d,), v("ln_pre.weight"), v("ln_pre.bias"))  # eps 1e-5 (torch's default, open_clip's)
    for i in range(12):
        b = f"transformer.resblocks.{i}."
        h = F.layer_norm(t, (d,), v(b + "ln_1.weight"), v(b + "ln_1.bias"))
        q, k, val = F.linear(h, v(b + "attn.in_proj_weight"), v(b + "attn.in_proj_bias")).chunk(3, dim=-1)
        split = lambda z: z.reshape(n, -1, heads, d // heads).transpose(1, 2)  # noqa: E731
        att = torch.softmax(split(q) @ split(k).transpose(-1, -2) / math.sqrt(d // heads), dim=-1) @ split(val)
        t = t + F.linear(
            att.transpose(1, 2).reshape(n, -1, d), v(b + "attn.out_proj.weight"), v(b + "attn.out_proj.bias")
        )
        h = F.layer_norm(t, (d,), v(b + "ln_2.weight"), v(b + "ln_2.bias"))
        h = F.linear(
            F.gelu(F.linear(h, v(b + "mlp.c_fc.weight"), v(b + "mlp.c_fc.bias"))),
            v(b + "mlp.c_proj.weight"),
            v(b + "mlp.c_proj.bias"),
        )
        t = t + h
    cls = F.layer_norm(t[:, 0], (d,), v("ln_post.weight"), v("ln_post.bias"))
    return cls @ v("proj") if project else cls


def test_clip_open_clip_checkpoint(tmp_path) -> None:
    ckpt = _open_clip_checkpoint(seed=4)
    path = tmp_path / "open_clip_pytorch_model.bin"
    torch.save(ckpt, path)
    ours = build_extractor(_cfg("clip", path), weights_dir=tmp_path)
    x = _images(2, 224, seed=5)
    xn = (x / 255.0 - CLIP_MEAN) / CLIP_STD
    with torch.no_grad():
        got = ours(x)
        want = _open_clip_image_feature(ckpt, xn)
        projected = _open_clip_image_feature(ckpt, xn, project=True)
    assert got.shape == (2, 768) and ours.feature_dim == 768 and projected.shape == (2, 512)
    _close(got, want, rel=1e-4)  # plain-torch attention vs timm's fused attention: float32 rounding
    # ImageNet normalisation would be a different extractor
    with torch.no_grad():
        wrong = _open_clip_image_feature(ckpt, (x / 255.0 - IMAGENET_MEAN) / IMAGENET_STD)
    assert (wrong - want).abs().max() > 1e-3 * want.abs().max()


def test_clip_equals_open_clip_package(tmp_path) -> None:
    """Where open_clip is installed: the same random weights through open_clip's own image tower."""
    open_clip = pytest.importorskip("open_clip")
    model = open_clip.create_model("ViT-B-32", pretrained=None).eval()
    state = _randomise(model.state_dict(), seed=6)
    model.load_state_dict(state)
    path = tmp_path / "open_clip_pytorch_model.bin"
    torch.save(state, path)
    ours = build_extractor(_cfg("clip", path), weights_dir=tmp_path)
    vis = model.visual
    x = _images(1, 224, seed=7)
    with torch.no_grad():  # dgm-eval's CLIPEncoder.forward with depth=0, on open_clip's modules
        t = vis.conv1((x / 255.0 - CLIP_MEAN) / CLIP_STD).flatten(2).transpose(1, 2)
        t = torch.cat([vis.class_embedding.expand(1, 1, -1), t], 1) + vis.positional_embedding
        t = vis.ln_pre(vis.patch_dropout(t))
        batch_first = getattr(vis.transformer, "batch_first", False)
        t = t if batch_first else t.transpose(0, 1)
        for block in vis.transformer.resblocks:
            t = block(t, attn_mask=None)
        t = t if batch_first else t.transpose(0, 1)
        want = vis.ln_post(t[:, 0])
        _close(ours(x), want, rel=1e-4)


def test_clip_bad_inputs(tmp_path) -> None:
    torch.save(_dinov2_hub_checkpoint(1, seed=8), tmp_path / "not_clip.bin")
    with pytest.raises(FidmedError, match="not an open_clip"):
        build_extractor(_cfg("clip", tmp_path / "not_clip.bin"), weights_dir=tmp_path)
    for name in ("clip", "dinov2"):
        with pytest.raises(FidmedError, match=rf"extractor\.{name}\.input_size=224"):
            build_extractor(_cfg(name, weights_source="random", input_size=112, depth=1), allow_random=True)
    ex = build_extractor(_cfg("clip", weights_source="random", depth=1), allow_random=True)
    assert ex.protocol()["preprocessing"] == "pil_bicubic-224-RGB"
    with pytest.raises(FidmedError, match=r"\[N, 3, 224, 224\]"):
        ex(torch.zeros(1, 3, 112, 112))
    with pytest.raises(FidmedError, match="depth must be between 1 and 12"):
        build_extractor(_cfg("clip", weights_source="random", depth=13), allow_random=True)


def test_compose_extras(compose_cfg) -> None:
    from fidmed.job import extractor_configs

    cfgs = extractor_configs(compose_cfg(["extractor=[dinov2,clip]"]))
    assert [c.name for c in cfgs] == ["dinov2", "clip"]
    for c, dim in zip(cfgs, (1024, 768)):
        assert c.resizer == "pil_bicubic" and set(c) == {"name", "input_size", "resizer", "weights_source", "seed"}
        setup = extractor_setup(OmegaConf.merge(c, {"weights_source": "random"})).with_options(depth=1)
        assert setup.weights.sha256 is None  # unpinned: no published digest
        ex = build_extractor(setup, allow_random=True)
        with torch.no_grad():
            assert ex(_images(1, 224, seed=9)).shape == (1, dim)

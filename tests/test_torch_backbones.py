"""StudioGAN's PyTorch backbones: fidmed's features equal the libraries' own forward with the study's hook.

Every test saves random weights in the official checkpoint layout (torchvision .pth, SwAV's ``module.``-prefixed
dict with its projection head, DINO's backbone dict, Swin's ``{"model": ...}`` with the original downsample
placement), builds the fidmed extractor from its registration pointed at that file, and compares its features with
the reference computation: torchvision's network with a forward pre-hook on ``fc`` (StudioGAN's hook), timm's
``get_intermediate_layers`` for DINO's 4 CLS tokens, timm's ``forward_head(pre_logits=True)`` for Swin pooling.
No network access.
"""

from __future__ import annotations

import hashlib
import re

import pytest
import torch
from omegaconf import OmegaConf

from fidmed.errors import FidmedError
from fidmed.features.registry import build_extractor

from conftest import extractor_cfg

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


_cfg = extractor_cfg


def _randomise(state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Random weights with BN/LN statistics far from identity, so every term of the forward pass matters."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, t in state.items():
        if not t.is_floating_point():
            out[k] = t.clone()
        elif k.endswith("running_var"):
            out[k] = 0.5 + torch.rand(t.shape, generator=g)
        elif k.endswith(("running_mean", "bias")):
            out[k] = 0.2 * (torch.rand(t.shape, generator=g) - 0.5)
        elif t.ndim == 1:  # norm scales, layer-scale gammas
            out[k] = 0.5 + torch.rand(t.shape, generator=g)
        else:
            fan_in = t[0].numel() if t.ndim > 1 else t.numel()
            out[k] = torch.randn(t.shape, generator=g) * (1.0 / fan_in) ** 0.5
    return out


def _images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=g).float()


def _fc_input(net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """StudioGAN's feature: a forward pre-hook on ``fc`` records its input."""
    seen = []
    handle = net.fc.register_forward_pre_hook(lambda m, inp: seen.append(inp[0]))
    with torch.no_grad():
        net(x)
    handle.remove()
    return seen[0]


def _close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> None:
    assert a.shape == b.shape
    err = (a - b).abs().max().item() / b.abs().max().item()
    assert err <= rel, f"max relative error {err:.3g}"


# ------------------------------------------------------------------------------------------------ CNNs
def _tv_inception():
    from torchvision.models import inception_v3

    return inception_v3(weights=None, aux_logits=True, transform_input=True, init_weights=False).eval()


def _tv_resnet():
    from torchvision.models import resnet50

    return resnet50(weights=None).eval()


@pytest.mark.parametrize("name,factory,size", [("inception", _tv_inception, 96), ("resnet", _tv_resnet, 64)])
def test_torchvision_features_equal_fc_pre_hook(name, factory, size, tmp_path) -> None:
    ref = factory()
    state = _randomise(ref.state_dict(), seed=1)
    ref.load_state_dict(state)
    path = tmp_path / f"{name}.pth"
    torch.save(state, path)
    ours = build_extractor(_cfg(name, path, input_size=size), weights_dir=tmp_path)
    assert ours.feature_dim == 2048 and not ours.random_init
    x = _images(2, size)
    with torch.no_grad():
        got = ours(x)
    want = _fc_input(ref, (x / 255.0 - MEAN) / STD)
    _close(got, want)
    assert got.shape == (2, 2048) and got.std() > 0


def test_inception_uses_transform_input(tmp_path) -> None:
    """torchvision 0.10's pretrained inception_v3 re-maps its input; without that the features would differ."""
    from torchvision.models import inception_v3

    ref = inception_v3(weights=None, aux_logits=True, transform_input=False, init_weights=False).eval()
    state = _randomise(ref.state_dict(), seed=2)
    ref.load_state_dict(state)
    path = tmp_path / "inc.pth"
    torch.save(state, path)
    ours = build_extractor(_cfg("inception", path, input_size=80), weights_dir=tmp_path)
    x = _images(1, 80)
    with torch.no_grad():
        got = ours(x)
    same_as_tf_norm = _fc_input(ref, (x / 255.0 - 0.5) / 0.5)  # what transform_input amounts to
    plain = _fc_input(ref, (x / 255.0 - MEAN) / STD)
    _close(got, same_as_tf_norm, rel=1e-4)
    assert (got - plain).abs().max() > 1e-3 * plain.abs().max()


def test_swav_official_layout(tmp_path) -> None:
    ref = _tv_resnet()
    state = _randomise(ref.state_dict(), seed=3)
    ckpt = {f"module.{k}": v for k, v in state.items() if not k.startswith("fc.")}
    g = torch.Generator().manual_seed(4)  # SwAV's projection head and prototypes: must be ignored
    ckpt["module.projection_head.0.weight"] = torch.randn(2048, 2048, generator=g)
    ckpt["module.projection_head.0.bias"] = torch.randn(2048, generator=g)
    ckpt["module.prototypes.weight"] = torch.randn(3000, 128, generator=g)
    path = tmp_path / "swav_800ep_pretrain.pth.tar"
    torch.save(ckpt, path)
    # the hub's loading: strip "module.", strict=False
    ref.load_state_dict({k.replace("module.", ""): v for k, v in ckpt.items()}, strict=False)
    ours = build_extractor(_cfg("swav", path, input_size=64), weights_dir=tmp_path)
    x = _images(2, 64, seed=5)
    with torch.no_grad():
        got = ours(x)
    _close(got, _fc_input(ref, (x / 255.0 - MEAN) / STD))
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert ours.weights_label == f"sha256:{digest}"
    # the registration has no published digest (unpinned): the file is used as found and its digest recorded
    unpinned = _cfg("swav", input_size=64)
    assert unpinned.weights.sha256 is None
    unpinned_ex = build_extractor(unpinned, weights_dir=tmp_path)
    assert unpinned_ex.weights_label == f"sha256:{digest} (unpinned)"

    del ckpt["module.layer4.2.bn3.running_var"]  # a truncated trunk is refused, not silently random
    bad = tmp_path / "bad.pth.tar"
    torch.save(ckpt, bad)
    with pytest.raises(FidmedError, match="layer4.2.bn3.running_var"):
        build_extractor(_cfg("swav", bad, input_size=64), weights_dir=tmp_path)


# ------------------------------------------------------------------------------------------------ ViTs
def test_dino_four_cls_tokens(tmp_path) -> None:
    import timm

    ref = timm.create_model("vit_small_patch8_224", pretrained=False, num_classes=0).eval()
    state = _randomise(ref.state_dict(), seed=6)
    ref.load_state_dict(state)
    path = tmp_path / "dino_deitsmall8_pretrain.pth"
    torch.save(state, path)  # DINO's file is the bare backbone state dict with these key names
    ours = build_extractor(_cfg("dino", path), weights_dir=tmp_path)
    x = _images(1, 224, seed=7)
    with torch.no_grad():
        got = ours(x)
        inter = ref.get_intermediate_layers((x / 255.0 - MEAN) / STD, n=4, norm=True, return_prefix_tokens=True)
    want = torch.cat([prefix[:, 0] for _, prefix in inter], dim=-1)
    assert got.shape == (1, 1536)
    _close(got, want)


def _swin_official_layout(timm_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm Swin keys -> the official checkpoint's: downsample at the end of the previous stage, plus buffers."""
    out = {}
    for k, v in timm_state.items():
        m = re.match(r"layers\.(\d+)\.downsample\.(.*)", k)
        out[f"layers.{int(m.group(1)) - 1}.downsample.{m.group(2)}" if m else k] = v
        if k.endswith("relative_position_bias_table"):
            out[k.replace("relative_position_bias_table", "relative_position_index")] = torch.zeros(49, 49).long()
    out["head.weight"] = torch.zeros(1000, 1024)
    out["head.bias"] = torch.zeros(1000)
    return out


@pytest.mark.slow
def test_swin_official_checkpoint_and_pooling(tmp_path) -> None:
    import timm

    ref = timm.create_model("swin_base_patch4_window7_224", pretrained=False, num_classes=0).eval()
    state = _randomise(ref.state_dict(), seed=8)
    ref.load_state_dict(state)
    official = _swin_official_layout(state)
    assert "layers.0.downsample.reduction.weight" in official
    path = tmp_path / "swin_base_patch4_window7_224_22kto1k.pth"
    torch.save({"model": official}, path)
    ours = build_extractor(_cfg("swin", path), weights_dir=tmp_path)
    x = _images(1, 224, seed=9)
    with torch.no_grad():
        got = ours(x)
        want = ref.forward_head(ref.forward_features((x / 255.0 - MEAN) / STD), pre_logits=True)
    assert got.shape == (1, 1024)
    _close(got, want)


# ------------------------------------------------------------------------------------------------ protocol, errors
def test_protocol_and_bad_inputs() -> None:
    ex = build_extractor(_cfg("resnet", weights_source="random", input_size=48), allow_random=True)
    p = ex.protocol()
    assert p["extractor"] == "resnet" and p["study_name"] == "Res" and p["feature_dim"] == 2048
    assert p["preprocessing"] == "clean-48-RGB" and p["random_init"] is True
    with pytest.raises(FidmedError, match=r"\[N, 3, 48, 48\]"):
        ex(torch.zeros(1, 3, 32, 32))
    with pytest.raises(FidmedError, match="at least 75"):
        build_extractor(_cfg("inception", weights_source="random", input_size=64), allow_random=True)
    with pytest.raises(FidmedError, match=r"extractor\.dino\.input_size=224"):
        build_extractor(_cfg("dino", weights_source="random", input_size=48), allow_random=True)


def test_random_init_is_seeded() -> None:
    cfg = _cfg("resnet", weights_source="random", input_size=40)
    a, b = build_extractor(cfg, allow_random=True), build_extractor(cfg, allow_random=True)
    x = _images(1, 40)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


def test_compose_all_study_backbones(compose_cfg) -> None:
    """extractor=[...] composes one config per name; each builds with random weights (eval.weights=random)."""
    from fidmed.job import extractor_configs

    names = ["inception_tf", "inception", "resnet", "swav", "dino", "swin"]
    cfg = compose_cfg([f"extractor=[{','.join(names)}]"])
    cfgs = extractor_configs(cfg)
    assert [c.name for c in cfgs] == names
    dims = {"inception_tf": 2048, "inception": 2048, "resnet": 2048, "swav": 2048, "dino": 1536, "swin": 1024}
    for c in cfgs:
        ex = build_extractor(OmegaConf.merge(c, {"weights_source": "random"}), allow_random=True)
        assert ex.feature_dim == dims[c.name] and ex.random_init

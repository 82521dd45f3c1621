"""TF-FID InceptionV3: numerical parity with pytorch-fid 0.3.0 (PyPI) given the same (random) weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fidmed.errors import FidmedError
from fidmed.features.extractors.inception_tf import FIDInceptionV3, load_fid_inception_weights
from fidmed.features.registry import build_extractor

from conftest import extractor_cfg


def _random_state_dict(seed: int) -> dict[str, torch.Tensor]:
    """Random but realistic weights: BN statistics far from the identity so every BN term matters."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, t in FIDInceptionV3().state_dict().items():
        if key.endswith("num_batches_tracked"):
            out[key] = t.clone()
        elif key.endswith("conv.weight"):
            out[key] = torch.randn(t.shape, generator=g) * (2.0 / t[0].numel()) ** 0.5
        elif key.endswith("bn.weight"):
            out[key] = 0.5 + torch.rand(t.shape, generator=g)
        elif key.endswith("bn.bias") or key.endswith("running_mean"):
            out[key] = 0.4 * (torch.rand(t.shape, generator=g) - 0.5)
        elif key.endswith("running_var"):
            out[key] = 0.5 + 1.5 * torch.rand(t.shape, generator=g)
        else:  # fc.weight, fc.bias
            out[key] = 0.01 * torch.randn(t.shape, generator=g)
    return out


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("weights") / "random_fid_inception.pth"
    torch.save(_random_state_dict(seed=123), path)
    return path


def _config_for(path: Path, **over):
    """The registered inception_tf, pointed at a local test weights file."""
    return extractor_cfg("inception_tf", path, **over)


def test_features_equal_pytorch_fid(weights_file: Path, monkeypatch) -> None:
    pfid = pytest.importorskip("pytorch_fid.inception")
    # pytorch-fid builds its FID network with load_state_dict_from_url(FID_WEIGHTS_URL): hand it the test weights
    monkeypatch.setattr(
        pfid,
        "load_state_dict_from_url",
        lambda *a, **k: torch.load(weights_file, map_location="cpu", weights_only=True),
    )
    reference = pfid.InceptionV3([3], resize_input=False, normalize_input=True).eval()
    ours = build_extractor(_config_for(weights_file), weights_dir=weights_file.parent)
    assert ours.feature_dim == 2048 and ours.preprocessing.key == "clean-299-RGB"
    assert ours.weights_label.startswith("sha256:") and not ours.random_init

    g = torch.Generator().manual_seed(0)
    x255 = torch.randint(0, 256, (2, 3, 299, 299), generator=g).float()  # preprocessed: float32 in [0, 255]
    with torch.no_grad():
        ref = reference(x255 / 255.0)[0].flatten(1)  # pytorch-fid takes [0, 1]
        got = ours(x255)
    assert got.shape == (2, 2048) and got.dtype == torch.float32
    scale = ref.abs().max()
    assert scale > 0 and float(ref.std()) > 0
    assert float((got - ref).abs().max()) <= 1e-5 * float(scale)


def test_torch_bilinear_resizer_reproduces_pytorch_fid_at_256_px(weights_file: Path, monkeypatch) -> None:
    """resizer=torch_bilinear + inception_tf = pytorch-fid's whole path from 8-bit 256 px images (ToTensor,
    bilinear resize to 299 inside its network)."""
    pfid = pytest.importorskip("pytorch_fid.inception")
    from fidmed.features.preprocess import preprocess

    monkeypatch.setattr(
        pfid,
        "load_state_dict_from_url",
        lambda *a, **k: torch.load(weights_file, map_location="cpu", weights_only=True),
    )
    reference = pfid.InceptionV3([3], resize_input=True, normalize_input=True).eval()
    ours = build_extractor(_config_for(weights_file, resizer="torch_bilinear"), weights_dir=weights_file.parent)
    assert ours.preprocessing.key == "torch_bilinear-299-RGB"
    g = torch.Generator().manual_seed(1)
    grey = torch.randint(0, 256, (2, 1, 256, 256), generator=g, dtype=torch.uint8)
    rgb = torch.randint(0, 256, (1, 3, 256, 256), generator=g, dtype=torch.uint8)
    for images in (grey, rgb):
        as_loaded = images.expand(-1, 3, -1, -1).float() / 255  # PIL convert("RGB") + ToTensor
        x = preprocess(images, ours.preprocessing)
        # the network input equals pytorch-fid's to within one float32 ulp
        torch.testing.assert_close(
            x / 255.0,
            torch.nn.functional.interpolate(as_loaded, size=(299, 299), mode="bilinear", align_corners=False),
            rtol=0,
            atol=6e-8,
        )
        with torch.no_grad():
            ref = reference(as_loaded)[0].flatten(1)
            got = ours(x)
        assert float((got - ref).abs().max()) <= 1e-5 * float(ref.abs().max())
        # and the clean resizer (the study's) is a different protocol: visibly different features
        with torch.no_grad():
            clean = build_extractor(_config_for(weights_file), weights_dir=weights_file.parent)
            other = clean(preprocess(images, clean.preprocessing))
        assert float((other - ref).abs().max()) > 1e-3 * float(ref.abs().max())


def test_state_dict_keys_equal_pytorch_fid_and_old_files_load(tmp_path: Path, monkeypatch) -> None:
    pfid = pytest.importorskip("pytorch_fid.inception")
    sd = _random_state_dict(seed=1)
    monkeypatch.setattr(pfid, "load_state_dict_from_url", lambda *a, **k: sd)
    theirs = pfid.fid_inception_v3().state_dict()
    ours = FIDInceptionV3().state_dict()
    assert list(theirs) == list(ours)
    assert all(theirs[k].shape == ours[k].shape for k in ours)
    # a file saved without num_batches_tracked (old PyTorch) still loads strictly, as in pytorch-fid
    old = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    torch.save(old, tmp_path / "old.pth")
    net = FIDInceptionV3()
    load_fid_inception_weights(net, tmp_path / "old.pth")
    assert torch.equal(net.Mixed_7c.branch_pool.bn.running_var, sd["Mixed_7c.branch_pool.bn.running_var"])


def test_wrong_file_and_wrong_input_raise(tmp_path: Path, weights_file: Path) -> None:
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "wrong.pth")
    with pytest.raises(FidmedError, match="not pytorch-fid's FID Inception weights"):
        load_fid_inception_weights(FIDInceptionV3(), tmp_path / "wrong.pth")
    ours = build_extractor(_config_for(weights_file), weights_dir=weights_file.parent)
    with pytest.raises(FidmedError, match=r"float32 \[N, 3, 299, 299\]"):
        ours(torch.zeros(1, 3, 224, 224))


def test_extractor_stays_in_eval_mode(weights_file: Path) -> None:
    ours = build_extractor(_config_for(weights_file), weights_dir=weights_file.parent)
    holder = torch.nn.ModuleDict({"extractor": ours})
    holder.train()  # what a LightningModule's fit loop does
    assert not ours.training and not ours.net.Mixed_5b.branch1x1.bn.training
    assert not any(p.requires_grad for p in ours.parameters())

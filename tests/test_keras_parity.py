"""Keras-faithful networks equal Keras 3 (torch backend, no TensorFlow) on the same random weights.

Each test builds ``keras.applications.<Arch>(include_top=False, pooling='avg', weights=None)``, fills it with
seeded random weights (BatchNorm statistics included, so no layer is an identity), writes a Keras 2-style .h5
with Keras' own legacy writer, loads that file into fidmed's network by layer order, and compares features on
the same inputs. Error measure: max |fidmed - keras| / max |keras| over the batch (features of random networks
span orders of magnitude, so an element-wise ratio would divide by near-zero features); bound 1e-5 (the issue's).
The Keras loader path (``load_img(..., interpolation='nearest')`` + ``preprocess_input``) is checked too.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("KERAS_BACKEND", "torch")
keras = pytest.importorskip("keras")
if keras.backend.backend() != "torch":  # keras was imported earlier in this process with another backend
    pytest.skip(f"Keras parity tests need KERAS_BACKEND=torch, keras uses {keras.backend.backend()}",
                allow_module_level=True)
h5py = pytest.importorskip("h5py")
from keras.src.legacy.saving import legacy_h5_format  # noqa: E402  (Keras 2-style .h5 writer)

from fidmed.errors import FidmedError  # noqa: E402
from fidmed.features.keras.archs import ARCHS  # noqa: E402
from fidmed.features.keras.h5 import h5_to_state_dict  # noqa: E402
from fidmed.features.keras_nets import KERAS_EXTRACTORS, normalize  # noqa: E402
from fidmed.features.preprocess import Preprocessing, preprocess  # noqa: E402
from fidmed.features.registry import build_extractor  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Keras 3's numpy-2 copy= warnings

TOL = 1e-5
FAST_SIZE = 75  # odd, and the smallest input Keras' InceptionV3/IRV2 accept; the slow tests add 224/237/299/512
REPO_CONF = Path(__file__).resolve().parents[1] / "conf" / "extractor"
PREPROCESS_MODULE = {"inception_v3": "inception_v3", "resnet50": "resnet50", "densenet121": "densenet",
                     "inception_resnet_v2": "inception_resnet_v2"}
# Keras layer class of each KerasGraph node kind
KERAS_CLASS = {"input": "InputLayer", "conv": "Conv2D", "bn": "BatchNormalization", "relu": "Activation",
               "max_pool": "MaxPooling2D", "avg_pool": "AveragePooling2D", "zero_pad": "ZeroPadding2D",
               "concat": "Concatenate", "add": "Add", "scale_add": "CustomScaleLayer",
               "gap": "GlobalAveragePooling2D"}


def keras_model(arch: str, size: int):
    cls = getattr(keras.applications, ARCHS[arch].keras_class)
    return cls(include_top=False, pooling="avg", weights=None, input_shape=(size, size, 3))


@functools.lru_cache(maxsize=4)
def shared_keras_model(arch: str, size: int):
    """One model per (arch, size) for the tests that set all its weights themselves or only read its structure."""
    return keras_model(arch, size)


def randomize(model, seed: int) -> None:
    """Seeded random weights: He-normal kernels, random biases/betas/means, gammas and variances in [0.5, 1.5]."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        new = []
        for w in layer.weights:
            shape = tuple(w.shape)
            if w.name == "kernel":
                arr = rng.normal(0.0, np.sqrt(2.0 / np.prod(shape[:-1])), shape)
            elif w.name in ("gamma", "moving_variance"):
                arr = rng.uniform(0.5, 1.5, shape)
            else:
                arr = rng.normal(0.0, 0.1, shape)
            new.append(arr.astype(np.float32))
        if new:
            layer.set_weights(new)


def save_h5(model, path, whole_model: bool = False, tf_names: bool = False) -> None:
    """Keras 2-style weights file (root ``layer_names``), or a whole-model file's layout (``model_weights``).

    ``tf_names``: weight names as Keras 2 on TensorFlow wrote them (``conv1_conv/kernel:0``), as in the
    RadImageNet files; Keras 3's legacy writer omits the ``:0``.
    """
    with h5py.File(path, "w") as f:
        root = f.create_group("model_weights") if whole_model else f
        legacy_h5_format.save_weights_to_hdf5_group(root, model)
        if tf_names:
            for name in root.attrs["layer_names"]:
                g = root[name]
                names = [w.decode() if isinstance(w, bytes) else str(w) for w in g.attrs["weight_names"]]
                for w in names:
                    g.move(w, w + ":0")
                g.attrs["weight_names"] = [(w + ":0").encode() for w in names]


def rel_err(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def fidmed_net(arch: str, path):
    g = ARCHS[arch].build()
    g.load_state_dict(h5_to_state_dict(g, path, ARCHS[arch].keras_class), strict=True)
    return g.eval()


def check_parity(arch: str, size: int, tmp_path, whole_model: bool = False, tf_names: bool = False) -> float:
    model = shared_keras_model(arch, size)
    randomize(model, seed=size)
    path = tmp_path / f"{arch}_{size}.h5"
    save_h5(model, path, whole_model, tf_names)
    x = np.random.default_rng(1).uniform(-1.0, 1.0, (2, size, size, 3)).astype(np.float32)
    ref = np.asarray(model.predict(x, verbose=0))
    with torch.no_grad():
        ours = fidmed_net(arch, path)(torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()).numpy()
    assert ours.shape == ref.shape == (2, ARCHS[arch].feature_dim)
    err = rel_err(ours, ref)
    assert err <= TOL, f"{arch} at {size}: max relative feature error {err:.3g}"
    return err


# ------------------------------------------------------------------------------------------------ layer order
@pytest.mark.parametrize("arch", list(ARCHS))
def test_layer_order_equals_keras(arch):
    """The order fidmed derives for Keras' layer list equals model.layers (class by class, shapes of weights)."""
    model = shared_keras_model(arch, FAST_SIZE)
    g = ARCHS[arch].build()
    ours = [KERAS_CLASS[g.nodes[n].kind] for n in g.keras_layer_order()]
    theirs = [type(layer).__name__ for layer in model.layers]
    assert ours == theirs
    net_shapes = [tuple(p.shape) for _, m in g.weighted_layers_in_keras_order() for p in m.parameters()]
    keras_shapes = [tuple(w.shape) for layer in model.layers for w in layer.trainable_weights]
    assert len(net_shapes) == len(keras_shapes)
    assert [int(np.prod(s)) for s in net_shapes] == [int(np.prod(s)) for s in keras_shapes]
    named = {i: g.nodes[n].keras_name for i, n in enumerate(g.keras_layer_order()) if g.nodes[n].keras_name}
    assert bool(named) == (arch != "inception_v3")  # Keras' InceptionV3 leaves every conv/BN auto-named
    assert all(model.layers[i].name == name for i, name in named.items())


# ------------------------------------------------------------------------------------------------ parity
@pytest.mark.parametrize("arch", list(ARCHS))
def test_parity_small_odd_size(arch, tmp_path):
    check_parity(arch, FAST_SIZE, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("size", [224, 237, 299, 512])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_parity_sizes(arch, size, tmp_path):
    check_parity(arch, size, tmp_path)


def test_whole_model_h5_layout(tmp_path):
    """A model.save('x.h5') layout with TF weight names (model_weights/conv1_conv/conv1_conv/kernel:0, as the
    RadImageNet files) loads the same."""
    check_parity("resnet50", 32, tmp_path, whole_model=True, tf_names=True)


def test_layer_names_do_not_matter(tmp_path):
    """Keras numbers auto-named layers from process-wide counters; two files differing only in names load alike."""
    first, second = keras_model("inception_v3", 75), keras_model("inception_v3", 75)
    randomize(first, 3)
    second.set_weights(first.get_weights())
    save_h5(first, tmp_path / "a.h5")
    save_h5(second, tmp_path / "b.h5")
    with h5py.File(tmp_path / "a.h5") as fa, h5py.File(tmp_path / "b.h5") as fb:
        assert list(fa.attrs["layer_names"]) != list(fb.attrs["layer_names"])
    sa = h5_to_state_dict(ARCHS["inception_v3"].build(), tmp_path / "a.h5")
    sb = h5_to_state_dict(ARCHS["inception_v3"].build(), tmp_path / "b.h5")
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_other_architecture_h5_is_refused(tmp_path):
    model = shared_keras_model("resnet50", 32)
    save_h5(model, tmp_path / "resnet.h5")
    # 106 and 188: the conv + BN layer counts of Keras' ResNet50 and InceptionV3 (test_layer_order checks the lists)
    with pytest.raises(FidmedError, match=r"(?s)does not hold weights for InceptionV3.*"
                                          r"106 layers with weights, InceptionV3 has 188.*layer #0: file 'conv1_conv'"):
        h5_to_state_dict(ARCHS["inception_v3"].build(), tmp_path / "resnet.h5", "InceptionV3")
    (tmp_path / "junk.h5").write_bytes(b"not hdf5")
    with pytest.raises(FidmedError, match="not a readable HDF5"):
        h5_to_state_dict(ARCHS["resnet50"].build(), tmp_path / "junk.h5")


def test_safetensors_conversion_loads_the_same(tmp_path):
    from fidmed.features.keras_nets import convert_keras_h5, load_keras_weights

    model = shared_keras_model("densenet121", 32)
    randomize(model, 9)
    save_h5(model, tmp_path / "d.h5")
    assert convert_keras_h5(tmp_path / "d.h5", tmp_path / "d.safetensors") == "densenet121"  # detected
    a, b = ARCHS["densenet121"].build(), ARCHS["densenet121"].build()
    load_keras_weights(a, tmp_path / "d.h5", ARCHS["densenet121"])
    load_keras_weights(b, tmp_path / "d.safetensors", ARCHS["densenet121"])
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_swapped_layers_of_equal_shape_are_refused(tmp_path):
    """conv2_block1_0_conv and conv2_block1_3_conv are both 1x1x64x256: a file listing them swapped is refused."""
    save_h5(shared_keras_model("resnet50", 32), tmp_path / "r.h5")
    with h5py.File(tmp_path / "r.h5", "r+") as f:
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in f.attrs["layer_names"]]
        i, j = names.index("conv2_block1_0_conv"), names.index("conv2_block1_3_conv")
        names[i], names[j] = names[j], names[i]
        f.attrs["layer_names"] = [n.encode() for n in names]
    with pytest.raises(FidmedError, match="file has 'conv2_block1_3_conv' where Keras' layer order puts "
                                          "'conv2_block1_0_conv'"):
        h5_to_state_dict(ARCHS["resnet50"].build(), tmp_path / "r.h5", "ResNet50")


# ------------------------------------------------------------------------------------------------ preprocessing
@pytest.mark.parametrize("arch", list(ARCHS))
def test_normalization_equals_preprocess_input(arch):
    x = np.random.default_rng(2).integers(0, 256, (2, 9, 11, 3)).astype(np.float32)
    module = getattr(keras.applications, PREPROCESS_MODULE[arch])
    ref = np.asarray(module.preprocess_input(x.copy()))
    mode = {a: m for a, m in KERAS_EXTRACTORS.values() if m != "radimagenet"}[arch]
    ours = normalize(torch.from_numpy(x).permute(0, 3, 1, 2), mode).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-5)


def test_radimagenet_normalization():
    """radfid: the 'caffe' preprocess_input (BGR, mean subtraction), then 1/255."""
    x = np.random.default_rng(3).integers(0, 256, (2, 5, 7, 3)).astype(np.float32)
    ref = np.asarray(keras.applications.resnet50.preprocess_input(x.copy())) / 255.0
    ours = normalize(torch.from_numpy(x).permute(0, 3, 1, 2), "radimagenet").permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("gray", [False, True])
@pytest.mark.parametrize("hw,size", [((37, 53), 64), ((130, 97), 75), ((64, 64), 64)])
def test_nearest_resizer_equals_keras_loader(tmp_path, gray, hw, size):
    from PIL import Image

    rng = np.random.default_rng(4)
    img = rng.integers(0, 256, hw if gray else hw + (3,), dtype=np.uint8)
    path = tmp_path / "img.png"
    Image.fromarray(img).save(path)
    ref = keras.utils.img_to_array(keras.utils.load_img(path, target_size=(size, size), interpolation="nearest"))
    batch = torch.from_numpy(img[None, None] if gray else img.transpose(2, 0, 1)[None])
    ours = preprocess(batch, Preprocessing("nearest", size, "RGB"))[0].permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(ours, ref)


def test_extractor_end_to_end_equals_keras(tmp_path):
    """build_extractor(radimagenet_resnet) on a PNG == Keras: load_img + preprocess_input/255 + ResNet50."""
    from PIL import Image

    size = 48
    model = keras_model("resnet50", size)
    randomize(model, 5)
    weights = tmp_path / "weights"
    weights.mkdir()
    save_h5(model, weights / "random.h5", whole_model=True)
    img = np.random.default_rng(6).integers(0, 256, (61, 45, 3), dtype=np.uint8)
    Image.fromarray(img).save(tmp_path / "img.png")
    loaded = keras.utils.img_to_array(keras.utils.load_img(tmp_path / "img.png", target_size=(size, size),
                                                           interpolation="nearest"))
    ref = np.asarray(model.predict(keras.applications.resnet50.preprocess_input(loaded[None]) / 255.0, verbose=0))
    from fidmed.features.weights import sha256_of

    cfg = {"name": "radimagenet_resnet", "module": "fidmed.features.keras_nets", "feature_dim": 2048,
           "input_size": size, "resizer": "nearest", "channels": "RGB", "arch": "resnet50",
           "normalization": "radimagenet",
           "weights": {"filename": "random.h5", "sha256": sha256_of(weights / "random.h5", use_cache=False)}}
    ex = build_extractor(cfg, weights_dir=weights)
    x = preprocess(torch.from_numpy(img.transpose(2, 0, 1)[None]), ex.preprocessing)
    with torch.no_grad():
        ours = ex(x).numpy()
    assert rel_err(ours, ref) <= TOL
    assert ex.protocol()["weights"] == f"sha256:{cfg['weights']['sha256']}"

    unpinned = build_extractor({**cfg, "weights": {"filename": "random.h5", "sha256": None}}, weights_dir=weights)
    assert unpinned.protocol()["weights"] == f"sha256:{cfg['weights']['sha256']} (unpinned)"


def test_random_init_is_seeded_and_nontrivial():
    cfg = {"name": "radimagenet_densenet", "feature_dim": 1024, "input_size": 40, "resizer": "nearest",
           "weights_source": "random", "seed": 1}
    x = torch.rand(2, 3, 40, 40, generator=torch.Generator().manual_seed(0)) * 255
    with torch.no_grad():
        a, b = build_extractor(cfg, allow_random=True)(x), build_extractor(cfg, allow_random=True)(x)
        c = build_extractor({**cfg, "seed": 2}, allow_random=True)(x)
    assert torch.isfinite(a).all() and a.abs().max() > 0
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_input_smaller_than_network_accepts():
    cfg = {"name": "irv2", "feature_dim": 1536, "input_size": 64, "resizer": "nearest", "weights_source": "random"}
    with pytest.raises(FidmedError, match="at least 75x75"):
        build_extractor(cfg, allow_random=True)


# ------------------------------------------------------------------------------------------------ configs, import
KERAS_CONFIGS = sorted(KERAS_EXTRACTORS)


@pytest.mark.parametrize("name", KERAS_CONFIGS)
def test_config_agrees_with_code(name):
    from omegaconf import OmegaConf

    from fidmed.features.keras_nets import KNOWN_H5_FILES
    from fidmed.features.registry import ExtractorSpec

    path = REPO_CONF / f"{name}.yaml"
    assert path.read_text().splitlines()[0] == f"# @package extractor.{name}"
    cfg = OmegaConf.to_container(OmegaConf.load(path))
    spec = ExtractorSpec.from_config(cfg)
    arch, mode = KERAS_EXTRACTORS[name]
    assert (cfg["arch"], cfg["normalization"]) == (arch, mode)
    assert spec.feature_dim == ARCHS[arch].feature_dim
    assert spec.preprocessing == Preprocessing("nearest", 512, "RGB")
    assert KNOWN_H5_FILES[spec.weights.filename] == (arch, cfg.get("weights_md5"))
    ex = build_extractor({**cfg, "weights_source": "random"}, allow_random=True)
    assert ex.feature_dim == spec.feature_dim and ex.normalization == mode


def test_import_checks_keras_h5(tmp_path):
    from fidmed.features.weights import WeightsSpec, import_weights

    specs = [WeightsSpec("RadImageNet-ResNet50_notop.h5", None),
             WeightsSpec("resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5", None)]
    src = tmp_path / "src"
    src.mkdir()
    save_h5(shared_keras_model("resnet50", 32), src / "RadImageNet-ResNet50_notop.h5", whole_model=True)
    spec, dest = import_weights(src / "RadImageNet-ResNet50_notop.h5", specs, tmp_path / "w")
    assert dest == tmp_path / "w" / "RadImageNet-ResNet50_notop.h5" and dest.is_file()

    save_h5(keras_model("densenet121", 32), tmp_path / "RadImageNet-ResNet50_notop.h5")
    with pytest.raises(FidmedError, match="does not hold weights for ResNet50"):
        import_weights(tmp_path / "RadImageNet-ResNet50_notop.h5", specs, tmp_path / "w2")
    assert not (tmp_path / "w2" / "RadImageNet-ResNet50_notop.h5").exists()

    save_h5(shared_keras_model("resnet50", 32), src / "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5")
    with pytest.raises(FidmedError, match="wrong md5"):  # random weights are not Keras' ImageNet file
        import_weights(src / "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5", specs, tmp_path / "w3")

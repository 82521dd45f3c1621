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

import numpy as np
import pytest
import torch

os.environ.setdefault("KERAS_BACKEND", "torch")
keras = pytest.importorskip("keras")
if keras.backend.backend() != "torch":  # keras was imported earlier in this process with another backend
    pytest.skip(
        f"Keras parity tests need KERAS_BACKEND=torch, keras uses {keras.backend.backend()}", allow_module_level=True
    )
h5py = pytest.importorskip("h5py")
from keras.src.legacy.saving import legacy_h5_format  # noqa: E402  (Keras 2-style .h5 writer)

from fidmed.errors import FidmedError  # noqa: E402
from fidmed.features.extractors.keras_apps import build_keras_extractor, normalize  # noqa: E402
from fidmed.features.keras.archs import ARCHS  # noqa: E402
from fidmed.features.keras.h5 import h5_to_state_dict  # noqa: E402
from fidmed.features.preprocess import Preprocessing, preprocess  # noqa: E402
from fidmed.features.registry import EXTRACTORS, build_extractor  # noqa: E402

from conftest import extractor_cfg  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Keras 3's numpy-2 copy= warnings

TOL = 1e-5
FAST_SIZE = 75  # odd, and the smallest input Keras' InceptionV3/IRV2 accept; the slow tests add 224/237/299/512
#: The registered Keras extractors: name -> ExtractorInfo (arch and normalization are options of the registration).
KERAS_INFOS = {e.name: e.info for e in EXTRACTORS.entries() if e.obj is build_keras_extractor}
PREPROCESS_MODULE = {
    "inception_v3": "inception_v3",
    "resnet50": "resnet50",
    "densenet121": "densenet",
    "inception_resnet_v2": "inception_resnet_v2",
}
# Keras layer class of each KerasGraph node kind
KERAS_CLASS = {
    "input": "InputLayer",
    "conv": "Conv2D",
    "bn": "BatchNormalization",
    "relu": "Activation",
    "max_pool": "MaxPooling2D",
    "avg_pool": "AveragePooling2D",
    "zero_pad": "ZeroPadding2D",
    "concat": "Concatenate",
    "add": "Add",
    "scale_add": "CustomScaleLayer",
    "gap": "GlobalAveragePooling2D",
}


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
    with pytest.raises(
        FidmedError,
        match=r"(?s)does not hold weights for InceptionV3.*"
        r"106 layers with weights, InceptionV3 has 188.*layer #0: file 'conv1_conv'",
    ):
        h5_to_state_dict(ARCHS["inception_v3"].build(), tmp_path / "resnet.h5", "InceptionV3")
    (tmp_path / "junk.h5").write_bytes(b"not hdf5")
    with pytest.raises(FidmedError, match="not a readable HDF5"):
        h5_to_state_dict(ARCHS["resnet50"].build(), tmp_path / "junk.h5")


def test_safetensors_conversion_loads_the_same(tmp_path):
    from fidmed.features.keras.loading import convert_keras_h5, load_keras_weights

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
    with pytest.raises(
        FidmedError, match="file has 'conv2_block1_3_conv' where Keras' layer order puts 'conv2_block1_0_conv'"
    ):
        h5_to_state_dict(ARCHS["resnet50"].build(), tmp_path / "r.h5", "ResNet50")


# ------------------------------------------------------------------------------------------------ preprocessing
@pytest.mark.parametrize("arch", list(ARCHS))
def test_normalization_equals_preprocess_input(arch):
    x = np.random.default_rng(2).integers(0, 256, (2, 9, 11, 3)).astype(np.float32)
    module = getattr(keras.applications, PREPROCESS_MODULE[arch])
    ref = np.asarray(module.preprocess_input(x.copy()))
    mode = {
        i.options["arch"]: i.options["normalization"]
        for i in KERAS_INFOS.values()
        if i.options["normalization"] != "radimagenet"
    }[arch]
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
    loaded = keras.utils.img_to_array(
        keras.utils.load_img(tmp_path / "img.png", target_size=(size, size), interpolation="nearest")
    )
    ref = np.asarray(model.predict(keras.applications.resnet50.preprocess_input(loaded[None]) / 255.0, verbose=0))
    import dataclasses

    from fidmed.features.weights import WeightsFile, sha256_of

    setup = extractor_cfg("radimagenet_resnet", weights / "random.h5", input_size=size)
    ex = build_extractor(setup, weights_dir=weights)
    x = preprocess(torch.from_numpy(img.transpose(2, 0, 1)[None]), ex.preprocessing)
    with torch.no_grad():
        ours = ex(x).numpy()
    assert rel_err(ours, ref) <= TOL
    digest = sha256_of(weights / "random.h5", use_cache=False)
    assert ex.protocol()["weights"] == f"sha256:{digest}"

    unpinned = build_extractor(dataclasses.replace(setup, weights=WeightsFile("random.h5", None)), weights_dir=weights)
    assert unpinned.protocol()["weights"] == f"sha256:{digest} (unpinned)"


def test_random_init_is_seeded_and_nontrivial():
    cfg = {"name": "radimagenet_densenet", "input_size": 40, "weights_source": "random", "seed": 1}
    x = torch.rand(2, 3, 40, 40, generator=torch.Generator().manual_seed(0)) * 255
    with torch.no_grad():
        a, b = build_extractor(cfg, allow_random=True)(x), build_extractor(cfg, allow_random=True)(x)
        c = build_extractor({**cfg, "seed": 2}, allow_random=True)(x)
    assert torch.isfinite(a).all() and a.abs().max() > 0
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_input_smaller_than_network_accepts():
    cfg = {"name": "irv2", "input_size": 64, "weights_source": "random"}
    with pytest.raises(FidmedError, match=r"at least 75x75.*extractor\.irv2\.input_size=75"):
        build_extractor(cfg, allow_random=True)


# ------------------------------------------------------------------------------------------------ registrations, import
def test_eight_keras_extractors_are_registered():
    assert sorted(KERAS_INFOS) == sorted(
        [
            "irv2",
            "densenet",
            "keras_inception",
            "keras_resnet",
            "radimagenet_inception",
            "radimagenet_resnet",
            "radimagenet_irv2",
            "radimagenet_densenet",
        ]
    )


@pytest.mark.parametrize("name", sorted(KERAS_INFOS))
def test_registration_agrees_with_code(name):
    info = KERAS_INFOS[name]
    arch, mode = info.options["arch"], info.options["normalization"]
    assert info.feature_dim == ARCHS[arch].feature_dim
    assert (info.resizer, info.input_size, info.channels) == ("nearest", 512, "RGB")
    # Keras' ImageNet files carry Keras' published md5; RadImageNet publishes nothing; neither has a sha256
    assert info.weights.sha256 is None and (info.weights.md5 is None) == (mode == "radimagenet")
    assert info.weights.filename.endswith(".h5") and (bool(info.weights.urls) == (mode != "radimagenet"))
    ex = build_extractor({"name": name, "weights_source": "random"}, allow_random=True)
    assert ex.feature_dim == info.feature_dim and ex.normalization == mode and ex.arch_name == arch


def test_import_checks_keras_h5(tmp_path):
    from fidmed.features.registry import import_weights_file

    src = tmp_path / "src"
    src.mkdir()
    save_h5(shared_keras_model("resnet50", 32), src / "RadImageNet-ResNet50_notop.h5", whole_model=True)
    done = import_weights_file(src / "RadImageNet-ResNet50_notop.h5", tmp_path / "w")
    assert done.path == tmp_path / "w" / "RadImageNet-ResNet50_notop.h5" and done.path.is_file()
    assert "loaded into RadImageNet ResNet50 (Keras): 2048-d features" in done.verified

    save_h5(keras_model("densenet121", 32), tmp_path / "RadImageNet-ResNet50_notop.h5")
    with pytest.raises(FidmedError, match="does not hold weights for ResNet50"):
        import_weights_file(tmp_path / "RadImageNet-ResNet50_notop.h5", tmp_path / "w2")
    assert not (tmp_path / "w2").exists() or not list((tmp_path / "w2").iterdir())  # nothing left behind

    save_h5(shared_keras_model("resnet50", 32), src / "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5")
    with pytest.raises(FidmedError, match="wrong md5"):  # random weights are not Keras' ImageNet file
        import_weights_file(src / "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5", tmp_path / "w3")


def test_import_recognises_renamed_radimagenet_file_by_architecture(tmp_path, capsys):
    """radfid's repository calls the file RadImageNet-ResNet50-notop.h5 (hyphen): any name works, the file is
    recognised by the architecture it loads into and stored under the canonical name."""
    from fidmed.cli import main

    save_h5(shared_keras_model("resnet50", 32), tmp_path / "RadImageNet-ResNet50-notop.h5", whole_model=True)
    save_h5(keras_model("densenet121", 32), tmp_path / "downloaded (1).h5", whole_model=True)
    rc = main(
        [
            "weights",
            "import",
            str(tmp_path / "RadImageNet-ResNet50-notop.h5"),
            str(tmp_path / "downloaded (1).h5"),
            "--weights-dir",
            str(tmp_path / "w"),
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0, out
    assert sorted(p.name for p in (tmp_path / "w").glob("*.h5")) == [
        "RadImageNet-DenseNet121_notop.h5",
        "RadImageNet-ResNet50_notop.h5",
    ]
    assert "loaded into RadImageNet ResNet50 (Keras): 2048-d features; sha256 " in out and "(unpinned)" in out
    assert "loaded into RadImageNet DenseNet121 (Keras): 1024-d features" in out

    (tmp_path / "not-weights.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 64)  # HDF5 magic, no content
    rc = main(["weights", "import", str(tmp_path / "not-weights.h5"), "--weights-dir", str(tmp_path / "w4")])
    err = capsys.readouterr().err
    assert rc == 2 and "matches no known weights file" in err and "RadImageNet-ResNet50_notop.h5" in err

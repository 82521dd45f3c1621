"""Importing stylegan2-ada-pytorch snapshot pickles safely (fidmed.gan.pickle_import), and naming wrong files.

The tests never import NVIDIA's code. They write pickles in the reference's format themselves: a test double of
``torch_utils.persistence`` (a decorator that records constructor arguments in ``_init_args``/``_init_kwargs``
and whose ``__reduce__`` returns ``(_reconstruct_persistent_obj, (meta,), None)`` with ``meta = dict(type='class',
version=6, module_src=..., class_name=..., state=obj.__dict__)``) and of ``dnnlib.util.EasyDict`` are registered
in ``sys.modules`` and wrapped around fidmed's own Generator/Discriminator, so names and weights are right. As in
the reference, ``weight_gain``/``act_gain`` are numpy float64 scalars, constructor kwargs hold EasyDicts, and the
file is ``pickle.dump(dict(training_set_kwargs, G, D, G_ema, augment_pipe))``.

During development the same importer read a snapshot written by the real stylegan2-ada-pytorch code
(CPU, torch 2.x): `pickletools` shows exactly the same set of globals in both files
(torch_utils.persistence._reconstruct_persistent_obj, collections.OrderedDict, torch._utils._rebuild_parameter,
torch._utils._rebuild_tensor_v2, torch.storage._load_from_bytes, numpy._core.multiarray.scalar, numpy.dtype,
dnnlib.util.EasyDict) and the same opcode set, and the imported generator's images equalled the reference
G_ema's bit for bit (max abs difference 0.0, noise_mode='const', psi 1 and 0.7, c_dim 0 and 3).

The test double's ``_reconstruct_persistent_obj`` (what NVIDIA's loader calls, and where it ``exec``-s
module_src) creates a flag file, and every module_src written here creates one too if executed: the importer must
leave both untouched. The stand-in ``networks.py`` plays the reference's part (its sha256 is made the known one for
each test); a snapshot with extra source lines is a "modified source" one.
"""

from __future__ import annotations

import builtins
import collections
import copy
import hashlib
import os
import pickle
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from fidmed.errors import FidmedError
from fidmed.gan import networks, pickle_import
from fidmed.gan.checkpoint import SNAPSHOT_FORMAT, load_generator

# ---------------------------------------------------------------------------------------------------------------------
# A test double of stylegan2-ada-pytorch's pickling machinery


class EasyDict(dict):
    """Same behaviour and pickled name as dnnlib.util.EasyDict."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name, value):
        self[name] = value

    def __delattr__(self, name):
        del self[name]


EasyDict.__module__ = "dnnlib.util"


def networks_src(flag: Path, extra: str = "") -> str:
    """A stand-in for training/networks.py: the reference's class names, plus a line that leaves a flag if run."""
    classes = "\n".join(f"class {name}(torch.nn.Module):\n    pass\n" for name in sorted(pickle_import.NETWORK_CLASSES))
    return (
        f"import pathlib\nimport torch\npathlib.Path({str(flag)!r}).write_text('module_src was executed')\n\n"
        f"{classes}{extra}"
    )


class AugmentPipe(torch.nn.Module):
    """Shaped like the reference's AugmentPipe state: float settings and the buffers p, Hz_geom, Hz_fbank."""

    def __init__(self, xflip=0, rotate90=0, imgfilter_bands=(1, 1, 1, 1)):
        super().__init__()
        self.register_buffer("p", torch.ones([]))
        self.xflip, self.rotate90 = float(xflip), float(rotate90)
        self.imgfilter_bands = list(imgfilter_bands)
        self.register_buffer("Hz_geom", torch.linspace(-1, 1, 12))
        self.register_buffer("Hz_fbank", torch.eye(4, 7))


class FakeReference:
    """Registers torch_utils.persistence and dnnlib.util doubles; builds and writes snapshots like training_loop.py."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
        self.flag = tmp_path / "FLAG_reconstruct_called"
        self.src_flag = tmp_path / "FLAG_module_src_executed"
        self.tmp_path = tmp_path
        self.monkeypatch = monkeypatch
        flag = self.flag

        def _reconstruct_persistent_obj(meta):  # the reference exec-s meta['module_src'] here
            flag.write_text("_reconstruct_persistent_obj was called")
            raise AssertionError("the importer called torch_utils.persistence._reconstruct_persistent_obj")

        _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
        _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
        self.reconstruct = _reconstruct_persistent_obj
        mods = {
            name: types.ModuleType(name) for name in ("torch_utils", "torch_utils.persistence", "dnnlib", "dnnlib.util")
        }
        mods["torch_utils"].persistence = mods["torch_utils.persistence"]
        mods["torch_utils.persistence"]._reconstruct_persistent_obj = _reconstruct_persistent_obj
        mods["dnnlib"].util = mods["dnnlib.util"]
        mods["dnnlib.util"].EasyDict = mods["dnnlib"].EasyDict = EasyDict
        for name, mod in mods.items():
            monkeypatch.setitem(sys.modules, name, mod)
        # the stand-in networks.py is "stylegan2-ada-pytorch's" in these tests
        monkeypatch.setattr(
            pickle_import,
            "REFERENCE_NETWORKS_SRC_SHA256",
            frozenset({hashlib.sha256(networks_src(self.src_flag).encode()).hexdigest()}),
        )

    def persistent_class(self, orig: type, module_src: str) -> type:
        reconstruct = self.reconstruct

        class Decorator(orig):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                self._init_args = copy.deepcopy(args)
                self._init_kwargs = copy.deepcopy(kwargs)

            def __reduce__(self):
                fields = list(super().__reduce__())
                fields += [None] * max(3 - len(fields), 0)
                state = dict(fields[2])
                class_name = state.pop("_fake_class_name", orig.__name__)  # lets a test mislabel one module
                for key in ("weight_gain", "act_gain"):  # the reference computes these with np.sqrt
                    if key in state:
                        state[key] = np.float64(state[key])
                meta = {
                    "type": "class",
                    "version": 6,
                    "module_src": module_src,
                    "class_name": class_name,
                    "state": state,
                }
                return (reconstruct, (meta,), None)

        Decorator.__name__ = Decorator.__qualname__ = orig.__name__
        return Decorator

    def build(self, kind: str, module_src: str, seed: int, **kwargs) -> torch.nn.Module:
        """A fidmed network whose every submodule pickles like a persistent stylegan2-ada-pytorch module."""
        with self.monkeypatch.context() as mp:
            for name in pickle_import.NETWORK_CLASSES:
                mp.setattr(networks, name, self.persistent_class(getattr(networks, name), module_src))
            torch.manual_seed(seed)
            net = getattr(networks, kind)(**kwargs)
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():  # move away from init values (noise_strength starts at 0)
            for name, value in net.state_dict().items():
                if value.dtype.is_floating_point and "resample_filter" not in name:
                    value.add_(0.1 * torch.randn(value.shape, generator=g))
        return net.eval().requires_grad_(False)

    def snapshot(
        self, path: Path, c_dim: int = 0, extra_src: str = "", tamper=None, first=None, protocol: int = 4
    ) -> dict:
        """Write ``path`` as training_loop.py does (``first``: entries put before all others); returns the data."""
        src = networks_src(self.src_flag, extra_src)
        common = {"c_dim": c_dim, "img_resolution": 16, "img_channels": 1}
        G_kwargs = EasyDict(
            z_dim=8,
            w_dim=8,
            mapping_kwargs=EasyDict(num_layers=2),
            synthesis_kwargs=EasyDict(channel_base=128, channel_max=16, num_fp16_res=2, conv_clamp=256),
        )
        D_kwargs = EasyDict(
            block_kwargs=EasyDict(),
            mapping_kwargs=EasyDict(),
            epilogue_kwargs=EasyDict(mbstd_group_size=4),
            channel_base=128,
            channel_max=16,
            num_fp16_res=2,
            conv_clamp=256,
        )
        G = self.build("Generator", src, 1, **G_kwargs, **common)
        G_ema = self.build("Generator", src, 2, **G_kwargs, **common)
        D = self.build("Discriminator", src, 3, **D_kwargs, **common)
        aug = self.persistent_class(AugmentPipe, "class AugmentPipe:\n    pass\n")(xflip=1, rotate90=1)
        if tamper is not None:
            tamper(G_ema)
        data = {**(first or {})}
        data["training_set_kwargs"] = dict(
            EasyDict(
                class_name="training.dataset.ImageFolderDataset",
                path="/data/ct.zip",
                use_labels=bool(c_dim),
                max_size=9,
                xflip=False,
                resolution=16,
            )
        )
        for name, module in (("G", G), ("D", D), ("G_ema", G_ema), ("augment_pipe", aug)):
            data[name] = module
        with open(path, "wb") as f:
            pickle.dump(data, f, protocol=protocol)  # 4: Python >= 3.8's default; 3: Python 3.7's
        return data

    def assert_nothing_ran(self) -> None:
        assert not self.flag.exists(), "torch_utils.persistence._reconstruct_persistent_obj was called"
        assert not self.src_flag.exists(), "the pickled module source was executed"


@pytest.fixture
def ref(monkeypatch, tmp_path):
    return FakeReference(monkeypatch, tmp_path)


def images(G: torch.nn.Module, c_dim: int, psi: float = 1.0) -> torch.Tensor:
    z = torch.randn([3, G.z_dim], generator=torch.Generator().manual_seed(11))
    c = torch.eye(c_dim)[torch.arange(3) % c_dim] if c_dim else None
    with torch.no_grad():
        return G(z, c, truncation_psi=psi, noise_mode="const")


def record_tensors(record: pickle_import.PersistentRecord, prefix: str = "") -> dict[str, torch.Tensor]:
    """Independent flattening of a record tree (parameters, persistent buffers, then children)."""
    out = {}
    state = record.state
    for table in ("_parameters", "_buffers"):
        for name, value in state[table].items():
            if value is not None and name not in state["_non_persistent_buffers_set"]:
                out[prefix + name] = value
    for name, child in state["_modules"].items():
        if child is not None:
            out.update(record_tensors(child, f"{prefix}{name}."))
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Importing


@pytest.mark.parametrize("c_dim", [0, 3])
def test_imported_generator_reproduces_original_images(ref, tmp_path, c_dim):
    pkl = tmp_path / "network-snapshot-004800.pkl"
    data = ref.snapshot(pkl, c_dim=c_dim)
    out = pickle_import.write_imported_generator(pkl)
    assert out == tmp_path / "network-snapshot-004800.fidmed.pt"
    G, record = load_generator(out)  # torch.load(weights_only=True) inside
    ref.assert_nothing_ran()
    for psi in (1.0, 0.7):
        assert torch.equal(images(G, c_dim, psi), images(data["G_ema"], c_dim, psi))
    assert not torch.equal(images(data["G"], c_dim), images(data["G_ema"], c_dim))  # G_ema, not G, was taken
    assert record["format"] == SNAPSHOT_FORMAT and record["kimg"] == 4800
    assert record["generator_kwargs"] == {
        "z_dim": 8,
        "c_dim": c_dim,
        "w_dim": 8,
        "img_resolution": 16,
        "img_channels": 1,
        "mapping_kwargs": {"num_layers": 2},
        "synthesis_kwargs": {"channel_base": 128, "channel_max": 16, "num_fp16_res": 2, "conv_clamp": 256},
    }
    assert list(record["G_ema"]) == list(data["G_ema"].state_dict())
    source = record["source"]
    assert source["sha256"] == hashlib.sha256(pkl.read_bytes()).hexdigest()
    assert source["module_src_sha256"] == hashlib.sha256(networks_src(ref.src_flag).encode()).hexdigest()
    assert source["module_src_is_reference"] is True  # (the stand-in plays the reference here)
    assert source["network"] == "G_ema" and source["path"] == str(pkl.resolve())
    assert source["class_names"] == sorted(
        {
            "Generator",
            "MappingNetwork",
            "SynthesisNetwork",
            "SynthesisBlock",
            "SynthesisLayer",
            "ToRGBLayer",
            "FullyConnectedLayer",
        }
    )
    assert source["training_set_kwargs"]["path"] == "/data/ct.zip"


def test_which_G_and_in_memory_record(ref, tmp_path):
    pkl = tmp_path / "run" / "snap.pkl"
    pkl.parent.mkdir()
    data = ref.snapshot(pkl)
    record = pickle_import.import_generator_pickle(pkl, which="G")
    assert record["kimg"] is None  # not the reference's file name
    expected = data["G"].state_dict()
    assert list(record["G_ema"]) == list(expected)
    assert all(torch.equal(record["G_ema"][k], expected[k]) for k in expected)
    with pytest.raises(FidmedError, match="which="):
        pickle_import.import_generator_pickle(pkl, which="D")
    out = pickle_import.write_imported_generator(pkl, tmp_path / "elsewhere" / "g.pt")
    assert out.is_file() and not list(out.parent.glob(".*.tmp"))


def test_python37_pickles_and_numpy1_names(ref, tmp_path):
    """Protocol 3 (Python 3.7, which stylegan2-ada-pytorch recommends) and numpy 1.x's numpy.core module name."""
    pkl = tmp_path / "network-snapshot-000300.pkl"
    data = ref.snapshot(pkl, protocol=3)
    content = pkl.read_bytes()
    assert b"cbuiltins\nset\n" in content  # sets are built by calling builtins.set under protocol 3
    content = content.replace(b"cnumpy._core.multiarray\nscalar\n", b"cnumpy.core.multiarray\nscalar\n")
    assert b"cnumpy.core.multiarray\nscalar\n" in content
    pkl.write_bytes(content)
    record = pickle_import.import_generator_pickle(pkl)
    expected = data["G_ema"].state_dict()
    assert all(torch.equal(record["G_ema"][k], expected[k]) for k in expected)
    ref.assert_nothing_ran()


_AUDIT: dict[str, list] = {"events": [], "active": []}


def _audit_hook(event, args):
    if _AUDIT["active"]:
        _AUDIT["events"].append(event)


def test_no_code_runs_while_importing(ref, tmp_path):
    """Python's audit hooks see every exec, import, os.system, subprocess and spawn: none may fire."""
    pkl = tmp_path / "network-snapshot-000100.pkl"
    ref.snapshot(pkl)
    pickle_import.import_generator_pickle(pkl)  # warm up: lazily imported modules are loaded now
    if not _AUDIT.get("installed"):
        sys.addaudithook(_audit_hook)  # cannot be removed; records only while "active" is set
        _AUDIT["installed"] = True
    _AUDIT["events"].clear()
    _AUDIT["active"].append(True)
    try:
        pickle_import.import_generator_pickle(pkl)
    finally:
        _AUDIT["active"].clear()
    forbidden = [
        e
        for e in _AUDIT["events"]
        if e
        in {"exec", "import", "os.system", "subprocess.Popen", "os.posix_spawn", "os.exec", "os.fork", "ctypes.dlopen"}
    ]
    assert forbidden == []
    assert "open" in _AUDIT["events"]  # the hook did observe the import (it opened the file)
    ref.assert_nothing_ran()


def test_read_returns_inert_tree(ref, tmp_path):
    pkl = tmp_path / "network-snapshot-000000.pkl"
    data = ref.snapshot(pkl)
    tree = pickle_import.read_stylegan2_ada_pickle(pkl)
    ref.assert_nothing_ran()
    assert set(tree) == {"training_set_kwargs", "G", "D", "G_ema", "augment_pipe"}
    assert type(tree["training_set_kwargs"]) is dict
    for name in ("G", "D", "G_ema", "augment_pipe"):
        rec = tree[name]
        assert isinstance(rec, pickle_import.PersistentRecord)
        assert rec.class_name == type(data[name]).__name__
        got, want = record_tensors(rec), data[name].state_dict()
        assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)
    D = tree["D"]
    assert type(D.init_kwargs["epilogue_kwargs"]) is dict and D.init_kwargs["epilogue_kwargs"] == {
        "mbstd_group_size": 4
    }
    fc = tree["G_ema"].modules["mapping"].modules["fc0"]
    assert type(fc.state["weight_gain"]) is float  # a numpy float64 in the file
    assert fc.state["weight_gain"] == data["G_ema"].mapping.fc0.weight_gain
    assert tree["augment_pipe"].state["imgfilter_bands"] == [1, 1, 1, 1]


def test_numpy_arrays_are_rebuilt_without_numpy_unpickling(tmp_path):
    arr = np.arange(12, dtype=">f4").reshape(3, 4)
    path = tmp_path / "a.pkl"
    path.write_bytes(
        pickle.dumps({"a": arr, "b": np.asfortranarray(arr.astype(np.int16)), "s": np.int64(-5)}, protocol=4)
    )
    tree = pickle_import.read_stylegan2_ada_pickle(path)
    assert np.array_equal(tree["a"], arr) and tree["a"].dtype == arr.dtype
    assert np.array_equal(tree["b"], arr.astype(np.int16))
    assert tree["s"] == -5 and type(tree["s"]) is int
    path.write_bytes(pickle.dumps({"a": np.array([None, 1], dtype=object)}, protocol=4))
    with pytest.raises(FidmedError):
        pickle_import.read_stylegan2_ada_pickle(path)


# ---------------------------------------------------------------------------------------------------------------------
# Refusing code


class _Exploit:
    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _exploits(flag: Path) -> dict[str, object]:
    code = f"open({str(flag)!r}, 'w').write('pwned')"
    return {
        "os.system": _Exploit(os.system, f"touch {flag}"),
        "builtins.eval": _Exploit(builtins.eval, code),
        "builtins.exec": _Exploit(builtins.exec, code),
        "subprocess.Popen": _Exploit(subprocess.Popen, ["touch", str(flag)]),
        "builtins.getattr": _Exploit(getattr, "", "join"),  # the first step of a getattr-chain gadget
        "torch.load": _Exploit(torch.load, str(flag)),
    }


@pytest.mark.parametrize("name", list(_exploits(Path("x"))))
@pytest.mark.parametrize("where", ["top", "nested"])
def test_refuses_foreign_globals_before_running_them(ref, tmp_path, name, where):
    flag = tmp_path / "FLAG_exploit"
    exploit = _exploits(flag)[name]
    if name in ("os.system", "builtins.exec", "subprocess.Popen"):  # the payload is live under plain pickle
        proc = pickle.loads(pickle.dumps(exploit))
        if isinstance(proc, subprocess.Popen):
            proc.wait()
        assert flag.exists()
        flag.unlink()

    def tamper(G_ema):
        if where == "nested":  # deep inside a network's state, after many good objects
            G_ema.synthesis.b8.conv1.__dict__["innocent"] = exploit

    pkl = tmp_path / "network-snapshot-000100.pkl"
    ref.snapshot(pkl, tamper=tamper, first={"evil": exploit} if where == "top" else None)
    with pytest.raises(FidmedError, match="not a plain stylegan2-ada-pytorch") as info:
        pickle_import.import_generator_pickle(pkl)
    module = {"os.system": os.system.__module__}.get(name, name.rsplit(".", 1)[0])
    assert f"{module}." in str(info.value)
    assert not flag.exists()
    ref.assert_nothing_ran()


def test_refuses_code_inside_a_tensor_storage(ref, tmp_path):
    """torch.storage._load_from_bytes loads its payload with weights_only=False; fidmed must not."""
    flag = tmp_path / "FLAG_storage"
    payload = pickle.dumps(_Exploit(os.system, f"touch {flag}"), protocol=2)
    with pytest.raises(RuntimeError, match="magic number"):  # torch runs the payload, then finds no magic number
        torch.storage._load_from_bytes(payload)  # what NVIDIA's loader would do
    assert flag.exists()
    flag.unlink()

    class EvilStorage:
        def __reduce__(self):
            return torch.storage._load_from_bytes, (payload,)

    pkl = tmp_path / "network-snapshot-000001.pkl"
    ref.snapshot(pkl, tamper=lambda G: G.mapping.__dict__.__setitem__("extra", EvilStorage()))
    with pytest.raises(FidmedError, match="not a plain stylegan2-ada-pytorch") as info:
        pickle_import.read_stylegan2_ada_pickle(pkl)
    assert f"{os.system.__module__}.system" in str(info.value) and "weights_only" not in str(info.value)
    assert not flag.exists()
    ref.assert_nothing_ran()


def test_tensorflow_pickles_get_a_hint(tmp_path):
    path = tmp_path / "tf.pkl"
    path.write_bytes(b"\x80\x02cdnnlib.tflib.network\nNetwork\nq\x00)\x81q\x01.")
    with pytest.raises(FidmedError, match="TensorFlow"):
        pickle_import.read_stylegan2_ada_pickle(path)


# ---------------------------------------------------------------------------------------------------------------------
# Broken or unexpected files


class _OversizedTensor:
    """Pickles as a 100-element tensor over a 4-element storage (torch would grow the storage to fit)."""

    def __reduce__(self):
        storage = torch.zeros(4).untyped_storage()
        typed = torch.storage.TypedStorage(wrap_storage=storage, dtype=torch.float32, _internal=True)
        return torch._utils._rebuild_tensor_v2, (typed, 0, (100,), (1,), False, collections.OrderedDict())


def test_truncated_or_corrupt_files(ref, tmp_path):
    pkl = tmp_path / "network-snapshot-000100.pkl"
    ref.snapshot(pkl)
    content = pkl.read_bytes()
    bad = tmp_path / "bad.pkl"
    cases = {
        "empty": b"",
        "first bytes": content[:50],
        "half": content[: len(content) // 2],
        "all but the last byte": content[:-1],
        "garbage": bytes(range(256)) * 8,
        "a list": pickle.dumps([1, 2, 3]),
        "tensor past its storage": pickle.dumps({"G_ema": _OversizedTensor()}),
    }
    for blob in cases.values():
        bad.write_bytes(blob)
        with pytest.raises(FidmedError):
            pickle_import.import_generator_pickle(bad)
    with pytest.raises(FidmedError, match="not found"):
        pickle_import.import_generator_pickle(tmp_path / "missing.pkl")
    ref.assert_nothing_ran()


def _set_kwarg(path: tuple[str, ...], value):
    def tamper(G_ema):
        kwargs = G_ema._init_kwargs
        for key in path[:-1]:
            kwargs = kwargs[key]
        kwargs[path[-1]] = value

    return tamper


@pytest.mark.parametrize(
    "tamper, extra_src, match",
    [
        (None, "class SynthesisInput(torch.nn.Module):\n    pass\n", "unexpected classes SynthesisInput"),
        (_set_kwarg(("synthesis_kwargs", "channel_max"), 8), "", "b16.in_channels is 16 in the pickle but 8"),
        (_set_kwarg(("mapping_kwargs", "num_layers"), 3), "", "mapping.num_layers is 2 in the pickle but 3"),
        (lambda G: G.mapping._modules.pop("fc1"), "", r"mapping has submodules \['fc0'\]"),
        (lambda G: G.mapping._buffers.pop("w_avg"), "", r"missing \['mapping.w_avg'\]"),
        (_set_kwarg(("synthesis_kwargs", "magnitude_ema_beta"), 0.5), "", "synthesis_kwargs.magnitude_ema_beta"),
        (_set_kwarg(("z_dim",), 8.5), "", "z_dim"),
        (lambda G: G.mapping.fc1._parameters.__setitem__("weight", torch.nn.Parameter(torch.zeros(8, 9))), "", "shape"),
        (
            lambda G: G.mapping.fc1.__dict__["_parameters"].__setitem__(
                "weight", torch.zeros(8, 8, dtype=torch.float64)
            ),
            "",
            "float64",
        ),
        (lambda G: setattr(G.mapping.fc1, "weight_gain", 0.5), "", "weight_gain"),
        (lambda G: G.mapping.fc0.__dict__.__setitem__("_fake_class_name", "ToRGBLayer"), "", "fc0 is a ToRGBLayer"),
    ],
    ids=[
        "other-classes",
        "channel-mismatch",
        "layer-count",
        "missing-module",
        "missing-buffer",
        "unknown-kwarg",
        "non-int-kwarg",
        "param-shape",
        "param-dtype",
        "attribute",
        "class-name",
    ],
)
def test_unexpected_networks_are_refused(ref, tmp_path, tamper, extra_src, match):
    pkl = tmp_path / "network-snapshot-000100.pkl"
    ref.snapshot(pkl, extra_src=extra_src, tamper=tamper)
    with pytest.raises(FidmedError, match=match):
        pickle_import.import_generator_pickle(pkl)
    ref.assert_nothing_ran()


# ---------------------------------------------------------------------------------------------------------------------
# Where users meet it: load_generator(PKL), `fidmed import-generator`, `run.py stage=evaluate generator=PKL`


def test_load_generator_and_cli_accept_pickles(ref, tmp_path, capsys):
    from fidmed.cli import main

    pkl = tmp_path / "network-snapshot-000100.pkl"
    data = ref.snapshot(pkl)
    G, record = load_generator(pkl)  # read in memory through the restricted unpickler
    assert torch.equal(images(G, 0), images(data["G_ema"], 0))
    assert main(["import-generator", str(pkl), "--out", str(tmp_path / "g.pt")]) == 0
    assert "sha256" in capsys.readouterr().out
    G2, _ = load_generator(tmp_path / "g.pt")
    assert torch.equal(images(G2, 0), images(data["G_ema"], 0))
    ref.assert_nothing_ran()
    assert main(["import-generator", str(tmp_path / "missing.pkl")]) == 2
    assert "Traceback" not in capsys.readouterr().err


def test_run_py_evaluates_a_pickle_directly(ref, tmp_path):
    import json
    import os
    import subprocess
    import sys

    from conftest import REPO

    pkl = tmp_path / "network-snapshot-000100.pkl"
    ref.snapshot(pkl)  # 16x16, 1 channel: the smoke modality's format
    env = {**os.environ, "FIDMED_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    # (the stand-in networks.py is not stylegan2-ada-pytorch's outside this process: allowed explicitly)
    out = subprocess.run(
        [
            sys.executable,
            str(REPO / "run.py"),
            "experiment=smoke",
            "stage=evaluate",
            f"generator={pkl}",
            "generator_allow_modified_source=true",
            "eval.num_gen=8",
            "modality.num_images=8",
            "eval.metrics=[fd]",
            f"hydra.run.dir={tmp_path / 'run'}",
            f"paths.root={tmp_path}",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["generator"]["source"]["sha256"] == hashlib.sha256(pkl.read_bytes()).hexdigest()
    assert results["generator"]["kimg"] == 100
    assert results["results"][0]["protocol"]["n_gen"] == 8
    ref.assert_nothing_ran()


# ---------------------------------------------------------------------------------------------------------------------
# A pickle whose networks.py is not the reference's: refused unless allowed, and recorded


def _one_line(message: str) -> str:
    assert "\n" not in message.strip() and "Traceback" not in message, message
    return message


def test_modified_network_source_is_refused_unless_allowed(ref, tmp_path, capsys):
    from fidmed.cli import main

    pkl = tmp_path / "network-snapshot-000100.pkl"
    data = ref.snapshot(pkl, extra_src="# a line the reference's networks.py does not have\n")
    with pytest.raises(FidmedError) as info:
        load_generator(pkl)
    message = _one_line(str(info.value))
    assert "not stylegan2-ada-pytorch's" in message and "--allow-modified-source" in message
    assert "generator_allow_modified_source=true" in message
    G, record = load_generator(pkl, allow_modified_source=True)
    assert torch.equal(images(G, 0), images(data["G_ema"], 0))
    assert record["source"]["module_src_is_reference"] is False
    assert record["source"]["sha256"] == hashlib.sha256(pkl.read_bytes()).hexdigest()
    # the command: refused with exit 2 and one line, nothing written; allowed with the flag, which the record keeps
    capsys.readouterr()
    assert main(["import-generator", str(pkl)]) == 2
    assert "--allow-modified-source" in _one_line(capsys.readouterr().err)
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".pt") == []
    assert main(["import-generator", str(pkl), "--allow-modified-source"]) == 0
    assert "--allow-modified-source was given" in capsys.readouterr().out
    _, converted = load_generator(tmp_path / "network-snapshot-000100.fidmed.pt")
    assert converted["source"]["module_src_is_reference"] is False
    ref.assert_nothing_ran()


def test_a_pickle_is_imported_in_memory_and_nothing_is_left_behind(ref, tmp_path, monkeypatch):
    import tempfile

    pkl = tmp_path / "snapshots" / "network-snapshot-000100.pkl"
    pkl.parent.mkdir()
    ref.snapshot(pkl)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    for var in ("TMPDIR", "TEMP", "TMP"):
        monkeypatch.setenv(var, str(scratch))
    G, record = load_generator(pkl)
    assert record["source"]["path"] == str(pkl.resolve())
    assert list(scratch.iterdir()) == [] and [p.name for p in pkl.parent.iterdir()] == [pkl.name]


# ---------------------------------------------------------------------------------------------------------------------
# Wrong files are named for what they are, in one line


class _Opaque:
    """A class torch's weights-only reader refuses."""


def _wrong_files(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    from PIL import Image

    out = {}
    png = tmp_path / "image.png"
    Image.fromarray(np.zeros((4, 4), dtype=np.uint8)).save(png)
    out["png"] = (png, "a PNG image")
    out["hdf5"] = (tmp_path / "weights.h5", "an HDF5 file")
    out["hdf5"][0].write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(64))
    folder = tmp_path / "run"
    (folder / "checkpoints").mkdir(parents=True)
    torch.save({"x": torch.zeros(1)}, folder / "final.pt")
    out["folder"] = (folder, "a folder")
    out["empty"] = (tmp_path / "empty.pkl", "an empty file")
    out["empty"][0].write_bytes(b"")
    out["zip"] = (tmp_path / "data.zip", "a zip archive")
    import zipfile

    with zipfile.ZipFile(out["zip"][0], "w") as z:
        z.writestr("a.txt", "hello")
    return out


@pytest.mark.parametrize("kind", ["png", "hdf5", "folder", "empty", "zip"])
@pytest.mark.parametrize("as_name", ["as is", ".pkl", ".pt"])
def test_wrong_files_are_named_in_one_line(tmp_path, kind, as_name):
    path, text = _wrong_files(tmp_path)[kind]
    if as_name != "as is" and kind != "folder":
        path = path.rename(path.with_suffix(as_name))
    for read in (load_generator, pickle_import.read_stylegan2_ada_pickle):
        with pytest.raises(FidmedError) as info:
            read(path)
        message = _one_line(str(info.value))
        assert text in message, (read.__name__, message)
        assert "persistent" not in message.lower() and "weights_only" not in message
    if kind == "folder":  # the folder's generator file is named
        with pytest.raises(FidmedError, match="it holds final.pt"):
            load_generator(path)


def test_pytorch_files_that_are_not_generators(tmp_path, capsys):
    from fidmed.cli import main

    objects = tmp_path / "objects.pt"
    torch.save({"model": _Opaque()}, objects)
    with pytest.raises(FidmedError) as info:
        load_generator(objects)
    message = _one_line(str(info.value))
    assert "_Opaque" in message and "not only tensors and plain values" in message
    assert "weights_only" not in message  # never torch's advice to load it unsafely
    plain = tmp_path / "plain.pt"
    torch.save({"x": torch.zeros(2)}, plain)
    with pytest.raises(FidmedError, match="is a PyTorch file but not a fidmed generator file"):
        load_generator(plain)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(plain.read_bytes()[:-40])
    with pytest.raises(FidmedError) as info:
        load_generator(truncated)
    assert "damaged or truncated" in _one_line(str(info.value)) and "copy it again" in str(info.value)
    # a PyTorch file given to the pickle importer: what it is and that it needs no import
    pt_as_pkl = tmp_path / "final.pkl"
    pt_as_pkl.write_bytes(plain.read_bytes())
    assert main(["import-generator", str(pt_as_pkl)]) == 2
    err = _one_line(capsys.readouterr().err)
    assert "is a PyTorch file (torch.save)" in err and "needs no import" in err


# ---------------------------------------------------------------------------------------------------------------------
# Protocol 2: bytes are _codecs.encode(str, 'latin1'), accepted in exactly that form


def test_protocol_2_snapshots_are_read(ref, tmp_path):
    pkl = tmp_path / "network-snapshot-000200.pkl"
    data = ref.snapshot(pkl, protocol=2)
    content = pkl.read_bytes()
    assert b"c_codecs\nencode\n" in content  # how protocol 2 writes bytes
    G, record = load_generator(pkl)
    assert torch.equal(images(G, 0), images(data["G_ema"], 0))
    assert record["source"]["sha256"] == hashlib.sha256(content).hexdigest()
    ref.assert_nothing_ran()


@pytest.mark.parametrize(
    "payload",
    [
        b"\x80\x02c_codecs\nencode\nq\x00X\x03\x00\x00\x00abcq\x01X\x05\x00\x00\x00utf-8q\x02\x86q\x03Rq\x04.",
        b"\x80\x02c_codecs\nencode\nq\x00K\x05X\x06\x00\x00\x00latin1q\x01\x86q\x02Rq\x03.",
        b"\x80\x02c__builtin__\nbytes\nq\x00J\x00\xca\x9a;\x85q\x01Rq\x02.",  # bytes(10**9): a memory bomb
    ],
    ids=["other-encoding", "not-a-string", "bytes-with-a-size"],
)
def test_codecs_and_bytes_only_in_the_protocol_2_form(tmp_path, payload):
    path = tmp_path / "odd.pkl"
    path.write_bytes(payload)
    with pytest.raises(FidmedError, match="not a plain stylegan2-ada-pytorch"):
        pickle_import.read_stylegan2_ada_pickle(path)
    ok = tmp_path / "ok.pkl"
    ok.write_bytes(pickle.dumps({"b": b"\x00\xff data", "e": b""}, protocol=2))
    assert pickle_import.read_stylegan2_ada_pickle(ok) == {"b": b"\x00\xff data", "e": b""}

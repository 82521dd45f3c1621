"""Import stylegan2-ada-pytorch network pickles (``network-snapshot-XXXXXX.pkl``) without running their code.

stylegan2-ada-pytorch's ``training_loop.py`` writes ``pickle.dump(dict(training_set_kwargs=..., G=..., D=...,
G_ema=..., augment_pipe=...))``. Each network is a ``torch_utils.persistence`` object: it pickles as a call
``_reconstruct_persistent_obj(meta)`` with ``meta = {type, version, module_src, class_name, state}``, where
``module_src`` is the full source of ``training/networks.py`` (which NVIDIA's loader ``exec``-utes) and ``state``
is the module's ``__dict__``: ``_parameters``, ``_buffers``, ``_modules`` (more persistent objects) and plain
attributes, including the constructor arguments the persistence decorator recorded (``_init_args``,
``_init_kwargs``). Tensors pickle as ``torch._utils._rebuild_tensor_v2`` of a storage that is itself a nested
``torch.save`` file passed to ``torch.storage._load_from_bytes`` (which torch loads with ``weights_only=False``).

This module reads such a file with a restricted unpickler. Only the globals those files use are resolved, each
to a harmless replacement: ``_reconstruct_persistent_obj`` returns an inert :class:`PersistentRecord` (the source
is kept as text and never executed), storages are read with ``torch.load(weights_only=True)``, ``EasyDict``
becomes ``dict``, numpy scalars become Python numbers. Any other global (``os.system``, ``builtins.eval``, ...)
is refused before it can be called. The generator is then rebuilt as :class:`fidmed.gan.networks.Generator`
from its recorded constructor arguments, after checking that every submodule's class name, every tensor's name,
shape and dtype, and every plain attribute agree with the rebuilt network.

The pickled ``networks.py`` is compared with stylegan2-ada-pytorch's own (by sha256): a generator trained with
modified network code may compute something other than the network fidmed rebuilds from its weights, so such a
file is refused unless the caller allows it explicitly (``allow_modified_source=True``; ``fidmed import-generator
--allow-modified-source``). Every record says whether the source matched, and the file's sha256.

Protocol-2 pickles (what Python 2 and ``pickle.dump(..., protocol=2)`` write) encode ``bytes`` as
``_codecs.encode(text, 'latin1')``; exactly that form is accepted (it builds bytes and nothing else).
"""

from __future__ import annotations

import ast
import collections
import hashlib
import inspect
import io
import math
import os
import pickle
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fidmed.errors import FidmedError
from fidmed.gan.networks import Generator
from fidmed.gan.snapshot import SNAPSHOT_FORMAT, atomic_torch_save, file_kind

#: ``torch_utils.persistence._version`` of stylegan2-ada-pytorch (the only version it writes or reads).
PERSISTENCE_VERSION = 6

#: The top-level classes of stylegan2-ada-pytorch's ``training/networks.py`` (read from its source).
NETWORK_CLASSES = frozenset(
    {
        "FullyConnectedLayer",
        "Conv2dLayer",
        "MappingNetwork",
        "SynthesisLayer",
        "ToRGBLayer",
        "SynthesisBlock",
        "SynthesisNetwork",
        "Generator",
        "DiscriminatorBlock",
        "MinibatchStdLayer",
        "DiscriminatorEpilogue",
        "Discriminator",
    }
)

#: sha256 of ``training/networks.py`` as ``torch_utils.persistence`` stores it (``inspect.getsource``: UTF-8,
#: no BOM), measured on a pickle written by NVlabs/stylegan2-ada-pytorch's own code
#: (``read_stylegan2_ada_pickle(p)['G_ema'].module_src_sha256``). EndlessSora/DeceiveD (APA) ships this file
#: unchanged. Any other source is refused unless explicitly allowed (see the module docstring).
REFERENCE_NETWORKS_SRC_SHA256 = frozenset(
    {
        "53b4e1ec457171d4e2c1454d48013765ab626141c35cdd383b020950effe11a5",
    }
)

#: Constructor arguments the importer understands: Generator's own, and what its ``mapping_kwargs`` /
#: ``synthesis_kwargs`` may pass on (synthesis_kwargs reach SynthesisNetwork, SynthesisBlock and SynthesisLayer).
GENERATOR_KWARGS = frozenset(
    {"z_dim", "c_dim", "w_dim", "img_resolution", "img_channels", "mapping_kwargs", "synthesis_kwargs"}
)
MAPPING_KWARGS = frozenset(
    {"num_layers", "embed_features", "layer_features", "activation", "lr_multiplier", "w_avg_beta"}
)
SYNTHESIS_KWARGS = frozenset(
    {
        "channel_base",
        "channel_max",
        "num_fp16_res",
        "architecture",
        "resample_filter",
        "conv_clamp",
        "fp16_channels_last",
        "kernel_size",
        "use_noise",
        "activation",
    }
)

_SNAPSHOT_NAME = re.compile(r"network-snapshot-(\d+)\.pkl$")
_PLAIN_SCALARS = (type(None), bool, int, float, str)


@dataclass(eq=False)
class PersistentRecord:
    """What ``torch_utils.persistence`` pickled for one object, kept as data: nothing here is ever executed."""

    class_name: str
    module_src: str = field(repr=False)
    state: dict[str, Any] = field(repr=False)
    version: Any = PERSISTENCE_VERSION
    type: str = "class"

    @property
    def module_src_sha256(self) -> str:
        return hashlib.sha256(self.module_src.encode("utf-8", "surrogatepass")).hexdigest()

    @property
    def init_kwargs(self) -> dict[str, Any]:
        return dict(self.state.get("_init_kwargs") or {})

    @property
    def modules(self) -> dict[str, PersistentRecord | None]:
        return dict(self.state.get("_modules") or {})


class _Refused(FidmedError):
    """A pickle referenced a global outside the allow-list."""


# ---------------------------------------------------------------------------------------------------------------------
# Replacements for the globals a stylegan2-ada-pytorch snapshot references


def _inert_persistent_obj(meta: Any) -> PersistentRecord:
    """Stands in for ``torch_utils.persistence._reconstruct_persistent_obj``: records ``meta``, runs nothing."""
    if not isinstance(meta, dict):
        raise pickle.UnpicklingError(f"persistent object metadata is a {type(meta).__name__}, not a dict")
    missing = {"type", "version", "module_src", "class_name", "state"} - set(meta)
    if missing:
        raise pickle.UnpicklingError(f"persistent object metadata lacks {sorted(missing)}")
    if not isinstance(meta["module_src"], str) or not isinstance(meta["class_name"], str):
        raise pickle.UnpicklingError("persistent object metadata has a non-text module_src or class_name")
    if not isinstance(meta["state"], dict):
        raise pickle.UnpicklingError(f"persistent object {meta['class_name']} has a non-dict state")
    return PersistentRecord(
        class_name=meta["class_name"],
        module_src=meta["module_src"],
        state=meta["state"],
        version=meta["version"],
        type=meta["type"],
    )


def _load_storage_bytes(data: Any) -> torch.storage.TypedStorage:
    """Stands in for ``torch.storage._load_from_bytes``, reading the nested file with ``weights_only=True``."""
    if not isinstance(data, (bytes, bytearray)):
        raise pickle.UnpicklingError(f"tensor storage payload is a {type(data).__name__}, not bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TypedStorage deprecation notices
            storage = torch.load(io.BytesIO(bytes(data)), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # torch's weights-only reader refused a global: say which, not its advice
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        detail = next((ln for ln in lines if "GLOBAL" in ln or "nsupported" in ln), lines[0] if lines else "")
        raise _Refused(
            f"refusing a tensor storage that is not plain data ({detail}): the file is not a plain "
            f"stylegan2-ada-pytorch network snapshot."
        ) from None
    if not isinstance(storage, torch.storage.TypedStorage):
        raise pickle.UnpicklingError(f"tensor storage payload holds a {type(storage).__name__}, not a storage")
    return storage


def _latin1_bytes(text: Any, encoding: Any = None) -> bytes:
    """``_codecs.encode(text, 'latin1')``, the form in which protocol-2 pickles store ``bytes``; nothing else."""
    if not isinstance(text, str) or encoding != "latin1":
        raise _Refused(
            "refusing _codecs.encode other than encode(str, 'latin1') (how protocol-2 pickles store "
            "bytes): the file is not a plain stylegan2-ada-pytorch network snapshot."
        )
    return text.encode("latin1")


def _empty_bytes(*args: Any) -> bytes:
    """``bytes()``, how protocol-2 pickles store ``b''``; any argument is refused."""
    if args:
        raise _Refused(
            "refusing builtins.bytes with arguments (protocol-2 pickles only call bytes() for b''): "
            "the file is not a plain stylegan2-ada-pytorch network snapshot."
        )
    return b""


def _rebuild_tensor(
    storage: Any,
    storage_offset: Any,
    size: Any,
    stride: Any,
    requires_grad: Any = False,
    backward_hooks: Any = None,
    metadata: Any = None,
) -> torch.Tensor:
    """``torch._utils._rebuild_tensor_v2`` for CPU storages only; hooks and metadata are dropped."""
    if not isinstance(storage, torch.storage.TypedStorage):
        raise pickle.UnpicklingError(f"tensor built from a {type(storage).__name__}, not a storage")
    if not (
        isinstance(storage_offset, int)
        and isinstance(size, tuple)
        and isinstance(stride, tuple)
        and all(isinstance(v, int) for v in (*size, *stride))
    ):
        raise pickle.UnpicklingError("tensor with a malformed offset, size or stride")
    if storage_offset < 0 or len(size) != len(stride) or any(v < 0 for v in (*size, *stride)):
        raise pickle.UnpicklingError("tensor with a negative offset, size or stride")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        numel = storage.size()
        # torch's set_() would silently grow the storage to fit; a well-formed file never needs that
        if all(size) and storage_offset + sum((n - 1) * s for n, s in zip(size, stride)) >= numel:
            raise pickle.UnpicklingError(f"tensor of size {size} reaches past its storage of {numel} elements")
        return torch._utils._rebuild_tensor(storage, storage_offset, size, stride)


def _rebuild_parameter(
    data: Any, requires_grad: Any = False, backward_hooks: Any = None, state: Any = None
) -> torch.Tensor:
    """``torch._utils._rebuild_parameter(_with_state)``: the data tensor, without hooks or extra state."""
    if not isinstance(data, torch.Tensor):
        raise pickle.UnpicklingError(f"parameter built from a {type(data).__name__}, not a tensor")
    return data


class _NumpyDType:
    """``numpy.dtype(name, align, copy)`` followed by ``__setstate__``: resolved to a plain numeric dtype."""

    def __init__(self, name: Any = None, align: Any = False, copy: Any = False) -> None:
        if not isinstance(name, str):
            raise pickle.UnpicklingError("numpy dtype with a non-text name")
        self.name = name
        self.byteorder = "="

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, tuple) or len(state) < 2 or not isinstance(state[1], str):
            raise pickle.UnpicklingError("malformed numpy dtype state")
        if len(state) > 2 and state[2] is not None:
            raise pickle.UnpicklingError("structured numpy dtypes are not supported")
        self.byteorder = state[1]

    def resolve(self) -> np.dtype:
        try:
            dtype = np.dtype(self.name)
        except TypeError as exc:
            raise pickle.UnpicklingError(f"unknown numpy dtype {self.name!r}") from exc
        if dtype.kind not in "biufc":
            raise pickle.UnpicklingError(f"numpy dtype {self.name!r} (kind {dtype.kind!r}) is not numeric")
        return dtype.newbyteorder(self.byteorder) if self.byteorder in "<>" else dtype


def _numpy_scalar(dtype: Any, data: Any = None) -> int | float | bool | complex:
    """``numpy.core.multiarray.scalar``: decoded to the equal Python number."""
    if not isinstance(dtype, _NumpyDType) or not isinstance(data, (bytes, bytearray)):
        raise pickle.UnpicklingError("malformed numpy scalar")
    dt = dtype.resolve()
    if len(data) != dt.itemsize:
        raise pickle.UnpicklingError(f"numpy scalar of {len(data)} bytes for dtype {dt}")
    return np.frombuffer(bytes(data), dtype=dt)[0].item()


class _NumpyArrayType:
    """Stands in for the class ``numpy.ndarray`` as the first argument of ``_reconstruct``."""


class _NumpyArrayStub:
    """``numpy.core.multiarray._reconstruct(ndarray, (0,), b'b')`` then ``__setstate__``; see ``_finalize``."""

    def __init__(self) -> None:
        self.array: np.ndarray | None = None

    def __setstate__(self, state: Any) -> None:
        if not (
            isinstance(state, tuple)
            and len(state) == 5
            and isinstance(state[1], tuple)
            and isinstance(state[2], _NumpyDType)
            and isinstance(state[4], (bytes, bytearray))
        ):
            raise pickle.UnpicklingError("malformed numpy array state (only numeric arrays are supported)")
        _, shape, dtype, fortran, data = state
        arr = np.frombuffer(bytes(data), dtype=dtype.resolve())
        self.array = arr.reshape(shape, order="F" if fortran else "C").copy()


def _numpy_reconstruct(cls: Any, shape: Any = None, typecode: Any = None) -> _NumpyArrayStub:
    if cls is not _NumpyArrayType:
        raise pickle.UnpicklingError("numpy _reconstruct of something other than ndarray")
    return _NumpyArrayStub()


_ALLOWED: dict[tuple[str, str], Any] = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _inert_persistent_obj,
    ("dnnlib.util", "EasyDict"): dict,  # built with NEWOBJ (cls.__new__(cls)) + SETITEMS: a plain dict is exact
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "bytes"): _empty_bytes,  # protocol 2: b''
    ("_codecs", "encode"): _latin1_bytes,  # protocol 2: any other bytes
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch.storage", "_load_from_bytes"): _load_storage_bytes,
    ("numpy", "dtype"): _NumpyDType,
    ("numpy", "ndarray"): _NumpyArrayType,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
    ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct,
}


class _SnapshotUnpickler(pickle.Unpickler):
    """Resolves only the globals of ``_ALLOWED``; everything else raises before it can be called."""

    def find_class(self, module: str, name: str) -> Any:
        module = {"__builtin__": "builtins", "copy_reg": "copyreg"}.get(module, module)
        try:
            return _ALLOWED[(module, name)]
        except (KeyError, TypeError):
            pass
        hint = ""
        if module.startswith("dnnlib.tflib"):
            hint = (
                " It is a TensorFlow StyleGAN pickle; convert it with stylegan2-ada-pytorch's legacy.py "
                "in a sandbox first."
            )
        raise _Refused(
            f"refusing to load {module}.{name}: the file is not a plain stylegan2-ada-pytorch "
            f"network snapshot (only tensors, containers and persistent networks are allowed, and "
            f"loading this name could run code).{hint}"
        )

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("persistent ids do not occur in stylegan2-ada-pytorch snapshots")


def _finalize(obj: Any, memo: dict[int, Any] | None = None) -> Any:
    """Replace numpy array stubs by arrays; reject leftover stand-in objects. Preserves sharing and cycles."""
    memo = {} if memo is None else memo
    key = id(obj)
    if key in memo:
        return memo[key]
    if isinstance(obj, _NumpyArrayStub):
        if obj.array is None:
            raise pickle.UnpicklingError("numpy array without data")
        memo[key] = obj.array
        return obj.array
    if isinstance(obj, (_NumpyDType, type)):
        raise pickle.UnpicklingError(f"stray {getattr(obj, '__name__', type(obj).__name__)} object")
    if isinstance(obj, PersistentRecord):
        memo[key] = obj
        obj.state = _finalize(obj.state, memo)
    elif isinstance(obj, dict):
        memo[key] = obj
        for k in list(obj):
            obj[k] = _finalize(obj[k], memo)
    elif isinstance(obj, list):
        memo[key] = obj
        obj[:] = [_finalize(v, memo) for v in obj]
    elif isinstance(obj, (tuple, set, frozenset)):
        out = type(obj)(_finalize(v, memo) for v in obj)
        memo[key] = out
        return out
    return obj


# ---------------------------------------------------------------------------------------------------------------------
# Public API

#: File kinds that are certainly not a pickle (see :func:`fidmed.gan.snapshot.file_kind`).
_NOT_A_PICKLE = frozenset(
    {"png", "jpeg", "gif", "tiff", "hdf5", "gzip", "npy", "bzip2", "xz", "zip", "damaged-zip", "dicom", "empty"}
)
_TORCH_FILES = frozenset({"torch-zip", "torch-legacy"})


class _HashingReader:
    """A binary file for the unpickler that hashes every byte it hands out (the rest of the file at ``finish``), so
    the recorded sha256 is that of exactly the bytes that were read."""

    def __init__(self, f: Any) -> None:
        self.f = f
        self.digest = hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.digest.update(data)
        return data

    def readline(self) -> bytes:
        data = self.f.readline()
        self.digest.update(data)
        return data

    def finish(self) -> str:
        for chunk in iter(lambda: self.f.read(1 << 20), b""):
            self.digest.update(chunk)
        return self.digest.hexdigest()


def check_pickle_file(path: str | os.PathLike) -> Path:
    """``path`` if it can be a stylegan2-ada-pytorch pickle; else a one-line FidmedError saying what it is."""
    path = Path(path)
    kind = file_kind(path)
    expected = "a stylegan2-ada-pytorch network snapshot (a pickle, network-snapshot-NNNNNN.pkl)"
    if kind.code == "missing":
        raise FidmedError(
            f"stylegan2-ada-pytorch pickle not found: {path}. Pass the path of a network-snapshot-NNNNNN.pkl."
        )
    if kind.code == "directory":
        found = sorted(p.name for p in path.glob("network-snapshot-*.pkl"))
        hint = f" (it holds {', '.join(found[-3:])})" if found else ""
        raise FidmedError(f"{path} is a folder, not {expected}{hint}; pass the .pkl file itself.")
    if kind.code in _TORCH_FILES:
        raise FidmedError(
            f"{path} is {kind.text}, not {expected}; a fidmed network-snapshot-*.pt, final.pt or "
            f"last.ckpt needs no import: evaluate it as it is (generator=PATH, fidmed evaluate PATH)."
        )
    if kind.code in _NOT_A_PICKLE or kind.code == "unreadable":
        raise FidmedError(f"{path} is {kind.text}, not {expected}.")
    return path


def read_stylegan2_ada_pickle(path: str | os.PathLike) -> dict[str, Any]:
    """The content of a stylegan2-ada-pytorch snapshot pickle as inert data.

    Networks come back as :class:`PersistentRecord` trees (their ``state`` holds tensors, containers and
    numbers), ``EasyDict`` as ``dict``. Nothing in the file is executed: any global outside the allow-list
    raises :class:`FidmedError` before it is called.
    """
    return _read_pickle(path)[0]


def _read_pickle(path: str | os.PathLike) -> tuple[dict[str, Any], str]:
    """``(content, sha256 of the file)``, read once."""
    path = check_pickle_file(path)
    try:
        with open(path, "rb") as f:
            reader = _HashingReader(f)
            data = _finalize(_SnapshotUnpickler(reader).load())
            sha256 = reader.finish()
    except _Refused as exc:
        raise FidmedError(f"{path}: {exc}") from None
    except FidmedError:
        raise
    except Exception as exc:  # noqa: BLE001 -- truncated/corrupt file, malformed objects: all mean "bad file"
        detail = (str(exc).strip().splitlines() or [""])[0]
        raise FidmedError(
            f"cannot read {path} as a stylegan2-ada-pytorch network snapshot "
            f"({type(exc).__name__}: {detail}); the file is truncated, corrupt or not such a pickle. "
            f"Download it again or pass a network-snapshot-NNNNNN.pkl."
        ) from None
    if not isinstance(data, dict):
        raise FidmedError(
            f"{path} holds a {type(data).__name__}, not the dict of a stylegan2-ada-pytorch "
            f"network snapshot (G, D, G_ema, ...)."
        )
    return data, sha256


def snapshot_kimg(path: str | os.PathLike) -> int | None:
    """kimg from the reference's file name ``network-snapshot-XXXXXX.pkl`` (whole kimg), else None."""
    m = _SNAPSHOT_NAME.search(Path(path).name)
    return int(m.group(1)) if m else None


def import_generator_pickle(
    pkl_path: str | os.PathLike, which: str = "G_ema", *, allow_modified_source: bool = False
) -> dict[str, Any]:
    """A fidmed generator record (:data:`fidmed.gan.snapshot.SNAPSHOT_FORMAT`) from a stylegan2-ada-pytorch pickle.

    Keys: ``format``, ``G_ema`` (state dict of ``which``), ``generator_kwargs`` (exact
    ``fidmed.gan.networks.Generator`` constructor arguments), ``kimg`` (from the file name, or None) and
    ``source``: ``kind``, ``path``, ``sha256`` (of the file), ``network``, ``class_names``, ``module_src_sha256``
    (of the pickled ``networks.py``), ``module_src_is_reference`` (whether that is stylegan2-ada-pytorch's),
    ``persistence_version``, ``training_set_kwargs``. Only tensors and plain values, so the record can be saved and
    read back with ``torch.load(weights_only=True)``.

    A pickle whose ``networks.py`` is not the reference's is refused unless ``allow_modified_source``.
    """
    path = Path(pkl_path)
    if which not in ("G_ema", "G"):
        raise FidmedError(f"which={which!r}: choose 'G_ema' (the generator the study evaluated) or 'G'.")
    tree, sha256 = _read_pickle(path)
    record = tree.get(which)
    if not isinstance(record, PersistentRecord):
        raise FidmedError(
            f"{path} has no '{which}' network (keys: {sorted(map(str, tree))}); it is not a "
            f"stylegan2-ada-pytorch network snapshot."
        )
    kwargs = _generator_kwargs(record, path, which)
    try:
        G = Generator(**kwargs)
    except Exception as exc:  # noqa: BLE001 -- any constructor failure means the arguments are unsupported
        raise FidmedError(
            f"{path}: fidmed cannot build the generator {which} describes ({exc}); constructor arguments: {kwargs}."
        ) from None
    nodes = _check_structure(record, G, path, which)
    state = _check_tensors(record, G, path, which)
    is_reference = record.module_src_sha256 in REFERENCE_NETWORKS_SRC_SHA256
    if not is_reference and not allow_modified_source:
        raise FidmedError(
            f"{path}: its embedded networks.py is not stylegan2-ada-pytorch's (sha256 "
            f"{record.module_src_sha256[:16]}...), so the generator was trained with modified code and "
            f"may compute something other than the network fidmed rebuilds from its weights (nothing "
            f"from the file was run); to use it anyway pass --allow-modified-source (fidmed "
            f"import-generator, fidmed evaluate) or generator_allow_modified_source=true (run.py), and "
            f"the record will say so."
        )
    ts_kwargs = tree.get("training_set_kwargs")
    return {
        "format": SNAPSHOT_FORMAT,
        "G_ema": state,
        "generator_kwargs": kwargs,
        "kimg": snapshot_kimg(path),
        "source": {
            "kind": "stylegan2-ada-pytorch pickle",
            "path": str(path.resolve()),
            "sha256": sha256,
            "network": which,
            "class_names": sorted({n.class_name for n in nodes}),
            "module_src_sha256": record.module_src_sha256,
            "module_src_is_reference": is_reference,
            "persistence_version": PERSISTENCE_VERSION,
            "training_set_kwargs": ts_kwargs if _is_plain(ts_kwargs) else None,
        },
    }


def write_imported_generator(
    pkl_path: str | os.PathLike,
    out_path: str | os.PathLike | None = None,
    which: str = "G_ema",
    *,
    allow_modified_source: bool = False,
) -> Path:
    """Import ``pkl_path`` and write the record atomically (default: ``<stem>.fidmed.pt`` next to the pickle)."""
    pkl_path = Path(pkl_path)
    record = import_generator_pickle(pkl_path, which=which, allow_modified_source=allow_modified_source)
    out = Path(out_path) if out_path is not None else pkl_path.with_name(f"{pkl_path.stem}.fidmed.pt")
    return atomic_torch_save(record, out)


# ---------------------------------------------------------------------------------------------------------------------
# Checks


def _is_plain(obj: Any) -> bool:
    """Only None/bool/int/float/str and lists, tuples and str-keyed dicts of them."""
    if isinstance(obj, _PLAIN_SCALARS):
        return True
    if isinstance(obj, (list, tuple)):
        return all(_is_plain(v) for v in obj)
    if isinstance(obj, dict):
        return all(isinstance(k, str) and _is_plain(v) for k, v in obj.items())
    return False


def _plain_copy(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_plain_copy(v) for v in obj)
    return obj


def _generator_kwargs(record: PersistentRecord, path: Path, which: str) -> dict[str, Any]:
    """Generator constructor arguments from the persistence decorator's ``_init_args``/``_init_kwargs``."""
    if record.class_name != "Generator":
        raise FidmedError(f"{path}: '{which}' is a {record.class_name}, not a stylegan2-ada-pytorch Generator.")
    if record.type != "class" or record.version != PERSISTENCE_VERSION:
        raise FidmedError(
            f"{path}: '{which}' was stored by torch_utils.persistence type {record.type!r} version "
            f"{record.version!r}; only stylegan2-ada-pytorch's (type 'class', version "
            f"{PERSISTENCE_VERSION}) is supported."
        )
    if "_init_kwargs" not in record.state:
        raise FidmedError(
            f"{path}: '{which}' does not record its constructor arguments (_init_kwargs); it was "
            f"not stored by stylegan2-ada-pytorch's torch_utils.persistence."
        )
    args, kwargs = record.state.get("_init_args") or (), record.state.get("_init_kwargs") or {}
    if not isinstance(args, (tuple, list)) or not isinstance(kwargs, dict) or not _is_plain([list(args), kwargs]):
        raise FidmedError(
            f"{path}: '{which}' has constructor arguments that are not plain values ({args!r}, {kwargs!r})."
        )
    try:
        bound = inspect.signature(Generator).bind(*args, **kwargs)
    except TypeError as exc:
        raise FidmedError(
            f"{path}: '{which}' was built with arguments fidmed's Generator does not take ({exc}): {args!r} {kwargs!r}."
        ) from None
    out = _plain_copy(dict(bound.arguments))
    unknown = sorted(set(out) - GENERATOR_KWARGS)
    for key, allowed in (("mapping_kwargs", MAPPING_KWARGS), ("synthesis_kwargs", SYNTHESIS_KWARGS)):
        sub = out.get(key)
        if sub is None:
            continue
        if not isinstance(sub, dict):
            raise FidmedError(f"{path}: '{which}' {key} is a {type(sub).__name__}, not a dict.")
        unknown += [f"{key}.{k}" for k in sorted(set(sub) - allowed)]
    if unknown:
        raise FidmedError(
            f"{path}: '{which}' uses architecture arguments fidmed does not know: "
            f"{', '.join(unknown)}. Only stylegan2-ada-pytorch's Generator arguments are supported."
        )
    for key in ("z_dim", "c_dim", "w_dim", "img_resolution", "img_channels"):
        if key not in out or isinstance(out[key], bool) or not isinstance(out[key], int) or out[key] < 0:
            raise FidmedError(f"{path}: '{which}' has {key}={out.get(key)!r}; expected a non-negative integer.")
    return out


def _source_classes(src: str) -> set[str]:
    """Names of the top-level classes a module source defines, by parsing (not running) it."""
    try:
        tree = ast.parse(src)
    except (SyntaxError, ValueError) as exc:
        raise FidmedError(f"the pickled network source does not parse ({exc}).") from None
    return {node.name for node in tree.body if isinstance(node, ast.ClassDef)}


def _check_structure(record: PersistentRecord, G: torch.nn.Module, path: Path, which: str) -> list[PersistentRecord]:
    """Every submodule: a persistent record whose class name and plain attributes match fidmed's module."""
    classes = _source_classes(record.module_src)
    if classes != NETWORK_CLASSES:
        extra, missing = sorted(classes - NETWORK_CLASSES), sorted(NETWORK_CLASSES - classes)
        raise FidmedError(
            f"{path}: the pickled networks.py is not stylegan2-ada-pytorch's: it defines "
            f"{'unexpected classes ' + ', '.join(extra) if extra else ''}"
            f"{' and ' if extra and missing else ''}"
            f"{'lacks ' + ', '.join(missing) if missing else ''}. fidmed imports only "
            f"stylegan2-ada-pytorch generators (not StyleGAN3 or modified architectures)."
        )
    fidmed_modules = dict(G.named_modules())
    nodes: list[PersistentRecord] = []

    def visit(prefix: str, node: Any) -> None:
        name = prefix or which
        if not isinstance(node, PersistentRecord):
            raise FidmedError(
                f"{path}: submodule {name} is a {type(node).__name__}, not a stylegan2-ada-pytorch "
                f"persistent network module."
            )
        module = fidmed_modules.get(prefix)
        if module is None:
            raise FidmedError(f"{path}: submodule {name} does not exist in the generator its arguments describe.")
        if node.module_src != record.module_src or node.type != "class" or node.version != PERSISTENCE_VERSION:
            raise FidmedError(
                f"{path}: submodule {name} ({node.class_name}) comes from different source code "
                f"than {which}; the pickle was not written by stylegan2-ada-pytorch."
            )
        if node.class_name != type(module).__name__:
            raise FidmedError(
                f"{path}: submodule {name} is a {node.class_name}; the generator its arguments "
                f"describe has a {type(module).__name__} there."
            )
        nodes.append(node)
        for key, value in node.state.items():
            if key.startswith("_") or key == "training" or key not in module.__dict__:
                continue
            mine = module.__dict__[key]
            if _is_plain(value) and _is_plain(mine) and not _same_value(value, mine):
                raise FidmedError(
                    f"{path}: {name}.{key} is {value!r} in the pickle but {mine!r} in the generator "
                    f"rebuilt from its recorded constructor arguments; the file was written by "
                    f"modified code or edited."
                )
        children = node.modules
        expected = {n for n, _ in module.named_children()}
        present = {n for n, v in children.items() if v is not None}
        if present != expected:
            raise FidmedError(
                f"{path}: {name} has submodules {sorted(present)}; the generator its arguments "
                f"describe has {sorted(expected)}."
            )
        for child_name in sorted(present):
            visit(f"{prefix}.{child_name}" if prefix else child_name, children[child_name])

    visit("", record)
    return nodes


def _same_value(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same_value(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_value(a[k], b[k]) for k in a)
    if (
        isinstance(a, (int, float))
        and isinstance(b, (int, float))
        and not isinstance(a, bool)
        and not isinstance(b, bool)
    ):
        return math.isclose(a, b, rel_tol=1e-12, abs_tol=0.0) or a == b
    return a == b


def _record_tensors(node: PersistentRecord, prefix: str, out: dict[str, Any]) -> None:
    """Parameters and persistent buffers in ``Module.state_dict`` order."""
    params = node.state.get("_parameters") or {}
    buffers = node.state.get("_buffers") or {}
    skip = node.state.get("_non_persistent_buffers_set") or set()
    for name, value in list(params.items()) + [(n, v) for n, v in buffers.items() if n not in skip]:
        if value is not None:
            out[prefix + name] = value
    for name, child in node.modules.items():
        if child is not None:
            _record_tensors(child, f"{prefix}{name}.", out)


def _check_tensors(record: PersistentRecord, G: torch.nn.Module, path: Path, which: str) -> dict[str, torch.Tensor]:
    """The pickled state dict, checked name by name against fidmed's Generator (shape and dtype)."""
    pickled: dict[str, Any] = {}
    _record_tensors(record, "", pickled)
    expected = G.state_dict()
    missing, unexpected = sorted(set(expected) - set(pickled)), sorted(set(pickled) - set(expected))
    if missing or unexpected:
        raise FidmedError(
            f"{path}: '{which}' tensors do not match the generator its arguments describe "
            f"(missing {missing[:5]}, unexpected {unexpected[:5]})."
        )
    state: dict[str, torch.Tensor] = {}
    for name, ref in expected.items():
        value = pickled[name]
        if not isinstance(value, torch.Tensor):
            raise FidmedError(f"{path}: {which}.{name} is a {type(value).__name__}, not a tensor.")
        if tuple(value.shape) != tuple(ref.shape) or value.dtype != ref.dtype:
            raise FidmedError(
                f"{path}: {which}.{name} has shape {tuple(value.shape)} ({value.dtype}); the "
                f"generator its arguments describe needs {tuple(ref.shape)} ({ref.dtype})."
            )
        state[name] = value.detach().contiguous()
    return state

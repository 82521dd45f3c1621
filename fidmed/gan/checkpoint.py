"""Loading any supported generator file, safely.

Supported: fidmed snapshots (``network-snapshot-*.pt``, ``final.pt``; :mod:`fidmed.gan.snapshot`), fidmed Lightning
checkpoints (``last.ckpt``, which carry the same record under ``"fidmed"``), both read with
``torch.load(weights_only=True)``, and stylegan2-ada-pytorch pickles (``network-snapshot-*.pkl``, the format of the
study's released generators), read in memory by the restricted unpickler of :mod:`fidmed.gan.pickle_import`. No
code from any of these files is run, and no converted copy is written anywhere.

A file is recognised by its content, not its name: a PNG, a folder or a zip archive given as a generator is named
for what it is, in one line.
"""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch

from fidmed.errors import FidmedError
from fidmed.gan.pickle_import import import_generator_pickle
from fidmed.gan.snapshot import SNAPSHOT_FORMAT, atomic_torch_save, file_kind, snapshot_name

__all__ = ["SNAPSHOT_FORMAT", "atomic_torch_save", "snapshot_name", "read_generator_record", "load_generator"]

_EXPECTED = (
    "a fidmed generator file (network-snapshot-*.pt, final.pt or last.ckpt) or a stylegan2-ada-pytorch "
    "network-snapshot-*.pkl"
)
#: Kinds that go to the stylegan2-ada-pytorch importer: pickles, and what a ``.pkl`` of an old pickle protocol
#: looks like (the importer then says what is wrong with it).
_PICKLE_KINDS = frozenset({"pickle"})
_MAYBE_PICKLE_KINDS = frozenset({"text", "unknown"})


def read_generator_record(path: str | os.PathLike, *, allow_modified_source: bool = False) -> dict[str, Any]:
    """The generator record of a fidmed snapshot or checkpoint, or of a stylegan2-ada-pytorch pickle.

    ``allow_modified_source``: accept a pickle whose embedded ``networks.py`` is not stylegan2-ada-pytorch's (see
    :func:`fidmed.gan.pickle_import.import_generator_pickle`; ``record["source"]`` says whether it matched).
    """
    path = Path(path)
    kind = file_kind(path)
    if kind.code == "missing":
        raise FidmedError(
            f"generator file not found: {path}. Pass generator=PATH to a network-snapshot-*.pt, "
            f"final.pt or last.ckpt written by fidmed (see `outputs/train/*/`), or a "
            f"stylegan2-ada-pytorch network-snapshot-*.pkl."
        )
    if kind.code == "directory":
        found = [n for n in ("final.pt", "checkpoints/last.ckpt") if (path / n).is_file()]
        found += sorted(p.name for p in path.glob("network-snapshot-*.p[tk]*"))[-2:]
        hint = f"; it holds {', '.join(found)}: pass one of them" if found else "; pass the file itself"
        raise FidmedError(f"{path} is a folder, not {_EXPECTED}{hint}.")
    if kind.code in _PICKLE_KINDS or (path.suffix == ".pkl" and kind.code in _MAYBE_PICKLE_KINDS):
        return import_generator_pickle(path, allow_modified_source=allow_modified_source)
    if kind.code == "damaged-zip":
        raise FidmedError(f"{path} is {kind.text}; copy it again or pass another generator file.")
    if kind.code not in ("torch-zip", "torch-legacy"):
        raise FidmedError(f"{path} is {kind.text}, not {_EXPECTED}.")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # the weights-only reader refused something: say what, not torch's advice
        names = re.findall(r"GLOBAL ([\w.]+)", str(exc))
        detail = f" such as {names[0]}" if names else ""
        raise FidmedError(
            f"{path} is a PyTorch file holding objects{detail}, not only tensors and plain values, so "
            f"it is not {_EXPECTED} (fidmed reads those without running code from them)."
        ) from None
    except Exception as exc:  # noqa: BLE001 -- a truncated or damaged file
        detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0].split("  (Could this")[0].strip()
        raise FidmedError(
            f"cannot read {path}: it is a damaged or truncated PyTorch file ({detail}); copy it again "
            f"or pass another generator file."
        ) from None
    if isinstance(obj, dict) and obj.get("format") == SNAPSHOT_FORMAT:
        return obj
    if isinstance(obj, dict) and isinstance(obj.get("fidmed"), dict):
        return obj["fidmed"]
    raise FidmedError(f"{path} is a PyTorch file but not {_EXPECTED} (no '{SNAPSHOT_FORMAT}' record).")


def load_generator(
    path: str | os.PathLike, device: torch.device | str = "cpu", *, allow_modified_source: bool = False
) -> tuple[torch.nn.Module, dict]:
    """Build G_ema from a generator file (see :func:`read_generator_record`); returns the generator (eval mode) and
    its record. A stylegan2-ada-pytorch pickle is imported in memory: nothing is written to disk."""
    from fidmed.gan.networks import Generator, build_networks

    record = read_generator_record(path, allow_modified_source=allow_modified_source)
    if "generator_kwargs" in record:  # exact constructor arguments (imported stylegan2-ada-pytorch pickles)
        G = Generator(**record["generator_kwargs"])
    else:
        G, _ = build_networks(**record["network_kwargs"])
    missing, unexpected = G.load_state_dict(record["G_ema"], strict=False)
    if missing or unexpected:
        raise FidmedError(
            f"generator file {path} does not match the network it describes "
            f"(missing {missing[:5]}, unexpected {unexpected[:5]}); it was written by an "
            f"incompatible fidmed version."
        )
    return G.eval().requires_grad_(False).to(device), record

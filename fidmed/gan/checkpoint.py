"""Generator snapshots: atomic writes, safe reads, and loading any supported generator file.

Supported: fidmed snapshots (``*.pt``), fidmed Lightning checkpoints (``*.ckpt``) and stylegan2-ada-pytorch
pickles (``network-snapshot-*.pkl``, the format of the study's released generators), which are read by the
restricted unpickler of :mod:`fidmed.gan.legacy` without running any code from the file.

A snapshot (``network-snapshot-XXXXXX.pt``) holds G_ema's weights and the arguments that build it, as
tensors and plain values only, so it is read with ``torch.load(weights_only=True)``: nothing in the file is
executed. Lightning checkpoints written by fidmed (``last.ckpt``) carry the same record under ``"fidmed"``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from fidmed.atomic import atomic_write
from fidmed.errors import FidmedError

SNAPSHOT_FORMAT = "fidmed-generator-v1"


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to a temporary file in the same folder, then rename: readers never see half a file."""
    with atomic_write(path) as f:
        torch.save(obj, f)
    return Path(path)


def snapshot_name(kimg: float) -> str:
    """stylegan2-ada-pytorch's naming: whole kimg, six digits."""
    return f"network-snapshot-{int(round(kimg * 1000)) // 1000:06d}.pt" if kimg >= 1 else \
        f"network-snapshot-{int(round(kimg * 1000)):06d}img.pt"


def read_generator_record(path: str | os.PathLike) -> dict[str, Any]:
    """The generator record of a fidmed snapshot (.pt) or fidmed Lightning checkpoint (.ckpt)."""
    path = Path(path)
    if not path.is_file():
        raise FidmedError(f"generator file not found: {path}. Pass generator=PATH to a network-snapshot-*.pt "
                          f"or last.ckpt written by fidmed (see `outputs/train/*/checkpoints/`).")
    if path.suffix == ".pkl":  # stylegan2-ada-pytorch snapshot: imported in memory, nothing in it executed
        from fidmed.gan.legacy import import_generator_pickle

        return import_generator_pickle(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt file, or a pickle that needs code
        raise FidmedError(f"cannot read generator file {path}: {exc}. It must be a fidmed snapshot "
                          f"(network-snapshot-*.pt) or a fidmed last.ckpt.") from None
    if isinstance(obj, dict) and obj.get("format") == SNAPSHOT_FORMAT:
        return obj
    if isinstance(obj, dict) and isinstance(obj.get("fidmed"), dict):
        return obj["fidmed"]
    raise FidmedError(f"{path} is not a fidmed generator file (no '{SNAPSHOT_FORMAT}' record).")


def load_generator(path: str | os.PathLike, device: torch.device | str = "cpu") -> tuple[torch.nn.Module, dict]:
    """Build G_ema from a snapshot or checkpoint; returns the generator (eval mode) and its record."""
    from fidmed.gan.networks import Generator, build_networks

    record = read_generator_record(path)
    if "generator_kwargs" in record:  # exact constructor arguments (imported stylegan2-ada-pytorch pickles)
        G = Generator(**record["generator_kwargs"])
    else:
        G, _ = build_networks(**record["network_kwargs"])
    missing, unexpected = G.load_state_dict(record["G_ema"], strict=False)
    if missing or unexpected:
        raise FidmedError(f"generator file {path} does not match the network it describes "
                          f"(missing {missing[:5]}, unexpected {unexpected[:5]}); it was written by an "
                          f"incompatible fidmed version.")
    return G.eval().requires_grad_(False).to(device), record

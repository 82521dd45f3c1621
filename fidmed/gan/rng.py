"""The random state of training, kept apart from the rest of the process and saved with every checkpoint.

A training step draws its random numbers (latents, style-mixing cut-offs, the generator's noise inputs, path-length
noise, ADA/DiffAugment parameters, APA's replacement draws and fakes) through the process's global generators:
torch's CPU generator, the generator of the accelerator the step runs on and, for any code that uses them, numpy's
and Python's. Those draws are spread over the networks, the loss and the augmentations, as in
stylegan2-ada-pytorch; rather than thread a ``torch.Generator`` through all of them (and change the numbers a
seed gives), a :class:`RandomStream` swaps its own state into the global generators for the duration of a step
and takes the advanced state back out afterwards. So:

- what a step draws depends only on the seed and on the steps before it, never on anything else the process does
  between steps (evaluation, image logging, a data-loader iterator being created when training resumes);
- the stream's state after step ``k`` is a few small tensors, written into the checkpoint of step ``k``; a
  resumed run loads it and its step ``k + 1`` draws exactly what the uninterrupted run's step ``k + 1`` drew.

Until its first use a stream has no state of its own: its first ``active`` block draws from the global
generators as it finds them (after ``seed_everything`` and the networks' initialisation), which is exactly the
sequence a fresh run drew before streams existed, so generators trained before keep their fingerprints.
:meth:`RandomStream.seed` gives a stream a start of its own instead (each DDP rank's: ``seed * world_size + rank``).

:func:`fork_random_state` is the same swap without a stream: code inside it may draw as it likes, the global
generators are put back afterwards (evaluation during training runs inside one).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

STATE_FORMAT = 1


def _accelerator(device: torch.device | str | None) -> torch.device | None:
    """``device`` when it has a generator of its own (CUDA), else None (the CPU generator covers it)."""
    if device is None:
        return None
    device = torch.device(device)
    return device if device.type == "cuda" else None


def capture_random_state(device: torch.device | str | None = None) -> dict[str, Any]:
    """The global generators' states as Python objects: torch CPU, ``device``'s (CUDA), numpy, Python."""
    acc = _accelerator(device)
    return {
        "torch": torch.get_rng_state(),
        "cuda": None
        if acc is None
        else (acc.index if acc.index is not None else torch.cuda.current_device(), torch.cuda.get_rng_state(acc)),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }


def restore_random_state(state: dict[str, Any], device: torch.device | str | None = None) -> None:
    """Put a state from :func:`capture_random_state` back into the global generators.

    The accelerator state is set on ``device`` (a state saved on ``cuda:1`` continues on ``cuda:0`` when the
    resumed run uses that device); a state without one (saved on the CPU) leaves the accelerator's generator alone.
    """
    torch.set_rng_state(state["torch"])
    acc = _accelerator(device)
    if acc is not None and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"][1], acc)
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


@contextmanager
def fork_random_state(device: torch.device | str | None = None) -> Iterator[None]:
    """Run a block with the global generators restored afterwards, as ``torch.random.fork_rng`` does, plus numpy's
    and Python's generators: whatever the block draws, the code after it draws as if it had not run."""
    outer = capture_random_state(device)
    try:
        yield
    finally:
        restore_random_state(outer, device)


class RandomStream:
    """A private sequence of random numbers, drawn through the global generators inside :meth:`active` blocks.

    ``state_dict()`` / ``load_state_dict()`` carry its position through checkpoints as tensors and plain numbers
    only (readable with ``torch.load(weights_only=True)``).
    """

    def __init__(self) -> None:
        self.state: dict[str, Any] | None = None  # None: not used yet, continue from the global generators

    def seed(self, seed: int, device: torch.device | str | None = None) -> None:
        """Start the stream where the global generators would be after seeding each with ``seed`` (torch's CPU and
        CUDA generators, numpy's, Python's: what ``lightning.seed_everything`` seeds), without touching them."""
        acc = _accelerator(device)
        cuda = None
        if acc is not None:
            index = acc.index if acc.index is not None else torch.cuda.current_device()
            cuda = (index, torch.Generator(device=f"cuda:{index}").manual_seed(seed).get_state())
        self.state = {
            "torch": torch.Generator().manual_seed(seed).get_state(),
            "cuda": cuda,
            "numpy": np.random.RandomState(seed % 2**32).get_state(),
            "python": random.Random(seed).getstate(),
        }

    @contextmanager
    def active(self, device: torch.device | str | None = None) -> Iterator[None]:
        """Draws inside the block come from this stream; afterwards the global generators are as before."""
        with fork_random_state(device):
            if self.state is not None:
                restore_random_state(self.state, device)
            try:
                yield
            finally:
                self.state = capture_random_state(device)

    # ------------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any] | None:
        """The stream's position (None before its first use)."""
        if self.state is None:
            return None
        name, keys, pos, has_gauss, cached = self.state["numpy"]
        version, internal, gauss_next = self.state["python"]
        cuda = self.state["cuda"]
        return {
            "format": STATE_FORMAT,
            "torch": self.state["torch"].clone(),
            "cuda": None if cuda is None else {"index": int(cuda[0]), "state": cuda[1].clone()},
            "numpy": {
                "name": str(name),
                "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
                "pos": int(pos),
                "has_gauss": int(has_gauss),
                "cached_gaussian": float(cached),
            },
            "python": {
                "version": int(version),
                "internal": torch.tensor(internal, dtype=torch.int64),
                "gauss_next": gauss_next,
            },
        }

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if state is None:
            self.state = None
            return
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"unknown random-state format {state.get('format')!r} (expected {STATE_FORMAT})")
        numpy_state, python_state, cuda = state["numpy"], state["python"], state["cuda"]
        self.state = {
            "torch": state["torch"].to(device="cpu", dtype=torch.uint8).clone(),
            "cuda": None
            if cuda is None
            else (int(cuda["index"]), cuda["state"].to(device="cpu", dtype=torch.uint8).clone()),
            "numpy": (
                numpy_state["name"],
                numpy_state["keys"].numpy().astype(np.uint32),
                int(numpy_state["pos"]),
                int(numpy_state["has_gauss"]),
                float(numpy_state["cached_gaussian"]),
            ),
            "python": (
                int(python_state["version"]),
                tuple(int(v) for v in python_state["internal"].tolist()),
                python_state["gauss_next"],
            ),
        }

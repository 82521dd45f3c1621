"""Exact distributed evaluation helpers.

The evaluator itself is distributed-aware: with an initialised default process group every rank reads a
disjoint shard ``np.arange(N)[rank::world]`` (uneven sizes, no padding, no duplicates), float64 moments are
all-reduced exactly and kept features are gathered with their indices (``StreamingMoments.all_reduce``), so
every rank returns the single-process result. Rank 0 writes the real-statistics cache; the others wait at a
barrier. Under Lightning DDP the trainer starts the group; this module's ``spawn`` starts one for a local
multi-process run (gloo on the CPU; used by the tests).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import Any

import torch.distributed as dist


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _entry(rank: int, world: int, port: int, backend: str, fn: Callable[..., Any], args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group(backend, rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def spawn(fn: Callable[..., Any], world_size: int, *args: Any, backend: str = "gloo") -> None:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` new processes sharing a process group.

    ``fn`` must be importable by name (module level). Results go through files or queues in ``args``.
    """
    import torch.multiprocessing as mp

    mp.spawn(_entry, args=(world_size, free_port(), backend, fn, args), nprocs=world_size, join=True)

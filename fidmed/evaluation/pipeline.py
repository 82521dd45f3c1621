"""Input pipeline of the evaluator: read, quantise and preprocess batches ahead of the forward passes.

fidmed's resizers are PIL on the CPU (measured on a 2-core Xeon: about 0.5-1 ms per image and distinct
preprocessing on one core). On a CPU that is under 1% of an evaluation; on a GPU, where the forward passes are
far faster, resizing serially in the main thread would set the speed (GPU numbers: benchmarks/results/evaluate.md,
pending). So this module

- reads batch ``k + 1`` (decoding files, or running the generator) in a producer thread while the main thread
  runs the forward passes of batch ``k`` (``prefetch`` batches are kept ready);
- computes each distinct :class:`~fidmed.features.preprocess.Preprocessing` once per batch, split over
  ``workers`` threads (PIL releases the GIL while it resizes and decodes, so the threads run in parallel);
- moves the preprocessed batches to the device from pinned memory.

Results are bit-identical for any ``workers``/``prefetch``: every image goes through the same per-image function
and the batches come out in order (tested). ``workers=0`` runs everything in the calling thread, one batch at a
time (useful for debugging and profiling).
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fidmed.features.preprocess import Preprocessing, preprocess

_DONE = object()


def default_workers() -> int:
    """Threads for preprocessing: the CPUs this process may use, at most 16."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(16, cpus))


def resolve_workers(workers: int | str | None) -> int:
    """``auto``/None -> :func:`default_workers`; an integer >= 0 as given (0 = no threads)."""
    if workers is None or str(workers).lower() == "auto":
        return default_workers()
    n = int(workers)
    if n < 0:
        from fidmed.errors import ConfigError

        raise ConfigError(f"eval.num_workers={workers} must be >= 0 or 'auto' (0 = preprocess in the main thread).")
    return n


@dataclass
class PreparedBatch:
    """One batch: source indices, the uint8 images (CPU) and one float32 input per preprocessing (on device)."""

    indices: np.ndarray
    images: torch.Tensor
    inputs: dict[Preprocessing, torch.Tensor]


def _preprocess_parallel(
    images: torch.Tensor, spec: Preprocessing, pool: ThreadPoolExecutor | None, parts: int
) -> torch.Tensor:
    """``preprocess`` over contiguous slices of the batch in ``pool`` (same per-image work, same result)."""
    n = images.shape[0]
    if pool is None or parts < 2 or n < 2:
        return preprocess(images, spec)
    bounds = np.linspace(0, n, min(parts, n) + 1).astype(int)
    futures = [pool.submit(preprocess, images[a:b], spec) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
    return torch.cat([f.result() for f in futures])


class _Producer(threading.Thread):
    """Runs ``make()`` for every chunk and puts the results (or the first exception) into a bounded queue."""

    def __init__(self, chunks: Sequence[np.ndarray], make, prefetch: int, device: torch.device) -> None:
        super().__init__(name="fidmed-eval-input", daemon=True)
        self.chunks, self.make, self.device = chunks, make, device
        self.out: queue.Queue = queue.Queue(maxsize=max(1, prefetch))
        self.stop = threading.Event()

    def _put(self, item: Any) -> bool:
        while not self.stop.is_set():
            try:
                self.out.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def run(self) -> None:
        try:
            if self.device.type == "cuda" and self.device.index is not None:
                torch.cuda.set_device(self.device)  # the current device is per thread too (DDP rank r: cuda:r)
            with torch.no_grad():  # grad mode is per thread: a generator running here must not build graphs
                for chunk in self.chunks:
                    if self.stop.is_set() or not self._put(self.make(chunk)):
                        return
        except BaseException as exc:  # handed to the consumer, which re-raises it
            self._put(exc)
            return
        self._put(_DONE)


def prepared_batches(
    source,
    batch_size: int,
    indices: Iterable[int],
    specs: Sequence[Preprocessing],
    device: torch.device,
    workers: int = 0,
    prefetch: int = 2,
) -> Iterator[PreparedBatch]:
    """Batches of ``source`` (a :mod:`fidmed.evaluation.sources` source) at ``indices``, preprocessed for ``specs``.

    The uint8 batch comes from ``source.batches(batch_size, chunk)`` one chunk at a time, so the source decides
    how to read (files decoded in threads, generator on its device). Exceptions raised while reading or
    preprocessing are re-raised here, in the caller's thread.
    """
    idx = np.asarray(indices, dtype=np.int64)
    chunks = [idx[s : s + batch_size] for s in range(0, len(idx), batch_size)]
    specs = list(dict.fromkeys(specs))
    pin = device.type == "cuda"
    pool = ThreadPoolExecutor(workers, thread_name_prefix="fidmed-preprocess") if workers > 1 else None

    def make(chunk: np.ndarray) -> PreparedBatch:
        got_idx, images = next(iter(source.batches(len(chunk), chunk)))
        inputs = {}
        for spec in specs:
            x = _preprocess_parallel(images, spec, pool, workers)
            if pin:
                x = x.pin_memory()
            inputs[spec] = x.to(device, non_blocking=pin)
        return PreparedBatch(np.asarray(got_idx), images, inputs)

    try:
        if workers == 0:
            for chunk in chunks:
                yield make(chunk)
            return
        producer = _Producer(chunks, make, prefetch, device)
        producer.start()
        try:
            while True:
                item = producer.out.get()
                if item is _DONE:
                    break
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            producer.stop.set()
            producer.join()
    finally:
        if pool is not None:
            pool.shutdown(wait=True)

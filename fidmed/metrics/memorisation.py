"""Did the generator copy its training images? The memorisation audit (docs/metrics.md#memorisation-audit).

In fidmed the real evaluation set of a modality *is* its training set (the same prepared folder), so the real
features the evaluation pass keeps are the training features. For each feature space (every extractor, and the
pixels of images area-averaged to a small size) and each generated image g:

    nn(g)       its nearest training image t (Euclidean distance d(g, t), float64)
    r(t)        t's distance to its own nearest other training image
    ratio(g)    d(g, t) / r(t)

* **authenticity** (Alaa et al., ICML 2022): the share of generated images with ratio > 1, i.e. not closer to
  their nearest training image than that image's nearest training neighbour is. 1 - authenticity is the share of
  generated images closer to a training image than training images are to each other; for a generator that
  samples the training distribution without copying it is about one half (a new image falls inside a training
  image's nearest-neighbour distance about as often as not), so it is a measure of closeness, not a verdict.
* **copies**: the share of generated images with ratio < ``threshold`` (default 0.5): far closer to one training
  image than training images ever are to each other. Exact copies have ratio 0; lightly perturbed ones (noise,
  a shift of a pixel, re-quantisation) stay far below 0.5 in every space tested (tests/test_memorisation.py).
* **C_T** (Meehan, Chaudhuri & Dasgupta, AISTATS 2020), when a held-out real split P (never trained on) is given:
  the training set is partitioned into ``cells`` cells by k-means (on its first 64 principal components, as
  dgm-eval partitions it); in each cell the distances (in the full feature space, as Meehan et al.; dgm-eval
  measures them in the 64-component projection) of held-out and of generated images to their nearest training
  image of the cell are compared by a Mann-Whitney U test, z-scored under the null of equal distributions (with
  the reference code's continuity correction); C_T is the average of the cells' z-scores weighted by the share of
  held-out images in each cell, over the cells holding more than ``min_cell`` generated images. C_T << 0 (e.g.
  below -3): the generated images are closer to the training images than new real images are: data copying;
  C_T >> 0: they are farther (underfitting).

Every generated image's nearest training image, distance and ratio are kept (written per space as a CSV next to
results.json), and the ``pairs`` closest pairs (lowest ratio) are shown side by side in an image grid for a person
to look at. Distances are computed in float64 by the matrix-product route in chunks, never an N x N matrix.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fidmed.errors import ConfigError, FidmedError

AUDIT_METRICS = {"authenticity": "Auth.", "copies": "copies", "ct": "C_T"}
PIXELS = "pixels"  # the name of the pixel space among the extractors' feature spaces


@dataclass(frozen=True)
class AuditSettings:
    """``eval.audit`` (checked)."""

    threshold: float = 0.5
    heldout: str | None = None
    pixel_size: int = 32
    cells: int = 3
    min_cell: int = 20
    pairs: int = 16

    def protocol(self) -> dict[str, Any]:
        return {
            "threshold": self.threshold,
            "pixel_size": self.pixel_size,
            "ct_cells": self.cells,
            "ct_min_cell": self.min_cell,
            "distance": "euclidean, float64",
            "training_set": "the real evaluation set (the modality's prepared training folder)",
        }


def audit_settings(cfg: Any) -> AuditSettings | None:
    """The settings of an ``eval.audit`` node (dataclass, mapping or DictConfig); None when the audit is off."""
    if cfg is None:
        return None
    get = cfg.get if hasattr(cfg, "get") else lambda k, d=None: getattr(cfg, k, d)
    if not bool(get("enabled", False)):
        return None
    s = AuditSettings(
        float(get("threshold", 0.5)),
        get("heldout"),
        int(get("pixel_size", 32)),
        int(get("cells", 3)),
        int(get("min_cell", 20)),
        int(get("pairs", 16)),
    )
    if not s.threshold > 0:
        raise ConfigError(f"eval.audit.threshold={s.threshold} must be > 0 (a share of the training NN distance).")
    if s.pixel_size < 0:
        raise ConfigError(f"eval.audit.pixel_size={s.pixel_size} must be >= 0 (0 = no pixel-space audit).")
    if s.cells < 1 or s.min_cell < 0 or s.pairs < 0:
        raise ConfigError(
            f"eval.audit.cells={s.cells} must be >= 1, eval.audit.min_cell={s.min_cell} and "
            f"eval.audit.pairs={s.pairs} >= 0."
        )
    return s


# ------------------------------------------------------------------------------------------------ distances
def _tensor(x: Any, device: torch.device) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))
    return t.to(device, torch.float64)


def _rows(n_cols: int, memory_bytes: int) -> int:
    return max(1, memory_bytes // (8 * max(1, n_cols)))


def nearest(
    queries: Any, reference: Any, device: torch.device, k: int = 1, memory_bytes: int = 256 << 20
) -> tuple[np.ndarray, np.ndarray]:
    """Distances [n, k] and indices [n, k] of each query's ``k`` nearest reference rows (ascending). The neighbours
    are found by the matrix-product route; their distances are then recomputed from the differences, so an exact
    copy is at distance 0 (the product route leaves about sqrt(eps) * |x| of rounding there)."""
    q, ref = _tensor(queries, device), _tensor(reference, device)
    k = min(k, ref.shape[0])
    dist = np.empty((q.shape[0], k), dtype=np.float64)
    idx = np.empty((q.shape[0], k), dtype=np.int64)
    rows = _rows(ref.shape[0], memory_bytes)
    for s in range(0, q.shape[0], rows):
        d = torch.cdist(q[s : s + rows], ref, compute_mode="use_mm_for_euclid_dist")
        top = torch.topk(d, k, dim=1, largest=False, sorted=True).indices
        exact = (q[s : s + rows, None, :] - ref[top]).norm(dim=2)
        order = torch.argsort(exact, dim=1, stable=True)
        dist[s : s + rows] = torch.gather(exact, 1, order).cpu().numpy()
        idx[s : s + rows] = torch.gather(top, 1, order).cpu().numpy()
    return dist, idx


def training_nn_distances(train: Any, device: torch.device, memory_bytes: int = 256 << 20) -> np.ndarray:
    """Each training row's distance to its nearest *other* training row (0 for duplicated images), recomputed from
    the difference like :func:`nearest`."""
    t = _tensor(train, device)
    n = t.shape[0]
    if n < 2:
        raise FidmedError(f"the memorisation audit needs at least 2 training images, got {n}")
    out = np.empty(n, dtype=np.float64)
    rows = _rows(n, memory_bytes)
    for s in range(0, n, rows):
        d = torch.cdist(t[s : s + rows], t, compute_mode="use_mm_for_euclid_dist")
        d[torch.arange(d.shape[0]), torch.arange(s, s + d.shape[0])] = math.inf  # not itself, whatever rounding
        other = d.argmin(dim=1)
        out[s : s + rows] = (t[s : s + rows] - t[other]).norm(dim=1).cpu().numpy()
    return out


# ------------------------------------------------------------------------------------------------ C_T
def kmeans(x: np.ndarray, k: int, seed: int, iters: int = 100) -> np.ndarray:
    """Centroids [k, d] of seeded k-means (k-means++ start, Lloyd iterations) in float64."""
    rng = np.random.default_rng(seed)
    n = len(x)
    k = min(k, n)
    centres = [x[rng.integers(n)]]
    d2 = ((x - centres[0]) ** 2).sum(axis=1)
    for _ in range(1, k):
        p = d2 / d2.sum() if d2.sum() > 0 else np.full(n, 1.0 / n)
        centres.append(x[rng.choice(n, p=p)])
        d2 = np.minimum(d2, ((x - centres[-1]) ** 2).sum(axis=1))
    c = np.stack(centres)
    labels = np.full(n, -1)
    for _ in range(iters):
        new = assign_cells(x, c)
        if np.array_equal(new, labels):
            break
        labels = new
        for j in range(k):
            members = x[labels == j]
            if len(members):
                c[j] = members.mean(axis=0)
            else:  # an empty cell takes the point farthest from its centre
                far = int(np.argmax(((x - c[labels]) ** 2).sum(axis=1)))
                c[j] = x[far]
    return c


def assign_cells(x: np.ndarray, centres: np.ndarray) -> np.ndarray:
    d = (x**2).sum(axis=1)[:, None] - 2 * x @ centres.T + (centres**2).sum(axis=1)[None, :]
    return np.argmin(d, axis=1)


def mann_whitney_z(gen_dist: np.ndarray, heldout_dist: np.ndarray) -> float:
    """Z-scored Mann-Whitney U of the generated (first) against the held-out distances, as Meehan et al.'s code:
    U = #(gen > held-out) + ties / 2, mean n m / 2 - 0.5 (continuity correction), sd sqrt(n m (n + m + 1) / 12)."""
    from scipy.stats import rankdata

    m, n = len(gen_dist), len(heldout_dist)
    ranks = rankdata(np.concatenate([gen_dist, heldout_dist]))
    u = float(ranks[:m].sum()) - m * (m + 1) / 2.0
    return (u - (n * m / 2.0 - 0.5)) / math.sqrt(n * m * (n + m + 1) / 12.0)


def data_copying_ct(
    train: np.ndarray,
    heldout: np.ndarray,
    gen: np.ndarray,
    cells: int,
    min_cell: int,
    seed: int,
    device: torch.device,
) -> tuple[float, dict[str, Any]]:
    """C_T of Meehan et al. 2020 (module docstring) and its per-cell details."""
    t, p, q = (np.asarray(a, dtype=np.float64) for a in (train, heldout, gen))
    mean = t.mean(axis=0)
    n_pc = min(64, t.shape[1], max(1, t.shape[0] - 1))
    basis = np.linalg.svd(t - mean, full_matrices=False)[2][:n_pc].T  # principal axes of the training set
    project = lambda a: (a - mean) @ basis  # noqa: E731
    centres = kmeans(project(t), cells, seed)
    lt, lp, lq = (assign_cells(project(a), centres) for a in (t, p, q))
    per_cell = []
    num = den = 0.0
    for c in range(len(centres)):
        tc, pc, qc = t[lt == c], p[lp == c], q[lq == c]
        row: dict[str, Any] = {"cell": c, "n_train": len(tc), "n_heldout": len(pc), "n_gen": len(qc), "z": None}
        if len(qc) > min_cell and len(pc) and len(tc):
            z = mann_whitney_z(nearest(qc, tc, device)[0][:, 0], nearest(pc, tc, device)[0][:, 0])
            row["z"] = z
            num += len(pc) / len(p) * z
            den += len(pc) / len(p)
        per_cell.append(row)
    value = num / den if den > 0 else math.nan
    details = {
        "cells": per_cell,
        "n_heldout": len(p),
        "cells_used": sum(r["z"] is not None for r in per_cell),
        "reason": None if den > 0 else f"no cell holds more than {min_cell} generated images and a held-out image",
        "reading": "C_T << 0 (below about -3): generated images are closer to the training images than held-out real "
        "images are (data copying); C_T >> 0: farther (underfitting)",
    }
    return value, details


# ------------------------------------------------------------------------------------------------ the audit
@dataclass
class AuditResult:
    """One feature space's audit: per generated image (index order) and the summary numbers."""

    space: str
    nn_index: np.ndarray
    nn_distance: np.ndarray
    train_nn_distance: np.ndarray
    ratio: np.ndarray
    threshold: float
    authenticity: float
    copies: float
    ct: float = math.nan
    ct_details: dict[str, Any] = field(default_factory=dict)
    closest: list[dict[str, Any]] = field(default_factory=list)

    @property
    def flagged(self) -> np.ndarray:
        return self.ratio < self.threshold

    def summary(self) -> dict[str, Any]:
        finite = self.ratio[np.isfinite(self.ratio)]
        q = np.quantile(finite, [0.01, 0.05, 0.5]) if finite.size else [math.nan] * 3
        return {
            "n_gen": len(self.ratio),
            "n_flagged": int(self.flagged.sum()),
            "threshold": self.threshold,
            "ratio_q01": float(q[0]),
            "ratio_q05": float(q[1]),
            "ratio_median": float(q[2]),
            "share_closer_than_training_nn": 1.0 - self.authenticity,
            "closest": self.closest,
        }


def audit(
    gen: Any,
    train: Any,
    settings: AuditSettings,
    device: torch.device,
    space: str,
    heldout: Any = None,
    seed: int = 0,
) -> AuditResult:
    """The memorisation audit of generated rows ``gen`` against training rows ``train`` (module docstring)."""
    gen, train = np.asarray(gen), np.asarray(train)
    if gen.ndim != 2 or train.ndim != 2 or gen.shape[1] != train.shape[1]:
        raise FidmedError(f"audit in {space}: generated {gen.shape} and training {train.shape} rows do not match")
    dist, idx = nearest(gen, train, device)
    dist, idx = dist[:, 0], idx[:, 0]
    own = training_nn_distances(train, device)[idx]
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(own > 0, dist / np.where(own > 0, own, 1.0), np.where(dist > 0, math.inf, 0.0))
    res = AuditResult(
        space,
        idx,
        dist,
        own,
        ratio,
        settings.threshold,
        authenticity=float((dist > own).mean()),
        copies=float((ratio < settings.threshold).mean()),
    )
    order = np.lexsort((dist, ratio))[: settings.pairs]
    res.closest = [
        {"gen_index": int(g), "train_index": int(idx[g]), "distance": float(dist[g]), "ratio": float(ratio[g])}
        for g in order
    ]
    if heldout is not None:
        res.ct, res.ct_details = data_copying_ct(
            train, np.asarray(heldout), gen, settings.cells, settings.min_cell, seed, device
        )
    else:
        res.ct_details = {"reason": "no held-out real split given (eval.audit.heldout=PATH, fidmed evaluate --heldout)"}
    return res


def per_image_rows(res: AuditResult, seeds: Sequence[int] | None = None) -> list[dict[str, Any]]:
    """One row per generated image: its index (and seed), nearest training image, distances, ratio, flag."""
    rows = []
    for g in range(len(res.ratio)):
        rows.append(
            {
                "gen_index": g,
                "seed": None if seeds is None else int(seeds[g]),
                "nn_train_index": int(res.nn_index[g]),
                "distance": float(res.nn_distance[g]),
                "train_nn_distance": float(res.train_nn_distance[g]),
                "ratio": float(res.ratio[g]),
                "flagged": bool(res.flagged[g]),
            }
        )
    return rows


# ------------------------------------------------------------------------------------------------ pixel space
def downsample(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 NCHW -> uint8 NCHW area-averaged to at most ``size`` x ``size`` (rounded to nearest)."""
    h, w = images.shape[-2:]
    if h <= size and w <= size:
        return images.to(torch.uint8)
    out = torch.nn.functional.adaptive_avg_pool2d(images.to(torch.float32), (min(size, h), min(size, w)))
    return out.round().clamp(0, 255).to(torch.uint8)


class PixelCopy:
    """An image source that keeps a downsampled uint8 copy of every image it hands out, for the pixel-space audit:
    it wraps the source of the evaluation pass, so no image is read twice. Memory: N x C x size^2 bytes (50,000
    gray images at 32 x 32: 51 MB)."""

    def __init__(self, source: Any, size: int) -> None:
        self.source = source
        self.size = int(size)
        self._images: np.ndarray | None = None
        self._seen: np.ndarray | None = None

    @property
    def description(self) -> dict[str, Any]:
        return self.source.description

    def __len__(self) -> int:
        return len(self.source)

    def batches(self, batch_size: int, indices: Sequence[int] | None = None) -> Iterator[tuple[np.ndarray, Any]]:
        for idx, images in self.source.batches(batch_size, indices):
            small = downsample(torch.as_tensor(images), self.size).cpu().numpy()
            if self._images is None:
                self._images = np.zeros((len(self.source), *small.shape[1:]), dtype=np.uint8)
                self._seen = np.zeros(len(self.source), dtype=bool)
            self._images[np.asarray(idx)] = small
            self._seen[np.asarray(idx)] = True
            yield idx, images

    def images(self) -> np.ndarray:
        """The copies of all images, index order (every rank calls this under torch.distributed: the ranks' shards
        are summed into the whole set)."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
            shape = torch.zeros(4, dtype=torch.int64, device=device)
            if self._images is not None:
                shape[:] = torch.tensor(self._images.shape)
            dist.all_reduce(shape, op=dist.ReduceOp.MAX)
            local = torch.zeros(tuple(shape.tolist()), dtype=torch.int32, device=device)
            seen = torch.zeros(int(shape[0]), dtype=torch.int32, device=device)
            if self._images is not None:
                local += torch.from_numpy(self._images).to(device, torch.int32)
                seen += torch.from_numpy(self._seen).to(device, torch.int32)
            dist.all_reduce(local)
            dist.all_reduce(seen)
            self._images = local.cpu().numpy().astype(np.uint8)
            self._seen = seen.cpu().numpy() > 0
        if self._images is None or not bool(self._seen.all()):
            raise FidmedError("the pixel copy of the images is incomplete (the pass did not read every image)")
        return self._images


def pixel_vectors(images: np.ndarray) -> np.ndarray:
    """Flattened pixel rows in [0, 1] (float32), the space of the pixel-space audit."""
    return images.reshape(len(images), -1).astype(np.float32) / 255.0


# ------------------------------------------------------------------------------------------------ image grid
def read_images(source: Any, indices: Sequence[int]) -> np.ndarray:
    """uint8 NCHW images of ``source`` at ``indices`` (a few images, read by index)."""
    if not len(indices):
        return np.zeros((0, 1, 1, 1), dtype=np.uint8)
    order = np.asarray(indices, dtype=np.int64)
    uniq, back = np.unique(order, return_inverse=True)
    got = [np.asarray(images) for _, images in source.batches(len(uniq), uniq)]
    return np.concatenate(got)[back]


def pairs_grid(gen_images: np.ndarray, train_images: np.ndarray, per_row: int = 4, gap: int = 2) -> np.ndarray:
    """Generated image next to its nearest training image, ``per_row`` pairs per row, white gaps between pairs:
    HWC uint8 (HW for gray)."""
    n, c, h, w = gen_images.shape
    if train_images.shape[1:] != (c, h, w):
        raise FidmedError(
            f"generated images {gen_images.shape[1:]} and training images {train_images.shape[1:]} differ"
        )
    per_row = max(1, min(per_row, n))
    rows = -(-n // per_row)
    pair_w = 2 * w + gap
    grid = np.full((rows * (h + 2 * gap), per_row * (pair_w + 3 * gap), c), 255, dtype=np.uint8)
    for k in range(n):
        r, col = divmod(k, per_row)
        y, x = r * (h + 2 * gap) + gap, col * (pair_w + 3 * gap) + gap
        grid[y : y + h, x : x + w] = gen_images[k].transpose(1, 2, 0)
        grid[y : y + h, x + w + gap : x + 2 * w + gap] = train_images[k].transpose(1, 2, 0)
    return grid[..., 0] if c == 1 else grid


def closest_pairs_grid(gen_source: Any, real_source: Any, closest: Sequence[dict[str, Any]]) -> np.ndarray | None:
    """The grid of the closest pairs of an audit (reads only those images, by index); None when there are none."""
    if not closest:
        return None
    gen = read_images(gen_source, [p["gen_index"] for p in closest])
    train = read_images(real_source, [p["train_index"] for p in closest])
    return pairs_grid(gen, train)

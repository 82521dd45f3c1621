"""Streaming float64 feature moments (mean and covariance) that merge exactly across batches and ranks.

The state is a set of sufficient statistics with a sum reduction (as in torchmetrics):

    count               number of feature vectors seen
    shift  K  [d]       a fixed reference point (the mean of the first non-empty batch)
    sum    S1 [d]       sum of (x - K)
    outer  S2 [d, d]    sum of (x - K)(x - K)^T

    mean = K + S1 / n
    cov  = (S2 - S1 S1^T / n) / (n - 1)          (unbiased, N - 1, like np.cov)

Why the shift: the textbook form E[xx^T] - mu mu^T cancels catastrophically when |mu| >> std (a feature with
mean 1e4 and std 1 loses 8 of float64's 16 digits). About a shift K within a few standard deviations of the
mean, the subtracted term S1 S1^T / n is at most of the size of S2 itself, so nothing cancels badly. Two
states with different shifts merge by re-expressing one about the other's shift (exact algebra, see
``_sums_about``); all ranks agree on one shift before a sum all-reduce.

All arithmetic is float64 on the device of the first features given (GPU features stay on the GPU).
With ``keep_features=True`` the raw features are kept too (as given, float32 usually, on the CPU), because the
exact FD route for N < d needs them (see ``fidmed.metrics.fd``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from fidmed.errors import FidmedError

STATE_FORMAT = "fidmed.moments/1"


class StreamingMoments:
    """Float64 streaming mean/covariance of feature vectors of dimension ``dim``."""

    def __init__(self, dim: int, keep_features: bool = False) -> None:
        if dim < 1:
            raise ValueError(f"dim must be positive, got {dim}")
        self.dim = int(dim)
        self.keep_features = bool(keep_features)
        self.count = 0
        self._shift: torch.Tensor | None = None  # [d] float64
        self._sum: torch.Tensor | None = None  # [d] float64, sum of (x - shift)
        self._outer: torch.Tensor | None = None  # [d, d] float64, sum of (x - shift)(x - shift)^T
        self._features: list[torch.Tensor] = []  # CPU tensors, dtype as given
        self._indices: list[torch.Tensor] = []  # CPU int64, only when update() got indices

    # ------------------------------------------------------------------ updating
    def update(self, feats: torch.Tensor, indices: torch.Tensor | None = None) -> None:
        """Add a batch of features ``[N, dim]`` (float32 or float64).

        ``indices`` (optional, ``[N]`` integers) are the samples' global indices; kept with the features (only when
        ``keep_features``; otherwise ignored) so a distributed gather can restore the order and drop duplicates
        (``all_reduce``).
        """
        if not isinstance(feats, torch.Tensor):
            feats = torch.as_tensor(np.asarray(feats))
        if feats.ndim != 2 or feats.shape[1] != self.dim:
            raise FidmedError(
                f"features have shape {tuple(feats.shape)}, expected [N, {self.dim}]: the extractor's feature_dim "
                "does not match the statistics it is added to (wrong extractor or stale cache?)"
            )
        if not feats.is_floating_point():
            raise FidmedError(f"features must be floating point, got {feats.dtype}")
        n = feats.shape[0]
        if n == 0:
            return
        if self.keep_features:
            if indices is not None:
                indices = torch.as_tensor(indices).reshape(-1)
                if indices.numel() != n:
                    raise FidmedError(f"got {indices.numel()} indices for {n} feature vectors")
            if (indices is not None) != bool(self._indices) and self.count > 0:
                raise FidmedError("indices must be given with every batch or with none")
        x = feats.detach().to(torch.float64)
        if not bool(torch.isfinite(x).all()):
            raise FidmedError(
                "the extractor produced NaN or infinite features; check the input images (uint8 expected) "
                "and the extractor weights"
            )
        if self._shift is None:
            self._init_accumulators(x.mean(dim=0))
        y = x - self._shift.to(x.device)
        self._sum += y.sum(dim=0).to(self._sum.device)
        self._outer += (y.T @ y).to(self._outer.device)
        self.count += n
        if self.keep_features:
            self._features.append(feats.detach().to("cpu").clone())
            if indices is not None:
                self._indices.append(indices.detach().to("cpu", torch.int64).clone())

    def _init_accumulators(self, shift: torch.Tensor) -> None:
        self._shift = shift.to(torch.float64).clone()
        self._sum = torch.zeros(self.dim, dtype=torch.float64, device=shift.device)
        self._outer = torch.zeros(self.dim, self.dim, dtype=torch.float64, device=shift.device)

    def _sums_about(self, new_shift: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This state's (sum, outer) re-expressed about ``new_shift`` (exact algebra).

        With y = x - K_old and delta = K_old - K_new:  x - K_new = y + delta, so
        sum' = sum + n delta and outer' = outer + delta sum^T + sum delta^T + n delta delta^T.
        """
        assert self._shift is not None and self._sum is not None and self._outer is not None
        delta = (self._shift - new_shift.to(self._shift.device)).to(torch.float64)
        n = float(self.count)
        new_sum = self._sum + n * delta
        cross = torch.outer(delta, self._sum)
        new_outer = self._outer + cross + cross.T + n * torch.outer(delta, delta)
        return new_sum, new_outer

    def merge(self, other: StreamingMoments) -> StreamingMoments:
        """Add another state's samples to this one (in place; returns self)."""
        if other.dim != self.dim:
            raise FidmedError(f"cannot merge moments of dimension {other.dim} into dimension {self.dim}")
        if other.count == 0:
            return self
        if bool(self._indices) != bool(other._indices) and self.count > 0:
            raise FidmedError("cannot merge moments with indices into moments without (or vice versa)")
        if self._shift is None:
            self._init_accumulators(other._shift.clone())
            assert other._sum is not None and other._outer is not None
            self._sum += other._sum.to(self._sum.device)
            self._outer += other._outer.to(self._outer.device)
        else:
            s, o = other._sums_about(self._shift.to(other._shift.device))
            self._sum += s.to(self._sum.device)
            self._outer += o.to(self._outer.device)
        self.count += other.count
        if self.keep_features:
            if not other.keep_features:
                raise FidmedError("cannot merge moments without kept features into moments that keep them")
            self._features.extend(f.clone() for f in other._features)
            self._indices.extend(i.clone() for i in other._indices)
        return self

    # ------------------------------------------------------------------ results
    def _require(self, n_min: int) -> None:
        if self.count < n_min:
            raise FidmedError(
                f"need at least {n_min} images to compute feature statistics, got {self.count}; "
                "generate or provide more images"
            )

    @property
    def mean(self) -> np.ndarray:
        """Sample mean, float64 numpy ``[d]``."""
        self._require(1)
        assert self._shift is not None and self._sum is not None
        return (self._shift + self._sum.to(self._shift.device) / self.count).cpu().numpy()

    @property
    def cov(self) -> np.ndarray:
        """Unbiased sample covariance (N - 1), float64 numpy ``[d, d]``, exactly symmetric."""
        self._require(2)
        assert self._sum is not None and self._outer is not None
        n = self.count
        c = (self._outer - torch.outer(self._sum, self._sum) / n) / (n - 1)
        c = 0.5 * (c + c.T)  # the two outer products are symmetric up to rounding; make it exact
        return c.cpu().numpy()

    @property
    def features(self) -> np.ndarray:
        """The kept raw features ``[N, d]`` as given (usually float32), in update order (or index order after a
        distributed gather)."""
        if not self.keep_features:
            raise FidmedError("features were not kept: create StreamingMoments(dim, keep_features=True)")
        if not self._features:
            return np.zeros((0, self.dim), dtype=np.float32)  # nothing seen yet: float32, the usual dtype
        return torch.cat(self._features).numpy()

    @property
    def indices(self) -> np.ndarray | None:
        """The kept sample indices ``[N]`` (int64), or None when update() got none."""
        if not self._indices:
            return None
        return torch.cat(self._indices).numpy()

    # ------------------------------------------------------------------ caching
    def state_dict(self) -> dict[str, Any]:
        """Numpy arrays and plain values only (safe for ``np.savez`` / ``torch.save(weights_only=True)``)."""
        state: dict[str, Any] = {
            "format": STATE_FORMAT,
            "dim": self.dim,
            "count": self.count,
            "keep_features": self.keep_features,
        }
        if self.count > 0:
            assert self._shift is not None and self._sum is not None and self._outer is not None
            state["shift"] = self._shift.cpu().numpy()
            state["sum"] = self._sum.cpu().numpy()
            state["outer"] = self._outer.cpu().numpy()
        if self.keep_features:
            state["features"] = self.features
            if self._indices:
                state["indices"] = self.indices
        return state

    @classmethod
    def from_state_dict(cls, state: dict[str, Any], device: str | torch.device = "cpu") -> StreamingMoments:
        fmt = str(np.asarray(state.get("format", "")))
        if fmt != STATE_FORMAT:
            raise FidmedError(f"unknown moments format {fmt!r} (expected {STATE_FORMAT!r}); delete the stale cache")
        m = cls(int(np.asarray(state["dim"])), keep_features=bool(np.asarray(state["keep_features"])))
        m.count = int(np.asarray(state["count"]))
        if m.count > 0:
            m._shift = torch.as_tensor(np.asarray(state["shift"], dtype=np.float64), device=device).clone()
            m._sum = torch.as_tensor(np.asarray(state["sum"], dtype=np.float64), device=device).clone()
            m._outer = torch.as_tensor(np.asarray(state["outer"], dtype=np.float64), device=device).clone()
        if m.keep_features:
            feats = np.asarray(state["features"])
            if feats.shape[0] != m.count:
                raise FidmedError(f"cached moments hold {feats.shape[0]} features for count {m.count}: corrupt cache")
            if feats.shape[0]:
                m._features = [torch.from_numpy(feats.copy())]
            if "indices" in state and state["indices"] is not None:
                m._indices = [torch.from_numpy(np.asarray(state["indices"], dtype=np.int64).copy())]
        return m

    # ------------------------------------------------------------------ distributed
    def all_reduce(self, group: Any = None) -> StreamingMoments:
        """Combine the states of all ranks in place so every rank holds the global statistics (exact).

        Sums: all ranks agree on one shift (the count-weighted mean of the ranks' means), re-express their sums
        about it, then sum-reduce count, sum and outer. With kept features: features (and indices) are gathered
        from every rank; when indices were given, they are sorted by index and duplicated indices (a padded
        DistributedSampler) are dropped, and the statistics are recomputed from the unique features, so the
        result is exact either way. No-op when torch.distributed is not initialised or has one rank.

        NCCL needs CUDA tensors: update the moments with features on the rank's GPU. Every rank must call this.
        """
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
            return self
        device = self._device_for_collectives(dist, group)
        count = torch.tensor([float(self.count)], dtype=torch.float64, device=device)
        weighted_mean = torch.zeros(self.dim, dtype=torch.float64, device=device)
        if self.count > 0:
            weighted_mean = torch.as_tensor(self.mean, device=device) * self.count
        dist.all_reduce(count, group=group)
        dist.all_reduce(weighted_mean, group=group)
        total = int(count.item())
        if total == 0:
            return self
        shift = weighted_mean / total
        if self.count > 0:
            s, o = self._sums_about(shift)
            s, o = s.to(device), o.to(device)
        else:
            s = torch.zeros(self.dim, dtype=torch.float64, device=device)
            o = torch.zeros(self.dim, self.dim, dtype=torch.float64, device=device)
        dist.all_reduce(s, group=group)
        dist.all_reduce(o, group=group)
        self._shift, self._sum, self._outer, self.count = shift, s, o, total

        if self.keep_features:
            local = self.features
            # gathered in float64 (lossless for float32) and cast back to the dtype the features came in
            feats = self._gather_rows(dist, group, device, local, np.float64).astype(local.dtype)
            if self._any_rank_has_indices(dist, group, device):  # a collective: every rank must call it
                idx_local = self.indices if self.indices is not None else np.zeros(0, dtype=np.int64)
                idx = self._gather_rows(dist, group, device, idx_local[:, None], np.int64)[:, 0]
                order = np.argsort(idx, kind="stable")
                idx, feats = idx[order], feats[order]
                keep = np.ones(len(idx), dtype=bool)
                keep[1:] = idx[1:] != idx[:-1]
                idx, feats = idx[keep], feats[keep]
                if not keep.all():
                    # duplicates were summed above: recompute the sums from the unique features
                    exact = StreamingMoments(self.dim, keep_features=False)
                    exact.update(torch.from_numpy(feats).to(device))
                    self._shift, self._sum, self._outer = exact._shift, exact._sum, exact._outer
                    self.count = exact.count
                self._indices = [torch.from_numpy(idx.copy())]
            self._features = [torch.from_numpy(feats.copy())]
        return self

    def _device_for_collectives(self, dist: Any, group: Any) -> torch.device:
        if dist.get_backend(group) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def _any_rank_has_indices(self, dist: Any, group: Any, device: torch.device) -> bool:
        flag = torch.tensor([1.0 if self._indices else 0.0], dtype=torch.float64, device=device)
        dist.all_reduce(flag, group=group)
        return bool(flag.item() > 0)

    def _gather_rows(self, dist: Any, group: Any, device: torch.device, rows: np.ndarray, dtype: Any) -> np.ndarray:
        """All-gather a variable number of rows from every rank (padded to the largest, then trimmed)."""
        rows = np.ascontiguousarray(rows, dtype=dtype)
        world = dist.get_world_size(group)
        n_local = torch.tensor([rows.shape[0]], dtype=torch.int64, device=device)
        sizes = [torch.zeros_like(n_local) for _ in range(world)]
        dist.all_gather(sizes, n_local, group=group)
        counts = [int(s.item()) for s in sizes]
        n_max = max(counts)
        padded = torch.zeros((n_max, rows.shape[1]), dtype=torch.from_numpy(rows).dtype, device=device)
        if rows.shape[0]:
            padded[: rows.shape[0]] = torch.from_numpy(rows).to(device)
        parts = [torch.zeros_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded, group=group)
        return np.concatenate([p[:c].cpu().numpy() for p, c in zip(parts, counts, strict=True)], axis=0)

    def __repr__(self) -> str:
        return f"StreamingMoments(dim={self.dim}, count={self.count}, keep_features={self.keep_features})"

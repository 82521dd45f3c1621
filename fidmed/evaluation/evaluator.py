"""Single-pass, multi-extractor evaluation.

image source -> uint8 batch -> each distinct preprocessing once -> every extractor that uses it -> float64
streaming moments (plus the raw features where the exact small-sample FD route needs them) -> FD and relative
FD against cached real statistics. Every number leaves with its protocol (:mod:`fidmed.evaluation.results`).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from fidmed.errors import FidmedError
from fidmed.evaluation.cache import StatsCache
from fidmed.evaluation.results import MetricRecord
from fidmed.evaluation.sources import QUANTISATION, DatasetSource, GeneratorSource
from fidmed.features.preprocess import preprocess
from fidmed.metrics.fd import frechet_distance_from_moments
from fidmed.metrics.moments import StreamingMoments

log = logging.getLogger(__name__)


def resolve_device(name: str | None) -> torch.device:
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(name).startswith("cuda") and not torch.cuda.is_available():
        raise FidmedError(f"eval.device={name} but no CUDA device is available; use eval.device=cpu or auto.")
    return torch.device(name)


def collect_moments(source, extractors: Sequence[torch.nn.Module], batch_size: int, device: torch.device,
                    keep_features: bool | dict[str, bool] = False, groups: np.ndarray | None = None,
                    num_groups: int = 1, desc: str = "features") -> dict[str, list[StreamingMoments]]:
    """Read ``source`` once and accumulate moments for every extractor.

    ``groups`` (one integer per source index, in ``range(num_groups)``) splits the images into disjoint
    groups with separate moments, e.g. the two halves of the real set for relative FD.
    """
    by_preprocessing: dict[Any, list[torch.nn.Module]] = defaultdict(list)
    for ex in extractors:
        by_preprocessing[ex.preprocessing].append(ex)
    keep = keep_features if isinstance(keep_features, dict) else {ex.name: bool(keep_features) for ex in extractors}
    moments = {ex.name: [StreamingMoments(ex.feature_dim, keep_features=keep[ex.name]) for _ in range(num_groups)]
               for ex in extractors}
    total = len(source)
    with tqdm(total=total, desc=desc, unit="img", leave=False, dynamic_ncols=True) as bar:
        for indices, images in source.batches(batch_size):
            for spec, members in by_preprocessing.items():
                x = preprocess(images, spec).to(device)
                for ex in members:
                    with torch.no_grad():
                        feats = ex(x).to(torch.float64)
                    if not torch.isfinite(feats).all():
                        raise FidmedError(f"extractor {ex.name} produced NaN/Inf features for images "
                                          f"{int(indices[0])}-{int(indices[-1])}; check its weights file "
                                          f"(`fidmed weights list`) and the input images.")
                    if groups is None:
                        moments[ex.name][0].update(feats)
                    else:
                        g = torch.as_tensor(groups[indices], device=feats.device)
                        for k in range(num_groups):
                            sel = g == k
                            if bool(sel.any()):
                                moments[ex.name][k].update(feats[sel])
            bar.update(len(indices))
    return moments


def _copy(m: StreamingMoments) -> StreamingMoments:
    return StreamingMoments.from_state_dict(m.state_dict())


@dataclass
class RealStats:
    """Real-set moments: the whole set and its two seeded halves (for relative FD)."""

    full: StreamingMoments
    half_a: StreamingMoments
    half_b: StreamingMoments
    record: dict[str, Any] = field(default_factory=dict)
    from_cache: bool = False


def split_groups(n: int, seed: int) -> np.ndarray:
    """Seeded split of ``n`` real images into halves: 0 = half A (first floor(n/2) of a permutation), 1 = B."""
    perm = np.random.default_rng(seed).permutation(n)
    groups = np.ones(n, dtype=np.int64)
    groups[perm[: n // 2]] = 0
    return groups


class Evaluator:
    """Evaluates generators against one real set with several extractors in one pass per image source."""

    def __init__(self, extractors: Sequence[torch.nn.Module], real: DatasetSource, *, cache_dir=None,
                 batch_size: int = 50, device: str | torch.device | None = "auto", real_split_seed: int = 0,
                 metrics: Iterable[str] = ("fd", "rfd")) -> None:
        if not extractors:
            raise FidmedError("no extractor selected; choose one with extractor=NAME or extractor=[A,B].")
        self.extractors = list(extractors)
        self.real = real
        self.cache = StatsCache(cache_dir)
        self.batch_size = int(batch_size)
        self.device = resolve_device(device) if not isinstance(device, torch.device) else device
        self.real_split_seed = int(real_split_seed)
        self.metrics = [m.lower() for m in metrics]
        unknown = set(self.metrics) - {"fd", "rfd"}
        if unknown:
            raise FidmedError(f"unknown metric(s) {sorted(unknown)}; available: fd, rfd.")
        if len(real) < 4:
            raise FidmedError(f"the real set has {len(real)} images; FD needs at least 4 (2 per split half).")
        for ex in self.extractors:
            ex.to(self.device).eval()
        self._real_stats: dict[str, RealStats] | None = None

    # --------------------------------------------------------------------------------------------------
    def _real_record(self, ex) -> dict[str, Any]:
        desc = self.real.description
        return {"extractor": ex.name, "weights": ex.weights_label, "preprocessing": ex.preprocessing.key,
                "feature_dim": ex.feature_dim, "dataset": desc.get("name"),
                "manifest_sha256": desc.get("manifest_sha256"), "num_real": len(self.real),
                "real_split_seed": self.real_split_seed, "dtype": "float64", "selection": "first-N-by-index"}

    def real_stats(self) -> dict[str, RealStats]:
        """Real statistics per extractor, from the cache where valid, else one pass for all missing ones."""
        if self._real_stats is not None:
            return self._real_stats
        n = len(self.real)
        stats: dict[str, RealStats] = {}
        missing = []
        for ex in self.extractors:
            record = self._real_record(ex)
            arrays = self.cache.load(record) if record["manifest_sha256"] else None
            if arrays is not None:
                parts = [StreamingMoments.from_state_dict({k[len(p) + 1:]: v for k, v in arrays.items()
                                                           if k.startswith(p + ".")}) for p in ("a", "b")]
                full = _copy(parts[0]).merge(parts[1])
                stats[ex.name] = RealStats(full, parts[0], parts[1], record, from_cache=True)
            else:
                missing.append(ex)
        if missing:
            # Keep the raw features when the split halves are smaller than the feature dimension: the exact
            # FD route for n < d needs them (REFERENCE.md section 5).
            keep = {ex.name: (n // 2) < ex.feature_dim for ex in missing}
            groups = split_groups(n, self.real_split_seed)
            halves = collect_moments(self.real, missing, self.batch_size, self.device, keep, groups, 2,
                                     desc="real images")
            for ex in missing:
                a, b = halves[ex.name]
                record = self._real_record(ex)
                full = _copy(a).merge(b)
                stats[ex.name] = RealStats(full, a, b, record)
                if record["manifest_sha256"]:
                    arrays = {f"a.{k}": v for k, v in a.state_dict().items()}
                    arrays.update({f"b.{k}": v for k, v in b.state_dict().items()})
                    self.cache.save(record, arrays)
        self._real_stats = stats
        return stats

    def evaluate(self, gen: GeneratorSource, context: dict[str, Any] | None = None,
                 desc: str = "generated images") -> list[MetricRecord]:
        """FD (and relative FD) of ``gen`` against the real set, for every extractor."""
        real = self.real_stats()
        # Features are kept only where a set is smaller than the feature dimension: the exact n < d routes
        # ("nuclear" with both sets' features, "mixed" with the small set's) need them (fidmed.metrics.fd).
        keep = {ex.name: len(gen) < ex.feature_dim for ex in self.extractors}
        moments = collect_moments(gen, self.extractors, self.batch_size, self.device, keep, desc=desc)
        records: list[MetricRecord] = []
        for ex in self.extractors:
            g = moments[ex.name][0]
            r = real[ex.name]
            protocol = self.protocol(ex, gen, r)
            fd = frechet_distance_from_moments(g, r.full)
            records.append(MetricRecord(ex.name, ex.study_name, "fd", fd.value,
                                        {"route": fd.route, "mean_term": fd.mean_term}, protocol, context or {}))
            if "rfd" in self.metrics:
                split = frechet_distance_from_moments(r.half_a, r.half_b)
                value = fd.value / split.value if split.value > 0 else float("nan")
                records.append(MetricRecord(ex.name, ex.study_name, "rfd", value,
                                            {"fd": fd.value, "fd_real_split": split.value,
                                             "split_route": split.route,
                                             "n_half_a": r.half_a.count, "n_half_b": r.half_b.count},
                                            protocol, context or {}))
        return records

    def protocol(self, ex, gen: GeneratorSource, real: RealStats) -> dict[str, Any]:
        """Everything that made a number: extractor, weights, input, resizer, quantisation, N, seeds."""
        p = ex.preprocessing
        return {
            "extractor": ex.name, "weights": ex.weights_label, "random_init": bool(ex.random_init),
            "feature_dim": ex.feature_dim, "input_size": p.size, "resizer": p.resizer, "channels": p.channels,
            "quantisation": QUANTISATION, "n_real": real.full.count, "n_gen": len(gen),
            "seeds": gen.description["seeds"], "truncation_psi": gen.truncation_psi,
            "noise_mode": gen.noise_mode, "real_dataset": self.real.description.get("name"),
            "real_manifest_sha256": self.real.description.get("manifest_sha256"),
            "real_split_seed": self.real_split_seed, "stats_dtype": "float64",
        }

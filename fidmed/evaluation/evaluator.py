"""Single-pass, multi-extractor evaluation.

image source -> uint8 batch -> each distinct preprocessing once -> every extractor that uses it -> float64
streaming moments (plus the raw features where a selected metric or the exact small-sample FD route needs them)
-> every selected metric (:data:`fidmed.metrics.base.METRICS`) against cached real statistics. Every number
leaves with its protocol (:mod:`fidmed.evaluation.results`).
"""

from __future__ import annotations

import contextlib
import logging
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from tqdm.auto import tqdm

from fidmed.errors import FidmedError
from fidmed.evaluation.cache import StatsCache
from fidmed.evaluation.pipeline import prepared_batches, resolve_workers
from fidmed.evaluation.results import MetricRecord
from fidmed.evaluation.sources import QUANTISATION, DatasetSource, GeneratorSource
from fidmed.features.base import forward_path, set_forward_path
from fidmed.metrics.base import METRICS, MetricInputs, MetricValue, resolve_metrics
from fidmed.metrics.memorisation import PIXELS, PixelCopy, audit, audit_settings, closest_pairs_grid, pixel_vectors
from fidmed.metrics.moments import StreamingMoments
from fidmed.metrics.uncertainty import ResampleContext, metric_uncertainty, plan_from

log = logging.getLogger(__name__)


def resolve_device(name: str | None) -> torch.device:
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(name).startswith("cuda") and not torch.cuda.is_available():
        raise FidmedError(f"eval.device={name} but no CUDA device is available; use eval.device=cpu or auto.")
    return torch.device(name)


PRECISIONS = ("fp32", "bf16", "tf32")


@runtime_checkable
class FeatureExtractor(Protocol):
    """What the evaluator needs of an extractor (fidmed.features.registry.Extractor is one): a frozen module
    mapping preprocessed float32 ``[N, 3, S, S]`` batches in [0, 255] to ``[N, feature_dim]`` features, and the
    facts recorded with every number it produces."""

    name: str
    study_name: str
    feature_dim: int
    preprocessing: Any  # fidmed.features.preprocess.Preprocessing: resizer, size, channels (hashable)
    weights_label: str
    random_init: bool

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...


def check_precision(precision: str, device: torch.device) -> str:
    precision = str(precision).lower()
    if precision not in PRECISIONS:
        raise FidmedError(
            f"eval.precision={precision!r}; choose one of {', '.join(PRECISIONS)} (fp32 is exact, "
            f"the others are opt-in speed-ups whose FD deviation is measured in benchmarks/)."
        )
    if precision == "tf32" and device.type != "cuda":
        raise FidmedError(
            "eval.precision=tf32 needs a CUDA device (TF32 exists on Ampere and newer GPUs only); "
            "use eval.precision=fp32 (or bf16) on the CPU."
        )
    return precision


@contextlib.contextmanager
def forward_precision(precision: str, device: torch.device) -> Iterator[None]:
    """Context for the extractor forward passes. Moments and FD stay float64 whatever this is.

    fp32: TF32 switched OFF for matmuls and cuDNN convolutions (PyTorch enables cuDNN TF32 by default, which
    would make "fp32" GPU features TF32); bf16: autocast to bfloat16; tf32: TF32 on (CUDA only). The global
    flags are restored on exit.
    """
    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
            torch.backends.cudnn.allow_tf32 = precision == "tf32"
        if precision == "bf16":
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
                yield
        else:
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


def dist_rank_world() -> tuple[int, int]:
    """(rank, world size) of the initialised default process group, else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard_indices(n: int, rank: int, world: int) -> np.ndarray:
    """Rank ``rank``'s disjoint shard of ``range(n)``: every ``world``-th index (uneven sizes allowed, no padding)."""
    return np.arange(n)[rank::world]


def collect_moments(
    source,
    extractors: Sequence[torch.nn.Module],
    batch_size: int,
    device: torch.device,
    keep_features: bool | dict[str, bool] = False,
    groups: np.ndarray | None = None,
    num_groups: int = 1,
    desc: str = "features",
    precision: str = "fp32",
    image_shape: tuple[int, ...] | None = None,
    workers: int = 0,
    prefetch: int = 2,
) -> dict[str, list[StreamingMoments]]:
    """Read ``source`` once and accumulate moments for every extractor.

    ``groups`` (one integer per source index, in ``range(num_groups)``) splits the images into disjoint
    groups with separate moments, e.g. the two halves of the real set for relative FD.

    Distributed: when torch.distributed is initialised, this rank reads only its shard
    ``shard_indices(len(source), rank, world)`` and the moments are all-reduced exactly at the end (kept
    features are gathered with their source indices), so every rank returns the single-process result.
    Every rank must call this with the same arguments. ``image_shape``: expected (C, H, W) of every batch.
    ``workers``/``prefetch``: input pipeline threads and batches read ahead (:mod:`fidmed.evaluation.pipeline`;
    the result does not depend on them). Kept features are stored as the extractor returned them (float32, or
    bf16 widened exactly to float32), half the memory of float64; the moments are float64.

    Each extractor runs through its forward path (:func:`fidmed.features.base.set_forward_path`, set by the
    :class:`Evaluator`: channels_last where safe, optionally compiled; an extractor without one runs as it is);
    a shared preprocessed batch is converted once per memory format its extractors use.
    """
    by_preprocessing: dict[Any, list[torch.nn.Module]] = defaultdict(list)
    for ex in extractors:
        by_preprocessing[ex.preprocessing].append(ex)
    keep = keep_features if isinstance(keep_features, dict) else {ex.name: bool(keep_features) for ex in extractors}
    moments = {
        ex.name: [StreamingMoments(ex.feature_dim, keep_features=keep[ex.name]) for _ in range(num_groups)]
        for ex in extractors
    }
    rank, world = dist_rank_world()
    shard = shard_indices(len(source), rank, world)
    with tqdm(total=len(shard), desc=desc, unit="img", leave=False, dynamic_ncols=True, disable=rank != 0) as bar:
        batches = prepared_batches(source, batch_size, shard, list(by_preprocessing), device, workers, prefetch)
        for batch_no, batch in enumerate(batches):
            indices, images = batch.indices, batch.images
            if image_shape is None:
                image_shape = tuple(images.shape[1:])
            elif tuple(images.shape[1:]) != tuple(image_shape):
                raise FidmedError(
                    f"{desc}: batch {batch_no} (images {int(indices[0])}-{int(indices[-1])}) has "
                    f"shape {tuple(images.shape[1:])} (C, H, W) but the images before were "
                    f"{tuple(image_shape)}; all images of a set must share one size and mode "
                    f"(re-prepare the folder with `fidmed prepare`)."
                )
            idx_t = torch.as_tensor(indices, dtype=torch.int64)
            for spec, members in by_preprocessing.items():
                x = batch.inputs[spec]
                formatted: dict[bool, torch.Tensor] = {}  # channels_last? -> the batch in that memory format
                for ex in members:
                    path = forward_path(ex)
                    if path.channels_last not in formatted:
                        formatted[path.channels_last] = path.prepare(x)
                    with torch.no_grad(), forward_precision(precision, device):
                        raw = path(formatted[path.channels_last])
                    # float32 (bf16 widens exactly) for the kept features; the moments widen to float64 themselves
                    feats = raw if raw.dtype in (torch.float32, torch.float64) else raw.to(torch.float32)
                    if not torch.isfinite(feats).all():
                        raise FidmedError(
                            f"extractor {ex.name} produced NaN/Inf features for images "
                            f"{int(indices[0])}-{int(indices[-1])} (batch {batch_no} of {desc}); "
                            f"check its weights file (`fidmed weights list`) and the input images."
                        )
                    if groups is None:
                        moments[ex.name][0].update(feats, idx_t if keep[ex.name] else None)
                    else:
                        g = torch.as_tensor(groups[indices], device=feats.device)
                        for k in range(num_groups):
                            sel = g == k
                            if bool(sel.any()):
                                moments[ex.name][k].update(feats[sel], idx_t[sel.cpu()] if keep[ex.name] else None)
            bar.update(len(indices))
    if world > 1:
        for ex in extractors:
            for m in moments[ex.name]:
                m.all_reduce()
    return moments


def features_in_index_order(m: StreamingMoments) -> np.ndarray:
    """Kept features sorted by their source index (the same order whatever the sharding or grouping)."""
    feats = m.features
    idx = m.indices
    return feats if idx is None else feats[np.argsort(idx, kind="stable")]


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
    """Evaluates generators against one real set with several extractors in one pass per image source.

    ``metrics``: names of registered metrics (:data:`fidmed.metrics.base.METRICS`: fd, rfd, prdc, kid, fd_inf,
    and any a plugin registers); ``metric_options``: metric name -> its options (the metric's config dataclass
    instance or a mapping of its fields; missing ones take the defaults). Raw features are kept only where a
    selected metric declares it needs them, or where a set is smaller than the feature dimension (exact FD
    route). ``precision``: fp32 | bf16 | tf32 for the extractor forward passes (moments and FD are float64
    always). ``num_workers``: threads that read and preprocess the next batches while the forward passes run
    ("auto": the usable CPUs, at most 16; 0: all in the main thread); results do not depend on it.
    ``channels_last``: run the extractors that declare it safe in the channels_last memory format (their fp32
    features equal the contiguous ones within float32 rounding, :data:`fidmed.features.base.CHANNELS_LAST_RTOL`,
    not bit for bit); False (default): every extractor contiguous, as the reference implementations run them.
    ``compile``: ``torch.compile`` each extractor's forward (features within
    :data:`fidmed.features.base.COMPILE_RTOL` of eager; the first batch of each shape pays the compilation).
    Like the device, both are set on the extractor modules here (:func:`fidmed.features.base.set_forward_path`).

    Distributed: construct and call on every rank of an initialised process group; each rank reads a disjoint
    shard and gets the single-process result (``collect_moments``). Rank 0 writes the real-statistics cache,
    the other ranks wait at a barrier.
    """

    def __init__(
        self,
        extractors: Sequence[FeatureExtractor],
        real: DatasetSource,
        *,
        cache_dir=None,
        batch_size: int = 50,
        device: str | torch.device | None = "auto",
        real_split_seed: int = 0,
        metrics: Iterable[str] = ("fd", "rfd"),
        metric_options: dict[str, Any] | None = None,
        precision: str = "fp32",
        metric_seed: int = 0,
        num_workers: int | str | None = "auto",
        prefetch: int = 2,
        channels_last: bool = False,
        compile: bool = False,
        uncertainty: Any = None,
        audit: Any = None,
        heldout: DatasetSource | None = None,
    ) -> None:
        if not extractors:
            raise FidmedError("no extractor selected; choose one with extractor=NAME or extractor=[A,B].")
        self.extractors = list(extractors)
        self.real = real
        self.cache = StatsCache(cache_dir)
        self.batch_size = int(batch_size)
        self.device = resolve_device(device) if not isinstance(device, torch.device) else device
        self.real_split_seed = int(real_split_seed)
        self.metrics = resolve_metrics(list(metrics))  # evaluation order; fd first, requirements added
        self.metric_options = {name: _metric_options(name, (metric_options or {}).get(name)) for name in self.metrics}
        self.precision = check_precision(precision, self.device)
        self.metric_seed = int(metric_seed)
        self.num_workers = resolve_workers(num_workers)
        self.prefetch = max(1, int(prefetch))
        if len(real) < 4:
            raise FidmedError(f"the real set has {len(real)} images; FD needs at least 4 (2 per split half).")
        self.channels_last = bool(channels_last)
        self.compile = bool(compile)
        for ex in self.extractors:
            ex.to(self.device).eval()
            set_forward_path(ex, channels_last=self.channels_last, compile=self.compile)
        self._real_stats: dict[str, RealStats] | None = None
        # How far to trust a score (docs/metrics.md#uncertainty, #memorisation-audit): bootstrap replicates of every
        # number and the memorisation audit, both from the features (and pixels) of the same pass.
        self.uncertainty = plan_from(uncertainty)
        self.audit = audit_settings(audit)
        self.heldout = heldout
        if heldout is not None and self.audit is None:
            raise FidmedError("a held-out split is only read by the memorisation audit; set eval.audit.enabled=true.")
        self._real_pixels: np.ndarray | None = None
        self._heldout: dict[str, Any] | None = None

    @property
    def needs_real_features(self) -> bool:
        return any(METRICS.get(m).info.needs_real_features for m in self.metrics)

    @property
    def needs_gen_features(self) -> bool:
        return any(METRICS.get(m).info.needs_gen_features for m in self.metrics)

    @property
    def _trust_keeps_gen(self) -> bool:
        """The bootstrap and the audit read the generated features: kept whenever either is on."""
        return self.uncertainty is not None or self.audit is not None

    @property
    def _trust_keeps_real(self) -> bool:
        """The real features (and so the cache entry) are kept when the real set is resampled or audited against."""
        return (self.uncertainty is not None and self.uncertainty.resample_real) or self.audit is not None

    @property
    def _pixel_size(self) -> int:
        """Size of the images' pixel copy for the pixel-space audit (0: none kept)."""
        return self.audit.pixel_size if self.audit is not None else 0

    # --------------------------------------------------------------------------------------------------
    def _real_record(self, ex) -> dict[str, Any]:
        desc = self.real.description
        return {
            "extractor": ex.name,
            "weights": ex.weights_label,
            "preprocessing": ex.preprocessing.key,
            "feature_dim": ex.feature_dim,
            "dataset": desc.get("name"),
            "manifest_sha256": desc.get("manifest_sha256"),
            "num_real": len(self.real),
            "real_split_seed": self.real_split_seed,
            "dtype": "float64",
            "selection": "first-N-by-index",
            "precision": self.precision,
            # channels_last / compiled change the last bits of fp32 features: their caches are kept apart (the
            # default contiguous eager path adds no key, so caches written before the option existed stay valid)
            **({"forward_path": forward_path(ex).key} if forward_path(ex).key != "contiguous" else {}),
            "features_kept": bool(
                self.needs_real_features or (len(self.real) // 2) < ex.feature_dim or self._trust_keeps_real
            ),
            **({"pixel_size": self._pixel_size} if self._pixel_size else {}),
        }

    def real_stats(self) -> dict[str, RealStats]:
        """Real statistics per extractor, from the cache where valid, else one pass for all missing ones."""
        if self._real_stats is not None:
            return self._real_stats
        import torch.distributed as dist

        rank, world = dist_rank_world()
        n = len(self.real)
        stats: dict[str, RealStats] = {}
        missing = []
        for ex in self.extractors:
            record = self._real_record(ex)
            arrays = self.cache.load(record) if record["manifest_sha256"] else None
            if arrays is not None:
                parts = [
                    StreamingMoments.from_state_dict(
                        {k[len(p) + 1 :]: v for k, v in arrays.items() if k.startswith(p + ".")}
                    )
                    for p in ("a", "b")
                ]
                full = _copy(parts[0]).merge(parts[1])
                stats[ex.name] = RealStats(full, parts[0], parts[1], record, from_cache=True)
                if "pixels" in arrays:  # the audit's pixel copy, cached with the statistics it was read with
                    self._real_pixels = arrays["pixels"]
            else:
                missing.append(ex)
        if world > 1:  # all ranks must agree on what to compute (a file may appear between two ranks' checks)
            flags = torch.tensor(
                [1.0 if ex in missing else 0.0 for ex in self.extractors],
                dtype=torch.float64,
                device="cuda" if dist.get_backend() == "nccl" else "cpu",
            )
            dist.all_reduce(flags)
            missing = [ex for ex, f in zip(self.extractors, flags.tolist(), strict=True) if f > 0]
        if missing:
            # Keep the raw features when a kNN metric needs them, or when the split halves are smaller than the
            # feature dimension: the exact FD route for n < d needs them (docs/metrics.md#frechet-distance).
            keep = {ex.name: self._real_record(ex)["features_kept"] for ex in missing}
            groups = split_groups(n, self.real_split_seed)
            source = PixelCopy(self.real, self._pixel_size) if self._pixel_size else self.real
            halves = collect_moments(
                source,
                missing,
                self.batch_size,
                self.device,
                keep,
                groups,
                2,
                desc="real images",
                precision=self.precision,
                workers=self.num_workers,
                prefetch=self.prefetch,
            )
            if isinstance(source, PixelCopy):
                self._real_pixels = source.images()
            for ex in missing:
                a, b = halves[ex.name]
                record = self._real_record(ex)
                full = _copy(a).merge(b)
                stats[ex.name] = RealStats(full, a, b, record)
                if record["manifest_sha256"] and rank == 0:
                    arrays = {f"a.{k}": v for k, v in a.state_dict().items()}
                    arrays.update({f"b.{k}": v for k, v in b.state_dict().items()})
                    if self._real_pixels is not None:
                        arrays["pixels"] = self._real_pixels
                    self.cache.save(record, arrays)
            if world > 1:
                dist.barrier()  # the cache files exist (rank 0 wrote them atomically) before anyone goes on
        self._real_stats = stats
        return stats

    def image_shape(self) -> tuple[int, ...]:
        """(C, H, W) of the real images."""
        first = next(iter(self.real.batches(1, [0])))[1]
        return tuple(first.shape[1:])

    def check_generator(self, gen: GeneratorSource) -> None:
        """A generator's images must have the real images' channels (and size)."""
        shape = self.image_shape()
        c = getattr(gen.G, "img_channels", None)
        r = getattr(gen.G, "img_resolution", None)
        if c is not None and int(c) != shape[0]:
            raise FidmedError(
                f"the generator outputs {c}-channel images but the real images "
                f"({self.real.description.get('name')}) have {shape[0]} channel(s); evaluate it "
                f"against the modality it was trained on (or re-prepare the real set with "
                f"channels={c})."
            )
        if r is not None and int(r) != shape[1]:
            raise FidmedError(
                f"the generator makes {r}x{r} images but the real images are {shape[1]}x{shape[2]}; "
                f"evaluate it against real images of its training resolution."
            )

    def evaluate(
        self, gen, context: dict[str, Any] | None = None, desc: str = "generated images", trust: bool = True
    ) -> list[MetricRecord]:
        """Every requested metric of ``gen`` (a GeneratorSource or DatasetSource) against the real set; with
        ``trust`` (default), also the uncertainty of every number and the memorisation audit where configured
        (``trust=False``: the FDs logged during training, which need neither)."""
        if isinstance(gen, GeneratorSource):
            self.check_generator(gen)
            shape = None
        else:
            shape = self.image_shape()
            first = tuple(next(iter(gen.batches(1, [0])))[1].shape[1:])
            if first[0] != shape[0]:
                raise FidmedError(
                    f"the generated images have {first[0]} channel(s) but the real images have "
                    f"{shape[0]}; convert one folder (e.g. `fidmed prepare ... ` with the same "
                    f"channels) so that both match."
                )
            shape = first
        real = self.real_stats()  # after the cheap checks: a mismatch is reported before any forward pass
        # Features are kept where a metric needs them or a set is smaller than the feature dimension (the exact
        # n < d FD routes, fidmed.metrics.fd), and for the bootstrap and the audit (they never change a number:
        # the FD routes do not depend on kept features, fidmed.metrics.fd.moments_for_fd).
        plan, settings = (self.uncertainty, self.audit) if trust else (None, None)
        keep = {
            ex.name: self.needs_gen_features or len(gen) < ex.feature_dim or (trust and self._trust_keeps_gen)
            for ex in self.extractors
        }
        pixels = self._pixel_size if trust else 0
        source = PixelCopy(gen, pixels) if pixels else gen  # the audit's pixel copy, made in the same pass
        moments = collect_moments(
            source,
            self.extractors,
            self.batch_size,
            self.device,
            keep,
            desc=desc,
            precision=self.precision,
            image_shape=shape,
            workers=self.num_workers,
            prefetch=self.prefetch,
        )
        gen_pixels = source.images() if isinstance(source, PixelCopy) else None
        heldout = self._heldout_data() if settings is not None and self.heldout is not None else {}
        records: list[MetricRecord] = []
        ctx = context or {}
        for ex in self.extractors:
            g, r = moments[ex.name][0], real[ex.name]
            protocol = self.protocol(ex, gen, r)
            inputs = MetricInputs(
                g,
                r.full,
                (r.half_a, r.half_b),
                self.device,
                self.metric_seed,
                gen_features_fn=_index_ordered(g) if self.needs_gen_features else None,
                real_features_fn=_index_ordered(r.full) if self.needs_real_features else None,
            )
            values: list[MetricValue] = []
            for name in self.metrics:
                inputs.options = self.metric_options[name]
                for v in METRICS.get(name).obj(inputs):
                    inputs.results[v.name] = v
                    values.append(v)
            if plan is not None:
                self._attach_uncertainty(g, r, inputs, values)
            records += [
                MetricRecord(ex.name, ex.study_name, v.name, v.value, v.details, {**protocol, **v.protocol}, ctx)
                for v in values
            ]
            if settings is not None:
                rows = (features_in_index_order(g), features_in_index_order(r.full), heldout.get(ex.name))
                records += self._audit_records(ex.name, ex.study_name, protocol, *rows, gen, ctx)
        if gen_pixels is not None:
            rows = (pixel_vectors(gen_pixels), pixel_vectors(self._real_pixels), heldout.get(PIXELS))
            records += self._audit_records(PIXELS, "pixel space", self._pixel_protocol(gen), *rows, gen, ctx)
        return records

    def _attach_uncertainty(self, g: StreamingMoments, r: RealStats, inputs: MetricInputs, values) -> None:
        """Every value's ``details["uncertainty"]``: its standard error, interval and replicates
        (fidmed.metrics.uncertainty), from the features this pass kept."""
        plan = self.uncertainty
        rctx = ResampleContext(
            inputs,
            plan,
            {v.name: v for v in values},
            self.metric_options,
            list(self.metrics),
            gen_features=features_in_index_order(g),
            real_features=features_in_index_order(r.full) if r.full.keep_features else None,
            device=self.device,
        )
        key = plan.real_resample_key(self.real.description, r.full.count, self.real_split_seed)
        entries = metric_uncertainty(rctx, key)
        for v in values:  # a copy: metrics may share one details dict between their numbers (prdc does)
            v.details = {**v.details, "uncertainty": entries[v.name]}

    def _heldout_data(self) -> dict[str, np.ndarray]:
        """Features (and the pixel copy) of the held-out real split, for C_T: one pass, all extractors."""
        if self._heldout is not None:
            return self._heldout
        shape = self.image_shape()
        first = tuple(next(iter(self.heldout.batches(1, [0])))[1].shape[1:])
        if first != shape:
            raise FidmedError(
                f"the held-out images are {first} (C, H, W) but the real images {shape}; prepare the held-out split "
                f"like the training set (`fidmed prepare`, same size and channels)."
            )
        h_sha, r_sha = (s.description.get("manifest_sha256") for s in (self.heldout, self.real))
        if h_sha and h_sha == r_sha:
            raise FidmedError(
                "the held-out split (eval.audit.heldout) is the training set itself; give real images the generator "
                "was not trained on."
            )
        if len(self.heldout) < 2:
            raise FidmedError(f"the held-out split has {len(self.heldout)} image(s); C_T needs at least 2.")
        source = PixelCopy(self.heldout, self._pixel_size) if self._pixel_size else self.heldout
        got = collect_moments(
            source,
            self.extractors,
            self.batch_size,
            self.device,
            True,
            desc="held-out images",
            precision=self.precision,
            workers=self.num_workers,
            prefetch=self.prefetch,
        )
        self._heldout = {ex.name: features_in_index_order(got[ex.name][0]) for ex in self.extractors}
        if isinstance(source, PixelCopy):
            self._heldout[PIXELS] = pixel_vectors(source.images())
        return self._heldout

    def _audit_records(
        self, space, study_name, protocol, gen_rows, train_rows, heldout_rows, gen, ctx
    ) -> list[MetricRecord]:
        """The memorisation audit of one feature space as records (authenticity, copies, C_T); the per-image
        result and the grid of the closest pairs ride along in ``MetricRecord.arrays`` for the writers."""
        res = audit(gen_rows, train_rows, self.audit, self.device, space, heldout_rows, seed=self.metric_seed)
        grid = closest_pairs_grid(gen, self.real, res.closest)
        heldout = self.heldout.description if self.heldout is not None else None
        proto = {
            **protocol,
            "audit": {
                **self.audit.protocol(),
                "space": space,
                "heldout": None if heldout is None else heldout.get("name"),
                "heldout_manifest_sha256": None if heldout is None else heldout.get("manifest_sha256"),
                "n_heldout": None if self.heldout is None else len(self.heldout),
            },
        }
        summary = res.summary()
        numbers = (
            ("authenticity", res.authenticity, {"definition": "share of generated images with ratio > 1"}),
            ("copies", res.copies, {"definition": f"share of generated images with ratio < {res.threshold}"}),
            ("ct", res.ct, res.ct_details),
        )
        arrays = {"audit": res, "grid": grid}
        return [
            MetricRecord(space, study_name, name, value, {**details, **summary}, proto, ctx, arrays=arrays)
            for name, value, details in numbers
        ]

    def _pixel_protocol(self, gen) -> dict[str, Any]:
        """The protocol of the pixel-space audit: the pass's, with the pixel copy in place of an extractor."""
        real = self.real_stats()[self.extractors[0].name]
        shape = self._real_pixels.shape[1:]
        return {
            **self.protocol(self.extractors[0], gen, real),
            "extractor": PIXELS,
            "weights": None,
            "random_init": False,
            "random_init_reason": None,
            "feature_dim": int(np.prod(shape)),
            "input_size": int(shape[-1]),
            "resizer": "area-average",
            "channels": int(shape[0]),
            "forward_precision": None,
            "forward_path": None,
        }

    def protocol(self, ex, gen, real: RealStats) -> dict[str, Any]:
        """Everything that made a number: extractor, weights, input, resizer, quantisation, N, seeds."""
        p = ex.preprocessing
        desc = gen.description
        return {
            "extractor": ex.name,
            "weights": ex.weights_label,
            "random_init": bool(ex.random_init),
            "random_init_reason": getattr(ex, "random_init_reason", None) if ex.random_init else None,
            "feature_dim": ex.feature_dim,
            "input_size": p.size,
            "resizer": p.resizer,
            "channels": p.channels,
            "quantisation": QUANTISATION if desc.get("kind") == "generator" else "as stored (8-bit files)",
            "n_real": real.full.count,
            "n_gen": len(gen),
            "seeds": desc.get("seeds"),
            "truncation_psi": desc.get("truncation_psi"),
            "noise_mode": desc.get("noise_mode"),
            "gen_source": desc.get("kind"),
            "generator": desc.get("generator"),
            "gen_dataset": desc.get("name"),
            "gen_manifest_sha256": desc.get("manifest_sha256"),
            "real_dataset": self.real.description.get("name"),
            "real_manifest_sha256": self.real.description.get("manifest_sha256"),
            "real_split_seed": self.real_split_seed,
            "stats_dtype": "float64",
            "forward_precision": self.precision,
            "forward_path": forward_path(ex).key,  # contiguous (default) | channels_last, +compiled
            "metric_seed": self.metric_seed,
        }


def _index_ordered(m: StreamingMoments):
    """A memoised ``features_in_index_order(m)`` (several metrics may read the same features)."""
    cache: list[np.ndarray] = []

    def get() -> np.ndarray:
        if not cache:
            cache.append(features_in_index_order(m))
        return cache[0]

    return get


def _metric_options(name: str, given: Any) -> Any:
    """The options object of metric ``name``: its config dataclass with ``given`` (an instance, a mapping of its
    fields, or None for the defaults); None for a metric without options."""
    import dataclasses

    from omegaconf import OmegaConf

    schema = METRICS.get(name).config
    if schema is None:
        return None
    if isinstance(given, schema):
        return given
    if given is None:
        return schema()
    values = OmegaConf.to_container(given, resolve=True) if OmegaConf.is_config(given) else dict(given)
    known = {f.name for f in dataclasses.fields(schema)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise FidmedError(f"metric {name} has no option {', '.join(unknown)}; its options: {', '.join(sorted(known))}")
    return schema(**values)

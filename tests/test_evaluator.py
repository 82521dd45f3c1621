"""Evaluation engine: kNN/KID/FD-inf records, feature keeping, cache keys, bad input, precision, and exact
2-process (gloo) evaluation with uneven shards equal to a single-process run."""

import json

import numpy as np
import pytest
import torch

from fidmed.errors import DataError, FidmedError
from fidmed.evaluation.evaluator import Evaluator
from fidmed.evaluation.sources import DatasetSource, GeneratorSource
from fidmed.features.preprocess import Preprocessing, preprocess
from fidmed.metrics.knn import prdc


class ToyExtractor(torch.nn.Module):
    """Seeded linear map of the 8x8 RGB preprocessed image: small, fast, float32 features like real extractors."""

    def __init__(self, name: str, dim: int, seed: int, resizer: str = "nearest") -> None:
        super().__init__()
        self.name, self.study_name, self.feature_dim = name, name.upper(), dim
        self.weights_label, self.random_init = f"toy-{seed}", True
        self.preprocessing = Preprocessing(resizer=resizer, size=8, channels="RGB")
        g = torch.Generator().manual_seed(seed)
        self.lin = torch.nn.Linear(3 * 8 * 8, dim, dtype=torch.float64)
        with torch.no_grad():
            self.lin.weight.copy_(torch.randn(dim, 192, generator=g) / 8)
            self.lin.bias.copy_(torch.randn(dim, generator=g))

    def forward(self, x):
        # float64 inside, float32 out: features independent of the batch composition (float32 BLAS is not)
        return torch.tanh(
            torch.nn.functional.linear(x.flatten(1).double() / 255, self.lin.weight.double(), self.lin.bias.double())
        ).float()


class ToyDataset(torch.utils.data.Dataset):
    def __init__(self, n: int, seed: int, channels: int = 1, size: int = 16, name: str = "toy"):
        rng = np.random.default_rng(seed)
        self.images = rng.integers(0, 256, size=(n, channels, size, size), dtype=np.uint8)
        self.name = name

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return torch.from_numpy(self.images[i])

    def manifest_hash(self):
        import hashlib

        return hashlib.sha256(self.images.tobytes()).hexdigest()


class ToyGenerator(torch.nn.Module):
    def __init__(self, channels: int = 1, res: int = 16):
        super().__init__()
        self.z_dim, self.c_dim, self.img_channels, self.img_resolution = 8, 0, channels, res
        g = torch.Generator().manual_seed(5)
        self.w = torch.nn.Parameter(torch.randn(8, channels * res * res, generator=g))

    def forward(self, z, c, truncation_psi=1.0, noise_mode="const"):
        # float64 inside: each image independent of the batch it is made in (float32 BLAS results depend on the
        # batch composition in the last bit, which uint8 truncation can turn into a one-level pixel flip)
        return (
            torch.tanh(z.double() @ self.w.double())
            .float()
            .reshape(len(z), self.img_channels, self.img_resolution, self.img_resolution)
        )


def _extractors():
    # two preprocessings; dims 6 and 40 (40 > N/2 for the real halves: exercises the n < d route too)
    return [ToyExtractor("a", 6, 1), ToyExtractor("b", 40, 2, resizer="clean"), ToyExtractor("c", 6, 3)]


def _features(ex, images: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return ex(preprocess(torch.from_numpy(images), ex.preprocessing)).double().numpy()


def _fd_numpy(x: np.ndarray, y: np.ndarray) -> float:
    """Independent FD: np.cov and the eigenvalues of cov_x cov_y (non-negative real in exact arithmetic)."""
    cx, cy = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    ev = np.clip(np.linalg.eigvals(cx @ cy).real, 0, None)
    return float(((x.mean(0) - y.mean(0)) ** 2).sum() + np.trace(cx) + np.trace(cy) - 2 * np.sqrt(ev).sum())


def _by(records):
    return {(r.extractor, r.metric): r for r in records}


def test_records_equal_direct_per_extractor_computation(tmp_path):
    real, gen = ToyDataset(37, 0), ToyDataset(29, 1, name="gen")
    ev = Evaluator(
        _extractors(),
        DatasetSource(real),
        cache_dir=tmp_path,
        batch_size=8,
        device="cpu",
        metrics=["fd", "rfd", "prdc", "kid", "fd_inf"],
        metric_options={"prdc": {"k": 3}, "kid": {"subsets": 4, "subset_size": 10}},
    )
    recs = _by(ev.evaluate(DatasetSource(gen)))
    for ex in _extractors():
        fr, fg = _features(ex, real.images), _features(ex, gen.images)
        want = prdc(fr, fg, 3, device="cpu")
        for m in ("precision", "recall", "density", "coverage"):
            r = recs[(ex.name, m)]
            assert r.value == getattr(want, m)
            assert r.protocol["knn_k"] == 3 and "real_features, fake_features" in r.details["argument_order"]
        assert recs[(ex.name, "fd")].value == pytest.approx(_fd_numpy(fg, fr), rel=1e-6)
        assert recs[(ex.name, "kid")].details["n_subsets"] == 4
        assert np.isfinite(recs[(ex.name, "fd_inf")].value)
    # keeping features for kNN metrics does not change any FD
    ev_fd = Evaluator(_extractors(), DatasetSource(real), cache_dir=tmp_path, batch_size=8, device="cpu")
    fd_only = _by(ev_fd.evaluate(DatasetSource(gen)))
    for ex in _extractors():
        assert fd_only[(ex.name, "fd")].value == recs[(ex.name, "fd")].value
        assert fd_only[(ex.name, "rfd")].value == recs[(ex.name, "rfd")].value


def test_cache_key_includes_kept_features(tmp_path):
    real = ToyDataset(20, 0)
    ev = Evaluator(_extractors()[:1], DatasetSource(real), cache_dir=tmp_path, device="cpu")
    assert not ev.real_stats()["a"].from_cache
    ev2 = Evaluator(_extractors()[:1], DatasetSource(real), cache_dir=tmp_path, device="cpu", metrics=["prdc"])
    assert not ev2.real_stats()["a"].from_cache  # a moments-only cache cannot serve a kNN metric
    ev3 = Evaluator(_extractors()[:1], DatasetSource(real), cache_dir=tmp_path, device="cpu", metrics=["prdc"])
    st = ev3.real_stats()["a"]
    assert st.from_cache and st.full.features.shape == (20, 6)
    assert len(list(tmp_path.glob("real-a-*.npz"))) == 2
    assert ev._real_record(ev.extractors[0]) != ev2._real_record(ev2.extractors[0])


def test_bad_input_errors():
    with pytest.raises(DataError, match="requested .* holds only 10"):
        DatasetSource(ToyDataset(10, 0), 11)
    real = DatasetSource(ToyDataset(12, 0, channels=1))
    ev = Evaluator(_extractors()[:1], real, device="cpu")
    with pytest.raises(FidmedError, match="3-channel images but the real images .* have 1"):
        ev.evaluate(GeneratorSource(ToyGenerator(channels=3), 5))
    with pytest.raises(FidmedError, match="3 channel"):
        ev.evaluate(DatasetSource(ToyDataset(12, 0, channels=3)))

    with pytest.raises(FidmedError, match="tf32 needs a CUDA device"):
        Evaluator(_extractors()[:1], real, device="cpu", precision="tf32")
    with pytest.raises(FidmedError, match="unknown metric"):
        Evaluator(_extractors()[:1], real, device="cpu", metrics=["fd", "is"])


class _MixedSizes(torch.utils.data.Dataset):
    name = "mixed"

    def __len__(self):
        return 12

    def __getitem__(self, i):
        s = 16 if i < 8 else 12
        return torch.zeros(1, s, s, dtype=torch.uint8) + i


def test_mixed_sizes_name_the_batch():
    ev = Evaluator(_extractors()[:1], DatasetSource(ToyDataset(12, 0)), batch_size=4, device="cpu")
    with pytest.raises(FidmedError, match="batch 2 .*images 8-11.* all images of a set must share one size"):
        ev.evaluate(DatasetSource(_MixedSizes()))


def test_nan_features_name_extractor_and_batch():
    class NaNEx(ToyExtractor):
        def forward(self, x):
            out = super().forward(x)
            return out / 0 if x.shape[0] < 4 else out

    ev = Evaluator([NaNEx("nanex", 4, 1)], DatasetSource(ToyDataset(11, 0)), batch_size=4, device="cpu")
    with pytest.raises(FidmedError, match="extractor nanex produced NaN/Inf features for images 8-10 .batch 2"):
        ev.real_stats()


def test_bf16_runs_and_is_recorded():
    class Fp32Ex(ToyExtractor):
        def forward(self, x):  # a float32 matmul, which autocast runs in bfloat16
            return torch.tanh(
                torch.nn.functional.linear(x.flatten(1) / 255, self.lin.weight.float(), self.lin.bias.float())
            )

    real, gen = ToyDataset(16, 0), ToyDataset(16, 1)
    exs = [Fp32Ex("a", 6, 1)]
    fp32 = _by(Evaluator(exs, DatasetSource(real), device="cpu").evaluate(DatasetSource(gen)))
    bf16 = _by(Evaluator(exs, DatasetSource(real), device="cpu", precision="bf16").evaluate(DatasetSource(gen)))
    assert bf16[("a", "fd")].protocol["forward_precision"] == "bf16"
    assert fp32[("a", "fd")].protocol["forward_precision"] == "fp32"
    # bf16 changes the features (8-bit mantissa) but stays close
    assert bf16[("a", "fd")].value != fp32[("a", "fd")].value
    assert bf16[("a", "fd")].value == pytest.approx(fp32[("a", "fd")].value, rel=0.2)


# ------------------------------------------------------------------------------------ distributed (2 x gloo)
N_REAL, N_GEN = 37, 29  # odd: shards of 19/18 and 15/14 images
METRICS = ["fd", "rfd", "prdc", "kid", "fd_inf"]


def _run(cache_dir, gen_kind):
    ev = Evaluator(
        _extractors(),
        DatasetSource(ToyDataset(N_REAL, 0)),
        cache_dir=cache_dir,
        batch_size=5,
        device="cpu",
        metrics=METRICS,
        metric_options={"prdc": {"k": 3}, "kid": {"subsets": 3, "subset_size": 10}},
    )
    gen = (
        GeneratorSource(ToyGenerator(), N_GEN, seed_start=3)
        if gen_kind == "gen"
        else DatasetSource(ToyDataset(N_GEN, 1))
    )
    recs = ev.evaluate(gen)
    from_cache = all(s.from_cache for s in ev.real_stats().values())
    return [(r.extractor, r.metric, r.value) for r in recs], from_cache


def _dist_worker(rank, world, cache_dir, out_dir, gen_kind):
    recs, from_cache = _run(cache_dir, gen_kind)
    (out_dir / f"rank{rank}.json").write_text(json.dumps({"records": recs, "from_cache": from_cache}))


@pytest.mark.parametrize("gen_kind", ["gen", "folder"])
def test_two_gloo_processes_equal_single_process(tmp_path, gen_kind):
    from fidmed.evaluation.distributed import spawn

    single, _ = _run(None, gen_kind)
    cache = tmp_path / "cache"
    spawn(_dist_worker, 2, cache, tmp_path, gen_kind)
    for rank in range(2):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert not got["from_cache"]
        assert len(got["records"]) == len(single)
        for (ex, metric, v), (ex2, metric2, w) in zip(got["records"], single, strict=True):
            assert (ex, metric) == (ex2, metric2)
            if metric in ("precision", "recall", "density", "coverage", "kid"):
                assert v == w, (ex, metric)  # same features in the same index order: exactly equal
            elif metric == "fd_inf":
                # an extrapolation from subsets down to N = 2 (near-singular covariances) amplifies the
                # 1e-16 summation-order differences of the real moments; measured here: ~1e-10 relative
                assert v == pytest.approx(w, rel=1e-8), (ex, metric)
            else:
                assert v == pytest.approx(w, rel=1e-10, abs=1e-12), (ex, metric)
    files = sorted(p.name for p in cache.iterdir())
    assert len(files) == 3 and not any(f.endswith(".tmp") for f in files)  # one per extractor, rank 0 only
    spawn(_dist_worker, 2, cache, tmp_path, gen_kind)  # second run: both ranks read rank 0's cache
    for rank in range(2):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got["from_cache"]
        assert [v for *_, v in got["records"]] == pytest.approx([v for *_, v in single], rel=1e-8)


# ------------------------------------------------------------------------- single pass and input pipeline
def test_single_pass_equals_separate_passes_bit_for_bit(tmp_path):
    """All extractors in one pass give exactly the numbers of one evaluation per extractor (fp32, CPU)."""
    from fidmed.features.registry import build_extractor

    real, gen = ToyDataset(14, 0, size=24), ToyDataset(12, 1, size=24, name="gen")
    # a real network (random-init TF-Inception, float32 BLAS) besides the toy ones
    exs = _extractors() + [build_extractor({"name": "inception_tf", "weights_source": "random"}, allow_random=True)]
    kw = dict(
        batch_size=5,
        device="cpu",
        metrics=["fd", "rfd", "prdc", "kid"],
        metric_options={"prdc": {"k": 3}, "kid": {"subsets": 3, "subset_size": 5}},
    )
    together = _by(Evaluator(exs, DatasetSource(real), **kw).evaluate(DatasetSource(gen)))
    for ex in exs:
        alone = _by(Evaluator([ex], DatasetSource(real), **kw).evaluate(DatasetSource(gen)))
        assert alone and all(key[0] == ex.name for key in alone)
        for key, rec in alone.items():
            assert together[key].value == rec.value, key


class _CountingDataset(ToyDataset):
    """Fails at image ``fail_at`` (if set) like an unreadable file would."""

    fail_at: int | None = None

    def __getitem__(self, i):
        if i == self.fail_at:
            raise OSError(f"cannot read image {i}")
        return super().__getitem__(i)


@pytest.mark.parametrize("workers,prefetch", [(1, 1), (3, 2), (4, 5)])
def test_pipeline_threads_give_identical_batches(workers, prefetch):
    from fidmed.evaluation.pipeline import prepared_batches

    src = DatasetSource(ToyDataset(23, 0, channels=3, size=20))
    specs = [Preprocessing("clean", 29), Preprocessing("nearest", 8), Preprocessing("clean", 29)]
    shard = np.arange(23)[1::2]  # a rank's shard: not contiguous
    ref = list(prepared_batches(src, 4, shard, specs, torch.device("cpu"), workers=0))
    got = list(prepared_batches(src, 4, shard, specs, torch.device("cpu"), workers=workers, prefetch=prefetch))
    assert len(ref) == len(got) == 3 and len(ref[0].inputs) == 2  # the duplicate spec is computed once
    for a, b in zip(ref, got, strict=True):
        assert np.array_equal(a.indices, b.indices) and torch.equal(a.images, b.images)
        for spec in a.inputs:
            assert torch.equal(a.inputs[spec], b.inputs[spec])
    assert np.concatenate([b.indices for b in got]).tolist() == shard.tolist()
    # and each input is what preprocess() gives for the whole batch at once
    for b in got:
        for spec, x in b.inputs.items():
            assert torch.equal(x, preprocess(b.images, spec))


def test_pipeline_reraises_source_errors_and_stops_its_thread():
    import threading

    from fidmed.evaluation.pipeline import prepared_batches

    ds = _CountingDataset(30, 0)
    ds.fail_at = 17
    before = threading.active_count()
    it = prepared_batches(
        DatasetSource(ds), 5, range(30), [Preprocessing("nearest", 8)], torch.device("cpu"), workers=2
    )
    got = []
    with pytest.raises(OSError, match="cannot read image 17"):
        for b in it:
            got.append(b.indices)
    assert np.concatenate(got).tolist() == list(range(15))  # the batches before the bad one came through, in order
    # a consumer that stops early (e.g. an extractor error) stops the reader too
    ds.fail_at = None
    it = prepared_batches(
        DatasetSource(ds), 5, range(30), [Preprocessing("nearest", 8)], torch.device("cpu"), workers=2, prefetch=1
    )
    next(it)
    it.close()
    assert threading.active_count() == before


def test_evaluator_results_do_not_depend_on_workers():
    real = DatasetSource(ToyDataset(21, 0))
    kw = dict(batch_size=4, device="cpu", metrics=["fd", "rfd", "prdc"], metric_options={"prdc": {"k": 3}})
    gen = GeneratorSource(ToyGenerator(), 17, seed_start=2)
    base = _by(Evaluator(_extractors(), real, num_workers=0, **kw).evaluate(gen))
    threaded = _by(Evaluator(_extractors(), real, num_workers=3, prefetch=3, **kw).evaluate(gen))
    assert base.keys() == threaded.keys()
    assert all(base[k].value == threaded[k].value for k in base)
    with pytest.raises(FidmedError, match="num_workers=-1 must be >= 0"):
        Evaluator(_extractors(), real, num_workers=-1, **kw)


_KILLED_WRITER = r"""
import os, signal, sys
import numpy as np
sys.path.insert(0, sys.argv[2])
from test_evaluator import ToyDataset, _extractors
from fidmed.evaluation.evaluator import Evaluator
from fidmed.evaluation.sources import DatasetSource

def dying_savez(f, **arrays):  # the process is killed (SIGKILL: no cleanup) halfway through the cache file
    f.write(b"PK\x03\x04" + bytes(1000))
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)

np.savez = dying_savez
Evaluator(_extractors()[:1], DatasetSource(ToyDataset(20, 0)), cache_dir=sys.argv[1], device="cpu").real_stats()
"""


def test_evaluation_killed_while_writing_the_cache_leaves_no_cache_file(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    cache = tmp_path / "cache"
    proc = subprocess.run(
        [sys.executable, "-c", _KILLED_WRITER, str(cache), str(Path(__file__).parent)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert not list(cache.glob("real-*.npz"))  # only an orphaned temporary file may remain, never a cache file
    # the next evaluation computes the statistics, writes a complete cache file, and a later one reads it
    ev = Evaluator(_extractors()[:1], DatasetSource(ToyDataset(20, 0)), cache_dir=cache, device="cpu")
    assert not ev.real_stats()["a"].from_cache
    again = Evaluator(_extractors()[:1], DatasetSource(ToyDataset(20, 0)), cache_dir=cache, device="cpu")
    assert again.real_stats()["a"].from_cache
    assert len(list(cache.glob("real-*.npz"))) == 1


def test_kept_features_are_stored_as_the_extractor_returned_them():
    """float32 features are kept as float32 (half of float64's memory at N = 50k); moments stay float64."""
    ev = Evaluator(_extractors()[:1], DatasetSource(ToyDataset(20, 0)), device="cpu", metrics=["prdc"])
    st = ev.real_stats()["a"]
    assert st.full.features.dtype == np.float32 and st.full.features.shape == (20, 6)
    assert st.full.mean.dtype == np.float64 and st.full.cov.dtype == np.float64

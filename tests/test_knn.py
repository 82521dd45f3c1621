"""k-NN metrics (precision/recall/density/coverage), KID and FD-infinity against independent computations."""

import numpy as np
import pytest
import torch

from fidmed.metrics.kid import fd_infinity, kid, poly_mmd2_unbiased
from fidmed.metrics.knn import kth_nn_radii, prdc


def brute_force_prdc(real: np.ndarray, fake: np.ndarray, k: int) -> dict:
    """Direct definitions with explicit loops over exact float64 differences (no matrix-product shortcut)."""
    real, fake = real.astype(np.float64), fake.astype(np.float64)

    def radii(x):
        out = []
        for i in range(len(x)):
            d = np.sort(np.sqrt(((x - x[i]) ** 2).sum(1)))
            out.append(d[k])  # d[0] is the sample itself
        return np.array(out)

    rr, rf = radii(real), radii(fake)
    D = np.sqrt(((real[:, None, :] - fake[None, :, :]) ** 2).sum(-1))
    precision = np.mean([any(D[i, j] < rr[i] for i in range(len(real))) for j in range(len(fake))])
    recall = np.mean([any(D[i, j] < rf[j] for j in range(len(fake))) for i in range(len(real))])
    density = sum(D[i, j] < rr[i] for i in range(len(real)) for j in range(len(fake))) / (k * len(fake))
    coverage = np.mean([D[i].min() < rr[i] for i in range(len(real))])
    return dict(precision=precision, recall=recall, density=density, coverage=coverage)


def _sets(seed=0, n_real=60, n_fake=45, d=8, shift=0.7):
    rng = np.random.default_rng(seed)
    real = rng.normal(size=(n_real, d)).astype(np.float32)
    fake = (rng.normal(size=(n_fake, d)) * 1.3 + shift).astype(np.float32)
    return real, fake


@pytest.mark.parametrize("k", [1, 3, 5])
def test_prdc_equals_brute_force(k):
    real, fake = _sets(k)
    got = prdc(real, fake, k, device="cpu").as_dict()
    ref = brute_force_prdc(real, fake, k)
    for name in ref:
        assert got[name] == pytest.approx(ref[name], abs=1e-12), name
    # non-trivial values (the test could fail): neither all 0 nor all 1
    assert 0 < got["precision"] < 1 and 0 < got["recall"] < 1


def test_argument_order_is_real_first():
    """A fake set concentrated in a small part of the real manifold: high precision, low recall."""
    rng = np.random.default_rng(1)
    real = rng.normal(size=(200, 4))
    fake = rng.normal(size=(100, 4)) * 0.2
    r = prdc(real, fake, 5, device="cpu")
    assert r.precision > 0.9 and r.recall < 0.5
    swapped = prdc(fake, real, 5, device="cpu")
    assert swapped.precision == pytest.approx(r.recall) and swapped.recall == pytest.approx(r.precision)


def test_chunk_size_does_not_change_result():
    real, fake = _sets(3, 97, 83, 16)
    ref = prdc(real, fake, 5, device="cpu").as_dict()
    for chunk in (1, 7, 50, 1000):
        assert prdc(real, fake, 5, device="cpu", chunk_size=chunk).as_dict() == ref


def test_kth_radii_match_sorting():
    x = torch.from_numpy(np.random.default_rng(4).normal(size=(30, 5)))
    want = torch.cdist(x, x).sort(dim=1).values[:, 3]
    assert torch.allclose(kth_nn_radii(x, 3, chunk_size=4), want, rtol=1e-12, atol=1e-12)


def test_prdc_equals_prdc_package():
    prdc_pkg = pytest.importorskip("prdc")
    real, fake = _sets(5, 150, 120, 32)
    ref = prdc_pkg.compute_prdc(real_features=real, fake_features=fake, nearest_k=5)
    got = prdc(real, fake, 5, device="cpu", chunk_size=33).as_dict()
    for name in ("precision", "recall", "density", "coverage"):
        assert got[name] == pytest.approx(float(ref[name]), abs=1e-12), name


def test_prdc_rejects_bad_input():
    from fidmed.errors import FidmedError

    real, fake = _sets()
    with pytest.raises(FidmedError, match="different extractors"):
        prdc(real, fake[:, :4], 5)
    bad = fake.copy()
    bad[0, 0] = np.nan
    with pytest.raises(FidmedError, match="NaN"):
        prdc(real, bad, 5)
    with pytest.raises(FidmedError, match="at least 6"):
        prdc(real[:5], fake, 5)


def test_mmd_equals_torchmetrics_poly_mmd():
    tm = pytest.importorskip("torchmetrics.image.kid")
    rng = np.random.default_rng(6)
    x = torch.from_numpy(rng.normal(size=(40, 12)))
    y = torch.from_numpy(rng.normal(size=(40, 12)) + 0.3)
    assert poly_mmd2_unbiased(x, y) == pytest.approx(float(tm.poly_mmd(x, y)), rel=1e-12)


def test_kid_full_subsets_are_the_whole_sets_and_seeded():
    rng = np.random.default_rng(7)
    x, y = rng.normal(size=(30, 6)), rng.normal(size=(30, 6)) + 0.5
    whole = poly_mmd2_unbiased(torch.from_numpy(x), torch.from_numpy(y))
    r = kid(x, y, n_subsets=3, subset_size=30, device="cpu")  # a subset of all 30 is a permutation
    assert r.value == pytest.approx(whole, rel=1e-12) and r.std < 1e-12 * abs(whole) + 1e-15
    a = kid(x, y, n_subsets=5, subset_size=10, seed=1, device="cpu")
    assert a == kid(x, y, n_subsets=5, subset_size=10, seed=1, device="cpu")
    assert a.value != kid(x, y, n_subsets=5, subset_size=10, seed=2, device="cpu").value


def test_fd_infinity_recovers_linear_bias():
    """FD_N of subsets is fitted by FD_inf + c/N; compare to an independent numpy least-squares fit."""
    from fidmed.metrics.fd import frechet_distance_from_moments
    from fidmed.metrics.moments import StreamingMoments

    rng = np.random.default_rng(8)
    real = StreamingMoments(4)
    real.update(torch.from_numpy(rng.normal(size=(500, 4))))
    fake = rng.normal(size=(400, 4)) + 0.2
    r = fd_infinity(fake, real, n_points=5, min_n=100, seed=3)
    perm = np.random.default_rng(3).permutation(400)
    fds = []
    for n in (100, 175, 250, 325, 400):
        m = StreamingMoments(4)
        m.update(torch.from_numpy(fake[perm[:n]]))
        fds.append(frechet_distance_from_moments(m, real).value)
    slope, intercept = np.polyfit(1.0 / np.array([100, 175, 250, 325, 400]), fds, 1)
    assert r.ns == [100, 175, 250, 325, 400]
    assert r.fds == pytest.approx(fds, rel=1e-12)
    assert r.value == pytest.approx(intercept, rel=1e-9) and r.slope == pytest.approx(slope, rel=1e-9)

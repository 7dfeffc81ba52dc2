"""Metrics against independent straightforward computations and known properties (zero on self, monotonic, unbiased)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch
from scipy.spatial.distance import cdist, pdist

from hagan_clinic.metrics import (
    MS_SSIM_WEIGHTS,
    frechet_distance,
    mae,
    median_bandwidth,
    mmd2,
    ms_ssim_3d,
    ms_ssim_settings,
    nearest_neighbour_distances,
    psnr,
    ssim_3d,
)


def _gaussian(rng, n: int, d: int, scale: float = 1.0) -> np.ndarray:
    """n draws of a correlated d-dimensional Gaussian (a fixed mixing matrix per d)."""
    mix = np.random.default_rng(d).standard_normal((d, d)) / np.sqrt(d) + np.eye(d)
    return scale * rng.standard_normal((n, d)) @ mix


def _smooth_volume(side: int, seed: int = 0) -> np.ndarray:
    """A structured volume in [-1, 1]: a few Gaussian blobs over a gentle gradient."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(0, 1, side)] * 3, indexing="ij"))
    vol = 0.3 * grid[0] - 0.5
    for _ in range(4):
        centre, width = rng.uniform(0.2, 0.8, size=(3, 1, 1, 1)), rng.uniform(0.08, 0.2)
        vol += rng.uniform(0.5, 1.0) * np.exp(-np.sum((grid - centre) ** 2, axis=0) / (2 * width**2))
    return np.clip(vol, -1, 1).astype(np.float32)


# ---------------------------------------------------------------------------------------------------------------------
# Fréchet distance
# ---------------------------------------------------------------------------------------------------------------------


def _fid_reference(a: np.ndarray, b: np.ndarray) -> float:
    """The textbook computation: sqrtm of the non-symmetric product, real part."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = np.real(scipy.linalg.sqrtm(s_a @ s_b))
    return float(np.sum((mu_a - mu_b) ** 2) + np.trace(s_a + s_b - 2 * covmean))


def test_fid_of_a_set_with_itself_is_zero():
    a = _gaussian(np.random.default_rng(0), 300, 8)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)


def test_fid_between_two_large_samples_of_one_gaussian_is_near_zero():
    rng = np.random.default_rng(1)
    a, b = _gaussian(rng, 20000, 4), _gaussian(rng, 20000, 4)
    assert 0.0 <= frechet_distance(a, b) < 5e-3


def test_fid_grows_with_a_mean_shift():
    rng = np.random.default_rng(2)
    a, b = _gaussian(rng, 2000, 5), _gaussian(rng, 2000, 5)
    direction = np.ones(5) / np.sqrt(5)
    values = [frechet_distance(a, b + s * direction) for s in (0.0, 0.5, 1.0, 2.0)]
    assert np.all(np.diff(values) > 0), values


@pytest.mark.parametrize("shift", [0.0, 0.5, 1.0, 2.0])
def test_fid_for_equal_covariances_is_the_squared_shift(shift):
    a = _gaussian(np.random.default_rng(3), 500, 6)
    offset = shift * np.linspace(-1, 1, 6)
    assert frechet_distance(a, a + offset) == pytest.approx(np.sum(offset**2), abs=1e-8)


def test_fid_agrees_with_sqrtm_of_the_product():
    rng = np.random.default_rng(4)
    a, b = _gaussian(rng, 80, 6), _gaussian(rng, 60, 6, scale=1.7) + 0.3
    b[:, 0] *= 0.4  # different covariance shapes, not only scale
    assert frechet_distance(a, b) == pytest.approx(_fid_reference(a, b), rel=1e-6)


def test_fid_is_invariant_to_row_order_and_handles_singular_covariances():
    rng = np.random.default_rng(5)
    a, b = _gaussian(rng, 50, 4), _gaussian(rng, 40, 4) + 1.0
    assert frechet_distance(a[rng.permutation(50)], b[rng.permutation(40)]) == pytest.approx(
        frechet_distance(a, b), rel=1e-10
    )
    few = _gaussian(rng, 5, 16)  # N < D: rank-deficient covariance, still finite and >= 0
    value = frechet_distance(few, _gaussian(rng, 7, 16))
    assert np.isfinite(value) and value > 0
    assert frechet_distance(few, few) == pytest.approx(0.0, abs=1e-8)


BAD_FEATURES = {
    "1d": (np.zeros(10), np.zeros((10, 2))),
    "3d": (np.zeros((4, 2, 2)), np.zeros((4, 2))),
    "different_d": (np.zeros((5, 3)), np.zeros((5, 4))),
    "one_sample": (np.zeros((1, 3)), np.ones((5, 3))),
    "nan": (np.full((5, 3), np.nan), np.ones((5, 3))),
    "inf": (np.ones((5, 3)), np.array([[np.inf, 0, 0]] * 5)),
}


@pytest.mark.parametrize("case", BAD_FEATURES)
@pytest.mark.parametrize("fn", [frechet_distance, mmd2, nearest_neighbour_distances])
def test_bad_features_raise_value_error(fn, case):
    a, b = BAD_FEATURES[case]
    with pytest.raises(ValueError):
        fn(a, b)


# ---------------------------------------------------------------------------------------------------------------------
# MMD^2
# ---------------------------------------------------------------------------------------------------------------------


def _mmd2_loops(a: np.ndarray, b: np.ndarray, sigma: float) -> float:
    def k(x, y):
        return np.exp(-np.sum((x - y) ** 2) / (2 * sigma**2))

    n, m = len(a), len(b)
    aa = sum(k(a[i], a[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    bb = sum(k(b[i], b[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    ab = sum(k(a[i], b[j]) for i in range(n) for j in range(m)) / (n * m)
    return aa + bb - 2 * ab


def test_mmd2_matches_a_double_loop():
    rng = np.random.default_rng(6)
    a, b = rng.standard_normal((7, 3)), rng.standard_normal((5, 3)) + 0.5
    assert mmd2(a, b, bandwidth=0.8) == pytest.approx(_mmd2_loops(a, b, 0.8), abs=1e-10)
    pooled = np.vstack([a, b])
    sigma = np.median([np.linalg.norm(p - q) for i, p in enumerate(pooled) for q in pooled[i + 1 :]])
    assert mmd2(a, b) == pytest.approx(_mmd2_loops(a, b, sigma), abs=1e-10)


def test_median_bandwidth_is_the_median_pooled_pairwise_distance():
    rng = np.random.default_rng(7)
    a, b = rng.standard_normal((9, 4)), rng.standard_normal((6, 4)) * 2
    assert median_bandwidth(a, b) == pytest.approx(np.median(pdist(np.vstack([a, b]))), rel=1e-12)
    with pytest.raises(ValueError):
        median_bandwidth(np.zeros((5, 2)), np.zeros((5, 2)))


def test_mmd2_is_near_zero_for_one_distribution_and_positive_for_a_shift():
    rng = np.random.default_rng(8)
    a, b = _gaussian(rng, 200, 5), _gaussian(rng, 200, 5)
    assert abs(mmd2(a, b)) < 0.01
    assert mmd2(a, b + 1.0) > 0.1
    assert mmd2(a, b + 1.0) < mmd2(a, b + 2.0)


def test_mmd2_is_symmetric():
    rng = np.random.default_rng(9)
    a, b = rng.standard_normal((30, 3)), rng.standard_normal((20, 3)) + 0.2
    assert mmd2(a, b) == pytest.approx(mmd2(b, a), abs=1e-14)
    assert mmd2(a, b, bandwidth=2.0) == pytest.approx(mmd2(b, a, bandwidth=2.0), abs=1e-14)


def test_mmd2_is_unbiased_over_repeated_draws():
    """With a fixed bandwidth the estimator's mean is 0 under the null; the biased V-statistic's is clearly not."""
    rng = np.random.default_rng(10)
    values, biased = [], []
    for _ in range(1500):
        a, b = rng.standard_normal((10, 2)), rng.standard_normal((10, 2))
        values.append(mmd2(a, b, bandwidth=1.0))
        k = np.exp(-cdist(np.vstack([a, b]), np.vstack([a, b]), "sqeuclidean") / 2)
        biased.append(k[:10, :10].mean() + k[10:, 10:].mean() - 2 * k[:10, 10:].mean())
    values = np.asarray(values)
    standard_error = values.std() / np.sqrt(len(values))
    assert abs(values.mean()) < 4 * standard_error
    assert np.mean(biased) > 20 * standard_error  # the same test would catch a biased estimator
    assert (values < 0).any() and (values > 0).any()


@pytest.mark.parametrize("bandwidth", ["mean", 0.0, -1.0, float("nan")])
def test_mmd2_rejects_bad_bandwidths(bandwidth):
    with pytest.raises(ValueError):
        mmd2(np.eye(3), np.eye(3) + 1, bandwidth=bandwidth)


# ---------------------------------------------------------------------------------------------------------------------
# Memorisation
# ---------------------------------------------------------------------------------------------------------------------


def test_copies_of_training_samples_are_flagged():
    real = _gaussian(np.random.default_rng(11), 200, 8)
    nn = nearest_neighbour_distances(real[:50].copy(), real)
    np.testing.assert_array_equal(nn["gen_to_real"], 0.0)
    assert nn["fraction_closer_than_real_p5"] == 1.0
    assert nn["median_ratio"] == 0.0


def test_fresh_samples_look_like_real_ones():
    rng = np.random.default_rng(12)
    real, gen = _gaussian(rng, 400, 4), _gaussian(rng, 400, 4)
    nn = nearest_neighbour_distances(gen, real)
    assert nn["gen_to_real"].shape == (400,) and nn["real_to_real"].shape == (400,)
    assert 0.85 < nn["median_ratio"] < 1.2
    assert nn["fraction_closer_than_real_p5"] < 0.12


def test_real_to_real_leaves_each_sample_out():
    rng = np.random.default_rng(13)
    real, gen = rng.standard_normal((12, 3)), rng.standard_normal((5, 3))
    nn = nearest_neighbour_distances(gen, real)
    expected = [min(np.linalg.norm(r - q) for j, q in enumerate(real) if j != i) for i, r in enumerate(real)]
    np.testing.assert_allclose(nn["real_to_real"], expected, rtol=1e-12)
    np.testing.assert_allclose(nn["gen_to_real"], [min(np.linalg.norm(g - r) for r in real) for g in gen], rtol=1e-12)


# ---------------------------------------------------------------------------------------------------------------------
# Volume similarity
# ---------------------------------------------------------------------------------------------------------------------


MS_SSIM_TABLE = [(32, 7, 3), (48, 5, 4), (64, 7, 4), (128, 7, 5), (175, 7, 5), (176, 11, 5), (256, 11, 5)]


@pytest.mark.parametrize(("side", "kernel", "scales"), MS_SSIM_TABLE)
def test_ms_ssim_settings_table(side, kernel, scales):
    k, weights = ms_ssim_settings((side, side + 10, side + 3))
    assert (k, len(weights)) == (kernel, scales)
    assert sum(weights) == pytest.approx(1.0)
    np.testing.assert_allclose(np.asarray(weights) / weights[0], np.asarray(MS_SSIM_WEIGHTS[:scales]) / 0.0448)


@pytest.mark.parametrize("side", [32, 64])
def test_ms_ssim_settings_use_as_many_scales_as_monai_allows(side):
    from monai.metrics import MultiScaleSSIMMetric

    kernel, weights = ms_ssim_settings((side,) * 3)
    x = torch.zeros((1, 1, side, side, side))
    one_more = (*weights, 0.1)
    with pytest.raises((ValueError, RuntimeError)):
        MultiScaleSSIMMetric(spatial_dims=3, data_range=2.0, kernel_size=kernel, weights=one_more)(x, x)


@pytest.mark.parametrize("side", [5, 9, 10, 16, 17, 20, 28, 36, 45, 32, 64, pytest.param(128, marks=pytest.mark.slow)])
def test_ms_ssim_of_a_volume_with_itself_is_one(side):
    vol = _smooth_volume(side)
    assert ms_ssim_3d(vol, vol) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.slow
def test_ms_ssim_decreases_with_noise_and_takes_torch_input():
    vol = _smooth_volume(32)
    noise = np.random.default_rng(14).standard_normal(vol.shape).astype(np.float32)
    scores = [ms_ssim_3d(vol, np.clip(vol + s * noise, -1, 1)) for s in (0.02, 0.05, 0.1, 0.2, 0.4)]
    assert np.all(np.diff(scores) < 0) and scores[0] < 1.0, scores
    assert ms_ssim_3d(torch.from_numpy(vol), vol + 0.1 * noise) == pytest.approx(ms_ssim_3d(vol, vol + 0.1 * noise))


def test_ms_ssim_at_64_is_below_one_for_a_different_volume():
    assert ms_ssim_3d(_smooth_volume(64, seed=0), _smooth_volume(64, seed=1)) < 0.95


def test_ssim_of_self_is_one_and_drops_with_noise():
    vol = _smooth_volume(32)
    assert ssim_3d(vol, vol) == pytest.approx(1.0, abs=1e-6)
    noise = np.random.default_rng(15).standard_normal(vol.shape).astype(np.float32)
    assert ssim_3d(vol, vol + 0.05 * noise) > ssim_3d(vol, vol + 0.2 * noise)
    small = _smooth_volume(4)  # window shrinks to 3 voxels
    assert ssim_3d(small, small) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("fn", [ms_ssim_3d, ssim_3d])
def test_ssim_functions_reject_bad_shapes(fn):
    with pytest.raises(ValueError):
        fn(np.zeros((16, 16, 16)), np.zeros((16, 16, 15)))
    with pytest.raises(ValueError):
        fn(np.zeros((1, 16, 16, 16)), np.zeros((1, 16, 16, 16)))
    with pytest.raises(ValueError):
        fn(np.zeros((2, 16, 16)), np.zeros((2, 16, 16)))


def test_psnr_and_mae_on_known_input():
    x = np.zeros((4, 4, 4))
    y = np.full((4, 4, 4), 0.1)
    assert psnr(x, x) == float("inf")
    assert psnr(x, y) == pytest.approx(10 * np.log10(4 / 0.01))
    assert psnr(x, y, data_range=1.0) == pytest.approx(20.0)
    rng = np.random.default_rng(16)
    a, b = rng.uniform(-1, 1, (8, 8, 8)), rng.uniform(-1, 1, (8, 8, 8))
    assert psnr(a, b) == pytest.approx(10 * np.log10(4 / np.mean((a - b) ** 2)), rel=1e-12)
    assert mae(x, y) == pytest.approx(0.1)
    assert mae(torch.from_numpy(a), b) == pytest.approx(np.mean(np.abs(a - b)), rel=1e-12)
    with pytest.raises(ValueError):
        mae(x, y[:3])

"""Metrics for generated volumes: distribution distances, image similarity and a memorisation check.

Three families, all returning plain Python floats (or a dict of arrays and floats):

- Distribution distances between feature sets (N, D) and (M, D), e.g. embeddings of generated and real volumes from a
  3D feature network: :func:`frechet_distance` (FID when the features come from a fixed network) and :func:`mmd2`.
- Similarity of two single volumes (D, H, W) in model range (e.g. [-1, 1], so ``data_range=2``): :func:`ms_ssim_3d`,
  :func:`ssim_3d`, :func:`psnr`, :func:`mae`. Only the SSIM functions need torch and MONAI, imported when called.
- Memorisation: :func:`nearest_neighbour_distances` compares generated-to-real with real-to-real neighbour distances.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.spatial.distance import cdist, pdist

# Wang, Simoncelli and Bovik (2003): weights of the five MS-SSIM scales, finest first.
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
# Candidate window sizes, largest (the standard 11) first; the window is always a Gaussian of sigma 1.5.
_MS_SSIM_KERNELS = (11, 7, 5)
_SSIM_KERNEL = 7


# ---------------------------------------------------------------------------------------------------------------------
# Distribution distances between feature sets
# ---------------------------------------------------------------------------------------------------------------------


def _features(x: Any, name: str) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2D (samples, features) array, got shape {arr.shape}")
    if arr.shape[0] < 2:
        raise ValueError(f"{name} needs at least 2 samples, got {arr.shape[0]}")
    if arr.shape[1] < 1:
        raise ValueError(f"{name} has no feature columns")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return arr


def _feature_pair(a: Any, b: Any) -> tuple[np.ndarray, np.ndarray]:
    a, b = _features(a, "a"), _features(b, "b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"a and b must have the same number of features, got {a.shape[1]} and {b.shape[1]}")
    return a, b


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (FID when the features come from a fixed net).

    ``||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2))`` with unbiased covariances (``np.cov``, ``ddof=1``).

    Args:
        a: (N, D) features, N >= 2, finite.
        b: (M, D) features, M >= 2, finite, same D.

    Returns:
        The distance in squared feature units, >= 0; 0 for identical sets. Rank-deficient covariances (N <= D) are
        allowed.

    Raises:
        ValueError: on non-2D input, fewer than 2 samples, differing D, or non-finite values.
    """
    a, b = _feature_pair(a, b)
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    cov_a = np.atleast_2d(np.cov(a, rowvar=False))
    cov_b = np.atleast_2d(np.cov(b, rowvar=False))
    # tr((S_a S_b)^(1/2)) is the sum of square roots of the eigenvalues of S_a S_b, which are those of the symmetric
    # PSD matrix S_a^(1/2) S_b S_a^(1/2) (XY and YX share eigenvalues). Going through eigh of symmetric matrices
    # keeps everything real and well conditioned, also for singular covariances (N <= D), where sqrtm of the
    # non-symmetric product S_a S_b returns spurious imaginary parts and loses accuracy. Round-off can make tiny
    # eigenvalues negative; they are clipped to 0 before the square root.
    sqrt_a = _psd_sqrt(cov_a)
    middle = sqrt_a @ cov_b @ sqrt_a
    eig = np.linalg.eigvalsh((middle + middle.T) / 2)
    tr_covmean = np.sqrt(np.clip(eig, 0.0, None)).sum()
    value = float(np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a) + np.trace(cov_b) - 2.0 * tr_covmean)
    return max(value, 0.0)  # identical sets can land a few ulps below zero


def _psd_sqrt(cov: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric positive semi-definite matrix (negative round-off eigenvalues -> 0)."""
    eig, vec = np.linalg.eigh((cov + cov.T) / 2)
    return (vec * np.sqrt(np.clip(eig, 0.0, None))) @ vec.T


def median_bandwidth(a: np.ndarray, b: np.ndarray) -> float:
    """The median heuristic: median Euclidean distance over all distinct pairs of the pooled sample.

    Args:
        a: (N, D) features; b: (M, D) features, same D.

    Returns:
        sigma > 0 in feature units, for the Gaussian kernel of :func:`mmd2`.

    Raises:
        ValueError: on invalid features, or when more than half of the pooled pairs coincide (median 0).
    """
    a, b = _feature_pair(a, b)
    sigma = float(np.median(pdist(np.vstack([a, b]), metric="euclidean")))
    if sigma <= 0.0:
        raise ValueError("median pairwise distance is 0 (mostly duplicate samples); pass a positive bandwidth")
    return sigma


def mmd2(a: np.ndarray, b: np.ndarray, bandwidth: float | str = "median") -> float:
    """Unbiased squared maximum mean discrepancy with a Gaussian kernel (Gretton et al., JMLR 2012, eq. 3).

    ``k(x, y) = exp(-||x - y||^2 / (2 sigma^2))``; the estimate is the mean of K_aa off its diagonal, plus the mean of
    K_bb off its diagonal, minus twice the mean of K_ab.

    Args:
        a: (N, D) features, N >= 2; b: (M, D) features, M >= 2, same D.
        bandwidth: ``"median"`` for sigma = :func:`median_bandwidth` of the pooled sample, or sigma itself (> 0, in
            feature units).

    Returns:
        MMD^2 estimate in [-2, 2]; about 0 when a and b come from one distribution. Being unbiased, it is slightly
        negative for about half of such draws; it is deliberately not clipped, so averages over draws stay unbiased.
        Memory is O((N + M)^2).
    """
    a, b = _feature_pair(a, b)
    if isinstance(bandwidth, str):
        if bandwidth != "median":
            raise ValueError(f"bandwidth must be 'median' or a positive number, got {bandwidth!r}")
        sigma = median_bandwidth(a, b)
    else:
        sigma = float(bandwidth)
        if not (np.isfinite(sigma) and sigma > 0.0):
            raise ValueError(f"bandwidth must be a positive finite number, got {bandwidth!r}")
    gamma = 1.0 / (2.0 * sigma**2)
    n, m = len(a), len(b)
    k_aa = np.exp(-gamma * cdist(a, a, metric="sqeuclidean"))
    k_bb = np.exp(-gamma * cdist(b, b, metric="sqeuclidean"))
    k_ab = np.exp(-gamma * cdist(a, b, metric="sqeuclidean"))
    # the diagonals are exactly exp(0) = 1, so the off-diagonal sums are the full sums minus n (or m)
    term_aa = (k_aa.sum() - n) / (n * (n - 1))
    term_bb = (k_bb.sum() - m) / (m * (m - 1))
    return float(term_aa + term_bb - 2.0 * k_ab.mean())


# ---------------------------------------------------------------------------------------------------------------------
# Memorisation
# ---------------------------------------------------------------------------------------------------------------------


def nearest_neighbour_distances(gen: np.ndarray, real: np.ndarray) -> dict[str, Any]:
    """Nearest-neighbour distances in feature space, to spot generated volumes that copy training volumes.

    Args:
        gen: (N, D) features of generated volumes, N >= 2.
        real: (M, D) features of the real (training) volumes, M >= 2, same D.

    Returns:
        ``gen_to_real``: (N,) Euclidean distance from each generated sample to its nearest real sample;
        ``real_to_real``: (M,) distance from each real sample to its nearest *other* real sample (leave-one-out);
        ``median_ratio``: median(gen_to_real) / median(real_to_real) (inf or nan if the latter is 0);
        ``fraction_closer_than_real_p5``: fraction of generated samples nearer to a real one than the 5th percentile
        of real_to_real.

        A generator that samples fresh volumes from the real distribution gives a ratio near 1 (slightly above, since
        the real set has one sample fewer to choose from) and a fraction near 0.05. A fraction well above 0.05 or a
        ratio well below 1 suggests it reproduces (memorises) training volumes. Memory is O(N M + M^2).
    """
    gen, real = _features(gen, "gen"), _features(real, "real")
    if gen.shape[1] != real.shape[1]:
        raise ValueError(f"gen and real must have the same number of features, got {gen.shape[1]} and {real.shape[1]}")
    gen_to_real = cdist(gen, real).min(axis=1)
    rr = cdist(real, real)
    np.fill_diagonal(rr, np.inf)
    real_to_real = rr.min(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.float64(np.median(gen_to_real)) / np.float64(np.median(real_to_real))
    p5 = np.percentile(real_to_real, 5)
    return {
        "gen_to_real": gen_to_real,
        "real_to_real": real_to_real,
        "median_ratio": float(ratio),
        "fraction_closer_than_real_p5": float(np.mean(gen_to_real < p5)),
    }


MEMORISATION_FLAG_FRACTION = 0.2  # four times the 0.05 a generator of fresh volumes would give
MEMORISATION_FLAG_RATIO = 0.5


def memorisation_check(gen: np.ndarray, train: np.ndarray, heldout: np.ndarray) -> dict[str, Any]:
    """Do generated volumes sit closer to the training volumes than unseen real volumes do?

    Args: feature matrices (N, D) of generated volumes, of the model's training volumes and of held-out real
    volumes (that the model never saw), each with at least 2 rows.

    Returns ``median_ratio`` = median(generated -> nearest training) / median(held-out -> nearest training),
    ``fraction_closer_than_heldout_p5`` = the fraction of generated volumes nearer to a training volume than the
    5th percentile of the held-out ones, the counts, and ``flagged``: a fraction above
    MEMORISATION_FLAG_FRACTION or a ratio below MEMORISATION_FLAG_RATIO. A generator of fresh volumes from the
    training distribution stands to the training set as held-out volumes do (ratio near 1, fraction near 0.05);
    one that copies training volumes gives distances near 0.
    """
    gen, train, heldout = _features(gen, "gen"), _features(train, "train"), _features(heldout, "heldout")
    if not gen.shape[1] == train.shape[1] == heldout.shape[1]:
        raise ValueError("gen, train and heldout must have the same number of features")
    gen_to_train = cdist(gen, train).min(axis=1)
    held_to_train = cdist(heldout, train).min(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = float(np.float64(np.median(gen_to_train)) / np.float64(np.median(held_to_train)))
    fraction = float(np.mean(gen_to_train < np.percentile(held_to_train, 5)))
    return {
        "median_ratio": ratio,
        "fraction_closer_than_heldout_p5": fraction,
        "median_generated_to_train": float(np.median(gen_to_train)),
        "median_heldout_to_train": float(np.median(held_to_train)),
        "n_generated": int(len(gen)),
        "n_train": int(len(train)),
        "n_heldout": int(len(heldout)),
        "flagged": bool(fraction > MEMORISATION_FLAG_FRACTION or ratio < MEMORISATION_FLAG_RATIO),
    }


# ---------------------------------------------------------------------------------------------------------------------
# Similarity of two volumes
# ---------------------------------------------------------------------------------------------------------------------


def _as_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor, possibly on a GPU or requiring grad
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def _same_shape(x: np.ndarray, y: np.ndarray) -> None:
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same shape, got {x.shape} and {y.shape}")


def mae(x: Any, y: Any) -> float:
    """Mean absolute error of two arrays of any one shape (numpy or torch), in their units (model range: x 1)."""
    x, y = _as_numpy(x), _as_numpy(y)
    _same_shape(x, y)
    return float(np.mean(np.abs(x - y)))


def psnr(x: Any, y: Any, data_range: float = 2.0) -> float:
    """Peak signal-to-noise ratio ``10 log10(data_range^2 / MSE)`` in dB; ``inf`` for identical inputs.

    Args:
        x, y: arrays of any one shape (numpy or torch), e.g. volumes (D, H, W) in [-1, 1].
        data_range: max - min of the value range (2 for [-1, 1]).
    """
    x, y = _as_numpy(x), _as_numpy(y)
    _same_shape(x, y)
    mse = float(np.mean((x - y) ** 2))
    return float("inf") if mse == 0.0 else float(10.0 * np.log10(data_range**2 / mse))


def _fits(side: int, kernel: int, scales: int) -> bool:
    # Two conditions, both needed: MONAI's own guard in compute_ms_ssim (side // max(1, scales - 1)^2 must exceed
    # kernel - 1) and the real one: after scales - 1 halvings (floor) the volume must still hold one unpadded window.
    # They coincide for 5 scales (16 = 2^4) but not for 2 or 4, hence both.
    monai_guard = side // max(1, scales - 1) ** 2 >= kernel
    window_fits = side // 2 ** (scales - 1) >= kernel
    return monai_guard and window_fits


def ms_ssim_settings(spatial_shape: tuple[int, ...]) -> tuple[int, tuple[float, ...]]:
    """Window size and scale weights :func:`ms_ssim_3d` uses for a volume of this (D, H, W) shape.

    The standard MS-SSIM (5 scales, 11-voxel window) needs at least 176 voxels per side. For smaller volumes we keep
    as many scales as fit (up to 5), because the coarse scales carry most of the weight, and then the largest window
    of 11, 7, 5 that allows them: 176+ -> (11, 5 scales), 112..175 -> (7, 5), 64 -> (7, 4), 32 -> (7, 3). The weights
    are the first ``s`` standard weights renormalised to sum to 1. Scores are comparable only between volumes of one
    size.

    Raises:
        ValueError: if the smallest side is under 5 voxels.
    """
    side = min(int(s) for s in spatial_shape)
    for scales in range(len(MS_SSIM_WEIGHTS), 0, -1):
        for kernel in _MS_SSIM_KERNELS:
            if _fits(side, kernel, scales):
                w = np.asarray(MS_SSIM_WEIGHTS[:scales])
                return kernel, tuple(float(v) for v in w / w.sum())
    raise ValueError(f"volume {tuple(spatial_shape)} too small for MS-SSIM: every side needs >= 5 voxels")


def _volume_pair(x: Any, y: Any):
    """Two (D, H, W) volumes as float32 torch tensors (1, 1, D, H, W) on x's device (torch input stays put)."""
    import torch

    def to_tensor(v: Any, device=None):
        t = v.detach() if isinstance(v, torch.Tensor) else torch.from_numpy(np.asarray(v, dtype=np.float32))
        return t.to(device=device, dtype=torch.float32) if device is not None else t.float()

    tx = to_tensor(x)
    ty = to_tensor(y, tx.device)
    if tx.ndim != 3 or ty.ndim != 3:
        raise ValueError(f"expected two single volumes (D, H, W), got shapes {tuple(tx.shape)} and {tuple(ty.shape)}")
    if tx.shape != ty.shape:
        raise ValueError(f"x and y must have the same shape, got {tuple(tx.shape)} and {tuple(ty.shape)}")
    return tx[None, None], ty[None, None]


def ms_ssim_3d(x: Any, y: Any, data_range: float = 2.0) -> float:
    """Multi-scale SSIM of two volumes, via MONAI's ``MultiScaleSSIMMetric`` with a size-adapted window and scales.

    Args:
        x, y: single volumes (D, H, W), numpy or torch (computed on the tensor's device), e.g. in [-1, 1]; sides of
            32 to 256 are the intended range (see :func:`ms_ssim_settings` for how window and scales are chosen).
        data_range: max - min of the value range (2 for [-1, 1]).

    Returns:
        MS-SSIM in [0, 1]; 1 for identical volumes. Negative contrast terms are set to 0 by MONAI.
    """
    import torch
    from monai.metrics import MultiScaleSSIMMetric

    tx, ty = _volume_pair(x, y)
    kernel, weights = ms_ssim_settings(tuple(tx.shape[2:]))
    metric = MultiScaleSSIMMetric(
        spatial_dims=3, data_range=data_range, kernel_size=kernel, kernel_sigma=1.5, weights=weights
    )
    with torch.no_grad():
        result = metric(tx, ty)
    assert isinstance(result, torch.Tensor)  # MONAI types a metric's result as a tensor or a sequence of tensors
    return float(result.reshape(-1)[0])


def ssim_3d(x: Any, y: Any, data_range: float = 2.0) -> float:
    """SSIM of two volumes via MONAI's ``SSIMMetric``: Gaussian window (sigma 1.5) of 7 voxels, smaller if needed.

    Args:
        x, y: single volumes (D, H, W), numpy or torch, e.g. in [-1, 1]; every side >= 3.
        data_range: max - min of the value range (2 for [-1, 1]).

    Returns:
        Mean SSIM over the unpadded windows, in [-1, 1]; 1 for identical volumes.
    """
    import torch
    from monai.metrics import SSIMMetric

    tx, ty = _volume_pair(x, y)
    side = min(tx.shape[2:])
    if side < 3:
        raise ValueError(f"volume {tuple(tx.shape[2:])} too small for SSIM: every side needs >= 3 voxels")
    kernel = min(_SSIM_KERNEL, side if side % 2 else side - 1)  # odd, so the window has a centre voxel
    metric = SSIMMetric(spatial_dims=3, data_range=data_range, win_size=kernel, kernel_sigma=1.5)
    with torch.no_grad():
        result = metric(tx, ty)
    assert isinstance(result, torch.Tensor)  # MONAI types a metric's result as a tensor or a sequence of tensors
    return float(result.reshape(-1)[0])

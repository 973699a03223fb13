"""Noise level of CT slices for the classical denoisers (BM3D, non-local means)."""

from __future__ import annotations

import warnings

import numpy as np
from scipy import ndimage
from skimage.restoration import estimate_sigma


def slice_noise_sd_hu(
    hu_slices: np.ndarray,
    window: int = 9,
    tissue_hu: tuple[float, float] = (0.0, 100.0),
    min_pixels: int = 200,
) -> np.ndarray:
    """Noise SD in HU of each slice: the median local SD in soft tissue (BM3D's per-slice sigma).

    Per slice (the classical baselines' noise level), unlike :func:`ldct_lightning.data.noise.estimate_noise_sd_hu` (one value per set of volumes,
    from plane fits in flat blocks, for the stage-1 noise level).

    The local SD over ``window`` x ``window`` pixels is computed everywhere; the pixels whose local mean
    lies in ``tissue_hu`` (soft tissue, where the image is nearly flat) vote and the median wins, which
    ignores the edges that a few windows straddle. This estimates the pixel SD a reader would measure in a
    small uniform ROI (liver, muscle), like the "global noise" of Christianson et al. 2015 (AJR 204:1257),
    who take the mode instead of the median. With correlated CT noise it is somewhat below the SD over a
    large ROI, as the window absorbs the lowest frequencies; with white noise it matches
    ``skimage.restoration.estimate_sigma`` (a wavelet estimate of the finest scale only, which would miss
    most of the correlated noise and is therefore not used).

    Args:
        hu_slices: images in HU, (N, H, W) or (H, W).
        window: side of the local window in pixels.
        tissue_hu: range of local means counted as soft tissue.
        min_pixels: fewest soft-tissue pixels for an estimate.

    Returns:
        float64 (N,) SDs in HU; NaN for slices with fewer than ``min_pixels`` soft-tissue pixels.
    """
    hu = np.asarray(hu_slices, dtype=np.float64)
    if hu.ndim == 2:
        hu = hu[None]
    if hu.ndim != 3:
        raise ValueError(f"slice_noise_sd_hu: expected (N, H, W) or (H, W) slices, got shape {hu.shape}")
    n = window * window
    out = np.full(len(hu), np.nan)
    for i, image in enumerate(hu):
        mean = ndimage.uniform_filter(image, window, mode="reflect")
        mean_sq = ndimage.uniform_filter(image * image, window, mode="reflect")
        var = np.clip(mean_sq - mean * mean, 0, None) * n / (n - 1)
        mask = (mean >= tissue_hu[0]) & (mean <= tissue_hu[1])
        if mask.sum() >= min_pixels:
            out[i] = float(np.median(np.sqrt(var[mask])))
    return out


def resolve_sigmas(hu: np.ndarray, sigma_hu: float | str) -> np.ndarray:
    """One noise SD in HU per slice: ``sigma_hu`` for all, or each slice's :func:`slice_noise_sd_hu`.

    Args:
        hu: (N, H, W) images in HU.
        sigma_hu: a noise SD in HU, or ``"auto"`` (slices without enough soft tissue take the median of
            the others; when no slice has enough, scikit-image's wavelet ``estimate_sigma`` of each
            slice, which sees only the finest scale and so underestimates correlated CT noise).

    Returns:
        float64 (N,) SDs in HU.
    """
    if isinstance(sigma_hu, str):
        if sigma_hu != "auto":
            raise ValueError(f"sigma_hu={sigma_hu!r}: give a noise SD in HU or 'auto'")
        sigmas = slice_noise_sd_hu(hu)
        if np.isnan(sigmas).all():
            warnings.warn(
                "sigma_hu='auto': no slice has enough soft tissue (local mean 0-100 HU) for the noise "
                "estimate; using scikit-image's estimate_sigma (finest scale only). Give sigma_hu in HU "
                "to set it",
                stacklevel=2,
            )
            return np.array([float(estimate_sigma(image)) for image in hu])
        return np.where(np.isnan(sigmas), np.nanmedian(sigmas), sigmas)
    sigma = float(sigma_hu)
    if not sigma > 0:
        raise ValueError(f"sigma_hu={sigma_hu}: must be > 0 HU")
    return np.full(len(hu), sigma)

"""How well a registered NDCT matches its LDCT: NCC per slice inside the body and a mask of well-registered pixels.

Both images are smoothed first (the LDCT is noisy: an unsmoothed NCC measures the noise, not the fit).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def _smooth(volume: np.ndarray, sigma_px: float) -> np.ndarray:
    volume = np.asarray(volume, dtype=np.float32)
    return ndimage.gaussian_filter(volume, (0, sigma_px, sigma_px)) if sigma_px > 0 else volume


def slice_ncc(
    ldct: np.ndarray, ndct: np.ndarray, body: np.ndarray, sigma_px: float = 1.0, min_pixels: int = 32
) -> np.ndarray:
    """Normalised cross-correlation of each slice pair inside ``body``.

    Args:
        ldct: (n, h, w) HU.
        ndct: (n, h, w) HU, registered onto the LDCT grid.
        body: (n, h, w) bool, the pixels to compare.
        sigma_px: Gaussian smoothing (pixels) of both images before the comparison.
        min_pixels: a slice with fewer body pixels gets NaN.

    Returns:
        (n,) float64 NCC in [-1, 1] (NaN where undefined).
    """
    a, b = _smooth(ldct, sigma_px), _smooth(ndct, sigma_px)
    out = np.full(len(a), np.nan)
    for k in range(len(a)):
        m = body[k]
        if m.sum() < min_pixels:
            continue
        x, y = a[k][m].astype(np.float64), b[k][m].astype(np.float64)
        x, y = x - x.mean(), y - y.mean()
        denom = np.sqrt((x * x).sum() * (y * y).sum())
        out[k] = float((x * y).sum() / denom) if denom > 0 else np.nan
    return out


def local_ncc(a: np.ndarray, b: np.ndarray, radius_px: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Local NCC in (2r+1)^2 windows of each slice, with the local SDs of both images.

    Returns:
        ``(ncc, sd_a, sd_b)``, each (n, h, w) float32.
    """
    size = (1, 2 * radius_px + 1, 2 * radius_px + 1)
    a, b = a.astype(np.float64), b.astype(np.float64)
    ma, mb = ndimage.uniform_filter(a, size), ndimage.uniform_filter(b, size)
    va = np.maximum(ndimage.uniform_filter(a * a, size) - ma * ma, 0)
    vb = np.maximum(ndimage.uniform_filter(b * b, size) - mb * mb, 0)
    cov = ndimage.uniform_filter(a * b, size) - ma * mb
    ncc = cov / np.sqrt(va * vb + 1e-6)
    return ncc.astype(np.float32), np.sqrt(va).astype(np.float32), np.sqrt(vb).astype(np.float32)


def registered_mask(
    ldct: np.ndarray,
    ndct: np.ndarray,
    body: np.ndarray,
    sigma_px: float,
    radius_px: int,
    threshold: float,
    flat_sd_hu: float,
    flat_tolerance_hu: float,
    outside: np.ndarray | None = None,
    residual_tolerance_hu: float | None = None,
    residual_radius_px: int = 0,
) -> np.ndarray:
    """Pixels whose neighbourhood matches.

    Inside ``body``: local NCC >= ``threshold``, or, where both images are locally flat (local SD <
    ``flat_sd_hu``, e.g. inside an organ, where NCC is undefined), local means within ``flat_tolerance_hu``.
    Pixels in ``outside`` (air around the body in both images) need no structure. With
    ``residual_tolerance_hu``, every pixel must also have its smoothed images agree within that many HU
    everywhere in its ``residual_radius_px`` neighbourhood: a structure seen in both images but a few mm
    apart (or mixed across slices by the z interpolation) still correlates, yet is a wrong target.

    Returns:
        (n, h, w) bool, False outside ``body | outside``.
    """
    a, b = _smooth(ldct, sigma_px), _smooth(ndct, sigma_px)
    ncc, sd_a, sd_b = local_ncc(a, b, radius_px)
    size = (1, 2 * radius_px + 1, 2 * radius_px + 1)
    mean_diff = np.abs(ndimage.uniform_filter(a - b, size))
    flat = (sd_a < flat_sd_hu) & (sd_b < flat_sd_hu) & (mean_diff < flat_tolerance_hu)
    good = body & ((ncc >= threshold) | flat)
    if outside is not None:
        good |= outside & ~body
    if residual_tolerance_hu is not None:
        worst = np.abs(a - b)
        if residual_radius_px > 0:
            worst = ndimage.maximum_filter(
                worst, size=(1, 2 * residual_radius_px + 1, 2 * residual_radius_px + 1)
            )
        good &= worst < residual_tolerance_hu
    return good

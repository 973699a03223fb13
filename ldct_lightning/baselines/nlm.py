"""Non-local means baseline (Buades et al. 2005), slice by slice, through scikit-image.

``skimage.restoration.denoise_nl_means`` with its fast mode and its recommended strength ``h = 0.8 sigma``
when the noise SD is known; the SD is estimated per slice in HU
(:func:`~ldct_lightning.baselines.noise_level.slice_noise_sd_hu`, the pixel SD in soft tissue) rather than
with ``skimage.restoration.estimate_sigma``, whose wavelet estimate sees only the finest scale and misses
most of CT's spatially correlated noise. Like BM3D it works in the network's normalised domain (HU clipped
to ``[hu_min, hu_max]``, scaled to [0, 1]).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from skimage.restoration import denoise_nl_means
from tqdm.auto import tqdm

from ldct_lightning.baselines.noise_level import resolve_sigmas
from ldct_lightning.data.normalize import HU_MAX, HU_MIN, hu_to_unit, unit_to_hu

# skimage's documented choice for fast_mode with sigma given
H_OVER_SIGMA = 0.8


def nlm_denoise(
    hu_slices: np.ndarray,
    sigma_hu: float | Literal["auto"] = "auto",
    patch_size: int = 5,
    patch_distance: int = 6,
    hu_min: float = HU_MIN,
    hu_max: float = HU_MAX,
    progress: bool = True,
) -> np.ndarray:
    """Denoise CT slices one by one with scikit-image's non-local means.

    Args:
        hu_slices: images in HU, (N, H, W) or (H, W).
        sigma_hu: noise SD in HU, one value for all slices, or ``"auto"``: estimated per slice.
        patch_size: side of the compared patches in pixels.
        patch_distance: half-side of the search window in pixels.
        hu_min: HU mapped to 0 by the normalisation.
        hu_max: HU mapped to 1 by the normalisation.
        progress: show a progress bar.

    Returns:
        float32 denoised images in HU, same shape as ``hu_slices`` (clipped to ``[hu_min, hu_max]``).
    """
    hu = np.asarray(hu_slices, dtype=np.float64)
    single = hu.ndim == 2
    if single:
        hu = hu[None]
    if hu.ndim != 3 or hu.shape[0] == 0:
        raise ValueError(f"nlm_denoise: expected (N, H, W) or (H, W) slices, got shape {np.shape(hu_slices)}")
    sigmas = resolve_sigmas(hu, sigma_hu) / (hu_max - hu_min)
    unit = hu_to_unit(hu, hu_min, hu_max)
    out = np.empty_like(unit)
    for i in tqdm(range(len(unit)), desc="NLM", unit="slice", disable=not progress):
        sigma = float(sigmas[i])
        out[i] = denoise_nl_means(
            unit[i],
            h=H_OVER_SIGMA * sigma,
            sigma=sigma,
            patch_size=patch_size,
            patch_distance=patch_distance,
            fast_mode=True,
        )
    result = unit_to_hu(out.clip(0, 1), hu_min, hu_max).astype(np.float32)
    return result[0] if single else result

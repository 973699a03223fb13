"""BM3D baseline (Dabov et al. 2007), slice by slice, through the ``bm3d`` package of Tampere University.

``bm3d`` (with its dependency ``bm4d``, which ships the compiled library) is an optional extra,
``pip install -e .[bm3d]``: its licence allows non-commercial use only (research and education), with
attribution, so it is not a core dependency of this project. Check that your use qualifies.

BM3D here works in the network's normalised domain (:func:`ldct_lightning.data.normalize.hu_to_unit`:
HU clipped to ``[hu_min, hu_max]`` and scaled to [0, 1]), so the noise level it gets is
``sigma_unit = sigma_hu / (hu_max - hu_min)``. The package's model is additive white Gaussian noise; CT noise
is spatially correlated (the package can take a noise power spectrum, not used here), so ``sigma_hu`` acts as
a strength and the paper does not say which one it used.
"""

from __future__ import annotations

import importlib
import importlib.util
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from types import ModuleType
from typing import Literal

import numpy as np
from scipy import ndimage
from tqdm.auto import tqdm

from ldct_lightning.data.normalize import HU_MAX, HU_MIN, hu_to_unit, unit_to_hu

MISSING_MESSAGE = "BM3D needs the optional extra: pip install -e .[bm3d] (non-commercial licence)"


def bm3d_available() -> bool:
    """Whether the optional ``bm3d`` package is installed."""
    return importlib.util.find_spec("bm3d") is not None


def _import_bm3d() -> ModuleType:
    try:
        return importlib.import_module("bm3d")
    except ImportError as err:
        raise ImportError(MISSING_MESSAGE) from err


def slice_noise_sd_hu(
    hu_slices: np.ndarray,
    window: int = 9,
    tissue_hu: tuple[float, float] = (0.0, 100.0),
    min_pixels: int = 200,
) -> np.ndarray:
    """Noise SD in HU of each slice: the median local SD in soft tissue (BM3D's per-slice sigma).

    Per slice, unlike :func:`ldct_lightning.data.noise.estimate_noise_sd_hu` (one value per set of volumes,
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


def _bm3d_slice(unit_slice: np.ndarray, sigma_unit: float, profile: str) -> np.ndarray:
    # module level so that worker processes can unpickle it
    return np.asarray(_import_bm3d().bm3d(unit_slice, sigma_unit, profile=profile), dtype=np.float32)


def bm3d_denoise(
    hu_slices: np.ndarray,
    sigma_hu: float | Literal["auto"] = "auto",
    hu_min: float = HU_MIN,
    hu_max: float = HU_MAX,
    workers: int | None = None,
    progress: bool = True,
    profile: str = "np",
) -> np.ndarray:
    """Denoise CT slices one by one with BM3D, in parallel over slices.

    Args:
        hu_slices: images in HU, (N, H, W) or (H, W).
        sigma_hu: noise SD in HU given to BM3D, one value for all slices, or ``"auto"``: each slice's
            :func:`slice_noise_sd_hu` (slices without enough soft tissue take the median of the others).
        hu_min: HU mapped to 0 by the normalisation.
        hu_max: HU mapped to 1 by the normalisation.
        workers: worker processes (None: one per CPU, at most one per slice; 1: in this process).
        progress: show a progress bar.
        profile: the package's parameter profile (``np``: its default, "normal profile").

    Returns:
        float32 denoised images in HU, same shape as ``hu_slices`` (clipped to ``[hu_min, hu_max]``).

    Raises:
        ImportError: when the optional ``bm3d`` package is not installed.
    """
    _import_bm3d()
    hu = np.asarray(hu_slices, dtype=np.float64)
    single = hu.ndim == 2
    if single:
        hu = hu[None]
    if hu.ndim != 3 or hu.shape[0] == 0:
        raise ValueError(
            f"bm3d_denoise: expected (N, H, W) or (H, W) slices, got shape {np.shape(hu_slices)}"
        )
    sigmas = _resolve_sigmas(hu, sigma_hu) / (hu_max - hu_min)
    unit = hu_to_unit(hu, hu_min, hu_max)

    n_workers = min(workers or multiprocessing.cpu_count(), len(unit))
    bar = tqdm(total=len(unit), desc="BM3D", unit="slice", disable=not progress)
    profiles = [profile] * len(unit)
    if n_workers <= 1:
        results = []
        for image, sigma in zip(unit, sigmas, strict=True):
            results.append(_bm3d_slice(image, float(sigma), profile))
            bar.update()
    else:
        # spawn: a forked child of a process that already ran torch's thread pools can deadlock
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(n_workers, mp_context=context) as pool:
            results = []
            for result in pool.map(_bm3d_slice, unit, sigmas.tolist(), profiles):
                results.append(result)
                bar.update()
    bar.close()
    out = unit_to_hu(np.stack(results).clip(0, 1), hu_min, hu_max).astype(np.float32)
    return out[0] if single else out


def _resolve_sigmas(hu: np.ndarray, sigma_hu: float | str) -> np.ndarray:
    if isinstance(sigma_hu, str):
        if sigma_hu != "auto":
            raise ValueError(f"sigma_hu={sigma_hu!r}: give a noise SD in HU or 'auto'")
        sigmas = slice_noise_sd_hu(hu)
        if np.isnan(sigmas).all():
            raise ValueError(
                "sigma_hu='auto': no slice has enough soft tissue (local mean 0-100 HU) to estimate the noise; "
                "give sigma_hu in HU"
            )
        return np.where(np.isnan(sigmas), np.nanmedian(sigmas), sigmas)
    sigma = float(sigma_hu)
    if not sigma > 0:
        raise ValueError(f"sigma_hu={sigma_hu}: must be > 0 HU")
    return np.full(len(hu), sigma)

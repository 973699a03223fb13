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
from tqdm.auto import tqdm

from ldct_lightning.baselines.noise_level import resolve_sigmas
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
            :func:`~ldct_lightning.baselines.noise_level.slice_noise_sd_hu` (slices without enough soft tissue take the median of the others).
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
    sigmas = resolve_sigmas(hu, sigma_hu) / (hu_max - hu_min)
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

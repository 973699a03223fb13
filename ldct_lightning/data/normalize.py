"""HU <-> network-domain intensity mapping (SPEC: HU clipped to [-1024, 3071], scaled to [0, 1])."""

from __future__ import annotations

from typing import TypeVar

import numpy as np
import torch

HU_MIN = -1024.0
HU_MAX = 3071.0

Array = TypeVar("Array", np.ndarray, torch.Tensor)


def hu_to_unit(hu: Array, hu_min: float = HU_MIN, hu_max: float = HU_MAX) -> Array:
    """Clip HU to ``[hu_min, hu_max]`` and scale linearly to ``[0, 1]``.

    Args:
        hu: image(s) in Hounsfield units (numpy array or torch tensor).
        hu_min: HU mapped to 0.
        hu_max: HU mapped to 1.

    Returns:
        The normalised image, same type as the input.
    """
    if hu_max <= hu_min:
        raise ValueError(f"hu_max ({hu_max}) must be greater than hu_min ({hu_min})")
    return (hu.clip(hu_min, hu_max) - hu_min) / (hu_max - hu_min)


def unit_to_hu(x: Array, hu_min: float = HU_MIN, hu_max: float = HU_MAX) -> Array:
    """Inverse of :func:`hu_to_unit` (without un-clipping).

    Args:
        x: normalised image(s).
        hu_min: HU that 0 maps to.
        hu_max: HU that 1 maps to.

    Returns:
        The image in HU, same type as the input.
    """
    return x * (hu_max - hu_min) + hu_min


# Display windows (center, width) in HU used for windowed metrics and figures.
WINDOWS: dict[str, tuple[float, float]] = {
    "abdomen": (40.0, 400.0),
    "lung": (-600.0, 1500.0),
    "full": ((HU_MIN + HU_MAX) / 2, HU_MAX - HU_MIN),
}


def apply_window(hu: Array, center: float, width: float) -> Array:
    """Map HU to ``[0, 1]`` through a display window (values outside are clipped).

    Args:
        hu: image(s) in HU.
        center: window center (level) in HU.
        width: window width in HU.

    Returns:
        The windowed image in ``[0, 1]``, same type as the input; metrics on it use data range 1.
    """
    if width <= 0:
        raise ValueError(f"window width must be positive, got {width}")
    return hu_to_unit(hu, center - width / 2, center + width / 2)

"""Regions of interest: label names, box files, mask helpers and optional rigid registration.

A box is half-open in pixel indices, ``image[y0:y1, x0:x1]``, on the slice it was drawn on.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import yaml
from scipy import ndimage
from skimage.metrics import mean_squared_error
from skimage.registration import phase_cross_correlation

from ldct_lightning.data.phantom import LABEL_NAMES
from ldct_lightning.errors import LDCTError

# Label ids of the synthetic set's ROI masks, defined once with the phantom.
LABELS: dict[int, str] = dict(LABEL_NAMES)
LABEL_IDS: dict[str, int] = {name: idx for idx, name in LABELS.items()}

# The paper's quantitative ROIs (Table 3/4 columns).
PAPER_ROIS: tuple[str, ...] = ("heart", "liver", "spleen", "muscle")

BOX_FIELDS: tuple[str, ...] = ("patient_key", "slice_index", "roi", "y0", "x0", "y1", "x1")


class Box(NamedTuple):
    """Half-open rectangle ``[y0, y1) x [x0, x1)`` in pixel indices."""

    y0: int
    x0: int
    y1: int
    x1: int

    @property
    def slices(self) -> tuple[slice, slice]:
        """Index for ``image[box.slices]``."""
        return slice(self.y0, self.y1), slice(self.x0, self.x1)

    @property
    def shape(self) -> tuple[int, int]:
        return self.y1 - self.y0, self.x1 - self.x0

    def to_mask(self, shape: tuple[int, int]) -> np.ndarray:
        """Boolean mask of the box on an image of ``shape``."""
        mask = np.zeros(shape, dtype=bool)
        mask[self.slices] = True
        return mask


# (patient_key, slice_index) -> {roi name: Box}
BoxTable = dict[tuple[str, int], dict[str, Box]]


class BoxFileError(LDCTError):
    """A boxes-per-slice file is malformed; the message names the file and the row."""


def _parse_box_row(row: Mapping[str, object], where: str) -> tuple[str, int, str, Box]:
    missing = [f for f in BOX_FIELDS if row.get(f) in (None, "")]
    if missing:
        raise BoxFileError(f"{where}: missing {', '.join(missing)}. Give all of {', '.join(BOX_FIELDS)}.")
    try:
        slice_index = int(row["slice_index"])  # type: ignore[arg-type]
        y0, x0, y1, x1 = (int(row[k]) for k in ("y0", "x0", "y1", "x1"))  # type: ignore[arg-type]
    except (TypeError, ValueError) as exc:
        raise BoxFileError(f"{where}: slice_index, y0, x0, y1, x1 must be integers ({exc}).") from exc
    if min(y0, x0) < 0 or y1 <= y0 or x1 <= x0:
        raise BoxFileError(
            f"{where}: box ({y0}, {x0}, {y1}, {x1}) is empty or negative. Need 0 <= y0 < y1, 0 <= x0 < x1."
        )
    return str(row["patient_key"]), slice_index, str(row["roi"]), Box(y0, x0, y1, x1)


def read_boxes(path: str | Path) -> BoxTable:
    """Read a boxes-per-slice file (CSV, or YAML with the same fields).

    CSV header: ``patient_key,slice_index,roi,y0,x0,y1,x1``. YAML: a list of mappings with the same keys,
    optionally under a top-level ``boxes:`` key.

    Args:
        path: ``.csv``, ``.yaml`` or ``.yml`` file.

    Returns:
        ``{(patient_key, slice_index): {roi: Box}}``.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".csv":
        with path.open(newline="") as fh:
            rows: list[Mapping[str, object]] = list(csv.DictReader(fh))
        first_row = 2  # header is line 1
    elif suffix in (".yaml", ".yml"):
        data = yaml.safe_load(path.read_text()) or []
        if isinstance(data, Mapping):
            data = data.get("boxes", [])
        if not isinstance(data, list) or not all(isinstance(r, Mapping) for r in data):
            raise BoxFileError(
                f"{path}: expected a list of mappings (optionally under 'boxes:'). See BOX_FIELDS."
            )
        rows = data
        first_row = 1
    else:
        raise BoxFileError(f"{path}: unknown box file type {suffix!r}. Use .csv, .yaml or .yml.")
    table: BoxTable = {}
    for i, row in enumerate(rows):
        key, idx, roi, box = _parse_box_row(row, f"{path}: row {i + first_row}")
        slot = table.setdefault((key, idx), {})
        if roi in slot:
            raise BoxFileError(
                f"{path}: row {i + first_row}: ROI {roi!r} given twice for this slice. Keep one."
            )
        slot[roi] = box
    return table


def write_boxes(path: str | Path, boxes: BoxTable) -> Path:
    """Write a boxes-per-slice table as CSV (the format :func:`read_boxes` reads).

    Args:
        path: output ``.csv``.
        boxes: ``{(patient_key, slice_index): {roi: Box}}``.

    Returns:
        The path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(BOX_FIELDS)
        for (key, idx), rois in sorted(boxes.items()):
            for roi, b in rois.items():
                writer.writerow([key, idx, roi, b.y0, b.x0, b.y1, b.x1])
    return path


def label_mask(labels: np.ndarray, roi: str | int) -> np.ndarray:
    """Boolean mask of one ROI in a label image.

    Args:
        labels: integer label image (ids as in :data:`LABELS`).
        roi: ROI name (``"liver"``) or label id.

    Returns:
        ``labels == id``.
    """
    if isinstance(roi, str):
        if roi not in LABEL_IDS:
            raise KeyError(f"unknown ROI name {roi!r}; known: {', '.join(LABEL_IDS)}")
        roi = LABEL_IDS[roi]
    return np.asarray(labels) == roi


def mask_to_box(mask: np.ndarray) -> Box:
    """Tight bounding box of the True pixels of a 2-D mask.

    Args:
        mask: boolean (H, W).

    Returns:
        The half-open :class:`Box`.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {mask.shape}")
    found = ndimage.find_objects(mask.astype(np.int8))
    if not found or found[0] is None:
        raise ValueError("mask is empty: no bounding box")
    ys, xs = found[0]
    return Box(ys.start, xs.start, ys.stop, xs.stop)


def erode_mask(mask: np.ndarray, iterations: int = 2) -> np.ndarray:
    """Erode a mask (4-connected structuring element) to keep away from organ edges.

    Pixels on the image border count as outside, so a mask touching the border shrinks there too.

    Args:
        mask: boolean (H, W).
        iterations: erosion steps in pixels; 0 returns a copy.

    Returns:
        The eroded boolean mask (may be empty).
    """
    mask = np.asarray(mask, dtype=bool)
    if iterations <= 0:
        return mask.copy()
    return ndimage.binary_erosion(mask, iterations=iterations, border_value=0)


def ring_mask(mask: np.ndarray, width: int = 5, gap: int = 1) -> np.ndarray:
    """Ring around a mask: ``dilate(mask, gap + width) & ~dilate(mask, gap)``.

    Args:
        mask: boolean (H, W), e.g. a lesion.
        width: ring width in pixels.
        gap: pixels left out between the mask and the ring (partial-volume edge).

    Returns:
        Boolean ring mask.
    """
    mask = np.asarray(mask, dtype=bool)
    outer = ndimage.binary_dilation(mask, iterations=gap + width)
    inner = ndimage.binary_dilation(mask, iterations=gap) if gap > 0 else mask
    return outer & ~inner


BONE_HU = 300.0  # above: bone (cortical and dense trabecular), for the bone-adjacent band
SOFT_TISSUE_HU = (-300.0, 300.0)  # fat, water, muscle, organs; leaves out air, lung and bone


def bone_band_mask(
    reference_hu: np.ndarray,
    width: int = 5,
    bone_hu: float = BONE_HU,
    soft_tissue_hu: tuple[float, float] = SOFT_TISSUE_HU,
) -> np.ndarray:
    """Soft tissue 1 to ``width`` pixels from bone: where a denoiser that smears bone errs most.

    ``ring_mask(reference > bone_hu, width, gap=0)`` restricted to reference pixels in ``soft_tissue_hu``
    (defined on the ground truth, so every method is scored on the same pixels).

    Args:
        reference_hu: the aligned ground truth in HU (H, W).
        width: band width in pixels (steps of a 4-connected dilation).
        bone_hu: threshold of bone.
        soft_tissue_hu: ``[low, high)`` HU range kept in the band.

    Returns:
        Boolean (H, W) mask; empty when the slice has no bone.
    """
    reference_hu = np.asarray(reference_hu)
    bone = reference_hu > bone_hu
    if not bone.any():
        return np.zeros(reference_hu.shape, dtype=bool)
    low, high = soft_tissue_hu
    return ring_mask(bone, width=width, gap=0) & (reference_hu >= low) & (reference_hu < high)


@dataclass(frozen=True)
class Registration:
    """Result of :func:`register_rigid`.

    Attributes:
        image: the moving image resampled onto the fixed image's grid.
        valid: boolean mask of pixels that came from inside the moving image (score only these).
        shift: (dy, dx) in pixels applied to the moving image.
        angle_deg: rotation applied with ``scipy.ndimage.rotate`` (degrees; 0 without rotation search).
        rmse_before: RMSE between fixed and moving before registration (image units).
        rmse_after: residual RMSE on ``valid`` pixels after registration; report it with any score on
            registered data, it bounds how far "aligned" the pair is.
    """

    image: np.ndarray
    valid: np.ndarray
    shift: tuple[float, float]
    angle_deg: float
    rmse_before: float
    rmse_after: float


def _apply_rigid(
    image: np.ndarray, angle_deg: float, shift: Iterable[float]
) -> tuple[np.ndarray, np.ndarray]:
    out = image
    valid = np.ones(image.shape, dtype=float)
    if angle_deg:
        out = ndimage.rotate(out, angle_deg, reshape=False, order=1, mode="constant", cval=float(image.min()))
        valid = ndimage.rotate(valid, angle_deg, reshape=False, order=0, mode="constant", cval=0.0)
    shift = tuple(shift)
    out = ndimage.shift(out, shift, order=1, mode="constant", cval=float(image.min()))
    valid = ndimage.shift(valid, shift, order=0, mode="constant", cval=0.0)
    return out, valid > 0.5


def register_rigid(
    moving: np.ndarray,
    fixed: np.ndarray,
    rotation: bool = False,
    max_angle_deg: float = 5.0,
    angle_step_deg: float = 0.5,
    upsample_factor: int = 10,
    normalization: str | None = None,
) -> Registration:
    """Rigidly register ``moving`` (e.g. the NDCT slice) to ``fixed`` (e.g. the LDCT input) before scoring.

    Translation comes from ``skimage.registration.phase_cross_correlation`` (sub-pixel). With ``rotation``
    a grid of angles in ``[-max_angle_deg, max_angle_deg]`` is tried and the one with the lowest residual
    after translation is kept: a plain search, robust for the few degrees of pose change expected
    between scans, where log-polar methods are unreliable on noisy CT.

    Args:
        moving: image to move (H, W).
        fixed: image to align to (H, W), same units.
        rotation: also search a rotation.
        max_angle_deg: rotation search half-range.
        angle_step_deg: rotation search step.
        upsample_factor: sub-pixel precision of the translation (1 / factor pixels).
        normalization: ``phase_cross_correlation``'s normalization; ``None`` (plain cross-correlation) is
            more robust on noisy CT than ``"phase"``.

    Returns:
        A :class:`Registration` with the resampled image and the residual RMSE to report.
    """
    moving = np.asarray(moving, dtype=np.float64)
    fixed = np.asarray(fixed, dtype=np.float64)
    if moving.shape != fixed.shape or moving.ndim != 2:
        raise ValueError(
            f"register_rigid needs two 2-D images of one shape, got {moving.shape} and {fixed.shape}"
        )
    angles = [0.0]
    if rotation:
        n = int(round(max_angle_deg / angle_step_deg))
        angles = [float(a) for a in np.linspace(-n * angle_step_deg, n * angle_step_deg, 2 * n + 1)]
    best: Registration | None = None
    for angle in angles:
        rotated = ndimage.rotate(moving, angle, reshape=False, order=1, mode="nearest") if angle else moving
        shift, _, _ = phase_cross_correlation(
            fixed, rotated, upsample_factor=upsample_factor, normalization=normalization
        )
        image, valid = _apply_rigid(moving, angle, shift)
        if not valid.any():
            continue
        rmse = float(np.sqrt(mean_squared_error(fixed[valid], image[valid])))
        if best is None or rmse < best.rmse_after:
            best = Registration(
                image=image,
                valid=valid,
                shift=(float(shift[0]), float(shift[1])),
                angle_deg=angle,
                rmse_before=float(np.sqrt(mean_squared_error(fixed, moving))),
                rmse_after=rmse,
            )
    if best is None:
        raise ValueError("registration failed: no overlap between the images at any tried pose")
    return best

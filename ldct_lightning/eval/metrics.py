"""Image-quality metrics under two named protocols.

``paper`` (Hu et al. 2024, eq. 10-12): PSNR, SSIM and RMSE on images normalised with ``hu_to_unit``,
computed on an ROI crop (a box, or the bounding box of a mask) against the NDCT slice. The NDCT is not
aligned with the input in the paper's data; register it first (``rois.register_rigid``) and report the
residual, or read these numbers as a measure of similarity, not of error.

``reference`` (an aligned ground truth exists, e.g. the synthetic set's clean image): PSNR and SSIM in named
display windows (data range 1 after windowing), RMSE in HU, on the full slice and on each ROI mask; noise SD in
eroded uniform-organ masks; lesion contrast-to-noise ratio.

Every record carries its protocol name, so numbers from the two are never mixed up.
SSIM everywhere uses Wang et al. (2004)'s settings: Gaussian window sigma 1.5 (11x11), population covariance.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TypedDict

import numpy as np
from scipy import ndimage
from skimage.metrics import mean_squared_error, peak_signal_noise_ratio, structural_similarity

from ldct_lightning.data.normalize import WINDOWS, apply_window, hu_to_unit
from ldct_lightning.eval.rois import (
    LABELS,
    PAPER_ROIS,
    Box,
    bone_band_mask,
    erode_mask,
    label_mask,
    mask_to_box,
    ring_mask,
)

PAPER = "paper"
REFERENCE = "reference"

SSIM_KWARGS: dict[str, object] = {"gaussian_weights": True, "sigma": 1.5, "use_sample_covariance": False}
SSIM_MIN_SIDE = 11  # the Gaussian window above is 11x11; smaller crops give NaN

REFERENCE_ROIS: tuple[str, ...] = (
    "heart",
    "liver",
    "spleen",
    "muscle",
    "fat",
    "lung",
    "bone",
    "vessel",
    "lesion",
)
NOISE_ROIS: tuple[str, ...] = ("heart", "liver", "spleen", "muscle", "fat")
# soft tissue 1-5 px from bone (rois.bone_band_mask), from the reference image: shows bone smeared into tissue
BONE_BAND = "bone_band"
# an ROI is scored in a window only when at least this share of its reference pixels lies inside the window's
# grey range (not clipped to black or white): the windows it can be read in
READABLE_SHARE = 0.5

Roi = Box | np.ndarray  # a box, or a boolean mask of the slice's shape


class Record(TypedDict):
    """One number: the flat row every scorer returns and every aggregator reads."""

    method: str
    patient_key: str
    slice_index: int
    protocol: str
    roi: str
    metric: str
    value: float


def _check_pair(pred: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred = np.asarray(pred, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if pred.shape != ref.shape:
        raise ValueError(f"prediction shape {pred.shape} != reference shape {ref.shape}")
    return pred, ref


def crop_roi(image: np.ndarray, roi: Roi) -> np.ndarray:
    """Crop an image to a box, or to the bounding box of a mask (pixels outside the mask stay in).

    Args:
        image: (H, W).
        roi: :class:`Box` or boolean mask of the same shape.

    Returns:
        The 2-D crop.
    """
    box = roi if isinstance(roi, Box) else mask_to_box(roi)
    return np.asarray(image)[box.slices]


# ---------------------------------------------------------------------------------------------- paper


def paper_psnr(pred: np.ndarray, ref: np.ndarray, max_value: float | None = None) -> float:
    """PSNR of eq. 11, ``10 log10(MAX^2 / MSE)`` with ``MAX`` = maximum of the reference image.

    A thin wrapper: ``skimage.metrics.peak_signal_noise_ratio`` takes ``MAX`` as ``data_range``; the paper's
    convention is to use the image maximum rather than the dynamic range, so we pass ``ref.max()``.

    Args:
        pred: image under test (any shape), normalised units.
        ref: reference image, same shape.
        max_value: ``MAX``; default the maximum of ``ref``.

    Returns:
        PSNR in dB (``inf`` for identical images).
    """
    pred, ref = _check_pair(pred, ref)
    peak = float(ref.max()) if max_value is None else float(max_value)
    if peak <= 0:
        raise ValueError(f"PSNR needs a positive MAX, got {peak}")
    if np.array_equal(pred, ref):
        return float("inf")
    return float(peak_signal_noise_ratio(ref, pred, data_range=peak))


def ssim(pred: np.ndarray, ref: np.ndarray, data_range: float = 1.0) -> float:
    """Mean SSIM of two 2-D images (``skimage.metrics.structural_similarity``, :data:`SSIM_KWARGS`).

    Args:
        pred: image under test (H, W).
        ref: reference image (H, W).
        data_range: ``L`` in the SSIM constants ``(k L)^2``.

    Returns:
        SSIM, or NaN when a side is shorter than :data:`SSIM_MIN_SIDE`.
    """
    pred, ref = _check_pair(pred, ref)
    if min(ref.shape) < SSIM_MIN_SIDE:
        return float("nan")
    return float(structural_similarity(ref, pred, data_range=data_range, **SSIM_KWARGS))


def rmse(pred: np.ndarray, ref: np.ndarray) -> float:
    """RMSE of eq. 12, ``sqrt(mean((x - y)^2))`` (``skimage.metrics.mean_squared_error``), in input units."""
    pred, ref = _check_pair(pred, ref)
    return float(np.sqrt(mean_squared_error(ref, pred)))


def paper_metrics(pred_hu: np.ndarray, ndct_hu: np.ndarray, roi: Roi) -> dict[str, float]:
    """The paper's three numbers on one ROI, on ``hu_to_unit``-normalised images.

    Args:
        pred_hu: denoised (or input) slice in HU (H, W).
        ndct_hu: NDCT slice in HU (H, W), registered to the input if it was not acquired aligned.
        roi: box or mask; a mask is scored on its bounding box (as a drawn box would be).

    Returns:
        ``psnr`` (eq. 11, MAX = maximum of the NDCT crop), ``psnr_max1`` (MAX = 1, the top of the normalised
        range: the paper's Table 3/4 values satisfy PSNR ~= -20 log10 RMSE, i.e. this convention),
        ``ssim`` (data range 1) and ``rmse`` (normalised units).
    """
    pred_hu, ndct_hu = _check_pair(pred_hu, ndct_hu)
    p = crop_roi(hu_to_unit(pred_hu), roi)
    r = crop_roi(hu_to_unit(ndct_hu), roi)
    return {
        "psnr": paper_psnr(p, r) if r.max() > 0 else float("nan"),  # an all-air crop has MAX 0
        "psnr_max1": paper_psnr(p, r, max_value=1.0),
        "ssim": ssim(p, r, data_range=1.0),
        "rmse": rmse(p, r),
    }


# ------------------------------------------------------------------------------------------ reference


def windowed_psnr(
    pred_hu: np.ndarray, ref_hu: np.ndarray, window: str | tuple[float, float], mask: np.ndarray | None = None
) -> float:
    """PSNR after a display window, data range 1 (the window width).

    Args:
        pred_hu: image under test in HU.
        ref_hu: aligned reference in HU.
        window: name in ``normalize.WINDOWS`` or ``(center, width)``.
        mask: optional boolean mask; MSE over its pixels only.

    Returns:
        PSNR in dB.
    """
    pred_hu, ref_hu = _check_pair(pred_hu, ref_hu)
    center, width = WINDOWS[window] if isinstance(window, str) else window
    p, r = apply_window(pred_hu, center, width), apply_window(ref_hu, center, width)
    if mask is not None:
        p, r = p[mask], r[mask]
    if np.array_equal(p, r):
        return float("inf")
    return float(peak_signal_noise_ratio(r, p, data_range=1.0))


def windowed_ssim_map(
    pred_hu: np.ndarray, ref_hu: np.ndarray, window: str | tuple[float, float]
) -> np.ndarray:
    """Full-slice SSIM map after a display window (data range 1); average it over a mask for an ROI.

    Returns:
        SSIM map, same shape as the inputs.
    """
    pred_hu, ref_hu = _check_pair(pred_hu, ref_hu)
    center, width = WINDOWS[window] if isinstance(window, str) else window
    p, r = apply_window(pred_hu, center, width), apply_window(ref_hu, center, width)
    _, smap = structural_similarity(r, p, data_range=1.0, full=True, **SSIM_KWARGS)
    return smap


def max_abs_error_hu(pred_hu: np.ndarray, ref_hu: np.ndarray, mask: np.ndarray | None = None) -> float:
    """The largest absolute HU error, over the image or a boolean mask."""
    diff = np.abs(np.asarray(pred_hu, dtype=np.float64) - np.asarray(ref_hu, dtype=np.float64))
    return float(diff[mask].max() if mask is not None else diff.max())


def rmse_hu(pred_hu: np.ndarray, ref_hu: np.ndarray, mask: np.ndarray | None = None) -> float:
    """RMSE in HU (no clipping), over a mask when given."""
    pred_hu, ref_hu = _check_pair(pred_hu, ref_hu)
    if mask is not None:
        pred_hu, ref_hu = pred_hu[mask], ref_hu[mask]
    return rmse(pred_hu, ref_hu)


def noise_sd(
    pred_hu: np.ndarray, mask: np.ndarray, ref_hu: np.ndarray | None = None, erosion_px: int = 2
) -> float:
    """Noise SD (HU) in an eroded uniform-organ mask.

    With ``ref_hu``: SD of ``pred - ref`` (anatomy and bias removed, only the residual noise counts). Without:
    SD of ``pred`` itself (includes any real texture of the organ; usable without an aligned reference).
    Sample SD (ddof=1).

    Args:
        pred_hu: image in HU.
        mask: organ mask.
        ref_hu: aligned reference in HU, optional.
        erosion_px: erosion before measuring, to stay off organ edges.

    Returns:
        The SD, or NaN when fewer than 2 pixels survive the erosion.
    """
    region = erode_mask(mask, erosion_px)
    values = np.asarray(pred_hu, dtype=np.float64)[region]
    if ref_hu is not None:
        values = values - np.asarray(ref_hu, dtype=np.float64)[region]
    return float(np.std(values, ddof=1)) if values.size >= 2 else float("nan")


def lesion_cnr(
    image_hu: np.ndarray,
    lesion: np.ndarray,
    background: np.ndarray,
    ring_width: int = 5,
    gap: int = 1,
    min_pixels: int = 20,
) -> float:
    """Lesion contrast-to-noise ratio ``|mean(lesion) - mean(ring)| / SD(ring)``.

    Each connected lesion is scored against its own ring (``rois.ring_mask``, binary dilation) restricted to
    the background organ (e.g. liver); rings with fewer than ``min_pixels`` background pixels are skipped.
    The mean over scored lesions is returned.

    Args:
        image_hu: image in HU.
        lesion: boolean lesion mask.
        background: boolean mask of the surrounding organ.
        ring_width: ring width in pixels.
        gap: pixels left out between lesion and ring.
        min_pixels: minimum ring size.

    Returns:
        Mean CNR, or NaN when no lesion has a usable ring.
    """
    image = np.asarray(image_hu, dtype=np.float64)
    components, n = ndimage.label(np.asarray(lesion, dtype=bool))
    all_lesions = components > 0
    values = []
    for i in range(1, n + 1):
        one = components == i
        ring = ring_mask(one, ring_width, gap) & np.asarray(background, dtype=bool) & ~all_lesions
        if ring.sum() < min_pixels:
            continue
        sd = np.std(image[ring], ddof=1)
        if sd > 0:
            values.append(abs(image[one].mean() - image[ring].mean()) / sd)
    return float(np.mean(values)) if values else float("nan")


# ------------------------------------------------------------------------------------------- scoring


def _resolve_rois(
    names: Iterable[str],
    labels: np.ndarray | None,
    boxes: Mapping[str, Box] | None,
    label_ids: Mapping[str, int],
    prefer_boxes: bool,
) -> dict[str, Roi]:
    out: dict[str, Roi] = {}
    for name in names:
        box = boxes.get(name) if boxes else None
        mask = None
        if labels is not None and name in label_ids:
            m = labels == label_ids[name]
            mask = m if m.any() else None
        if prefer_boxes:
            roi = box if box is not None else mask
        else:
            roi = mask if mask is not None else box
        if roi is not None:
            out[name] = roi
    return out


def score_slice(
    pred_hu: np.ndarray,
    *,
    method: str,
    patient_key: str,
    slice_index: int,
    ndct_hu: np.ndarray | None = None,
    reference_hu: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    boxes: Mapping[str, Box] | None = None,
    paper_rois: Sequence[str] = PAPER_ROIS,
    reference_rois: Sequence[str] = REFERENCE_ROIS,
    noise_rois: Sequence[str] = NOISE_ROIS,
    windows: Sequence[str] = tuple(WINDOWS),
    label_names: Mapping[int, str] = LABELS,
    erosion_px: int = 2,
    lesion_background: str = "liver",
) -> list[Record]:
    """Score one slice of one method and return flat records.

    ``paper`` records need ``ndct_hu``; ROIs are ``boxes`` first, else the bounding boxes of the ``labels``
    masks. ``reference`` records need ``reference_hu``; ROIs are ``labels`` masks first, else boxes, plus
    ``roi="slice"`` for the full slice and ``roi="bone_band"`` (soft tissue 1-5 px from bone in the reference). An ROI absent from the slice gives no record.

    Metric names: paper ``psnr``, ``psnr_max1``, ``ssim``, ``rmse`` (see :func:`paper_metrics`); reference
    ``psnr_<window>``, ``ssim_<window>`` (data range 1 after the window), ``rmse_hu``, ``max_abs_err_hu`` (largest
    absolute error; full slice and bone band), ``noise_sd_diff_hu`` (SD
    of pred - reference in the eroded mask), ``sd_hu`` (SD of pred in the eroded mask), ``cnr`` (roi
    ``lesion``, against ``lesion_background``).

    Args:
        pred_hu: the method's output (or the input, for the LDCT row) in HU, (H, W).
        method: method name as it should appear in tables.
        patient_key: hashed patient key.
        slice_index: slice index in the input series.
        ndct_hu: NDCT slice in HU for the paper protocol (registered beforehand if wanted).
        reference_hu: aligned ground truth in HU for the reference protocol.
        labels: integer label image aligned with ``pred_hu`` (ids as ``label_names``).
        boxes: ``{roi: Box}`` for this slice (from ``rois.read_boxes``).
        paper_rois: ROI names for the paper protocol.
        reference_rois: ROI names for the reference protocol.
        noise_rois: uniform organs for the noise SD.
        windows: window names from ``normalize.WINDOWS``.
        label_names: label id -> name.
        erosion_px: mask erosion before noise SD.
        lesion_background: organ the lesion ring is restricted to.

    Returns:
        List of :class:`Record`.
    """
    pred_hu = np.asarray(pred_hu, dtype=np.float64)
    if pred_hu.ndim != 2:
        raise ValueError(f"score_slice expects a 2-D slice, got shape {pred_hu.shape}")
    if labels is not None and np.shape(labels) != pred_hu.shape:
        raise ValueError(f"labels shape {np.shape(labels)} != slice shape {pred_hu.shape}")
    label_ids = {name: idx for idx, name in label_names.items()}
    records: list[Record] = []

    def add(protocol: str, roi: str, metric: str, value: float) -> None:
        records.append(
            Record(
                method=method,
                patient_key=patient_key,
                slice_index=int(slice_index),
                protocol=protocol,
                roi=roi,
                metric=metric,
                value=float(value),
            )
        )

    if ndct_hu is not None:
        for name, roi in _resolve_rois(paper_rois, labels, boxes, label_ids, prefer_boxes=True).items():
            for metric, value in paper_metrics(pred_hu, ndct_hu, roi).items():
                add(PAPER, name, metric, value)

    if reference_hu is not None:
        pred_hu, reference_hu = _check_pair(pred_hu, reference_hu)
        smaps = {w: windowed_ssim_map(pred_hu, reference_hu, w) for w in windows}
        pad = (SSIM_MIN_SIDE - 1) // 2  # skimage's mean SSIM leaves out this border of the map
        for w in windows:
            add(REFERENCE, "slice", f"psnr_{w}", windowed_psnr(pred_hu, reference_hu, w))
            add(REFERENCE, "slice", f"ssim_{w}", float(smaps[w][pad:-pad, pad:-pad].mean()))
        add(REFERENCE, "slice", "rmse_hu", rmse_hu(pred_hu, reference_hu))
        add(REFERENCE, "slice", "max_abs_err_hu", max_abs_error_hu(pred_hu, reference_hu))
        rois = _resolve_rois(reference_rois, labels, boxes, label_ids, prefer_boxes=False)
        band = bone_band_mask(reference_hu)
        if band.any():
            rois[BONE_BAND] = band
        for name, roi in rois.items():
            mask = roi.to_mask(pred_hu.shape) if isinstance(roi, Box) else roi
            for w in windows:
                shown = apply_window(reference_hu[mask], *WINDOWS[w])
                if np.mean((shown > 0.0) & (shown < 1.0)) < READABLE_SHARE:
                    # the window clips most of the ROI's reference (bone in the lung window, lung in the
                    # abdomen window): the PSNR would rest on its few partial-volume pixels at the edge (lung
                    # in the abdomen window: 1.5 % of the lung pixels of site A), or be inf when all are clipped
                    continue
                add(REFERENCE, name, f"psnr_{w}", windowed_psnr(pred_hu, reference_hu, w, mask))
                add(REFERENCE, name, f"ssim_{w}", float(smaps[w][mask].mean()))
            add(REFERENCE, name, "rmse_hu", rmse_hu(pred_hu, reference_hu, mask))
            if name == BONE_BAND:
                add(REFERENCE, name, "max_abs_err_hu", max_abs_error_hu(pred_hu, reference_hu, mask))
            if name in noise_rois:
                add(REFERENCE, name, "noise_sd_diff_hu", noise_sd(pred_hu, mask, reference_hu, erosion_px))
                add(REFERENCE, name, "sd_hu", noise_sd(pred_hu, mask, None, erosion_px))
        if labels is not None and "lesion" in label_ids and lesion_background in label_ids:
            lesion = label_mask(labels, label_ids["lesion"])
            if lesion.any():
                cnr = lesion_cnr(pred_hu, lesion, label_mask(labels, label_ids[lesion_background]))
                if not np.isnan(cnr):
                    add(REFERENCE, "lesion", "cnr", cnr)
    return records

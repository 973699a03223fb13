"""Metrics (paper and reference protocols) and ROI helpers against skimage / scipy / hand computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage
from skimage.metrics import structural_similarity

from ldct_lightning.data.normalize import hu_to_unit
from ldct_lightning.eval import metrics as M
from ldct_lightning.eval.rois import (
    LABELS,
    Box,
    BoxFileError,
    erode_mask,
    mask_to_box,
    read_boxes,
    register_rigid,
    ring_mask,
    write_boxes,
)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def phantom(h: int = 48, w: int = 48) -> tuple[np.ndarray, np.ndarray]:
    """A small HU slice and its label image: air, a liver disc with a lesion, a heart box."""
    hu = np.full((h, w), -1000.0)
    labels = np.zeros((h, w), dtype=np.int16)
    yy, xx = np.mgrid[:h, :w]
    liver = (yy - 30) ** 2 + (xx - 28) ** 2 < 14**2
    hu[liver], labels[liver] = 60.0, 2
    lesion = (yy - 30) ** 2 + (xx - 28) ** 2 < 3**2
    hu[lesion], labels[lesion] = 30.0, 9
    hu[2:14, 4:20], labels[2:14, 4:20] = 40.0, 1
    return hu, labels


# ------------------------------------------------------------------------------------------- paper


def test_paper_psnr_uses_max_of_reference_by_hand(rng):
    ref = rng.uniform(0.2, 0.6, (16, 16))
    pred = ref + rng.normal(0, 0.01, ref.shape)
    mse = np.mean((ref - pred) ** 2)
    assert M.paper_psnr(pred, ref) == pytest.approx(10 * math.log10(ref.max() ** 2 / mse), rel=1e-12)
    assert M.paper_psnr(pred, ref, max_value=1.0) == pytest.approx(10 * math.log10(1.0 / mse), rel=1e-12)
    assert M.paper_psnr(ref, ref) == math.inf


def test_rmse_and_ssim_against_hand_and_skimage(rng):
    ref = rng.uniform(0, 1, (20, 24))
    pred = ref + rng.normal(0, 0.05, ref.shape)
    assert M.rmse(pred, ref) == pytest.approx(np.sqrt(np.mean((pred - ref) ** 2)), rel=1e-12)
    expected = structural_similarity(
        ref, pred, data_range=1.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False
    )
    assert M.ssim(pred, ref) == pytest.approx(expected, rel=1e-12)
    assert M.ssim(ref, ref) == pytest.approx(1.0)
    assert math.isnan(M.ssim(pred[:8, :8], ref[:8, :8]))  # smaller than the 11x11 window


def test_paper_metrics_on_box_and_mask_crop(rng):
    ndct, labels = phantom()
    pred = ndct + rng.normal(0, 20, ndct.shape)
    box = Box(18, 16, 42, 40)
    got = M.paper_metrics(pred, ndct, box)
    p, r = hu_to_unit(pred)[18:42, 16:40], hu_to_unit(ndct)[18:42, 16:40]
    mse = np.mean((p - r) ** 2)
    assert got["rmse"] == pytest.approx(np.sqrt(mse), rel=1e-12)
    assert got["psnr"] == pytest.approx(10 * math.log10(r.max() ** 2 / mse), rel=1e-12)
    assert got["psnr_max1"] == pytest.approx(-10 * math.log10(mse), rel=1e-12)
    assert got["ssim"] == pytest.approx(M.ssim(p, r), rel=1e-12)
    # a mask is scored on its bounding box
    mask = labels == 1
    assert M.paper_metrics(pred, ndct, mask) == M.paper_metrics(pred, ndct, mask_to_box(mask))


# --------------------------------------------------------------------------------------- reference


def test_windowed_psnr_data_range_is_the_window():
    ref = np.full((16, 16), 40.0)
    pred = ref + 10.0  # 10 HU everywhere, inside the abdomen window
    assert M.windowed_psnr(pred, ref, "abdomen") == pytest.approx(20 * math.log10(400 / 10))
    assert M.windowed_psnr(pred, ref, "full") == pytest.approx(20 * math.log10(4095 / 10))
    assert M.windowed_psnr(pred, ref, (0.0, 200.0)) == pytest.approx(20 * math.log10(200 / 10))
    # errors outside the window are clipped away: bone 1000 vs 1300 HU is the same white in abdomen
    bone_ref, bone_pred = np.full((4, 4), 1000.0), np.full((4, 4), 1300.0)
    assert M.windowed_psnr(bone_pred, bone_ref, "abdomen") == math.inf
    # a mask restricts the MSE
    mask = np.zeros_like(ref, dtype=bool)
    mask[:4] = True
    pred2 = ref.copy()
    pred2[:4] += 20.0
    pred2[4:] += 40.0
    assert M.windowed_psnr(pred2, ref, "abdomen", mask) == pytest.approx(20 * math.log10(400 / 20))


def test_rmse_hu_noise_sd_by_hand(rng):
    ref, labels = phantom()
    noise = rng.normal(0, 25, ref.shape)
    pred = ref + noise
    liver = labels == 2
    assert M.rmse_hu(pred, ref, liver) == pytest.approx(np.sqrt(np.mean(noise[liver] ** 2)), rel=1e-12)
    region = ndimage.binary_erosion(liver, iterations=2)
    assert M.noise_sd(pred, liver, ref, erosion_px=2) == pytest.approx(
        np.std(noise[region], ddof=1), rel=1e-12
    )
    assert M.noise_sd(pred, liver, None, erosion_px=2) == pytest.approx(
        np.std(pred[region], ddof=1), rel=1e-12
    )


def test_lesion_cnr_by_hand(rng):
    ref, labels = phantom()
    img = ref + rng.normal(0, 10, ref.shape)
    lesion, liver = labels == 9, labels == 2
    ring = (
        ndimage.binary_dilation(lesion, iterations=6) & ~ndimage.binary_dilation(lesion, iterations=1) & liver
    )
    expected = abs(img[lesion].mean() - img[ring].mean()) / np.std(img[ring], ddof=1)
    assert M.lesion_cnr(img, lesion, liver, ring_width=5, gap=1) == pytest.approx(expected, rel=1e-12)
    assert math.isnan(M.lesion_cnr(img, lesion, np.zeros_like(liver)))


def _window(hu: np.ndarray, center: float, width: float) -> np.ndarray:
    return np.clip((hu - (center - width / 2)) / width, 0.0, 1.0)


def test_score_slice_records(rng):
    ref, labels = phantom()
    pred = ref + rng.normal(0, 15, ref.shape)
    boxes = {"liver": Box(20, 18, 40, 38)}
    recs = M.score_slice(
        pred,
        method="m1",
        patient_key="abc",
        slice_index=3,
        ndct_hu=ref,
        reference_hu=ref,
        labels=labels,
        boxes=boxes,
    )
    assert all(
        set(r) == {"method", "patient_key", "slice_index", "protocol", "roi", "metric", "value"} for r in recs
    )
    assert {r["protocol"] for r in recs} == {"paper", "reference"}
    paper = {(r["roi"], r["metric"]): r["value"] for r in recs if r["protocol"] == "paper"}
    # liver from its box, heart from the label bounding box; spleen/muscle absent from the slice
    assert {roi for roi, _ in paper} == {"liver", "heart"}
    # paper protocol by hand: HU clipped to [-1024, 3071] scaled to [0, 1], cropped, MAX = the NDCT crop's max
    unit = lambda hu: (np.clip(hu, -1024, 3071) + 1024) / 4095  # noqa: E731
    for roi, (ys, xs) in {
        "liver": (slice(20, 40), slice(18, 38)),
        "heart": (slice(2, 14), slice(4, 20)),
    }.items():
        p, r = unit(pred)[ys, xs], unit(ref)[ys, xs]
        mse = np.mean((p - r) ** 2)
        assert paper[(roi, "rmse")] == pytest.approx(np.sqrt(mse), rel=1e-12), roi
        assert paper[(roi, "psnr")] == pytest.approx(10 * math.log10(r.max() ** 2 / mse), rel=1e-12), roi
        assert paper[(roi, "psnr_max1")] == pytest.approx(-10 * math.log10(mse), rel=1e-12), roi
    ref_recs = {(r["roi"], r["metric"]): r["value"] for r in recs if r["protocol"] == "reference"}
    assert ref_recs[("slice", "rmse_hu")] == pytest.approx(np.sqrt(np.mean((pred - ref) ** 2)), rel=1e-12)
    liver, heart = labels == 2, labels == 1
    mse = np.mean((_window(pred, 40, 400) - _window(ref, 40, 400))[liver] ** 2)
    assert ref_recs[("liver", "psnr_abdomen")] == pytest.approx(-10 * math.log10(mse), rel=1e-12)
    # windowed SSIM against skimage: the map's mean over the ROI, and skimage's own mean for the slice
    ssim_args = dict(data_range=1.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
    lung_ref, lung_pred = _window(ref, -600, 1500), _window(pred, -600, 1500)
    mean_ssim, smap = structural_similarity(lung_ref, lung_pred, full=True, **ssim_args)
    assert ref_recs[("heart", "ssim_lung")] == pytest.approx(smap[heart].mean(), rel=1e-12)
    assert ref_recs[("slice", "ssim_lung")] == pytest.approx(mean_ssim, rel=1e-12)
    abdomen = structural_similarity(_window(ref, 40, 400), _window(pred, 40, 400), **ssim_args)
    assert ref_recs[("slice", "ssim_abdomen")] == pytest.approx(abdomen, rel=1e-12)
    # noise SDs in the liver eroded by 2 px; lesion CNR against a liver ring (as in the hand tests above)
    region = ndimage.binary_erosion(liver, iterations=2)
    assert ref_recs[("liver", "noise_sd_diff_hu")] == pytest.approx(np.std((pred - ref)[region], ddof=1))
    assert ref_recs[("liver", "sd_hu")] == pytest.approx(np.std(pred[region], ddof=1))
    lesion = labels == 9
    ring = (
        ndimage.binary_dilation(lesion, iterations=6) & ~ndimage.binary_dilation(lesion, iterations=1) & liver
    )
    cnr = abs(pred[lesion].mean() - pred[ring].mean()) / np.std(pred[ring], ddof=1)
    assert ref_recs[("lesion", "cnr")] == pytest.approx(cnr, rel=1e-12)
    # no reference, no NDCT -> nothing to score
    assert M.score_slice(pred, method="m", patient_key="k", slice_index=0) == []


@pytest.mark.parametrize(
    ("n_air", "expected"),
    [
        (0, {"psnr_full", "ssim_full", "rmse_hu"}),
        # one air pixel of 49 (partial volume) inside the lung window: the ROI is still not read there
        (1, {"psnr_full", "ssim_full", "rmse_hu"}),
        # 25 of 49 pixels at -1000 HU: more than half of the ROI is shown in the lung window
        (25, {"psnr_full", "ssim_full", "rmse_hu", "psnr_lung", "ssim_lung"}),
    ],
)
def test_roi_is_scored_only_in_windows_that_show_most_of_it(rng, n_air: int, expected: set) -> None:
    """Bone at 1000 HU is above the lung (tops out at 150 HU) and abdomen (240 HU) windows: white whatever the
    method, so PSNR there would be inf or rest on a few edge pixels; the ROI gets a metric only in the windows
    that show at least half of its reference pixels (metrics.READABLE_SHARE), and keeps the others."""
    ref, labels = phantom()
    bone = np.zeros_like(labels, dtype=bool)
    bone[5:12, 5:12] = True
    ref, labels = ref.copy(), labels.copy()
    ref[bone], labels[bone] = 1000.0, 7
    ref[np.nonzero(bone)[0][:n_air], np.nonzero(bone)[1][:n_air]] = -1000.0
    pred = ref + rng.normal(0, 15, ref.shape)
    recs = M.score_slice(pred, method="m", patient_key="k", slice_index=0, reference_hu=ref, labels=labels)
    assert {r["metric"] for r in recs if r["roi"] == "bone"} == expected
    assert all(math.isfinite(r["value"]) for r in recs)


# -------------------------------------------------------------------------------------------- rois


def test_labels_match_synthetic_set():
    from ldct_lightning.data import synthetic

    assert {int(k): v for k, v in synthetic.LABELS.items()} == LABELS
    assert LABELS[2] == "liver" and LABELS[1] == "heart"


def test_box_files_roundtrip_csv_and_yaml(tmp_path):
    table = {
        ("p1", 4): {"liver": Box(1, 2, 10, 12), "heart": Box(0, 0, 5, 5)},
        ("p2", 0): {"muscle": Box(3, 3, 9, 9)},
    }
    assert read_boxes(write_boxes(tmp_path / "b.csv", table)) == table
    y = tmp_path / "b.yaml"
    y.write_text("boxes:\n  - {patient_key: p1, slice_index: 4, roi: liver, y0: 1, x0: 2, y1: 10, x1: 12}\n")
    assert read_boxes(y) == {("p1", 4): {"liver": Box(1, 2, 10, 12)}}
    bad = tmp_path / "bad.csv"
    bad.write_text("patient_key,slice_index,roi,y0,x0,y1,x1\np1,0,liver,5,5,5,9\n")
    with pytest.raises(BoxFileError, match=r"bad\.csv: row 2"):
        read_boxes(bad)


def test_mask_helpers():
    mask = np.zeros((10, 12), dtype=bool)
    mask[2:7, 3:9] = True
    assert mask_to_box(mask) == Box(2, 3, 7, 9)
    assert mask_to_box(mask).to_mask(mask.shape).sum() == mask.sum()
    assert erode_mask(mask, 1).sum() == 3 * 4
    ring = ring_mask(mask, width=1, gap=0)
    assert not (ring & mask).any() and ring.sum() == 2 * (5 + 6)  # 4-connected dilation adds the edges only
    with pytest.raises(ValueError, match="empty"):
        mask_to_box(np.zeros((3, 3), dtype=bool))


def test_register_rigid_recovers_shift_and_rotation(rng):
    fixed, _ = phantom(64, 64)
    fixed[40:46, 10:16] = 700.0  # a bone-like corner breaks the symmetry
    moving = ndimage.shift(fixed, (3.0, -2.0), order=1, mode="nearest") + rng.normal(0, 20, fixed.shape)
    reg = register_rigid(moving, fixed)
    assert reg.shift == pytest.approx((-3.0, 2.0), abs=0.2)
    assert reg.rmse_after < 0.5 * reg.rmse_before
    rotated = ndimage.rotate(fixed, 3.0, reshape=False, order=1, mode="nearest")
    reg = register_rigid(rotated, fixed, rotation=True, max_angle_deg=4, angle_step_deg=1)
    assert reg.angle_deg == pytest.approx(-3.0)
    assert reg.valid.any() and reg.rmse_after < 0.5 * reg.rmse_before

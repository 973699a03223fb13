"""The reference protocol's bone-adjacent soft-tissue band and largest absolute error, by hand computation."""

from __future__ import annotations

import numpy as np
import pytest

from ldct_lightning.eval.metrics import REFERENCE, score_slice
from ldct_lightning.eval.rois import bone_band_mask


def slab() -> np.ndarray:
    """12x12 soft tissue (40 HU) with a 2x2 bone block (1000 HU) at rows/cols 5-6 and air in the first row."""
    ref = np.full((12, 12), 40.0)
    ref[5:7, 5:7] = 1000.0
    ref[0, :] = -1000.0
    return ref


def test_bone_band_is_soft_tissue_within_width_pixels_of_bone() -> None:
    ref = slab()
    band = bone_band_mask(ref, width=2)
    # 4-connected dilation by 2 steps: city-block distance 1..2 from the block
    yy, xx = np.mgrid[:12, :12]
    dy = np.maximum(np.maximum(5 - yy, yy - 6), 0)
    dx = np.maximum(np.maximum(5 - xx, xx - 6), 0)
    expected = (dy + dx >= 1) & (dy + dx <= 2)
    np.testing.assert_array_equal(band, expected)
    # air and lung are left out; no bone, no band
    ref[3, 5] = -800.0
    assert not bone_band_mask(ref, width=2)[3, 5]
    assert not bone_band_mask(np.full((8, 8), 40.0)).any()


def test_score_slice_reports_band_and_max_abs_error() -> None:
    ref = slab()
    pred = ref.copy()
    band = bone_band_mask(ref)
    ys, xs = np.nonzero(band)
    pred[ys[0], xs[0]] += 250.0  # bone smeared into one band pixel
    pred[11, 11] -= 30.0  # far from bone
    records = score_slice(pred, method="m", patient_key="p", slice_index=0, reference_hu=ref)
    got = {(r["roi"], r["metric"]): r["value"] for r in records if r["protocol"] == REFERENCE}
    assert got[("slice", "max_abs_err_hu")] == pytest.approx(250.0)
    assert got[("bone_band", "max_abs_err_hu")] == pytest.approx(250.0)
    assert got[("bone_band", "rmse_hu")] == pytest.approx(np.sqrt(250.0**2 / band.sum()))
    assert got[("slice", "rmse_hu")] == pytest.approx(np.sqrt((250.0**2 + 30.0**2) / ref.size))

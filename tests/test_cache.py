"""SeriesCache: content equals read_series_hu (rounded), reused when unchanged, rebuilt when a file changes."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest

from ldct_lightning.data.cache import SeriesCache, content_key, hu_to_int16
from ldct_lightning.data.dicom import read_series_hu, scan_dicom_folder
from ldct_lightning.data.dicom_write import ct_slice_dataset, save_atomic


@pytest.fixture
def series(write_series):
    # slope 0.5 makes half-integer HU, so the cache's rounding is exercised
    rng = np.random.default_rng(1)
    hu = rng.integers(-2048, 4000, size=(5, 12, 10)) / 2
    written = write_series(
        hu=hu, z_mm=[3.0, 0.0, 1.0, 2.0, 4.0], rescale_slope=0.5, rescale_intercept=-1024.0
    )
    return scan_dicom_folder(written.paths[0].parent)[0]


def test_content_equals_rounded_read_series_hu(series, tmp_path: Path) -> None:
    volume = SeriesCache(tmp_path / "cache").get(series)
    reference = read_series_hu(series)
    assert isinstance(volume, np.memmap) and volume.dtype == np.int16
    assert volume.shape == (series.n_slices, series.rows, series.cols)
    np.testing.assert_array_equal(volume, np.rint(reference).astype(np.int16))
    assert not volume.flags.writeable


def test_sidecar_and_file_names_hold_no_identifiers(series, tmp_path: Path) -> None:
    cache = SeriesCache(tmp_path / "cache")
    info = cache.sidecar(series)
    assert info["shape"] == [series.n_slices, series.rows, series.cols]
    assert info["series_key"] == series.series_key
    assert info["positions_mm"] == list(series.positions_mm)
    names = [p.name for p in (tmp_path / "cache").rglob("*")]
    assert all(re.fullmatch(r"[0-9a-f]{32}(\.npy|\.json)?|stat", n) for n in names), names
    assert not any(n.endswith(".tmp") for n in names)  # the atomic write left nothing behind


def test_reused_on_second_get(series, tmp_path: Path) -> None:
    first = SeriesCache(tmp_path / "cache")
    first.get(series)
    array_path = next((tmp_path / "cache").glob("*.npy"))
    mtime = array_path.stat().st_mtime_ns
    for trust_stat in (True, False):
        again = SeriesCache(tmp_path / "cache", trust_stat=trust_stat)
        again.get(series)
        assert again.builds == 0
    assert first.builds == 1
    assert array_path.stat().st_mtime_ns == mtime


@pytest.mark.parametrize("keep_mtime", [False, True])
def test_rebuilt_when_a_file_changes(series, tmp_path: Path, keep_mtime: bool) -> None:
    cache = SeriesCache(tmp_path / "cache", trust_stat=not keep_mtime)
    old = np.array(cache.get(series))
    path = series.files[2]
    st = path.stat()
    new_slice = np.full((series.rows, series.cols), 123.0)
    ds = ct_slice_dataset(new_slice, _spec_like(path), series.positions_mm[2], 3)
    save_atomic(ds, path)
    if keep_mtime:  # same size and mtime: only the content hash sees the change
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    volume = cache.get(series)
    assert cache.builds == 2
    np.testing.assert_array_equal(volume[2], 123)
    np.testing.assert_array_equal(np.delete(volume, 2, axis=0), np.delete(old, 2, axis=0))


def _spec_like(path: Path):
    import pydicom

    from ldct_lightning.data.dicom_write import CTSeriesSpec

    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return CTSeriesSpec(
        patient_id=str(ds.PatientID),
        study_uid=str(ds.StudyInstanceUID),
        series_uid=str(ds.SeriesInstanceUID),
        rescale_slope=float(ds.RescaleSlope),
        rescale_intercept=float(ds.RescaleIntercept),
    )


def test_content_key_depends_on_bytes(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(b"xyz")
    b.write_bytes(b"xyz")
    assert content_key([a]) == content_key([b])
    b.write_bytes(b"xyw")
    assert content_key([a]) != content_key([b])
    assert content_key([a, b]) != content_key([b, a])


def test_hu_to_int16_rounds_and_clips() -> None:
    hu = np.array([-40000.0, -1.6, -0.4, 0.5, 1.5, 2.4, 50000.0], dtype=np.float32)
    out = np.empty(hu.shape, np.int16)
    hu_to_int16(hu.copy(), out)
    np.testing.assert_array_equal(out, [-32768, -2, 0, 0, 2, 2, 32767])  # round half to even


def test_get_npz_extracts_memmaps(tmp_path: Path) -> None:
    path = tmp_path / "truth.npz"
    clean = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    labels = (clean > 10).astype(np.uint8)
    np.savez_compressed(path, clean_ld=clean, labels_ld=labels)
    cache = SeriesCache(tmp_path / "cache")
    arrays = cache.get_npz(path)
    np.testing.assert_array_equal(arrays["clean_ld"], clean)
    np.testing.assert_array_equal(arrays["labels_ld"], labels)
    assert isinstance(arrays["clean_ld"], np.memmap)
    cache.get_npz(path)
    assert cache.builds == 1

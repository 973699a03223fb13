"""Tests of ldct_lightning.data.dicom against hand computations on small written series."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import RLELossless, generate_uid

from ldct_lightning.data.dicom import DicomError, read_series_hu, read_slice_hu, scan_dicom_folder
from ldct_lightning.privacy import hash_identifier

SECRET_ID = "SECRET-ID-4711"
SECRET_NAME = "Doe^Secretname"


def _assert_clean(message: str, written) -> None:
    """No patient identifier or UID in clear text."""
    for secret in (SECRET_ID, SECRET_NAME, "Secretname", written.spec.series_uid, written.spec.study_uid):
        assert secret not in message


def _stored_values(path: Path, signed: bool) -> np.ndarray:
    """The raw stored pixel values, read straight from the bytes (no pydicom pixel handler)."""
    ds = pydicom.dcmread(path)
    dtype = np.dtype("<i2") if signed else np.dtype("<u2")
    return np.frombuffer(ds.PixelData, dtype=dtype).reshape(ds.Rows, ds.Columns)


def _edit_files(paths, edit) -> None:
    for path in paths:
        ds = pydicom.dcmread(path)
        edit(ds)
        ds.save_as(path)


@pytest.mark.parametrize(
    ("signed", "slope", "intercept"),
    [(True, 0.5, -20.0), (False, 2.5, -1024.0), (False, 1.0, -1024.0)],
)
def test_hu_is_stored_times_slope_plus_intercept(write_series, signed, slope, intercept):
    written = write_series(
        pixel_representation=int(signed), rescale_slope=slope, rescale_intercept=intercept, n_slices=2
    )
    for path in written.paths:
        stored = _stored_values(path, signed)
        if signed:
            assert stored.min() < 0  # the signed branch is really exercised
        hu = read_slice_hu(path)
        assert hu.dtype == np.float32 and hu.shape == (8, 8)
        np.testing.assert_allclose(hu, stored.astype(np.float64) * slope + intercept, atol=1e-4)
    # rounding to the stored grid moves a value by at most half a step
    volume = read_series_hu(scan_dicom_folder(written.paths[0].parent)[0])
    assert np.abs(volume - written.hu).max() <= slope / 2 + 1e-4


def test_groups_by_series_uid_and_reads_metadata(write_series, tmp_path):
    tags = {"ctdi_vol": 1.5, "tube_current_ma": 40.0, "exposure_time_ms": 500.0, "kvp": 100.0}
    geometry = {"pixel_spacing": (0.6, 0.65), "slice_thickness": 2.0}
    a = write_series(
        "mixed", n_slices=3, patient_id=SECRET_ID, series_description="low dose", **tags, **geometry
    )
    b = write_series("mixed", n_slices=5, patient_id=SECRET_ID, seed=1, series_description="normal dose")
    c = write_series("mixed/sub/deeper", n_slices=2, patient_id="OTHER-PATIENT", seed=2)
    series = scan_dicom_folder(tmp_path / "mixed", progress=True)
    assert len(series) == 3
    by_key = {s.series_key: s for s in series}
    for written in (a, b, c):
        s = by_key[hash_identifier(written.spec.series_uid, tmp_path / "mixed")]
        assert set(s.files) == set(written.paths)
        assert s.series_uid == written.spec.series_uid and s.series_uid not in repr(s)
        assert s.patient_key == hash_identifier(written.spec.patient_id, tmp_path / "mixed")
        assert s.n_slices == len(written.paths) and (s.rows, s.cols) == (8, 8) and s.modality == "CT"
    s = by_key[hash_identifier(a.spec.series_uid, tmp_path / "mixed")]
    assert s.pixel_spacing_mm == (0.6, 0.65) and s.slice_thickness_mm == 2.0 and s.kvp == 100.0
    assert s.ctdi_vol == 1.5 and s.tube_current_ma == 40.0 and s.exposure_mas == 20.0  # 40 mA * 0.5 s
    assert s.series_description == "low dose"


@pytest.mark.parametrize(
    ("orientation", "z_mm"),
    [
        ([1, 0, 0, 0, 1, 0], [5.0, -2.5, 10.0, 0.0, 7.5]),  # shuffled
        ([1, 0, 0, 0, 1, 0], [10.0, 7.5, 5.0, 2.5, 0.0]),  # InstanceNumber runs against z
        (
            [-1, 0, 0, 0, 1, 0],
            [5.0, -2.5, 10.0, 0.0, 7.5],
        ),  # normal points to -z: ascending means z descending
    ],
)
def test_sorts_along_slice_normal(write_series, orientation, z_mm):
    written = write_series(z_mm=z_mm, n_slices=5, extra={"ImageOrientationPatient": orientation})
    (series,) = scan_dicom_folder(written.paths[0].parent)
    normal = np.cross(orientation[:3], orientation[3:])
    position = [float(np.dot([0, 0, z], normal)) for z in z_mm]  # x, y do not move along this normal
    order = np.argsort(position)
    assert series.positions_mm == pytest.approx(sorted(position))
    assert list(series.files) == [written.paths[i] for i in order]
    np.testing.assert_array_equal(read_series_hu(series), written.hu[order])


def test_instance_number_fallback(write_series):
    written = write_series(z_mm=[5.0, -2.5, 10.0, 0.0], n_slices=4, slice_thickness=2.0)

    def drop_geometry(ds):
        del ds.ImagePositionPatient
        del ds.ImageOrientationPatient

    _edit_files(written.paths, drop_geometry)
    with pytest.warns(UserWarning, match="InstanceNumber"):
        (series,) = scan_dicom_folder(written.paths[0].parent)
    assert list(series.files) == written.paths  # written in InstanceNumber order 1..4
    assert series.positions_mm == pytest.approx([2.0, 4.0, 6.0, 8.0])


def test_no_geometry_and_no_instance_number_fails(write_series):
    written = write_series(n_slices=3, patient_id=SECRET_ID, patient_name=SECRET_NAME)

    def drop_order(ds):
        del ds.ImagePositionPatient
        del ds.InstanceNumber

    _edit_files(written.paths, drop_order)
    with pytest.raises(DicomError, match="cannot order") as err, warnings.catch_warnings():
        scan_dicom_folder(written.paths[0].parent)
    assert any(str(p) in str(err.value) for p in written.paths)
    _assert_clean(str(err.value), written)


def test_rle_compressed_series_decodes_to_same_hu(write_series):
    written = write_series(n_slices=3, pixel_representation=1, rescale_slope=0.5, rescale_intercept=-10.0)
    expected = read_series_hu(scan_dicom_folder(written.paths[0].parent)[0])

    def compress(ds):
        ds.compress(RLELossless)

    _edit_files(written.paths, compress)
    assert pydicom.dcmread(written.paths[0]).file_meta.TransferSyntaxUID == RLELossless
    np.testing.assert_array_equal(read_series_hu(scan_dicom_folder(written.paths[0].parent)[0]), expected)
    # a truncated compressed stream is reported with the file's path, too
    path = written.paths[1]
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(DicomError) as err, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the missing sequence delimiter
        read_slice_hu(path)
    assert str(path) in str(err.value)


def test_non_dicom_files_are_skipped_with_a_warning(write_series, tmp_path):
    written = write_series("data")
    (tmp_path / "data" / "README").write_text("exported by some viewer")
    (tmp_path / "data" / "empty").write_bytes(b"")
    with pytest.warns(UserWarning, match="not a DICOM file") as record:
        series = scan_dicom_folder(tmp_path / "data")
    assert [s.n_slices for s in series] == [len(written.paths)]
    messages = " ".join(str(w.message) for w in record)
    assert str(tmp_path / "data" / "README") in messages and str(tmp_path / "data" / "empty") in messages


def test_empty_or_dicom_free_folder_fails(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DicomError, match="no DICOM CT image found") as err:
        scan_dicom_folder(tmp_path / "empty")
    assert str(tmp_path / "empty") in str(err.value)
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "notes.txt").write_text("hello")
    with pytest.raises(DicomError, match="no DICOM CT image found"), pytest.warns(UserWarning):
        scan_dicom_folder(tmp_path / "text")
    with pytest.raises(DicomError, match="not a folder"):
        scan_dicom_folder(tmp_path / "missing")


@pytest.mark.parametrize("cut", ["in_meta", "after_meta", "in_pixel_tag"])
def test_truncated_header_fails_naming_the_file(write_series, cut):
    written = write_series(n_slices=2, patient_id=SECRET_ID, patient_name=SECRET_NAME)
    path = written.paths[1]
    data = path.read_bytes()
    n_pixel_bytes = 8 * 8 * 2
    keep = {"in_meta": 140, "after_meta": 400, "in_pixel_tag": len(data) - n_pixel_bytes - 4}[cut]
    path.write_bytes(data[:keep])
    with pytest.raises(DicomError) as err:
        scan_dicom_folder(path.parent)
    assert str(path) in str(err.value) and "truncated" in str(err.value)
    _assert_clean(str(err.value), written)


def test_truncated_pixel_data_fails_when_reading(write_series):
    written = write_series(n_slices=2, patient_id=SECRET_ID, patient_name=SECRET_NAME)
    path = written.paths[0]
    path.write_bytes(path.read_bytes()[:-10])
    (series,) = scan_dicom_folder(path.parent)  # headers are intact
    with pytest.raises(DicomError, match="truncated") as err:
        read_series_hu(series)
    assert str(path) in str(err.value)
    _assert_clean(str(err.value), written)


def test_missing_pixel_data_fails(write_series):
    written = write_series(n_slices=2, patient_id=SECRET_ID, patient_name=SECRET_NAME)

    def drop_pixels(ds):
        del ds.PixelData

    _edit_files(written.paths[:1], drop_pixels)
    with pytest.raises(DicomError, match="no pixel data") as err:
        read_series_hu(scan_dicom_folder(written.paths[0].parent)[0])
    assert str(written.paths[0]) in str(err.value)
    _assert_clean(str(err.value), written)


def test_non_ct_modality_fails_or_is_skipped(write_series, tmp_path):
    ct = write_series("data", n_slices=2, patient_id=SECRET_ID, patient_name=SECRET_NAME)
    mr = write_series("data", n_slices=2, modality="MR", patient_id=SECRET_ID, patient_name=SECRET_NAME)
    with pytest.raises(DicomError, match="modality is MR, not CT") as err:
        scan_dicom_folder(tmp_path / "data")
    assert any(str(p) in str(err.value) for p in mr.paths)
    _assert_clean(str(err.value), mr)
    with pytest.warns(UserWarning, match="modality MR"):
        series = scan_dicom_folder(tmp_path / "data", allow_non_ct=True)
    assert [s.series_key for s in series] == [hash_identifier(ct.spec.series_uid, tmp_path / "data")]


@pytest.mark.parametrize(
    ("second", "problem"),
    [({"shape": (6, 8)}, "matrix sizes"), ({"pixel_spacing": (0.8, 0.8)}, "pixel spacings")],
)
def test_inconsistent_series_fails_naming_series_and_file(write_series, tmp_path, second, problem):
    uid = generate_uid()
    common = {"series_uid": uid, "patient_id": SECRET_ID, "patient_name": SECRET_NAME}
    first = write_series("data/a", n_slices=2, **common)
    other = write_series("data/b", n_slices=2, z_mm=[5.0, 6.25], **common, **second)
    with pytest.raises(DicomError, match=problem) as err:
        scan_dicom_folder(tmp_path / "data")
    message = str(err.value)
    assert hash_identifier(uid, tmp_path / "data") in message
    assert any(str(p) in message for p in first.paths + other.paths)
    _assert_clean(message, first)


def test_duplicate_positions_warn(write_series):
    written = write_series(n_slices=3, z_mm=[0.0, 1.25, 1.25])
    with pytest.warns(UserWarning, match="duplicate position"):
        (series,) = scan_dicom_folder(written.paths[0].parent)
    assert series.n_slices == 3


def test_missing_rescale_tags_warn_and_use_identity(write_series):
    written = write_series(n_slices=3, rescale_intercept=0.0, hu=np.full((3, 8, 8), 40.0))

    def drop_rescale(ds):
        del ds.RescaleSlope
        del ds.RescaleIntercept

    _edit_files(written.paths, drop_rescale)
    with pytest.warns(UserWarning, match="RescaleSlope/RescaleIntercept missing") as record:
        hu = read_slice_hu(written.paths[0])
    assert str(written.paths[0]) in str(record[0].message)
    np.testing.assert_array_equal(hu, _stored_values(written.paths[0], signed=False).astype(np.float32))
    (series,) = scan_dicom_folder(written.paths[0].parent)
    with pytest.warns(UserWarning, match="in 3 of 3 files") as record:
        read_series_hu(series)
    assert len(record) == 1  # one warning per series, not per slice


def test_localizer_images_are_skipped(write_series, tmp_path):
    axial = write_series("data", n_slices=2)
    write_series("data", n_slices=1, extra={"ImageType": ["ORIGINAL", "PRIMARY", "LOCALIZER"]})
    with pytest.warns(UserWarning, match="localizer"):
        series = scan_dicom_folder(tmp_path / "data")
    assert [s.series_key for s in series] == [hash_identifier(axial.spec.series_uid, tmp_path / "data")]

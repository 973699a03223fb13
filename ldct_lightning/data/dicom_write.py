"""Writing CT image series as real DICOM files (used by the synthetic data set and by tests).

Files are written to a temporary name in the target folder and renamed, so an interrupted write never
leaves a half-written ``.dcm`` behind.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid

from ldct_lightning.atomic import atomic_path


@dataclass
class CTSeriesSpec:
    """Tags that describe one CT series to write.

    Attributes mirror the DICOM attributes of the same name; dose fields may be ``None`` to leave the
    tag out (useful for tests of missing tags).
    """

    patient_id: str
    patient_name: str = "Anonymous^Synthetic"
    patient_birth_date: str = ""
    study_uid: str = field(default_factory=generate_uid)
    series_uid: str = field(default_factory=generate_uid)
    series_number: int = 1
    series_description: str = "synthetic CT"
    study_date: str = "20240101"
    modality: str = "CT"
    pixel_spacing: tuple[float, float] = (0.7, 0.7)
    slice_thickness: float = 1.25
    kvp: float | None = 120.0
    tube_current_ma: float | None = 200.0
    exposure_time_ms: float | None = 500.0
    ctdi_vol: float | None = 12.0
    rescale_slope: float = 1.0
    rescale_intercept: float = -1024.0
    pixel_representation: int = 0  # 0 unsigned, 1 signed
    implicit_vr: bool = False  # Implicit VR Little Endian (older exports) instead of explicit
    convolution_kernel: str = "STANDARD"
    manufacturer: str = "ldct-lightning synthetic"
    table_offset_mm: float = 0.0
    extra: dict[str, object] = field(default_factory=dict)


def hu_to_stored(hu: np.ndarray, slope: float, intercept: float, signed: bool) -> np.ndarray:
    """Apply the inverse modality LUT: stored = round((HU - intercept) / slope), clipped to the type.

    Args:
        hu: image in HU.
        slope: RescaleSlope.
        intercept: RescaleIntercept.
        signed: PixelRepresentation 1 (int16) or 0 (uint16).

    Returns:
        The stored values as int16 or uint16.
    """
    dtype = np.int16 if signed else np.uint16
    info = np.iinfo(dtype)
    stored = np.round((np.asarray(hu, dtype=np.float64) - intercept) / slope)
    return np.clip(stored, info.min, info.max).astype(dtype)


def ct_slice_dataset(hu: np.ndarray, spec: CTSeriesSpec, z_mm: float, instance_number: int) -> FileDataset:
    """Build one CT Image Storage dataset for a 2-D slice in HU.

    Args:
        hu: (rows, cols) slice in HU.
        spec: series tags.
        z_mm: slice position along the patient axis (ImagePositionPatient z).
        instance_number: InstanceNumber (1-based).

    Returns:
        A pydicom dataset ready for ``save_as``.
    """
    if hu.ndim != 2:
        raise ValueError(f"expected a 2-D slice, got shape {hu.shape}")
    rows, cols = hu.shape
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ImplicitVRLittleEndian if spec.implicit_vr else ExplicitVRLittleEndian
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientID = spec.patient_id
    ds.PatientName = spec.patient_name
    ds.PatientBirthDate = spec.patient_birth_date
    ds.StudyInstanceUID = spec.study_uid
    ds.SeriesInstanceUID = spec.series_uid
    ds.FrameOfReferenceUID = spec.study_uid + ".1" if len(spec.study_uid) < 62 else generate_uid()
    ds.StudyDate = spec.study_date
    ds.SeriesDate = spec.study_date
    ds.Modality = spec.modality
    ds.Manufacturer = spec.manufacturer
    ds.SeriesNumber = spec.series_number
    ds.InstanceNumber = instance_number
    ds.SeriesDescription = spec.series_description
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.BodyPartExamined = "CHEST"
    ds.ConvolutionKernel = spec.convolution_kernel
    ds.PatientPosition = "FFS"
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    # the image centre sits on the scanner axis
    ds.ImagePositionPatient = [
        -spec.pixel_spacing[1] * (cols - 1) / 2,
        -spec.pixel_spacing[0] * (rows - 1) / 2,
        float(z_mm),
    ]
    ds.SliceLocation = float(z_mm)
    ds.PixelSpacing = [float(spec.pixel_spacing[0]), float(spec.pixel_spacing[1])]
    ds.SliceThickness = float(spec.slice_thickness)
    ds.TableHeight = 150.0 + spec.table_offset_mm
    if spec.kvp is not None:
        ds.KVP = spec.kvp
    if spec.tube_current_ma is not None:
        ds.XRayTubeCurrent = int(round(spec.tube_current_ma))
    if spec.exposure_time_ms is not None:
        ds.ExposureTime = int(round(spec.exposure_time_ms))
        if spec.tube_current_ma is not None:
            ds.Exposure = int(round(spec.tube_current_ma * spec.exposure_time_ms / 1000))
    if spec.ctdi_vol is not None:
        ds.CTDIvol = float(spec.ctdi_vol)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = spec.pixel_representation
    ds.RescaleSlope = spec.rescale_slope
    ds.RescaleIntercept = spec.rescale_intercept
    ds.RescaleType = "HU"
    ds.WindowCenter = 40
    ds.WindowWidth = 400
    for keyword, value in spec.extra.items():
        setattr(ds, keyword, value)
    stored = hu_to_stored(hu, spec.rescale_slope, spec.rescale_intercept, spec.pixel_representation == 1)
    ds.PixelData = stored.tobytes()
    return ds


def save_atomic(ds: pydicom.Dataset, path: Path) -> None:
    """Write a dataset to ``path`` through a temporary file and an atomic rename.

    Args:
        ds: the dataset.
        path: the final file path (its folder is created).
    """
    with atomic_path(path) as tmp:
        ds.save_as(tmp, enforce_file_format=True)


def write_ct_series(
    volume_hu: np.ndarray,
    spec: CTSeriesSpec,
    z_positions_mm: Sequence[float],
    out_dir: Path,
    file_names: Sequence[str] | None = None,
) -> list[Path]:
    """Write a (slices, rows, cols) HU volume as one DICOM series.

    Args:
        volume_hu: the volume in HU.
        spec: series tags.
        z_positions_mm: one slice position per slice.
        out_dir: folder to write into.
        file_names: optional file name per slice (default ``IM000001.dcm`` ...); pass shuffled, random
            names to mimic exports whose names carry no order.

    Returns:
        The paths written, in slice order.
    """
    if volume_hu.ndim != 3:
        raise ValueError(f"expected (slices, rows, cols), got shape {volume_hu.shape}")
    n = volume_hu.shape[0]
    if len(z_positions_mm) != n:
        raise ValueError(f"{len(z_positions_mm)} z positions for {n} slices")
    names = list(file_names) if file_names is not None else [f"IM{i + 1:06d}.dcm" for i in range(n)]
    if len(names) != n:
        raise ValueError(f"{len(names)} file names for {n} slices")
    paths = []
    for i in range(n):
        ds = ct_slice_dataset(volume_hu[i], spec, z_positions_mm[i], instance_number=i + 1)
        path = Path(out_dir) / names[i]
        save_atomic(ds, path)
        paths.append(path)
    return paths

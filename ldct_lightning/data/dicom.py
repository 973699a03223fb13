"""Reading CT series from a DICOM folder tree: headers, slice order and Hounsfield units.

Files are found recursively under any name and grouped by SeriesInstanceUID (never by folder or file
name). Slices are sorted by their position along the slice normal. Identifiers never reach a message in
clear text: series and patients are named by keyed hashes under the data root's secret
(:func:`ldct_lightning.privacy.pseudonymizer`).
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut
from pydicom.uid import MediaStorageDirectoryStorage
from tqdm.auto import tqdm

from ldct_lightning.data.prefetch import ordered_prefetch
from ldct_lightning.errors import LDCTError
from ldct_lightning.privacy import KEY_FILE_NAME, Pseudonymizer, find_key_root, pseudonymizer

# Slices closer than this along the normal count as the same position (mm).
_SAME_POSITION_MM = 1e-3


class DicomError(LDCTError):
    """A problem with the DICOM input; ``str(e)`` reads ``"<path>: <problem>. <what to do>"``.

    Args:
        message: the one-line message.
        path: the file it names, when one (series-level problems name one of the series' files).
    """

    def __init__(self, message: str, path: Path | None = None) -> None:
        super().__init__(message)
        self.path = path

    @property
    def problem(self) -> str:
        """The message without the leading path (when ``path`` is known)."""
        return str(self).removeprefix(f"{self.path}: ") if self.path is not None else str(self)


@dataclass(frozen=True)
class SeriesInfo:
    """Header summary of one CT series (no pixel data).

    Attributes:
        series_uid: SeriesInstanceUID, kept in memory only; never log it (use ``series_key``).
        series_key: hashed SeriesInstanceUID.
        patient_key: hashed PatientID.
        modality: DICOM Modality (``"CT"``).
        files: slice files, sorted along the slice normal (InstanceNumber when geometry is missing).
        positions_mm: slice positions along the normal, ascending, same order as ``files``.
        rows: image rows.
        cols: image columns.
        pixel_spacing_mm: (row spacing, column spacing).
        slice_thickness_mm: SliceThickness, if present.
        kvp: KVP, if present.
        tube_current_ma: mean XRayTubeCurrent over the slices that have it.
        exposure_mas: mean Exposure over the slices that have it.
        ctdi_vol: mean CTDIvol over the slices that have it.
        series_description: SeriesDescription (may be empty).
        frame_of_reference_key: hashed FrameOfReferenceUID (None when absent); positions are comparable
            only between series that share it.
        orientation: ImageOrientationPatient (None when absent).
    """

    series_uid: str = field(repr=False)  # a UID must not reach logs through repr()
    series_key: str
    patient_key: str
    modality: str
    files: tuple[Path, ...]
    positions_mm: tuple[float, ...]
    rows: int
    cols: int
    pixel_spacing_mm: tuple[float, float]
    slice_thickness_mm: float | None
    kvp: float | None
    tube_current_ma: float | None
    exposure_mas: float | None
    ctdi_vol: float | None
    series_description: str
    frame_of_reference_key: str | None = None
    orientation: tuple[float, ...] | None = None

    @property
    def n_slices(self) -> int:
        """Number of slices."""
        return len(self.files)


@dataclass(frozen=True)
class _SliceHeader:
    """The tags of one file that the scan needs (small, so that large folders fit in memory)."""

    path: Path
    series_uid: str
    patient_id: str
    rows: int
    cols: int
    pixel_spacing: tuple[float, float]
    orientation: tuple[float, ...] | None
    position: tuple[float, ...] | None
    instance_number: int | None
    slice_thickness: float | None
    spacing_between_slices: float | None
    kvp: float | None
    tube_current: float | None
    exposure: float | None
    ctdi_vol: float | None
    description: str
    frame_of_reference: str = ""


def _has_dicm_marker(path: Path) -> bool:
    """True when the file carries the DICOM Part 10 preamble and ``DICM`` prefix."""
    with open(path, "rb") as f:
        return f.read(132)[128:132] == b"DICM"


def _float(ds: Dataset, keyword: str) -> float | None:
    """A numeric tag as float, or None when absent, empty or not a number."""
    value = ds.get(keyword)
    try:
        return None if value is None or value == "" else float(value)
    except (TypeError, ValueError):
        return None


def _floats(ds: Dataset, keyword: str, n: int) -> tuple[float, ...] | None:
    """A multi-valued numeric tag with exactly ``n`` values, or None."""
    value = ds.get(keyword)
    try:
        values = tuple(float(v) for v in value) if value is not None else ()
    except (TypeError, ValueError):
        return None
    return values if len(values) == n else None


def _parse_error(path: Path, exc: Exception) -> DicomError:
    return DicomError(
        f"{path}: cannot parse the DICOM file ({type(exc).__name__}: {exc}). "
        "It is truncated or corrupt: re-export it or remove it from the folder",
        path=path,
    )


def _read_header(path: Path) -> Dataset | None:
    """Read a file's header, or return None when it is not a DICOM Part 10 file."""
    if not _has_dicm_marker(path):
        return None
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except Exception as e:  # any parse failure of a file that claims to be DICOM means corruption
        raise _parse_error(path, e) from e
    return ds


def _slice_header(path: Path, ds: Dataset) -> _SliceHeader:
    """Extract the scan's tags from a CT header, failing clearly when required ones are missing."""
    required = ("SeriesInstanceUID", "Rows", "Columns", "PixelSpacing")
    missing = [k for k in required if ds.get(k) in (None, "")]
    spacing = _floats(ds, "PixelSpacing", 2)
    if not missing and spacing is None:
        missing = ["PixelSpacing"]
    if missing:
        raise DicomError(
            f"{path}: the DICOM header lacks {', '.join(missing)}. The file is truncated or not a CT "
            "image: re-export it or remove it from the folder"
        )
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        raise DicomError(
            f"{path}: multi-frame (enhanced) CT images are not supported. "
            "Export the series as single-frame CT Image Storage files"
        )
    instance = _float(ds, "InstanceNumber")
    return _SliceHeader(
        path=path,
        series_uid=str(ds.SeriesInstanceUID),
        patient_id=str(ds.get("PatientID", "") or ""),
        rows=int(ds.Rows),
        cols=int(ds.Columns),
        pixel_spacing=(spacing[0], spacing[1]),
        orientation=_floats(ds, "ImageOrientationPatient", 6),
        position=_floats(ds, "ImagePositionPatient", 3),
        instance_number=int(instance) if instance is not None else None,
        slice_thickness=_float(ds, "SliceThickness"),
        spacing_between_slices=_float(ds, "SpacingBetweenSlices"),
        kvp=_float(ds, "KVP"),
        tube_current=_float(ds, "XRayTubeCurrent"),
        exposure=_float(ds, "Exposure"),
        ctdi_vol=_float(ds, "CTDIvol"),
        description=str(ds.get("SeriesDescription", "") or ""),
        frame_of_reference=str(ds.get("FrameOfReferenceUID", "") or ""),
    )


def _mean(values: Sequence[float | None]) -> float | None:
    """Mean of the values that are present (tube current modulation varies them per slice)."""
    present = [v for v in values if v is not None]
    return float(np.mean(present)) if present else None


def _check_consistent(key: str, headers: Sequence[_SliceHeader]) -> None:
    """One matrix size, one pixel spacing and one orientation per series."""
    first = headers[0]
    for h in headers[1:]:
        if (h.rows, h.cols) != (first.rows, first.cols):
            problem = (
                f"mixes matrix sizes ({first.rows}x{first.cols} in {first.path.name}, {h.rows}x{h.cols} here)"
            )
        elif not np.allclose(h.pixel_spacing, first.pixel_spacing, atol=1e-4):
            problem = f"mixes pixel spacings ({first.pixel_spacing} mm in {first.path.name}, {h.pixel_spacing} mm here)"
        elif (
            h.orientation is not None
            and first.orientation is not None
            and not np.allclose(h.orientation, first.orientation, atol=1e-3)
        ):
            problem = f"mixes slice orientations ({first.path.name} and this file)"
        else:
            continue
        raise DicomError(
            f"{h.path}: series {key} {problem}. A series must be one stack of equal slices: "
            "re-export it or remove the odd files",
            path=h.path,
        )


def _slice_positions(key: str, headers: Sequence[_SliceHeader]) -> list[float]:
    """Position of each slice along the slice normal; InstanceNumber times the slice step as fallback."""
    if all(h.orientation is not None and h.position is not None for h in headers):
        orientation = np.asarray(headers[0].orientation)
        normal = np.cross(orientation[:3], orientation[3:])
        return [float(np.dot(h.position, normal)) for h in headers]
    no_geometry = next(h for h in headers if h.orientation is None or h.position is None)
    no_instance = next((h for h in headers if h.instance_number is None), None)
    if no_instance is not None and len(headers) > 1:
        raise DicomError(
            f"{no_instance.path}: cannot order the slices of series {key}: ImagePositionPatient/"
            "ImageOrientationPatient and InstanceNumber are missing. Re-export the series with its geometry tags",
            path=no_instance.path,
        )
    step = no_geometry.spacing_between_slices or no_geometry.slice_thickness or 1.0
    warnings.warn(
        f"{no_geometry.path}: series {key} lacks ImagePositionPatient/ImageOrientationPatient; slices are "
        f"ordered by InstanceNumber and positions estimated with a {step:g} mm step",
        stacklevel=4,
    )
    return [float(h.instance_number or 0) * step for h in headers]


def _make_series(series_uid: str, headers: Sequence[_SliceHeader], keys: Pseudonymizer) -> SeriesInfo:
    """Check, sort and summarise the headers of one series."""
    key = keys.key(series_uid)
    _check_consistent(key, headers)
    positions = _slice_positions(key, headers)
    order = sorted(
        range(len(headers)),
        key=lambda i: (positions[i], headers[i].instance_number or 0, str(headers[i].path)),
    )
    headers = [headers[i] for i in order]
    positions = [positions[i] for i in order]
    duplicates = int(np.sum(np.diff(positions) < _SAME_POSITION_MM))
    if duplicates:
        i = int(np.argmax(np.diff(positions) < _SAME_POSITION_MM))
        warnings.warn(
            f"{headers[i + 1].path}: series {key} has {duplicates} slice(s) at a duplicate position "
            f"(e.g. {positions[i]:.2f} mm); check for a repeated acquisition in the series",
            stacklevel=3,
        )
    first = headers[0]
    if not first.patient_id:
        warnings.warn(
            f"{first.path}: series {key} has no PatientID; all such series count as one patient", stacklevel=3
        )
    return SeriesInfo(
        series_uid=series_uid,
        series_key=key,
        patient_key=keys.key(first.patient_id),
        modality="CT",
        files=tuple(h.path for h in headers),
        positions_mm=tuple(positions),
        rows=first.rows,
        cols=first.cols,
        pixel_spacing_mm=first.pixel_spacing,
        slice_thickness_mm=first.slice_thickness,
        kvp=first.kvp,
        tube_current_ma=_mean([h.tube_current for h in headers]),
        exposure_mas=_mean([h.exposure for h in headers]),
        ctdi_vol=_mean([h.ctdi_vol for h in headers]),
        series_description=first.description,
        frame_of_reference_key=keys.key(first.frame_of_reference) if first.frame_of_reference else None,
        orientation=first.orientation,
    )


@dataclass(frozen=True)
class SkippedFile:
    """A file left out of a scan, or a series left out named by one of its files.

    Attributes:
        path: the file.
        message: one line, ``"<path>: <problem>. <what to do>"``, without identifiers in clear text.
    """

    path: Path
    message: str

    @property
    def problem(self) -> str:
        """The message without the leading path."""
        return self.message.removeprefix(f"{self.path}: ")


@dataclass
class DicomScan:
    """What :func:`scan_dicom` found: the CT series and the files it left out.

    Attributes:
        series: the series, sorted by (patient_key, series_key).
        skipped: the files (and series) skipped, in scan order.
        n_files: number of files looked at.
    """

    series: list[SeriesInfo]
    skipped: list[SkippedFile]
    n_files: int


def _input_files(inputs: Sequence[str | Path]) -> list[Path]:
    """The files of the inputs: folders recursively (sorted), files as given; each file once."""
    files: list[Path] = []
    seen: set[Path] = set()
    for item in map(Path, inputs):
        if item.is_dir():
            found = sorted(p for p in item.rglob("*") if p.is_file())
        elif item.is_file():
            found = [item]
        else:
            raise DicomError(
                f"{item}: no such file or folder. Give DICOM files or the folders that hold them"
            )
        for path in found:
            if path.resolve() not in seen:
                seen.add(path.resolve())
                files.append(path)
    return files


def _classify(path: Path) -> _SliceHeader | str:
    """The CT header of a file, or why it is no CT image (a benign skip: not DICOM, another modality).

    Raises:
        DicomError: a file that claims to be DICOM but is unreadable, truncated or incomplete.
    """
    try:
        if path.stat().st_size == 0:
            return "empty file (0 bytes)"
        ds = _read_header(path)
    except OSError as e:
        raise DicomError(f"{path}: cannot read the file ({type(e).__name__}). Check its permissions") from e
    if ds is None:
        return "not a DICOM file (no 'DICM' marker)"
    if ds.file_meta.get("MediaStorageSOPClassUID") == MediaStorageDirectoryStorage:
        return "DICOMDIR index file"
    modality = str(ds.get("Modality", "") or "")
    if modality and modality != "CT":
        return f"modality {modality}"
    if "LOCALIZER" in [str(v).upper() for v in ds.get("ImageType", [])]:
        return "localizer (scout) image"
    return _slice_header(path, ds)


def scan_dicom(
    inputs: Sequence[str | Path],
    progress: bool = False,
    allow_non_ct: bool = False,
    strict: bool = False,
    key_root: str | Path | None = None,
) -> DicomScan:
    """Find all CT series in DICOM files and folder trees (recursively, any file names), from headers only.

    Lenient (the default): every file that is no CT image (not DICOM, DICOMDIR, another modality, a
    localizer) or is broken (truncated, unreadable, required tags missing), and every series whose files
    disagree (matrix size, spacing, orientation, no slice order), is left out and listed in
    ``skipped`` with a one-line message; no warning is issued for them. Strict: the first broken file or
    series raises; files that are no CT image are skipped with a warning, other modalities raise unless
    ``allow_non_ct``.

    Args:
        inputs: files and folders.
        progress: show a tqdm progress bar.
        allow_non_ct: strict mode: skip files of other modalities with a warning instead of failing.
        strict: stop at the first bad file or series.
        key_root: the data root whose secret keys the series and patients (default: the first input, or its
            folder when it is a file, or the nearest parent with a key file, see
            :func:`~ldct_lightning.privacy.find_key_root`).

    Returns:
        The series and the skipped files.

    Raises:
        DicomError: an input that does not exist, no CT image at all, or (strict) a bad file or series.
    """
    paths = _input_files(inputs)
    if key_root is None:
        key_root = find_key_root(inputs[0] if Path(inputs[0]).is_dir() else Path(inputs[0]).parent)
    keys = pseudonymizer(key_root)
    where = str(inputs[0]) if len(inputs) == 1 else f"the {len(inputs)} inputs"
    by_series: dict[str, list[_SliceHeader]] = defaultdict(list)
    skipped: list[SkippedFile] = []
    benign: dict[str, list[Path]] = defaultdict(list)  # strict mode: reason -> files, one warning each
    for path in tqdm(paths, desc="scan DICOM", unit="file", disable=not progress):
        if path.name == KEY_FILE_NAME:  # the data root's pseudonym key (ldct_lightning.privacy)
            continue
        try:
            header = _classify(path)
        except DicomError as e:
            if strict:
                raise
            skipped.append(SkippedFile(path, str(e)))
            continue
        if isinstance(header, str):
            if not strict:
                skipped.append(SkippedFile(path, f"{path}: {header}, skipped"))
            elif header.startswith("modality") and not allow_non_ct:
                raise DicomError(
                    f"{path}: {header.replace('modality', 'modality is', 1)}, not CT. Remove non-CT files from "
                    "the folder or move them out of the folder (scan_dicom_folder(..., allow_non_ct=True) "
                    "skips them)"
                )
            elif header.startswith("not a DICOM"):
                warnings.warn(
                    f"{path}: not a DICOM file (no 'DICM' marker), skipped. "
                    "Files without the DICOM Part 10 header must be re-exported to be read",
                    stacklevel=2,
                )
            else:
                benign[header].append(path)
            continue
        by_series[header.series_uid].append(header)
    for reason, files in benign.items():
        warnings.warn(f"{files[0]}: skipped {len(files)} file(s) ({reason})", stacklevel=2)
    series = []
    for uid, headers in by_series.items():
        try:
            series.append(_make_series(uid, headers, keys))
        except DicomError as e:
            if strict:
                raise
            path = e.path if e.path is not None else headers[0].path
            skipped.append(SkippedFile(path, f"{e} ({len(headers)} files of the series skipped)"))
    if not series:
        first = f"; first skipped: {skipped[0].message}" if skipped else ""
        raise DicomError(
            f"{where}: no DICOM CT image found among {len(paths)} file(s). "
            f"Point the data path to the folder that holds the exported CT series{first}"
        )
    return DicomScan(sorted(series, key=lambda s: (s.patient_key, s.series_key)), skipped, len(paths))


def scan_dicom_folder(
    root: str | Path,
    progress: bool = False,
    allow_non_ct: bool = False,
    strict: bool = True,
    key_root: str | Path | None = None,
) -> list[SeriesInfo]:
    """Find all CT series under a folder (recursively, any file names) from their headers only.

    Non-DICOM files and DICOMDIR index files are skipped with a warning, as are localizer (scout)
    images. With ``strict=False`` every bad file or series is skipped with one warning each (see
    :func:`scan_dicom`).

    Args:
        root: folder to scan.
        progress: show a tqdm progress bar.
        allow_non_ct: skip files of other modalities with a warning instead of failing.
        strict: stop at the first bad file or series.
        key_root: the data root whose secret keys the series and patients (default: ``root`` or the nearest
            parent with a key file).

    Returns:
        The series, sorted by (patient_key, series_key).

    Raises:
        DicomError: no DICOM found, and (strict) a corrupt or truncated header, a non-CT file (unless
            allowed), an inconsistent series, or slices that cannot be ordered.
    """
    root = Path(root)
    if not root.is_dir():
        raise DicomError(
            f"{root}: not a folder. Point the data path to the folder that holds the DICOM files"
        )
    scan = scan_dicom([root], progress=progress, allow_non_ct=allow_non_ct, strict=strict, key_root=key_root)
    for item in scan.skipped:
        warnings.warn(item.message, stacklevel=2)
    return scan.series


def _decode_hu(path: Path) -> tuple[np.ndarray, bool]:
    """Decode one slice to HU. Returns the float32 image and whether the rescale tags were missing."""
    try:
        ds = pydicom.dcmread(path)
    except Exception as e:  # missing marker, truncated header, unreadable file
        raise _parse_error(path, e) from e
    if "PixelData" not in ds:
        raise DicomError(
            f"{path}: no pixel data found (missing or truncated). Re-export the series or remove the file",
            path=path,
        )
    try:
        stored = ds.pixel_array
    except Exception as e:  # truncated pixel data, missing decoder, corrupt stream
        syntax = ds.file_meta.get("TransferSyntaxUID")
        todo = "The file is truncated or corrupt: re-export it or remove it from the folder"
        if syntax is not None and syntax.is_compressed:
            todo = (
                f"The file is truncated or corrupt, or no decoder for {syntax.name} is installed: re-export "
                "it, or pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg pylibjpeg-rle"
            )
        raise DicomError(
            f"{path}: cannot decode the pixel data ({type(e).__name__}: {e}). {todo}", path=path
        ) from e
    if stored.ndim != 2:
        raise DicomError(
            f"{path}: expected a single 2-D slice, got pixel data of shape {stored.shape}", path=path
        )
    slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    if "ModalityLUTSequence" in ds or (slope not in (None, "") and intercept not in (None, "")):
        return np.asarray(apply_modality_lut(stored, ds), dtype=np.float32), False
    # Some CT exports omit the rescale tags; their stored values are then taken as HU.
    slope = 1.0 if slope in (None, "") else float(slope)
    intercept = 0.0 if intercept in (None, "") else float(intercept)
    return (stored.astype(np.float64) * slope + intercept).astype(np.float32), True


def _warn_missing_rescale(path: Path, detail: str = "") -> None:
    warnings.warn(
        f"{path}: RescaleSlope/RescaleIntercept missing{detail}; assuming slope 1 and intercept 0 "
        "(HU = stored value). Check the HU range of this export",
        stacklevel=3,
    )


def read_slice_hu(path: Path) -> np.ndarray:
    """Read one slice in Hounsfield units through the modality LUT (RescaleSlope/Intercept).

    Args:
        path: a DICOM CT file (any transfer syntax that pydicom's pixel handlers decode).

    Returns:
        float32 array (rows, cols) in HU.

    Raises:
        DicomError: the file is not DICOM, is truncated or corrupt, or has no pixel data.
    """
    hu, missing_rescale = _decode_hu(Path(path))
    if missing_rescale:
        _warn_missing_rescale(path)
    return hu


def _decode_checked(series: SeriesInfo, path: Path) -> tuple[np.ndarray, bool]:
    """One slice of ``series`` in HU and whether its rescale tags were missing; checks the scanned size."""
    hu, missing = _decode_hu(path)
    if hu.shape != (series.rows, series.cols):
        raise DicomError(
            f"{path}: slice is {hu.shape[0]}x{hu.shape[1]}, but series {series.series_key} was scanned as "
            f"{series.rows}x{series.cols}. The files changed since the scan: scan the folder again",
            path=path,
        )
    return hu, missing


def iter_series_hu(
    series: SeriesInfo, progress: bool = False, workers: int = 0, ahead: int = 8
) -> Iterator[np.ndarray]:
    """The slices of a series in HU, one at a time in ``series.files`` order, optionally read ahead on threads.

    At most ``ahead`` decoded slices wait in memory (see :func:`~ldct_lightning.data.prefetch.ordered_prefetch`),
    so memory stays bounded for any series length. Missing rescale tags give one warning at the end.

    Args:
        series: a series from :func:`scan_dicom_folder`.
        progress: show a tqdm progress bar.
        workers: reader threads (0: read in the calling thread).
        ahead: slices read ahead of the consumer.

    Returns:
        An iterator of float32 arrays (rows, cols) in HU.

    Raises:
        DicomError: a slice cannot be read or its size differs from the scanned header.
    """
    missing_rescale: list[Path] = []
    slices = ordered_prefetch(partial(_decode_checked, series), series.files, workers=workers, ahead=ahead)
    bar = tqdm(
        slices,
        total=series.n_slices,
        desc=f"read series {series.series_key}",
        unit="slice",
        disable=not progress,
    )
    for path, (hu, missing) in zip(series.files, bar, strict=True):
        if missing:
            missing_rescale.append(path)
        yield hu
    if missing_rescale:
        detail = f" (in {len(missing_rescale)} of {series.n_slices} files of series {series.series_key})"
        _warn_missing_rescale(missing_rescale[0], detail)


def read_series_hu(series: SeriesInfo, progress: bool = False) -> np.ndarray:
    """Read a whole series in Hounsfield units, in the order of ``series.files``.

    Args:
        series: a series from :func:`scan_dicom_folder`.
        progress: show a tqdm progress bar.

    Returns:
        float32 array (n_slices, rows, cols) in HU.

    Raises:
        DicomError: a slice cannot be read or its size differs from the scanned header.
    """
    volume = np.empty((series.n_slices, series.rows, series.cols), dtype=np.float32)
    for i, hu in enumerate(iter_series_hu(series, progress=progress)):
        volume[i] = hu
    return volume

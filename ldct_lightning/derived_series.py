"""Writing denoised DICOM series: a derived copy of every source file, streamed and written atomically.

Each output series lands in ``OUTPUT/<series_key>/`` as a copy of the source files with new Series/SOP
Instance UIDs, ImageType ``DERIVED\\SECONDARY``, the description suffixed, a DerivationDescription and a
SourceImageSequence, geometry and all other tags kept. Pixel data go back through the inverse modality LUT of
each source file and are written uncompressed (Explicit VR Little Endian). A series is written into a hidden
temporary folder and renamed when complete, so an interrupted run leaves no half-written series behind.

Slices stream through three stages that overlap: reader threads decode the next slices while the network
runs on the current batch, and a writer thread encodes and saves the finished ones. At most a few batches are
in memory at once, whatever the series length.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from tqdm import tqdm

from ldct_lightning.allocator import TRIM_EVERY_SLICES, release_freed_memory
from ldct_lightning.data.dicom import DicomError, DicomScan, SeriesInfo, iter_series_hu
from ldct_lightning.data.dicom_write import hu_to_stored, save_atomic
from ldct_lightning.inference import Denoiser

# Summary tags computed from the old pixels; they would be wrong for the new ones (all type 3, optional).
_STALE_PIXEL_TAGS = (
    "SmallestImagePixelValue",
    "LargestImagePixelValue",
    "SmallestPixelValueInSeries",
    "LargestPixelValueInSeries",
)


@dataclass
class SeriesResult:
    """Outcome of one series: ``folder`` when written, ``reason`` when skipped."""

    series_key: str
    n_slices: int
    folder: Path | None = None
    reason: str | None = None
    problem: str | None = None  # the reason without the file name


def short_sha256(path: Path, length: int = 12) -> str:
    """The first ``length`` hex digits of a file's sha256 (names the checkpoint in DerivationDescription).

    Not :func:`ldct_lightning.eval.evaluate.file_sha256`: importing the evaluation package (scipy.stats) would
    add seconds to the start of every ``ldct-denoise``.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:length]


def _stored_range(ds: Dataset) -> tuple[int, int]:
    """The range of stored values that BitsStored and PixelRepresentation allow."""
    bits = int(ds.get("BitsStored", 16) or 16)
    if int(ds.get("PixelRepresentation", 0) or 0) == 1:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def _check_writable(path: Path, ds: Dataset) -> None:
    """Pixel encodings this writer can reproduce (all CT in practice); others skip the series."""
    problems = []
    if int(ds.get("BitsAllocated", 0) or 0) != 16:
        problems.append(f"BitsAllocated {ds.get('BitsAllocated')} (only 16 is supported)")
    if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        problems.append(f"SamplesPerPixel {ds.get('SamplesPerPixel')} (only grayscale is supported)")
    if "ModalityLUTSequence" in ds:
        problems.append("a ModalityLUTSequence instead of RescaleSlope/RescaleIntercept")
    if float(ds.get("RescaleSlope", 1) or 1) == 0:
        problems.append("RescaleSlope 0")
    if problems:
        raise DicomError(f"{path}: cannot write this pixel encoding back: {'; '.join(problems)}", path=path)


def derived_dataset(
    source: Path,
    hu: np.ndarray,
    source_hu: np.ndarray,
    series_uid: str,
    suffix: str,
    derivation: str,
) -> Dataset:
    """The source file's dataset with denoised pixels and the tags of a derived image.

    Args:
        source: the source DICOM file.
        hu: the denoised slice (rows, cols) in HU.
        source_hu: the source slice in HU (pixels equal to PixelPaddingValue stay padding).
        series_uid: the new SeriesInstanceUID.
        suffix: appended to SeriesDescription.
        derivation: DerivationDescription.

    Returns:
        The dataset, uncompressed (Explicit VR Little Endian), with new SOP Instance UIDs.

    Raises:
        DicomError: unreadable file or a pixel encoding this writer does not support.
    """
    try:
        ds = pydicom.dcmread(source, stop_before_pixels=True)  # the pixels are replaced anyway
    except Exception as e:  # any parse failure of a file the scan accepted means it changed or is corrupt
        raise DicomError(
            f"{source}: cannot re-read the DICOM file ({type(e).__name__}). Re-export it", path=source
        ) from e
    _check_writable(source, ds)
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
    lo, hi = _stored_range(ds)
    stored = np.clip(hu_to_stored(hu, slope, intercept, signed), lo, hi)
    padding = ds.get("PixelPaddingValue")
    if padding is not None:  # keep the region outside the field of view as padding
        stored[source_hu == float(padding) * slope + intercept] = padding
    old_sop_class, old_sop_uid = ds.get("SOPClassUID"), ds.get("SOPInstanceUID")

    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian  # before set_pixel_data: no encapsulation
    ds.set_pixel_data(
        stored,
        photometric_interpretation=str(ds.get("PhotometricInterpretation", "MONOCHROME2")),
        bits_stored=int(ds.get("BitsStored", 16) or 16),
        generate_instance_uid=False,
    )
    sop_uid = generate_uid()
    ds.SOPInstanceUID = sop_uid
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.SeriesInstanceUID = series_uid
    image_type = [str(v) for v in ds.get("ImageType", [])]
    ds.ImageType = ["DERIVED", "SECONDARY", *image_type[2:]]
    description = (str(ds.get("SeriesDescription", "") or "") + suffix).strip()
    ds.SeriesDescription = description[:64]  # LO: at most 64 characters
    ds.DerivationDescription = derivation[:1024]  # ST: 1024 chars
    if old_sop_class and old_sop_uid:
        ref = Dataset()
        ref.ReferencedSOPClassUID = old_sop_class
        ref.ReferencedSOPInstanceUID = old_sop_uid
        ds.SourceImageSequence = [ref]
    for keyword in _STALE_PIXEL_TAGS:
        if keyword in ds:
            del ds[keyword]
    return ds


def replace_folder(tmp: Path, final: Path) -> None:
    """Move a finished series folder into place, replacing an older one without a window of no folder."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _write_slice(
    source: Path,
    hu: np.ndarray,
    source_hu: np.ndarray,
    path: Path,
    series_uid: str,
    suffix: str,
    derivation: str,
) -> None:
    save_atomic(derived_dataset(source, hu, source_hu, series_uid, suffix, derivation), path)


def write_denoised_series(
    series: SeriesInfo,
    denoiser: Denoiser,
    output_dir: Path,
    suffix: str,
    derivation: str,
    progress: bool | None = None,
    read_workers: int = 2,
    write_workers: int = 1,
) -> Path:
    """Denoise one series, streaming, and write it atomically to ``output_dir/<series_key>/``.

    Args:
        series: the source series.
        denoiser: the model (its ``batch_size`` slices go through the network at a time).
        output_dir: OUTPUT.
        suffix: SeriesDescription suffix.
        derivation: DerivationDescription.
        progress: a tqdm bar for this series with slices/s (None: only on a terminal; False: none).
        read_workers: threads decoding source slices ahead of the network.
        write_workers: threads encoding and saving finished slices.

    Returns:
        The series folder written.

    Raises:
        DicomError: a source file that cannot be read or written back.
    """
    final = output_dir / series.series_key
    tmp = output_dir / f".{series.series_key}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    new_series_uid = generate_uid()
    ahead = 2 * denoiser.batch_size  # slices waiting at each side of the network
    slices = iter_series_hu(series, workers=read_workers, ahead=ahead)
    writer = ThreadPoolExecutor(max_workers=max(1, write_workers), thread_name_prefix="ldct-write")
    pending: deque[Future[None]] = deque()
    bar = tqdm(
        total=series.n_slices,
        desc=f"series {series.series_key}",
        unit="slice",
        disable=None if progress is None else not progress,
    )
    try:
        for (i, source_hu), hu in denoiser.denoise_stream(enumerate(slices), image=lambda item: item[1]):
            path = tmp / f"IM{i + 1:06d}.dcm"
            args = (series.files[i], hu, source_hu, path, new_series_uid, suffix, derivation)
            pending.append(writer.submit(_write_slice, *args))
            if (i + 1) % TRIM_EVERY_SLICES == 0:
                release_freed_memory()
            while pending and (len(pending) > ahead or pending[0].done()):
                pending.popleft().result()  # a write error stops the series now
                bar.update(1)
        while pending:
            pending.popleft().result()
            bar.update(1)
        writer.shutdown(wait=True)
        replace_folder(tmp, final)
        release_freed_memory()
    finally:
        writer.shutdown(wait=True, cancel_futures=True)
        bar.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def denoise_scan(
    scan: DicomScan,
    denoiser: Denoiser,
    output_dir: Path,
    suffix: str,
    derivation: str,
    strict: bool = False,
    progress: bool | None = None,
) -> list[SeriesResult]:
    """Denoise every series of a scan into ``output_dir``; a series that fails is skipped (unless ``strict``).

    Args:
        scan: the scanned inputs.
        denoiser: the model.
        output_dir: OUTPUT (created).
        suffix: SeriesDescription suffix.
        derivation: DerivationDescription.
        strict: raise the first error instead of skipping the series.
        progress: one tqdm bar per series (None: only on a terminal).

    Returns:
        One result per series, in scan order.
    """
    output_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for series in scan.series:
        result = SeriesResult(series.series_key, series.n_slices)
        try:
            result.folder = write_denoised_series(series, denoiser, output_dir, suffix, derivation, progress)
        except DicomError as e:
            if strict:
                raise
            result.reason, result.problem = str(e), e.problem
        results.append(result)
    return results

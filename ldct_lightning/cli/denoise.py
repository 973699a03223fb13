"""``ldct-denoise INPUT [INPUT ...] OUTPUT --checkpoint C``: every CT series in the inputs becomes a denoised series.

An INPUT is a DICOM file or a folder tree. Files that are no CT image or are broken (truncated, zero bytes,
other modalities, ...) and series that cannot be read are skipped, each named once in the summary at the
end; every readable CT series is denoised. ``--strict`` stops at the first bad file instead.

Each output series lands in ``OUTPUT/<series_key>/`` (a keyed hash of the SeriesInstanceUID under the secret
of the first INPUT folder, as training and evaluation on that folder name it; never a patient name) as a copy
of the source files with new Series/SOP Instance UIDs, ImageType ``DERIVED\\SECONDARY``, the description
suffixed, a DerivationDescription and a SourceImageSequence, geometry and all other tags kept. Pixel data go back
through the inverse modality LUT of each source file and are written uncompressed (Explicit VR Little Endian).
A series is written into a hidden temporary folder and renamed when complete, so an interrupted run leaves no
half-written series behind.

Exit codes: 0 all series denoised and no file skipped, 2 bad input or anything skipped, 130 interrupted.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from tqdm import tqdm

from ldct_lightning import __version__
from ldct_lightning.data.dicom import DicomError, SeriesInfo, SkippedFile, read_series_hu, scan_dicom
from ldct_lightning.data.dicom_write import hu_to_stored, save_atomic
from ldct_lightning.inference import Denoiser, InferenceError, load_generator_config
from ldct_lightning.modules.handoff import CheckpointError
from ldct_lightning.privacy import PrivacyError

PROG = "ldct-denoise"

# Summary tags computed from the old pixels; they would be wrong for the new ones (all type 3, optional).
_STALE_PIXEL_TAGS = (
    "SmallestImagePixelValue",
    "LargestImagePixelValue",
    "SmallestPixelValueInSeries",
    "LargestPixelValueInSeries",
)


class DenoiseCLIError(ValueError):
    """Bad command-line input; ``str(e)`` names the argument, the problem and what to do."""


@dataclass
class SeriesResult:
    """Outcome of one series: ``folder`` when written, ``reason`` when skipped."""

    series_key: str
    n_slices: int
    folder: Path | None = None
    reason: str | None = None
    problem: str | None = None  # the reason without the file name


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Denoise every CT series in the inputs (DICOM files or folder trees) with a trained generator "
        "and write new DICOM series to OUTPUT/<series_key>/ (hashed folder names). Bad files are skipped and "
        "listed at the end (exit code 2).",
    )
    p.add_argument(
        "inputs", type=Path, nargs="+", metavar="INPUT", help="DICOM file or folder tree with CT series"
    )
    p.add_argument("output", type=Path, metavar="OUTPUT", help="folder for the denoised series")
    p.add_argument("--checkpoint", "-c", type=Path, required=True, help="Lightning checkpoint (.ckpt)")
    p.add_argument(
        "--generator-config",
        type=Path,
        default=None,
        help="YAML with the generator's config (a run_info.yaml or generator kwargs); default: the "
        "checkpoint's run_info.yaml when present, else the default generator",
    )
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    p.add_argument("--half", action="store_true", help="half-precision autocast (GPU; see --half-dtype)")
    p.add_argument(
        "--half-dtype", choices=["fp16", "bf16"], default="fp16", help="dtype of --half (default: fp16)"
    )
    p.add_argument(
        "--tile", type=int, default=None, help="tile size for large matrices (default: whole slices)"
    )
    p.add_argument("--overlap", type=int, default=32, help="tile overlap in pixels (default: 32)")
    p.add_argument("--batch-size", type=int, default=4, help="slices or tiles per forward pass (default: 4)")
    p.add_argument(
        "--suffix", default=" denoised", help="appended to SeriesDescription (default: ' denoised')"
    )
    p.add_argument(
        "--strict",
        action="store_true",
        help="stop at the first bad file or series instead of skipping it",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="allow a non-empty OUTPUT and replace series folders that already exist there",
    )
    return p


def _check_paths(inputs: Sequence[Path], output_dir: Path, overwrite: bool) -> None:
    """Fail early and clearly on unusable INPUT paths and OUTPUT folder."""
    out = output_dir.resolve()
    for item in inputs:
        if not item.exists():
            raise DenoiseCLIError(f"{item}: no such INPUT. Give DICOM files or the folders that hold them")
        if item.is_dir() and not any(p.is_file() for p in item.rglob("*")):
            raise DenoiseCLIError(f"{item}: INPUT holds no file. Give the folder that holds the CT series")
        inp = item.resolve()
        if item.is_dir() and (out == inp or inp in out.parents):
            raise DenoiseCLIError(
                f"{output_dir}: OUTPUT lies inside INPUT {item}, so later scans of INPUT would find the "
                "denoised series. Give an OUTPUT outside INPUT"
            )
        if out in inp.parents:
            raise DenoiseCLIError(f"{item}: INPUT lies inside OUTPUT. Give an OUTPUT outside the inputs")
    if output_dir.exists() and not output_dir.is_dir():
        raise DenoiseCLIError(f"{output_dir}: OUTPUT exists and is not a folder. Give a new or empty folder")
    if output_dir.is_dir() and any(output_dir.iterdir()) and not overwrite:
        raise DenoiseCLIError(
            f"{output_dir}: OUTPUT exists and is not empty. Give a new or empty folder, or pass --overwrite"
        )


def _file_sha256(path: Path, length: int = 12) -> str:
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


def _replace_folder(tmp: Path, final: Path) -> None:
    """Move a finished series folder into place, replacing an older one without a window of no folder."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def denoise_one_series(
    series: SeriesInfo,
    denoiser: Denoiser,
    output_dir: Path,
    suffix: str,
    derivation: str,
    pbar: tqdm | None = None,
) -> Path:
    """Denoise one series and write it atomically to ``output_dir/<series_key>/``.

    Args:
        series: the source series.
        denoiser: the model.
        output_dir: OUTPUT.
        suffix: SeriesDescription suffix.
        derivation: DerivationDescription.
        pbar: progress bar advanced per slice.

    Returns:
        The series folder written.

    Raises:
        DicomError: a source file that cannot be read or written back.
    """
    volume = read_series_hu(series)
    final = output_dir / series.series_key
    tmp = output_dir / f".{series.series_key}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    new_series_uid = generate_uid()
    try:
        for start in range(0, series.n_slices, denoiser.batch_size):
            stop = min(start + denoiser.batch_size, series.n_slices)
            denoised = denoiser.denoise(volume[start:stop])
            for i in range(start, stop):
                ds = derived_dataset(
                    series.files[i], denoised[i - start], volume[i], new_series_uid, suffix, derivation
                )
                save_atomic(ds, tmp / f"IM{i + 1:06d}.dcm")
            if pbar is not None:
                pbar.update(stop - start)
        _replace_folder(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _print_summary(
    results: Sequence[SeriesResult], skipped_files: Sequence[SkippedFile], output_dir: Path
) -> None:
    """Every series (done or skipped) and every skipped file, one line each."""
    done = [r for r in results if r.folder is not None]
    failed = [r for r in results if r.folder is None]
    print(
        f"{PROG}: {len(results)} series found, {len(done)} denoised, {len(failed)} skipped, "
        f"{len(skipped_files)} file(s) skipped -> {output_dir}"
    )
    for r in done:
        print(f"  done     {r.series_key}  {r.n_slices} slices  {r.folder.name}/")
    for r in failed:
        print(f"  skipped  series {r.series_key}: {r.reason}")
    for item in skipped_files:
        print(f"  skipped  {item.message}")


def _failure_line(
    results: Sequence[SeriesResult], skipped_files: Sequence[SkippedFile], n_files: int
) -> str | None:
    """The one error line when anything was skipped (counts and the first problem), else None."""
    failed = [r for r in results if r.folder is None]
    parts = []
    if failed:
        parts.append(f"{len(failed)} of {len(results)} series not denoised")
    if skipped_files:
        parts.append(f"{len(skipped_files)} of {n_files} file(s) skipped")
    if not parts:
        return None
    first = failed[0].problem if failed else skipped_files[0].problem
    return f"{', '.join(parts)} (listed above); first: {first}"


def run(args: argparse.Namespace) -> int:
    """Run the command; raises the errors that :func:`main` turns into one line and exit code 2."""
    _check_paths(args.inputs, args.output, args.overwrite)
    generator_kwargs = load_generator_config(args.generator_config) if args.generator_config else None
    denoiser = Denoiser.from_checkpoint(
        args.checkpoint,
        device=args.device,
        half=args.half_dtype if args.half else False,
        generator_kwargs=generator_kwargs,
        tile=args.tile,
        overlap=args.overlap,
        batch_size=args.batch_size,
    )
    # series keys under the secret of the first input's data root: the same keys as training and evaluation
    scan = scan_dicom(args.inputs, allow_non_ct=True, strict=args.strict)
    derivation = (
        f"Denoised with ldct-lightning {__version__} (two-stage LDCT denoising after Hu et al. 2024), "
        f"checkpoint sha256 {_file_sha256(args.checkpoint)}"
    )
    args.output.mkdir(parents=True, exist_ok=True)
    results = []
    total = sum(s.n_slices for s in scan.series)
    with tqdm(total=total, desc="denoise", unit="slice", disable=None, file=sys.stderr) as pbar:
        for series in scan.series:
            pbar.set_postfix_str(series.series_key)
            result = SeriesResult(series.series_key, series.n_slices)
            try:
                result.folder = denoise_one_series(
                    series, denoiser, args.output, args.suffix, derivation, pbar
                )
            except DicomError as e:
                if args.strict:
                    raise
                result.reason, result.problem = str(e), e.problem
            results.append(result)
    _print_summary(results, scan.skipped, args.output)
    failure = _failure_line(results, scan.skipped, scan.n_files)
    if failure is not None:
        print(f"{PROG}: error: {failure}", file=sys.stderr)
        return 2
    return 0


def _show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: object = None,
    line: str | None = None,
) -> None:
    """Warnings as one line each, without source lines (they are for users, not developers)."""
    print(f"{PROG}: warning: {message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``ldct-denoise``.

    Args:
        argv: arguments (default: ``sys.argv[1:]``).

    Returns:
        The exit code: 0 success, 2 bad input or anything skipped, 130 interrupted.
    """
    args = build_parser().parse_args(argv)
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        try:
            return run(args)
        except (DicomError, CheckpointError, InferenceError, DenoiseCLIError, PrivacyError) as e:
            print(f"{PROG}: error: {e}", file=sys.stderr)
            return 2
        except OSError as e:  # permissions, disk full: the message names the path
            print(f"{PROG}: error: {e}. Check the folder's permissions and free space", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print(f"{PROG}: interrupted; series not finished were not written", file=sys.stderr)
            return 130


if __name__ == "__main__":
    sys.exit(main())

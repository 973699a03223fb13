"""``ldct-denoise INPUT [INPUT ...] OUTPUT --checkpoint C``: every CT series in the inputs becomes a denoised series.

An INPUT is a DICOM file or a folder tree. Files that are no CT image or are broken (truncated, zero bytes,
other modalities, ...) and series that cannot be read are skipped, each named once in the summary at the
end; every readable CT series is denoised. ``--strict`` stops at the first bad file instead.

Each output series lands in ``OUTPUT/<series_key>/`` (a keyed hash of the SeriesInstanceUID under the secret
of the first INPUT folder, as training and evaluation on that folder name it; never a patient name); what is
written, and how reading, the network and writing overlap, is in :mod:`ldct_lightning.derived_series`. Speed
options: ``--batch-size``, ``--backend onnxruntime``, ``--precision bf16``; ``--plain`` is the reference path.

Exit codes: 0 all series denoised and no file skipped, 2 bad input or anything skipped, 130 interrupted.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

from ldct_lightning import __version__
from ldct_lightning.allocator import keep_freed_memory
from ldct_lightning.cli.arguments import add_generator_config_argument
from ldct_lightning.data.dicom import SkippedFile, scan_dicom
from ldct_lightning.derived_series import SeriesResult, denoise_scan, short_sha256
from ldct_lightning.errors import LDCTError
from ldct_lightning.inference import Denoiser, load_generator_config
from ldct_lightning.inference_backends import BACKENDS

PROG = "ldct-denoise"


class DenoiseCLIError(LDCTError):
    """Bad command-line input; ``str(e)`` names the argument, the problem and what to do."""


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
    add_generator_config_argument(p)
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    p.add_argument(
        "--backend",
        choices=BACKENDS,
        default="torch",
        help="torch, or onnxruntime (CPU, float32; needs the export extra) (default: torch)",
    )
    p.add_argument(
        "--onnx",
        type=Path,
        default=None,
        help="with --backend onnxruntime: the checkpoint's file from ldct-export --format onnx (checked "
        "against the checkpoint); default: exported once into ~/.cache/ldct-lightning/onnx",
    )
    p.add_argument(
        "--precision",
        choices=["fp32", "bf16", "fp16"],
        default="fp32",
        help="fp32, or autocast in bf16 (CPU with AVX-512 BF16/AMX, or GPU) or fp16 (GPU) (default: fp32)",
    )
    p.add_argument(
        "--plain",
        action="store_true",
        help="torch backend without batch-norm folding and channels-last (the reference path; slower)",
    )
    p.add_argument("--half", action="store_true", help="same as --precision fp16 (or --half-dtype)")
    p.add_argument(
        "--half-dtype", choices=["fp16", "bf16"], default="fp16", help="dtype of --half (default: fp16)"
    )
    p.add_argument(
        "--tile", type=int, default=None, help="tile size for large matrices (default: whole slices)"
    )
    p.add_argument("--overlap", type=int, default=32, help="tile overlap in pixels (default: 32)")
    p.add_argument(
        "--batch-size",
        type=int,
        default=2,
        help="slices or tiles per forward pass (default: 2, the fastest of 1/2/4/8 on 2 CPU cores; more on a GPU)",
    )
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


def _precision(args: argparse.Namespace) -> str | bool:
    """The autocast setting of --precision (or the older --half/--half-dtype)."""
    if args.precision != "fp32":
        return args.precision
    return args.half_dtype if args.half else False


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
    if args.onnx is not None and args.backend != "onnxruntime":
        raise DenoiseCLIError(f"--onnx {args.onnx}: only with --backend onnxruntime. Add it or drop --onnx")
    generator_kwargs = load_generator_config(args.generator_config) if args.generator_config else None
    denoiser = Denoiser.from_checkpoint(
        args.checkpoint,
        device=args.device,
        half=_precision(args),
        generator_kwargs=generator_kwargs,
        tile=args.tile,
        overlap=args.overlap,
        batch_size=args.batch_size,
        backend=args.backend,
        fold_bn=args.backend == "torch" and not args.plain,
        channels_last=args.backend == "torch" and not args.plain,
        onnx_path=args.onnx,
    )
    # series keys under the secret of the first input's data root: the same keys as training and evaluation
    scan = scan_dicom(args.inputs, allow_non_ct=True, strict=args.strict)
    derivation = (
        f"Denoised with ldct-lightning {__version__} (two-stage LDCT denoising after Hu et al. 2024), "
        f"checkpoint sha256 {short_sha256(args.checkpoint)}"
    )
    results = denoise_scan(scan, denoiser, args.output, args.suffix, derivation, strict=args.strict)
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
    keep_freed_memory()
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        try:
            return run(args)
        except LDCTError as e:
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

"""``ldct-simulate``: generate the built-in synthetic LDCT/NDCT data set as DICOM plus ground truth."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from ldct_lightning.data.synthetic import KERNELS, PRESETS, SyntheticConfig, generate_dataset

EPILOG = """
presets:
  tiny   3 patients x 4 slices, 64x64 at 5.6 mm (tests, seconds)
  demo   11 patients x 10 slices, 256x256 at 1.4 mm (about a minute on 2 CPU cores)
  bench  16 patients x 24 slices, 512x512 at 0.7 mm (benchmarks, tens of minutes on a CPU, ~2 GB RAM)
  site_a 12 patients x 16 slices, bench geometry, trabecular bone, bowtie + tube-current modulation,
         smooth kernel (make bench-generalize trains on it)
  site_b 6 patients x 12 slices, site_a's anatomy model with other patients, a sharper kernel, slimmer and
         larger bodies, dose ratios 1/12-1/5, mixed DICOM storage (make bench-generalize tests on it)

output (OUT):
  dicom/...              2 DICOM series per patient (LDCT ~1.5 mGy, NDCT ~12 mGy), random file names
  truth/<patient>.npz    noiseless reconstructions and ROI labels aligned with each series
  manifest.csv           series_uid, role (ldct|ndct), aligned
  labels.json, summary.json (measured noise, PSNR, timing, realism report: tissue HU, noise per
                         tissue, NPS peak, SPEC targets), overview.png (with the realism panels)

examples:
  ldct-simulate data/demo --preset demo
  ldct-simulate data/small --preset demo --patients 4 --slices 6 --size 128
  ldct-simulate data/aligned --preset tiny --misalignment 0 --overwrite
  ldct-simulate data/sharp --preset site_a --size 256 --kernel ramp --seed 7   # another site's style
"""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (also used to render ``--help``)."""
    parser = argparse.ArgumentParser(
        prog="ldct-simulate",
        description=(
            "Generate a synthetic low-dose / normal-dose CT data set: procedural thorax-abdomen phantoms, "
            "dose simulated in the projection domain (Poisson + electronic noise, FBP), the LDCT scanned in "
            "a slightly different pose so that the pairs are unaligned, written as real DICOM series."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("out", type=Path, help="output folder (must be empty or absent unless --overwrite)")
    parser.add_argument(
        "--preset", choices=sorted(PRESETS), default="demo", help="size preset (default: demo)"
    )
    parser.add_argument("--patients", type=int, help="number of patients (overrides the preset)")
    parser.add_argument("--slices", type=int, help="slices per series")
    parser.add_argument(
        "--size",
        type=int,
        help="image size N (pixel size, views and photons follow, keeping the field of view and noise)",
    )
    parser.add_argument("--dose-ratio", type=float, help="LDCT / NDCT dose (default 0.125, as in the paper)")
    parser.add_argument(
        "--dose-ratio-max",
        type=float,
        help="draw each patient's dose ratio from [--dose-ratio, this] (protocols that differ per patient)",
    )
    parser.add_argument(
        "--kernel",
        action="append",
        choices=sorted(KERNELS),
        help="reconstruction kernel (FBP filter), repeat for a per-patient mix (default: the preset's; "
        "hann = smooth soft tissue, ramp = sharp)",
    )
    parser.add_argument(
        "--misalignment", type=float, help="scale of the LDCT pose change (0 = aligned pairs, default 1)"
    )
    parser.add_argument("--seed", type=int, help="random seed (default 0); the same seed gives the same data")
    parser.add_argument(
        "--threads",
        type=int,
        help="torch threads (default 1: on a busy machine more threads can be much slower)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or summary table")
    return parser


def config_from_args(args: argparse.Namespace) -> SyntheticConfig:
    """The preset with the command-line overrides applied."""
    cfg = PRESETS[args.preset]
    if args.size is not None:
        cfg = cfg.resized(args.size)
    changes = {}
    if args.patients is not None:
        changes["n_patients"] = args.patients
    if args.slices is not None:
        changes["n_slices"] = args.slices
    if args.dose_ratio is not None:
        changes["dose_ratio"] = args.dose_ratio
    if args.dose_ratio_max is not None:
        changes["dose_ratio_max"] = args.dose_ratio_max
    if args.kernel:
        changes["kernels"] = tuple(args.kernel)
    if args.misalignment is not None:
        changes["misalignment"] = args.misalignment
    if args.seed is not None:
        changes["seed"] = args.seed
    cfg = dataclasses.replace(cfg, **changes)
    cfg.validate()
    return cfg


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``ldct-simulate``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(args)
    except ValueError as err:
        parser.error(str(err))
    out: Path = args.out
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.overwrite:
        print(
            f"ldct-simulate: {out}: exists and is not empty. Pass --overwrite or choose another folder.",
            file=sys.stderr,
        )
        return 2
    summary = generate_dataset(
        out, cfg, progress=not args.quiet, overwrite=args.overwrite, num_threads=args.threads
    )
    if not args.quiet:
        print(f"wrote {summary['n_series']} series of {cfg.n_patients} patients to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

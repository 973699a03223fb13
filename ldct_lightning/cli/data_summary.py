"""`ldct-data-summary ROOT`: read a data set the way training does and print what is in it.

Scans the DICOM tree, pairs LDCT/NDCT series per patient, writes or checks the patient split, builds the
cache, registers the studies whose two series have their own frames of reference (z offset found, residual,
share of usable slices, one checkerboard figure per study), and prints one row per series (split, hashed patient and series keys, dose tags, slices) with the
noise SD estimated from the images (flat soft tissue, :func:`ldct_lightning.data.noise.estimate_noise_sd_hu`).
For the synthetic set it also prints the noise measured against the noiseless truth (``summary.json``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ldct_lightning.data.datamodule import DataConfigError, LDCTDataModule
from ldct_lightning.data.dicom import DicomError
from ldct_lightning.data.noise import estimate_noise_sd_hu
from ldct_lightning.data.pairing import PairingError
from ldct_lightning.registration.figures import save_registration_figure


def estimated_noise_table(dm: LDCTDataModule) -> list[str]:
    """Lines of: patient key, estimated noise SD of its LDCT and NDCT series (HU)."""
    lines = [f"{'patient_key':<14}{'split':<7}{'LDCT SD (HU)':>14}{'NDCT SD (HU)':>14}"]
    for part in ("train", "val", "test"):
        for p in dm.patients(part):
            ld, nd = estimate_noise_sd_hu([p.ldct]), estimate_noise_sd_hu([p.ndct])
            lines.append(f"{p.patient_key:<14}{part:<7}{ld:>14.1f}{nd:>14.1f}")
    return lines


def registration_lines(dm: LDCTDataModule, figures: Path | None) -> list[str]:
    """Per registered study: z offset found, residual, share of usable slices; one figure each."""
    info = dm.register_studies()
    if not info and not dm.left_out:
        return [
            "",
            "registration: none needed (every study's series share a frame of reference, or are aligned)",
        ]
    part_of = {k: part for part in ("train", "val", "test") for k in getattr(dm.split, part)}
    lines = [
        "",
        "registration of the NDCT onto the LDCT (two frames of reference):",
        f"{'patient_key':<14}{'split':<7}{'z offset (mm)':>14}{'median NCC':>12}{'residual (HU)':>15}"
        f"{'usable':>8}{'stages':>16}{'s':>7}",
    ]
    by_key = {p.patient_key: p for part in ("train", "val", "test") for p in dm.patients(part)}
    for key, r in sorted(info.items()):
        lines.append(
            f"{key:<14}{part_of.get(key, '-'):<7}{r['z_offset_mm']:>14.1f}{r['ncc_median']:>12.3f}"
            f"{r['residual_hu']:>15.1f}{r['usable_fraction']:>8.0%}{'+'.join(r['stages']):>16}{r['seconds']:>7.1f}"
        )
        p = by_key.get(key)
        if figures is not None and p is not None and p.ndct_registered is not None:
            path = figures / f"{key}.png"
            save_registration_figure(p.ldct, p.ndct_registered, p.registered_mask, p.usable_slices, key, path)
    for key in sorted(dm.left_out):
        lines.append(f"{key:<14}{part_of.get(key, '-'):<7}  left out: registration failed (see the warning)")
    if figures is not None and info:
        lines.append(
            f"registration figures (LDCT, registered NDCT, checkerboard, mask): {figures}/<patient_key>.png"
        )
    return lines


def synthetic_noise_lines(root: Path) -> list[str]:
    """The synthetic generator's own noise measurement (noisy minus noiseless, in a liver ROI)."""
    summary_file = root / "summary.json"
    if not summary_file.is_file():
        return []
    summary = json.loads(summary_file.read_text())
    lines = ["", f"measured by the generator ({summary_file.name}, means over patients):"]
    for key, value in summary.items():
        if key.endswith("_mean"):
            lines.append(f"  {key.removesuffix('_mean'):<22}{value:8.2f}")
    for key in ("noise_measure", "psnr_measure"):
        if key in summary:
            lines.append(f"  {key}: {summary[key]}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="ldct-data-summary",
        description="Read an LDCT/NDCT DICOM data set (or the synthetic set) as training does and summarise it.",
    )
    parser.add_argument("root", type=Path, help="data folder (a DICOM tree or an ldct-simulate output)")
    parser.add_argument("--manifest", type=Path, default=None, help="CSV/YAML with each series' role")
    parser.add_argument("--n-val", type=float, default=2, help="validation patients (count or fraction)")
    parser.add_argument("--n-test", type=float, default=2, help="test patients (count or fraction)")
    parser.add_argument(
        "--figures",
        type=Path,
        default=None,
        help="folder of the per-study registration figures (default <root>/registration_figures)",
    )
    args = parser.parse_args(argv)
    as_count = [int(v) if float(v).is_integer() and v >= 1 else v for v in (args.n_val, args.n_test)]
    try:
        dm = LDCTDataModule(
            args.root, manifest=args.manifest, n_val=as_count[0], n_test=as_count[1], progress=True
        )
        print(dm.summary())
        print()
        print("noise SD estimated from the images (flat soft tissue):")
        print("\n".join(estimated_noise_table(dm)))
        print("\n".join(registration_lines(dm, args.figures or args.root / "registration_figures")))
    except (DataConfigError, DicomError, PairingError, ValueError) as exc:
        print(f"ldct-data-summary: error: {exc}", file=sys.stderr)
        return 2
    print("\n".join(synthetic_noise_lines(args.root)))
    overview = args.root / "overview.png"
    if overview.is_file():
        print(f"\noverview figure: {overview}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""`ldct-data-summary ROOT`: read a data set the way training does and print what is in it.

Scans the DICOM tree, pairs LDCT/NDCT series per patient, reads the patient split (or shows the one
training would make, without writing it: its parameters are the data config's, ``conf/data/dicom.yaml`` or
``synthetic.yaml``), builds the cache, registers the studies whose two series have their own frames of reference
(z offset found, residual, share of usable slices, one checkerboard figure per study), and prints one row per
series (split, hashed patient and series keys, dose tags, slices) with the
noise SD estimated from the images (flat soft tissue, :func:`ldct_lightning.data.noise.estimate_noise_sd_hu`).
For the synthetic set it also prints the noise measured against the noiseless truth (``summary.json``). Bad files are skipped with one warning each, and the exit code is
then 2; ``--strict`` stops at the first.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

from ldct_lightning.data.datamodule import LDCTDataModule
from ldct_lightning.data.noise import estimate_noise_sd_hu
from ldct_lightning.data.realism import realism_lines
from ldct_lightning.data.split_defaults import (
    data_config_kind,
    data_split_defaults,
    split_params,
    split_size,
)
from ldct_lightning.errors import LDCTError
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
    """The synthetic generator's own measurements: noise (noisy minus noiseless, in a liver ROI) and, for
    sets made since it exists, the realism report (tissue HU, noise per tissue, NPS, SPEC targets)."""
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
    if "realism" in summary:
        lines += ["", *realism_lines(summary["realism"])]
    return lines


def _split_line(dm: LDCTDataModule, existed: bool, kind: str) -> str:
    if existed:
        return f"split: read from {dm.split_file}"
    return (
        f"split: none yet at {dm.split_file}; shown is the one `train.py data={kind}` makes there "
        f"(n_val {dm.n_val}, n_test {dm.n_test}, seed {dm.split_seed}); nothing was written"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="ldct-data-summary",
        description="Read an LDCT/NDCT DICOM data set (or the synthetic set) as training does and summarise it. "
        "It reads an existing split and never writes one.",
    )
    parser.add_argument("root", type=Path, help="data folder (a DICOM tree or an ldct-simulate output)")
    parser.add_argument("--manifest", type=Path, default=None, help="CSV/YAML with each series' role")
    parser.add_argument(
        "--n-val",
        type=split_size,
        default=None,
        help="validation patients (count or fraction; default: the split file's, else the data config's)",
    )
    parser.add_argument(
        "--n-test", type=split_size, default=None, help="test patients (count, fraction or all)"
    )
    parser.add_argument("--strict", action="store_true", help="stop at the first bad file or series")
    parser.add_argument(
        "--figures",
        type=Path,
        default=None,
        help="folder of the per-study registration figures (default <root>/registration_figures)",
    )
    args = parser.parse_args(argv)
    kind = data_config_kind(args.root)
    split_file = args.root / "split.yaml"
    params = split_params(split_file, data_split_defaults(kind), args.n_val, args.n_test)
    existed = split_file.is_file()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            dm = LDCTDataModule(
                args.root,
                manifest=args.manifest,
                split_file=split_file,
                write_split=False,
                strict=args.strict,
                progress=True,
                **params,
            )
            print(dm.summary())
            print(_split_line(dm, existed, kind))
            print()
            print("noise SD estimated from the images (flat soft tissue):")
            print("\n".join(estimated_noise_table(dm)))
            print("\n".join(registration_lines(dm, args.figures or args.root / "registration_figures")))
        except LDCTError as exc:
            _print_warnings(caught)
            print(f"ldct-data-summary: error: {exc}", file=sys.stderr)
            return 2
    _print_warnings(caught)
    print("\n".join(synthetic_noise_lines(args.root)))
    overview = args.root / "overview.png"
    if overview.is_file():
        print(f"\noverview figure: {overview}")
    if dm.skipped:
        print(
            f"ldct-data-summary: error: {len(dm.skipped)} file(s) or series skipped (named in the warnings "
            "above); --strict stops at the first",
            file=sys.stderr,
        )
        return 2
    return 0


def _print_warnings(caught: list[warnings.WarningMessage]) -> None:
    """Warnings as one line each (they are for users, not developers)."""
    for w in caught:
        print(f"ldct-data-summary: warning: {w.message}", file=sys.stderr)


if __name__ == "__main__":
    raise SystemExit(main())

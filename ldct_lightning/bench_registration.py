"""Registration benchmark: error of the cross-study registration against the synthetic truth, and time per study.

The synthetic generator keeps the exact rigid LDCT -> NDCT map of every patient (``ld_to_nd_matrix`` and
``ld_to_nd_offset`` in ``truth/<patient_key>.npz``; the table offset included). For every study the
registration's map is compared with it on body voxels of the LDCT: the median |z error| (mm) and median
in-plane error (pixels). Breathing and the smooth warp of the synthetic pose are not rigid, so a rigid or
affine fit cannot reach 0. Targets (issue 13): rigid <= 1 mm in z and <= 1 pixel in-plane (median).

Usage: ``python -m ldct_lightning.bench_registration --out bench/registration.json [--data DIR | --preset
bench] [--n-patients 4] [--image-size 256] [--deformable bspline]``
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from ldct_lightning.data.datamodule import LDCTDataModule
from ldct_lightning.data.synthetic import PRESETS, generate_dataset

TARGETS = {"z_error_mm_median": 1.0, "inplane_error_px_median": 1.0}


def correspondence_error(patient: Any, truth: Any, step: int = 4) -> dict[str, float]:
    """Median z (mm) and in-plane (px) error of a patient's correspondence against the truth's rigid map."""
    c = patient.correspondence
    ld = np.asarray(patient.ldct)
    k, r, col = np.meshgrid(
        np.arange(ld.shape[0]),
        np.arange(0, ld.shape[1], step),
        np.arange(0, ld.shape[2], step),
        indexing="ij",
    )
    body = ld[k, r, col] > -500
    points = c.ldct.to_physical(k[body].astype(float), r[body], col[body])
    true = points @ np.asarray(truth["ld_to_nd_matrix"]).T + np.asarray(truth["ld_to_nd_offset"])
    error = c.map_points(points) - true
    return {
        "z_error_mm_median": float(np.median(np.abs(error[:, 2]))),
        "inplane_error_px_median": float(np.median(np.hypot(error[:, 0], error[:, 1])) / c.ldct.pixel_mm[0]),
    }


def run(root: Path, registration: dict[str, Any], cache_dir: Path) -> dict[str, Any]:
    """Register every study of the data set at ``root`` and score it against its truth."""
    dm = LDCTDataModule(
        root,
        cache_dir=cache_dir,
        split_file=cache_dir / "split.yaml",
        n_val=0,
        n_test=0,
        num_workers=0,
        registration={"mode": "always", **registration},
    )
    start = time.perf_counter()
    info = dm.register_studies(("train",))
    rows = []
    for p in dm.patients("train"):
        truth = np.load(root / "truth" / f"{p.patient_key}.npz")
        row = {"patient_key": p.patient_key, "table_offset_mm": float(truth["table_offset_mm"])}
        row |= {
            k: info[p.patient_key][k]
            for k in ("z_offset_mm", "ncc_median", "usable_fraction", "stages", "seconds")
        }
        row |= correspondence_error(p, truth)
        rows.append(row)
    summary: dict[str, Any] = {"patients": rows, "failed": sorted(dm.left_out)}
    if rows:
        for key in ("z_error_mm_median", "inplane_error_px_median", "seconds"):
            values = [r[key] for r in rows]
            summary[f"{key}_median_over_studies"] = float(np.median(values))
            summary[f"{key}_max_over_studies"] = float(np.max(values))
        summary["meets_targets"] = all(summary[f"{k}_median_over_studies"] <= v for k, v in TARGETS.items())
    summary["seconds_total"] = round(time.perf_counter() - start, 2)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ldct_lightning.bench_registration", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--out", type=Path, default=Path("bench/registration.json"))
    parser.add_argument(
        "--data", type=Path, default=None, help="an ldct-simulate output (default: generate one)"
    )
    parser.add_argument("--preset", default="bench", choices=sorted(PRESETS))
    parser.add_argument("--n-patients", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=None, help="resize the preset (same field of view)")
    parser.add_argument("--deformable", default="none", choices=["none", "bspline"])
    parser.add_argument("--no-affine", action="store_true")
    args = parser.parse_args(argv)
    registration = {"deformable": args.deformable, "affine": not args.no_affine}
    with tempfile.TemporaryDirectory(prefix="ldct-bench-reg-") as tmp:
        cfg = None
        root = args.data
        if root is None:
            cfg = dataclasses.replace(PRESETS[args.preset], n_patients=args.n_patients)
            if args.image_size:
                cfg = cfg.resized(args.image_size)
            root = Path(tmp) / "data"
            generate_dataset(root, cfg, progress=False)
        result = run(root, registration, Path(tmp) / "cache")
    result = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "data": str(args.data) if args.data else dataclasses.asdict(cfg),
        "registration": registration,
        "targets": TARGETS,
        **result,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "patients"}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Quality benchmark (`make bench-quality`): every method's reference metrics on held-out patients.

After ``train.py -m experiment=bench_quality model=attention_unet,redcnn,pix2pix,cyclegan,oracle`` (one job per
method), this evaluates the jobs of that multirun (``ldct-evaluate --sweep``: with firstStep, the proposed job's
stage-1 checkpoint; and BM3D when the extra is installed) with ``ldct-evaluate`` on the test patients, and writes a JSON file and a
Markdown table: reference-protocol PSNR and SSIM in the abdomen window and RMSE in HU on the whole slice, per
method with the LDCT input row, and each job's training budget and wall time.

Usage: ``python -m ldct_lightning.bench_quality --data data/bench --sweep SWEEP_DIR --out bench/quality.json``
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from ldct_lightning.bench import machine
from ldct_lightning.cli import evaluate as evaluate_cli

PROG = "python -m ldct_lightning.bench_quality"
# (summary.csv metric, JSON key, Markdown header, digits)
METRICS = (
    ("psnr_abdomen", "psnr_abdomen_db", "PSNR abdomen (dB)", 2),
    ("ssim_abdomen", "ssim_abdomen", "SSIM abdomen", 3),
    ("rmse_hu", "rmse_hu", "RMSE (HU)", 1),
)
INPUT_ROW = "LDCT"


def sweep_jobs(sweep: Path) -> list[dict[str, Any]]:
    """Each finished job of a multirun: its method name, stages with budget and cost, and checkpoints.

    Args:
        sweep: the multirun folder (``<n>_<name>_s<seed>/`` with ``run_info.yaml`` and ``summary.yaml``).

    Returns:
        One dict per job: ``name``, ``dir`` and ``stages`` (stage -> epochs, crops per epoch, batch, crop size,
        training batches, fit seconds, device, best and last checkpoint).
    """
    jobs = []
    for summary_file in sorted(sweep.glob("*/summary.yaml")):
        summary = yaml.safe_load(summary_file.read_text()) or {}
        config = yaml.safe_load((summary_file.parent / "run_info.yaml").read_text())["config"]
        stages = {}
        for stage, result in summary.items():
            stage_cfg = config["stages"][stage]
            data = {**config["data"], **stage_cfg.get("data", {})}
            stages[stage] = {
                "epochs": stage_cfg["max_epochs"],
                "crops_per_epoch": data.get("samples_per_epoch"),
                "batch_size": data["batch_size"],
                "crop_size": data["crop_size"],
                "train_batches": result.get("train_batches"),
                "fit_seconds": result.get("fit_seconds"),
                "device": result.get("device"),
                "best_ckpt": result.get("best_ckpt"),
                "last_ckpt": result.get("last_ckpt"),
            }
        jobs.append({"name": config["ablation"]["name"], "dir": str(summary_file.parent), "stages": stages})
    return jobs


def quality_rows(summary_csv: Path, methods: list[str]) -> list[dict[str, Any]]:
    """Per method the whole-slice reference metrics (mean and SD over patients) from ``stats/summary.csv``.

    Args:
        summary_csv: ``ldct-evaluate``'s ``stats/summary.csv``.
        methods: the methods in table order.

    Returns:
        One dict per method with ``method``, ``n_patients`` and ``<key>_mean`` / ``<key>_sd`` per metric.
    """
    wanted = {metric: key for metric, key, _, _ in METRICS}
    rows: dict[str, dict[str, Any]] = {m: {"method": m} for m in methods}
    with summary_csv.open(newline="") as f:
        for rec in csv.DictReader(f):
            if rec["protocol"] != "reference" or rec["roi"] != "slice" or rec["metric"] not in wanted:
                continue
            if rec["method"] not in rows:
                continue
            row, key = rows[rec["method"]], wanted[rec["metric"]]
            row[f"{key}_mean"] = float(rec["mean"])
            row[f"{key}_sd"] = float(rec["sd"]) if rec["sd"] not in ("", "nan") else None
            row["n_patients"] = int(rec["n_patients"])
    missing = [m for m, row in rows.items() if len(row) == 1]
    if missing:
        raise ValueError(f"{summary_csv}: no reference-protocol whole-slice metrics for {missing}")
    return list(rows.values())


def markdown_table(rows: list[dict[str, Any]], jobs_by_method: dict[str, str]) -> str:
    """The Markdown quality table: mean ± SD over patients, and the training cost of each row."""
    header = ["Method", *(h for _, _, h, _ in METRICS), "Training (updates, wall time)"]
    lines = ["| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 2) + "|---|"]
    for row in rows:
        cells = [row["method"]]
        for _, key, _, digits in METRICS:
            mean, sd = row[f"{key}_mean"], row.get(f"{key}_sd")
            cells.append(f"{mean:.{digits}f}" + (f" ± {sd:.{digits}f}" if sd is not None else ""))
        cells.append(jobs_by_method.get(row["method"], "-"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cost(stage: dict[str, Any]) -> str:
    seconds = stage.get("fit_seconds")
    if seconds is None:
        wall = "wall time not recorded"
    else:
        wall = f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"
    batches = stage.get("train_batches")
    return f"{batches if batches is not None else '?'} × {stage['batch_size']} crops of {stage['crop_size']}², {wall}"


def training_costs(jobs: list[dict[str, Any]], proposed: str) -> dict[str, str]:
    """Method name -> a short description of its training budget and wall time (stages joined by +)."""
    costs = {job["name"]: " + ".join(_cost(s) for s in job["stages"].values()) for job in jobs}
    for job in jobs:
        if job["name"] == proposed and "first" in job["stages"] and "second" in job["stages"]:
            costs["firstStep"] = _cost(job["stages"]["first"]) + f" (stage 1 of {proposed})"
    costs[INPUT_ROW] = "none"
    costs["BM3D"] = "none (no training)"
    return costs


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument(
        "--data", type=Path, required=True, help="the bench data set (ldct-simulate --preset bench)"
    )
    p.add_argument("--sweep", type=Path, required=True, help="the train.py multirun folder of the methods")
    p.add_argument("--out", type=Path, default=Path("bench/quality.json"), help="JSON file (a .md beside it)")
    p.add_argument(
        "--evaluation",
        type=Path,
        default=None,
        help="ldct-evaluate report folder (default SWEEP/evaluation); with --no-evaluate, an existing one",
    )
    p.add_argument("--no-evaluate", action="store_true", help="only collect an existing --evaluation folder")
    p.add_argument(
        "--proposed", default="proposed", help="name of the proposed method's job (default proposed)"
    )
    p.add_argument(
        "--bm3d",
        default="auto",
        help="BM3D noise SD in HU, 'auto' (estimated; default) or 'off'; skipped when bm3d is not installed",
    )
    p.add_argument("--device", default="cpu", help="evaluation device: cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--max-slices", type=int, default=None, help="at most N slices per test patient")
    return p


def main(argv: list[str] | None = None) -> int:
    """Evaluate the sweep's methods and write the quality JSON and Markdown table.

    Args:
        argv: arguments (default ``sys.argv[1:]``).

    Returns:
        The exit code: 0 success, 2 bad input (or ``ldct-evaluate``'s code when it fails).
    """
    args = build_parser().parse_args(argv)
    if not args.sweep.is_dir():
        print(f"{PROG}: error: --sweep {args.sweep}: not a folder. Run the multirun first", file=sys.stderr)
        return 2
    jobs = sweep_jobs(args.sweep)
    if not jobs:
        print(f"{PROG}: error: --sweep {args.sweep}: no finished job (no */summary.yaml)", file=sys.stderr)
        return 2
    evaluation = args.evaluation or args.sweep / "evaluation"
    if not args.no_evaluate:
        eval_args = ["--data", str(args.data), "--sweep", str(args.sweep), "--proposed", args.proposed]
        eval_args += ["--out", str(evaluation), "--overwrite", "--protocols", "reference", "--no-volumes"]
        eval_args += ["--device", args.device]
        if args.max_slices is not None:
            eval_args += ["--max-slices", str(args.max_slices)]
        if args.bm3d != "off":
            try:
                import bm3d  # noqa: F401
            except ImportError:
                print(f"{PROG}: bm3d is not installed (pip install -e .[bm3d]): no BM3D row", file=sys.stderr)
            else:
                eval_args += ["--bm3d", args.bm3d]
        print("+ ldct-evaluate " + " ".join(eval_args), file=sys.stderr)
        code = evaluate_cli.main(eval_args)
        if code:
            return code
    info_file = evaluation / "evaluation.json"
    if not info_file.is_file():
        print(f"{PROG}: error: {info_file}: no evaluation there. Run without --no-evaluate", file=sys.stderr)
        return 2
    info = json.loads(info_file.read_text())
    rows = quality_rows(evaluation / "stats" / "summary.csv", info["methods_order"])
    costs = training_costs(jobs, args.proposed)
    data_summary = args.data / "summary.json"
    result = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "data": {
            "folder": str(args.data),
            "synthetic": json.loads(data_summary.read_text()).get("config")
            if data_summary.is_file()
            else None,
            "test": info["data"],
            "n_test_patients": info["n_patients"],
            "n_test_slices": info["n_slices"],
        },
        "protocol": "reference: whole slice against the aligned noiseless truth; PSNR/SSIM in the abdomen "
        "window C40/W400 (data range 1 after windowing), RMSE in HU; mean and SD over test patients",
        "methods": rows,
        "jobs": jobs,
        "evaluation_seconds_per_slice": info.get("seconds_per_slice"),
        "evaluation": str(evaluation),
    }
    md = (
        f"# Quality benchmark\n\n{result['protocol']}; {info['n_patients']} held-out patients, "
        f"{info['n_slices']} slices; {info['data']}.\n\n"
        f"{markdown_table(rows, costs)}\n\n"
        f"Machine: {result['machine']['cuda'] or 'CPU only'}, {result['machine']['cpu_count']} CPU cores, "
        f"torch {result['machine']['torch']}. Full report: {evaluation / 'report.md'}\n"
    )
    _write_atomic(args.out, json.dumps(result, indent=2))
    _write_atomic(args.out.with_suffix(".md"), md)
    print(md)
    print(f"{PROG}: wrote {args.out} and {args.out.with_suffix('.md')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

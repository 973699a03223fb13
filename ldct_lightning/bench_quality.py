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
import statistics
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ldct_lightning.atomic import write_text_atomic
from ldct_lightning.bench import machine
from ldct_lightning.cli import evaluate as evaluate_cli
from ldct_lightning.runs import RunError, Sweep, split_seed

PROG = "python -m ldct_lightning.bench_quality"
# (summary.csv metric, JSON key, Markdown header, digits)
METRICS = (
    ("slice", "psnr_abdomen", "psnr_abdomen_db", "PSNR abdomen (dB)", 2),
    ("slice", "ssim_abdomen", "ssim_abdomen", "SSIM abdomen", 3),
    ("slice", "rmse_hu", "rmse_hu", "RMSE (HU)", 1),
    ("bone_band", "psnr_abdomen", "bone_band_psnr_abdomen_db", "bone band PSNR (dB)", 2),
    ("slice", "max_abs_err_hu", "max_abs_err_hu", "max abs error (HU)", 0),
)
INPUT_ROW = "LDCT"
# issue targets checked on every run (reference protocol, whole slice, abdomen window)
GAIN_OVER_FIRST_DB = 0.5
GAIN_OVER_INPUT_DB = 3.0


def sweep_jobs(sweep: Path) -> list[dict[str, Any]]:
    """Each finished job of a multirun: its method name, stages with budget and cost, and checkpoints.

    Args:
        sweep: the multirun folder (:class:`ldct_lightning.runs.Sweep`).

    Returns:
        One dict per job: ``name``, ``dir`` and ``stages`` (stage -> epochs, crops per epoch, batch, crop size,
        training batches, fit seconds, device, best and last checkpoint).

    Raises:
        RunError: no job has finished.
    """
    jobs = []
    for run in Sweep(sweep).jobs():
        stages = {}
        for stage, result in run.summary().items():
            stage_cfg = run.stage_config(stage)
            data = stage_cfg["data"]
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
        jobs.append({"name": run.ablation, "dir": str(run.root), "stages": stages})
    return jobs


def read_summary(summary_csv: Path) -> dict[tuple[str, str, str], dict[str, Any]]:
    """The reference-protocol records of ``stats/summary.csv``, keyed by (method, roi, metric)."""
    records = {}
    with summary_csv.open(newline="") as f:
        for rec in csv.DictReader(f):
            if rec["protocol"] == "reference":
                records[(rec["method"], rec["roi"], rec["metric"])] = rec
    return records


def quality_rows(summary_csv: Path, methods: list[str]) -> list[dict[str, Any]]:
    """Per method the whole-slice (and bone-band) reference metrics, mean and SD over patients.

    Args:
        summary_csv: ``ldct-evaluate``'s ``stats/summary.csv``.
        methods: the methods in table order.

    Returns:
        One dict per method with ``method``, ``n_patients`` and ``<key>_mean`` / ``<key>_sd`` per metric
        (a metric the evaluation does not have, e.g. the bone band of slices without bone, is left out).
    """
    records = read_summary(summary_csv)
    rows = []
    for method in methods:
        row: dict[str, Any] = {"method": method}
        for roi, metric, key, _, _ in METRICS:
            rec = records.get((method, roi, metric))
            if rec is None:
                continue
            row[f"{key}_mean"] = float(rec["mean"])
            row[f"{key}_sd"] = float(rec["sd"]) if rec["sd"] not in ("", "nan") else None
            row["n_patients"] = int(rec["n_patients"])
        if "psnr_abdomen_db_mean" not in row:
            raise ValueError(f"{summary_csv}: no reference-protocol whole-slice metrics for {method!r}")
        rows.append(row)
    return rows


def over_seeds(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows of one method over several seeds merged: mean and SD over the seeds' patient means.

    A row without a seed suffix (LDCT, BM3D, a single-seed job) is kept as it is (SD over patients).

    Args:
        rows: :func:`quality_rows` output, seed rows named ``<method>_s<seed>``.

    Returns:
        One row per method in first-seen order; a merged row has ``seeds`` and ``<key>_per_seed``, and its
        ``<key>_sd`` is the SD over seeds (None for one seed).
    """
    groups: dict[str, list[tuple[int | None, dict[str, Any]]]] = {}
    for row in rows:
        method, seed = split_seed(row["method"])
        groups.setdefault(method, []).append((seed, row))  # method is the whole name when it has no seed
    merged = []
    for method, members in groups.items():
        if members[0][0] is None:
            merged.extend(row for _, row in members)
            continue
        out: dict[str, Any] = {"method": method, "seeds": [seed for seed, _ in members]}
        out["n_patients"] = members[0][1]["n_patients"]
        for *_, key, _, _ in METRICS:
            values = [row[f"{key}_mean"] for _, row in members if f"{key}_mean" in row]
            if len(values) != len(members):
                continue
            out[f"{key}_per_seed"] = values
            out[f"{key}_mean"] = statistics.fmean(values)
            out[f"{key}_sd"] = statistics.stdev(values) if len(values) > 1 else None
        merged.append(out)
    return merged


def rois_below_input(summary_csv: Path, methods: list[str]) -> dict[str, list[str]]:
    """Per method the reference ROIs (bone band included) whose PSNR is below the LDCT input's in a window
    that shows them (each window where the evaluation scored the ROI: at least half of its reference pixels
    inside the window's grey range, ``metrics.READABLE_SHARE``; e.g. the lung in the lung window only).

    Args:
        summary_csv: ``ldct-evaluate``'s ``stats/summary.csv``.
        methods: the methods (seed rows as they are named in the evaluation).

    Returns:
        Method -> sorted names where the method's mean PSNR is lower than the input's (empty: none): ``roi``
        for the abdomen window, ``roi (<window> window)`` for another.
    """
    records = read_summary(summary_csv)
    scored = sorted(
        {(roi, metric) for (m, roi, metric) in records if m == INPUT_ROW and metric.startswith("psnr_")}
    )

    def name(roi: str, metric: str) -> str:
        window = metric.removeprefix("psnr_")
        return roi if window == "abdomen" else f"{roi} ({window} window)"

    return {
        method: sorted(
            name(roi, metric)
            for roi, metric in scored
            if (method, roi, metric) in records
            and float(records[(method, roi, metric)]["mean"])
            < float(records[(INPUT_ROW, roi, metric)]["mean"])
        )
        for method in methods
    }


def target_checks(
    rows: list[dict[str, Any]], below: dict[str, list[str]], proposed: str
) -> list[dict[str, Any]]:
    """The two-stage targets on the merged rows: each check with its numbers and whether it holds.

    Args:
        rows: :func:`over_seeds` output.
        below: :func:`rois_below_input` output (seed rows).
        proposed: the proposed method's name.

    Returns:
        One dict per check (``check``, ``value``, ``target``, ``met``); empty when a needed row is absent.
    """
    by_name = {row["method"]: row for row in rows}
    if not {proposed, "firstStep", INPUT_ROW} <= set(by_name):
        return []
    psnr = {name: by_name[name]["psnr_abdomen_db_mean"] for name in (proposed, "firstStep", INPUT_ROW)}
    rmse = {name: by_name[name]["rmse_hu_mean"] for name in (proposed, INPUT_ROW)}
    below_proposed = sorted(
        {roi for m, rois in below.items() if split_seed(m)[0] == proposed for roi in rois}
    )
    return [
        {
            "check": f"{proposed} >= firstStep + {GAIN_OVER_FIRST_DB} dB (PSNR abdomen)",
            "value": round(psnr[proposed] - psnr["firstStep"], 2),
            "target": GAIN_OVER_FIRST_DB,
            "met": psnr[proposed] - psnr["firstStep"] >= GAIN_OVER_FIRST_DB,
        },
        {
            "check": f"{proposed} >= LDCT + {GAIN_OVER_INPUT_DB} dB (PSNR abdomen)",
            "value": round(psnr[proposed] - psnr[INPUT_ROW], 2),
            "target": GAIN_OVER_INPUT_DB,
            "met": psnr[proposed] - psnr[INPUT_ROW] >= GAIN_OVER_INPUT_DB,
        },
        {
            "check": f"{proposed} whole-slice RMSE below the input's (HU)",
            "value": round(rmse[proposed], 1),
            "target": round(rmse[INPUT_ROW], 1),
            "met": rmse[proposed] < rmse[INPUT_ROW],
        },
        {
            "check": f"no ROI of {proposed} (any seed) below the input (PSNR, each window that shows it)",
            "value": below_proposed,
            "target": [],
            "met": not below_proposed,
        },
    ]


def generalize_checks(
    rows: list[dict[str, Any]], below: dict[str, list[str]], proposed: str, classical: str = "NLM"
) -> list[dict[str, Any]]:
    """The generalisation targets (a model tested on another site's style): each with its numbers.

    firstStep and the proposed method each >= LDCT + 3 dB whole-slice abdomen PSNR, no ROI (bone band
    included) below the input, and above the classical baseline (non-local means).

    Args:
        rows: :func:`over_seeds` output.
        below: :func:`rois_below_input` output (seed rows).
        proposed: the proposed method's name.
        classical: the classical baseline's row.

    Returns:
        One dict per check (``check``, ``value``, ``target``, ``met``); checks of an absent row are left out.
    """
    by_name = {row["method"]: row for row in rows}
    if INPUT_ROW not in by_name:
        return []
    checks = []
    for method in (name for name in ("firstStep", proposed) if name in by_name):
        psnr = by_name[method]["psnr_abdomen_db_mean"]
        gain = psnr - by_name[INPUT_ROW]["psnr_abdomen_db_mean"]
        checks.append(
            {
                "check": f"{method} >= LDCT + {GAIN_OVER_INPUT_DB} dB (PSNR abdomen)",
                "value": round(gain, 2),
                "target": GAIN_OVER_INPUT_DB,
                "met": gain >= GAIN_OVER_INPUT_DB,
            }
        )
        rois = sorted({roi for m, r in below.items() if split_seed(m)[0] == method for roi in r})
        checks.append(
            {
                "check": f"no ROI of {method} (any seed) below the input (PSNR, each window that shows it)",
                "value": rois,
                "target": [],
                "met": not rois,
            }
        )
        if classical in by_name:
            margin = psnr - by_name[classical]["psnr_abdomen_db_mean"]
            checks.append(
                {
                    "check": f"{method} above {classical} (PSNR abdomen, dB)",
                    "value": round(margin, 2),
                    "target": 0.0,
                    "met": margin > 0,
                }
            )
    return checks


TARGETS = {"two-stage": target_checks, "generalize": generalize_checks}


def markdown_table(rows: list[dict[str, Any]], jobs_by_method: dict[str, str]) -> str:
    """The Markdown quality table: mean ± SD (over seeds for seeded rows, else over patients), training cost."""
    header = ["Method", *(h for *_, h, _ in METRICS), "Training (updates, wall time)"]
    lines = ["| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 2) + "|---|"]
    for row in rows:
        name = row["method"] + (f" ({len(row['seeds'])} seeds)" if len(row.get("seeds", [])) > 1 else "")
        cells = [name]
        for *_, key, _, digits in METRICS:
            mean, sd = row.get(f"{key}_mean"), row.get(f"{key}_sd")
            if mean is None:
                cells.append("-")
                continue
            cells.append(f"{mean:.{digits}f}" + (f" ± {sd:.{digits}f}" if sd is not None else ""))
        cells.append(jobs_by_method.get(row["method"], "-"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def checks_markdown(checks: list[dict[str, Any]], targets: str = "two-stage") -> str:
    """The target checks as a Markdown list (empty string when there are none)."""
    if not checks:
        return ""
    lines = [f"Targets ({targets} issue):", ""]
    for check in checks:
        mark = "met" if check["met"] else "**not met**"
        lines.append(f"- {check['check']}: {check['value']} (target {check['target']}): {mark}")
    return "\n".join(lines) + "\n\n"


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
    costs["BM3D"] = costs["NLM"] = "none (no training)"
    return costs


def evaluated_name(args: argparse.Namespace) -> str:
    """The proposed method's name as ``ldct-evaluate --sweep`` names it: its first seed's row with several seeds."""
    names = list(Sweep(args.sweep).methods())
    if args.proposed in names:
        return args.proposed
    seeded = sorted(
        (seed, name) for name in names for method, seed in [split_seed(name)] if method == args.proposed
    )
    return seeded[0][1] if seeded else args.proposed


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
    p.add_argument(
        "--nlm",
        default="auto",
        help="non-local means noise SD in HU, 'auto' (estimated per slice; default) or 'off'",
    )
    p.add_argument(
        "--targets",
        choices=sorted(TARGETS),
        default="two-stage",
        help="which issue's targets to check: two-stage (default; the method on its own data's test "
        "patients) or generalize (a model tested on another site's data)",
    )
    p.add_argument(
        "--all-test",
        action="store_true",
        help="every patient of --data is a test patient (a data set the models never saw; a new split "
        "file beside the evaluation folder, <EVALUATION>_split.yaml)",
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
    try:
        jobs = sweep_jobs(args.sweep)
    except RunError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    evaluation = args.evaluation or args.sweep / "evaluation"
    if not args.no_evaluate:
        eval_args = ["--data", str(args.data), "--sweep", str(args.sweep), "--proposed", evaluated_name(args)]
        eval_args += ["--out", str(evaluation), "--overwrite", "--protocols", "reference", "--no-volumes"]
        eval_args += ["--device", args.device]
        if args.max_slices is not None:
            eval_args += ["--max-slices", str(args.max_slices)]
        if args.all_test:
            split_file = evaluation.parent / f"{evaluation.name}_split.yaml"
            eval_args += ["--split-file", str(split_file), "--n-val", "0", "--n-test", "all"]
        if args.nlm != "off":
            eval_args += ["--nlm", args.nlm]
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
    summary_csv = evaluation / "stats" / "summary.csv"
    seed_rows = quality_rows(summary_csv, info["methods_order"])
    rows = over_seeds(seed_rows)
    checks = TARGETS[args.targets](rows, rois_below_input(summary_csv, info["methods_order"]), args.proposed)
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
        "window C40/W400 (data range 1 after windowing), RMSE and largest absolute error in HU; bone band: "
        "soft tissue 1-5 px from bone; mean and SD over test patients, or, for methods trained with several "
        "seeds, mean and SD over seeds of each seed's patient mean",
        "methods": rows,
        "methods_per_seed": seed_rows,
        "targets": args.targets,
        "checks": checks,
        "jobs": jobs,
        "evaluation_seconds_per_slice": info.get("seconds_per_slice"),
        "evaluation": str(evaluation),
    }
    md = (
        f"# Quality benchmark\n\n{result['protocol']}; {info['n_patients']} held-out patients, "
        f"{info['n_slices']} slices; {info['data']}.\n\n"
        f"{markdown_table(rows, costs)}\n\n"
        f"{checks_markdown(checks, args.targets)}"
        f"Machine: {result['machine']['cuda'] or 'CPU only'}, {result['machine']['cpu_count']} CPU cores, "
        f"torch {result['machine']['torch']}. Full report: {evaluation / 'report.md'}\n"
    )
    write_text_atomic(args.out, json.dumps(result, indent=2))
    write_text_atomic(args.out.with_suffix(".md"), md)
    print(md)
    print(f"{PROG}: wrote {args.out} and {args.out.with_suffix('.md')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

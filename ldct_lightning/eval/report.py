"""Assemble the evaluation report: tables (Markdown, CSV, LaTeX), statistics, figures and ``report.md``.

:func:`write_report` reads an evaluation folder written by :func:`ldct_lightning.eval.evaluate.evaluate` (or
takes its :class:`~ldct_lightning.eval.evaluate.EvaluationResult`) and writes beside it:

```
tables/paper_table3.{md,csv,tex}       Table 3 layout, every method, paper protocol
tables/paper_table4.{md,csv,tex}       Table 4 layout (proposed, oneStep, firstStep) when ablations were run
tables/reference_table3.{md,csv,tex}   windowed PSNR/SSIM and RMSE (HU) against the aligned reference
tables/reference_table4.{md,csv,tex}   the same for the ablations
tables/reference_noise.{md,csv,tex}    noise SD (HU) in uniform organs and lesion CNR
stats/tests.csv                        paired t-test and Wilcoxon vs the proposed method, raw and Holm p
stats/summary.csv                      mean, SD and n over patients per method, protocol, ROI, metric
figures/*.png|pdf                      comparison panels, HU histograms + KDE, difference maps
report.md                              all of the above with both protocol statements and method configs
```

Every number is a mean over patients of per-patient means (slices of one patient are not independent); the
tests pair patients. Patients appear only by their hashed key.
"""

from __future__ import annotations

import csv
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from ldct_lightning.atomic import write_text_atomic
from ldct_lightning.eval import figures as figs
from ldct_lightning.eval.evaluate import (
    INPUT,
    NDCT_NAME,
    REFERENCE_NAME,
    EvaluationResult,
    FigureSlice,
    figure_box,
    load_figure_slices,
)
from ldct_lightning.eval.metrics import BONE_BAND, NOISE_ROIS, PAPER, REFERENCE, SSIM_KWARGS
from ldct_lightning.eval.rois import LABEL_IDS, PAPER_ROIS, Box, erode_mask
from ldct_lightning.eval.stats import PairedTestResult, compare_to_proposed, summarize
from ldct_lightning.eval.tables import (
    ABLATIONS,
    ResultTable,
    build_table,
    metric_label,
    table3,
    table4,
    to_csv,
    to_latex,
    to_markdown,
)

PAPER_TABLE_METRICS: tuple[str, ...] = ("psnr", "psnr_max1", "ssim", "rmse")
NOISE_METRICS: tuple[str, ...] = ("noise_sd_diff_hu", "sd_hu", "cnr")
TEST_FIELDS: tuple[str, ...] = (
    "method",
    "proposed",
    "protocol",
    "roi",
    "metric",
    "n",
    "mean_diff",
    "t_statistic",
    "p_ttest",
    "p_ttest_holm",
    "w_statistic",
    "p_wilcoxon",
    "p_wilcoxon_holm",
)
MIN_PATIENTS_FOR_TESTS = 3
MIN_PATIENTS_WILCOXON = 6  # two-sided exact signed-rank: the smallest p with n pairs is 2 / 2**n

PSNR_NOTE = (
    "PSNR conventions: 'PSNR' is eq. 11 as written, 10 log10(MAX^2 / MSE) with MAX = the maximum of the "
    "NDCT ROI crop (normalised units); 'PSNR (MAX=1)' takes MAX = 1, the top of the normalised range. The "
    "paper's published values (e.g. 47.64 dB with RMSE 0.0043) satisfy PSNR ~= -20 log10(RMSE), i.e. the "
    "MAX = 1 convention: compare with the paper on that row."
)


@dataclass
class ReportResult:
    """What :func:`write_report` wrote."""

    report_path: Path
    tables: dict[str, ResultTable]
    table_paths: dict[str, list[Path]]
    figure_paths: list[Path]
    tests_path: Path | None
    summary_path: Path | None
    notes: list[str] = field(default_factory=list)
    wandb_logged: bool = False


# ------------------------------------------------------------------------------------------ statistics


def merge_tests(
    ttests: Sequence[PairedTestResult], wtests: Sequence[PairedTestResult]
) -> list[dict[str, Any]]:
    """Join t-test and Wilcoxon results of the same comparison into one row (:data:`TEST_FIELDS`)."""
    wil = {(r["method"], r["protocol"], r["roi"], r["metric"]): r for r in wtests}
    rows = []
    for t in ttests:
        w = wil.get((t["method"], t["protocol"], t["roi"], t["metric"]))
        rows.append(
            {
                "method": t["method"],
                "proposed": t["proposed"],
                "protocol": t["protocol"],
                "roi": t["roi"],
                "metric": t["metric"],
                "n": t["n"],
                "mean_diff": t["mean_diff"],
                "t_statistic": t["statistic"],
                "p_ttest": t["p"],
                "p_ttest_holm": t["p_holm"],
                "w_statistic": w["statistic"] if w else float("nan"),
                "p_wilcoxon": w["p"] if w else float("nan"),
                "p_wilcoxon_holm": w["p_holm"] if w else float("nan"),
            }
        )
    return rows


def patient_count_warning(n_patients: int) -> str | None:
    """A warning line when too few patients make the paired tests meaningless (or Wilcoxon toothless)."""
    if n_patients < MIN_PATIENTS_FOR_TESTS:
        return (
            f"**Warning: only {n_patients} test patient(s).** Paired tests across patients need at least "
            f"{MIN_PATIENTS_FOR_TESTS} to mean anything; the p-values and `*` marks below are shown for "
            "completeness only. Evaluate on more patients before drawing conclusions."
        )
    if n_patients < MIN_PATIENTS_WILCOXON:
        return (
            f"Note: with {n_patients} patients the two-sided Wilcoxon signed-rank test cannot reach p < 0.05 "
            f"(its smallest p is {2 / 2**n_patients:.3g}); the t-test marks rely on normality."
        )
    return None


def _fmt_p(p: float, alpha: float) -> str:
    if p is None or (isinstance(p, float) and math.isnan(p)):
        return "-"
    return f"{p:.3g}" + ("*" if p < alpha else "")


def _fmt(v: float, digits: int = 4) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}g}"


def tests_markdown(
    rows: Sequence[Mapping[str, Any]], protocol: str, metrics: Sequence[str], alpha: float = 0.05
) -> str:
    """Markdown table of the paired tests of one protocol (metrics in the given order)."""
    order = {m: i for i, m in enumerate(metrics)}
    chosen = sorted(
        (r for r in rows if r["protocol"] == protocol and r["metric"] in order),
        key=lambda r: (order[r["metric"]], r["method"], r["roi"]),
    )
    if not chosen:
        return "_No paired tests (a single method, or no records)._\n"
    lines = [
        "| Metric | Method | ROI | n | mean diff (method - proposed) | t-test p | t-test p (Holm) "
        "| Wilcoxon p | Wilcoxon p (Holm) |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in chosen:
        lines.append(
            f"| {metric_label(r['metric'])} | {r['method']} | {r['roi']} | {r['n']} | {_fmt(r['mean_diff'])} "
            f"| {_fmt_p(r['p_ttest'], alpha)} | {_fmt_p(r['p_ttest_holm'], alpha)} "
            f"| {_fmt_p(r['p_wilcoxon'], alpha)} | {_fmt_p(r['p_wilcoxon_holm'], alpha)} |"
        )
    return "\n".join(lines) + "\n"


def _write_rows(path: Path, fields: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(fields), lineterminator="\n")
        writer.writeheader()
        writer.writerows({k: r[k] for k in fields} for r in rows)
    return path


# ---------------------------------------------------------------------------------------------- tables


def _present(records: Sequence[Mapping[str, Any]], protocol: str) -> tuple[set[str], set[str], set[str]]:
    rs = [r for r in records if r["protocol"] == protocol]
    return {r["method"] for r in rs}, {r["roi"] for r in rs}, {r["metric"] for r in rs}


def build_tables(
    result: EvaluationResult, ttests: Sequence[PairedTestResult], alpha: float = 0.05
) -> dict[str, ResultTable]:
    """The report's tables for the protocols that have records (see the module docstring for names)."""
    patients = result.patient_records
    proposed = result.proposed
    order = [m for m in result.methods if m != INPUT]
    baselines = [m for m in order if m != proposed]
    # the paper-literal proposed method (ablation=proposed_eq9) is a row of the ablation table when it was run
    ablations = [a for a in ("proposed_eq9", *ABLATIONS) if a in order and a != proposed]
    windows = list(result.info.get("windows", {"abdomen": None}))
    common = {"tests": ttests, "alpha": alpha, "with_sd": True, "mark": "p"}
    tables: dict[str, ResultTable] = {}
    n = result.n_patients

    methods, rois, metrics = _present(patients, PAPER)
    if INPUT in methods and proposed in methods:
        paper_metrics = [m for m in PAPER_TABLE_METRICS if m in metrics]
        paper_rois = [r for r in PAPER_ROIS if r in rois]
        kw = {**common, "protocol": PAPER, "metrics": paper_metrics, "rois": paper_rois}
        tables["paper_table3"] = table3(
            patients,
            baselines,
            proposed,
            title=f"Table 3 layout, paper protocol: methods on the ROIs against the NDCT ({n} patients)",
            **kw,
        )
        if ablations:
            tables["paper_table4"] = table4(
                patients,
                proposed,
                ablations,
                title=f"Table 4 layout, paper protocol: ablations ({n} patients)",
                **kw,
            )
        for key in ("paper_table3", "paper_table4"):
            if key in tables:
                tables[key].footnote += " " + PSNR_NOTE

    methods, rois, metrics = _present(patients, REFERENCE)
    if INPUT in methods and proposed in methods:
        ref_metrics = [m for w in windows for m in (f"psnr_{w}", f"ssim_{w}") if m in metrics]
        ref_metrics += [m for m in ("rmse_hu", "max_abs_err_hu") if m in metrics]
        ref_rois = [r for r in ("slice", *PAPER_ROIS, BONE_BAND) if r in rois]
        kw = {**common, "protocol": REFERENCE, "metrics": ref_metrics, "rois": ref_rois}
        tables["reference_table3"] = table3(
            patients,
            baselines,
            proposed,
            title=f"Reference protocol: windowed PSNR/SSIM (data range 1 after the window) and RMSE in HU "
            f"against the aligned ground truth ({n} patients)",
            **kw,
        )
        if ablations:
            tables["reference_table4"] = table4(
                patients,
                proposed,
                ablations,
                title=f"Reference protocol, ablations ({n} patients)",
                **kw,
            )
        noise_metrics = [m for m in NOISE_METRICS if m in metrics]
        noise_rois = [r for r in (*NOISE_ROIS, "lesion") if r in rois]
        if noise_metrics and noise_rois:
            tables["reference_noise"] = build_table(
                patients,
                [*baselines, proposed],
                proposed=proposed,
                protocol=REFERENCE,
                metrics=noise_metrics,
                rois=noise_rois,
                title=f"Reference protocol: noise SD (HU) in eroded uniform-organ masks and lesion CNR "
                f"({n} patients)",
                **common,
            )
    return tables


def write_tables(tables: Mapping[str, ResultTable], out_dir: Path) -> dict[str, list[Path]]:
    """Write each table as ``<name>.md``, ``.csv`` and ``.tex`` under ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, table in tables.items():
        paths = []
        for suffix, render in ((".md", to_markdown), (".csv", to_csv), (".tex", to_latex)):
            path = out_dir / f"{name}{suffix}"
            path.write_text(render(table))
            paths.append(path)
        written[name] = paths
    return written


def log_tables_to_wandb(tables: Mapping[str, ResultTable], prefix: str = "eval") -> bool:
    """Log tables as ``wandb.Table`` when a W&B run is active (never imports or starts wandb itself).

    Returns:
        Whether anything was logged.
    """
    wandb = sys.modules.get("wandb")
    if wandb is None or getattr(wandb, "run", None) is None or not tables:
        return False
    wandb.run.log(
        {f"{prefix}/{name}": wandb.Table(columns=t.header(), data=t.rows()) for name, t in tables.items()}
    )
    return True


# --------------------------------------------------------------------------------------------- figures


def _figure_rois(fs: FigureSlice, as_boxes: bool) -> dict[str, Box | np.ndarray]:
    """Liver and heart ROIs of a figure slice: boxes from the boxes file, else label masks (or zoom boxes)."""
    rois: dict[str, Box | np.ndarray] = {}
    for name in ("liver", "heart", "spleen", "muscle"):
        if len(rois) == 2:
            break
        if name in fs.boxes:
            rois[name] = fs.boxes[name]
        elif fs.labels is not None:
            mask = fs.labels == LABEL_IDS[name]
            if not mask.any():
                continue
            if as_boxes:
                rois[name] = figure_box(mask, max(16, min(mask.shape) // 5))
            else:
                eroded = erode_mask(mask, 2)
                if eroded.sum() >= 10:
                    rois[name] = eroded
    return rois


def _roi_values(image: np.ndarray, roi: Box | np.ndarray) -> np.ndarray:
    return np.asarray(image)[roi.slices] if isinstance(roi, Box) else np.asarray(image)[roi]


def ndct_label(info: dict) -> str:
    """How the NDCT of the figures relates to the input (per-slice rigid, 3-D registered, or not aligned)."""
    if info.get("register"):
        return "NDCT, rigidly registered to the input"
    if info.get("ndct_registration_3d"):
        return "NDCT, registered in 3-D onto the input"
    return "NDCT, nearest slice in z, not aligned"


def make_figures(
    slices: Sequence[FigureSlice], out_dir: Path, ndct_caption: str, window: str = "abdomen"
) -> tuple[list[tuple[str, Path]], list[str]]:
    """Comparison panels, HU histograms + KDE and difference maps for each figure slice.

    Args:
        slices: the figure slices.
        out_dir: folder of the PNG files.
        ndct_caption: the NDCT panel's caption (:func:`ndct_label`).
        window: display window of the panels.

    Returns:
        ``[(caption, png path)]`` and notes on figures that could not be drawn.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    shown: list[tuple[str, Path]] = []
    notes: list[str] = []
    for i, fs in enumerate(slices, start=1):
        where = f"patient {fs.patient_key}, slice {fs.slice_index}"
        panel = {**fs.images, **fs.extras}
        zoom = _figure_rois(fs, as_boxes=True)
        try:
            paths = figs.comparison_panel(
                panel, out_dir / f"comparison_{i}", window=window, boxes=list(zoom.values()), title=where
            )
            extras = ", ".join(
                (ndct_caption if n == NDCT_NAME else "aligned clean reference") for n in fs.extras
            )
            shown.append(
                (
                    f"Comparison ({where}, {window} window): input, methods"
                    + (f", {extras}" if extras else "")
                    + (f"; zooms: {', '.join(zoom)}" if zoom else ""),
                    paths[0],
                )
            )
        except ValueError as e:
            notes.append(f"comparison panel {i} not drawn: {e}")

        hist_rois = _figure_rois(fs, as_boxes=False)
        if hist_rois:
            # a KDE needs spread: a noiseless reference (or a method's flat output) in an ROI has none
            drawable = {
                n: img
                for n, img in {**fs.images, **fs.extras}.items()
                if all(np.ptp(_roi_values(img, roi)) > 0 for roi in hist_rois.values())
            }
            flat = [n for n in (*fs.images, *fs.extras) if n not in drawable]
            if flat:
                notes.append(
                    f"HU histograms {i}: {', '.join(flat)} left out (constant inside an ROI, no density to draw)"
                )
            ref_name = next((n for n in (REFERENCE_NAME, NDCT_NAME) if n in drawable), None)
            images = {n: drawable[n] for n in fs.images if n in drawable}
            if ref_name is not None:
                images[ref_name] = drawable[ref_name]
            try:
                if not images:
                    raise ValueError("every image is constant inside an ROI")
                paths = figs.hu_histograms(images, hist_rois, out_dir / f"histograms_{i}", reference=ref_name)
                against = {REFERENCE_NAME: "the aligned reference", NDCT_NAME: ndct_caption}.get(ref_name, "")
                shown.append(
                    (
                        f"HU histograms and KDE in {', '.join(hist_rois)} ({where})"
                        + (f"; thick black line: {against}" if against else ""),
                        paths[0],
                    )
                )
            except ValueError as e:
                notes.append(f"HU histograms {i} not drawn: {e}")
        else:
            notes.append(f"HU histograms {i} not drawn: no liver or heart ROI on {where}")

        if REFERENCE_NAME in fs.extras:
            try:
                paths = figs.difference_maps(
                    fs.images,
                    fs.extras[REFERENCE_NAME],
                    out_dir / f"difference_{i}",
                    reference_name="reference",
                )
                shown.append((f"Difference to the aligned reference, HU ({where})", paths[0]))
            except ValueError as e:
                notes.append(f"difference maps {i} not drawn: {e}")
    return shown, notes


# ---------------------------------------------------------------------------------------------- report


def _window_text(windows: Mapping[str, Sequence[float]]) -> str:
    return ", ".join(f"{name} C{c:g}/W{w:g}" for name, (c, w) in windows.items())


def protocol_statements(result: EvaluationResult) -> dict[str, str]:
    """The two protocol statements of the report (always both, saying when one was not computed)."""
    info = result.info
    hu_min, hu_max = info.get("hu_range", [-1024.0, 3071.0])
    registration = result.registration
    if info.get("register"):
        before = np.nanmean([r["rmse_before_hu"] for r in registration]) if registration else float("nan")
        after = np.nanmean([r["rmse_after_hu"] for r in registration]) if registration else float("nan")
        valid = np.nanmean([r["valid_fraction"] for r in registration]) if registration else float("nan")
        kind = "translation and rotation" if info.get("register_rotation") else "translation"
        align = (
            f"Each NDCT slice was rigidly registered to the input before scoring ({kind}: "
            "skimage phase_cross_correlation, sub-pixel). Residual RMSE between input and registered NDCT: "
            f"{after:.1f} HU (before: {before:.1f} HU; it includes the input's own noise), mean over "
            f"{len(registration)} slices; {100 * valid:.1f}% of the pixels lie inside the moved image on "
            "average. The residual bounds how aligned the pair is: read the scores with it."
        )
    elif info.get("ndct_registration_3d"):
        studies = info["ndct_registration_3d"].values()
        ncc = np.nanmean([float(r.get("ncc_median") or np.nan) for r in studies])
        residual = np.nanmean([float(r.get("residual_hu") or np.nan) for r in studies])
        align = (
            f"The LDCT and NDCT of the {len(studies)} test studies lie in two frames of reference: the NDCT "
            "volume was registered in 3-D onto the input (SimpleITK, rigid, then affine where kept; "
            "ldct_lightning/registration) and resampled onto its slices. Median NCC inside the body "
            f"{ncc:.3f}, residual {residual:.1f} HU (median |input - registered NDCT| after smoothing), means over "
            "studies (evaluation.json, ndct_registration_3d). Breathing and organ motion are not undone by a "
            "rigid/affine map: read the scores with the residual."
        )
    else:
        align = (
            "The NDCT is the slice nearest in z from a separate acquisition and is NOT aligned with the input "
            "(no registration was run; pass --register to register it rigidly): these numbers measure "
            "similarity to a different image of the same anatomy, not error."
        )
    paper_done = PAPER in result.protocols
    paper = (
        "**Paper protocol** (Hu et al. 2024, eq. 10-12): images normalised to [0, 1] (HU clipped to "
        f"[{hu_min:g}, {hu_max:g}]); PSNR, SSIM (Gaussian window sigma 1.5, data range 1) and RMSE (eq. 12, "
        "normalised units) on the crop of each ROI (heart, liver, spleen, muscle), input and methods against "
        f"the NDCT. ROIs from: {info.get('roi_source', 'n/a')}. {align} {PSNR_NOTE}"
    )
    if not paper_done:
        why = (
            "it was not requested"
            if PAPER not in info.get("protocols_requested", [])
            else "no slice had both an NDCT of the input's matrix and an ROI (give a boxes file with --boxes)"
        )
        paper += f" **Not computed: {why}.**"
    windows = info.get("windows", {})
    reference = (
        "**Reference protocol** (an aligned clean ground truth exists, e.g. the synthetic set's noiseless "
        f"reconstruction): PSNR and SSIM after display windows ({_window_text(windows)}), each with data "
        "range 1 = the window width; SSIM per Wang et al. 2004 (Gaussian sigma "
        f"{SSIM_KWARGS['sigma']}, population covariance), the slice mean leaving out the 5-pixel border, the "
        "ROI mean over the mask; RMSE in HU without clipping; on the full slice ('Full slice') and on each "
        "ROI mask. Noise SD of difference = SD of (image - reference) in the organ mask eroded by 2 pixels; "
        "SD = SD of the image itself there; lesion CNR = |mean(lesion) - mean(ring)| / SD(ring), a 5-pixel "
        "ring in the liver around each lesion."
    )
    if REFERENCE not in result.protocols:
        why = (
            "it was not requested"
            if REFERENCE not in info.get("protocols_requested", [])
            else "the data set has no aligned ground truth"
        )
        reference += f" **Not computed: {why}.**"
    return {PAPER: paper, REFERENCE: reference}


def _method_section(name: str, entry: Mapping[str, Any]) -> list[str]:
    config = dict(entry.get("config") or {})
    lines = [f"### {name}", "", entry.get("description") or "", ""]
    run_info = config.pop("run_info", None)
    if config.get("kind") == "checkpoint":
        lines += [
            f"- checkpoint: `{config.get('checkpoint')}`",
            f"- sha256: `{config.get('sha256')}`",
            f"- generator: {config.get('generator_class')} ({config.get('generator_parameters')} parameters), "
            f"architecture from `{config.get('generator_config_source')}`",
            f"- inference: `{config.get('inference')}`",
            "",
        ]
        if run_info:
            lines += [
                f"<details><summary>Run config (<code>{config.get('run_info_path')}</code>)</summary>",
                "",
                "```yaml",
                yaml.safe_dump(run_info, sort_keys=False).rstrip(),
                "```",
                "",
                "</details>",
                "",
            ]
        else:
            lines += ["No run_info.yaml beside the checkpoint: its path and sha256 above identify it.", ""]
    else:
        lines += ["```yaml", yaml.safe_dump(config, sort_keys=False).rstrip() or "{}", "```", ""]
    return lines


def write_report(
    result: EvaluationResult | str | Path,
    alpha: float = 0.05,
    log_to_wandb: bool = True,
    window: str = "abdomen",
) -> ReportResult:
    """Write tables, statistics, figures and ``report.md`` into the evaluation folder.

    Args:
        result: the result of ``evaluate``, or its output folder.
        alpha: significance threshold of the ``*`` marks.
        log_to_wandb: log the tables to the active W&B run, if there is one.
        window: display window of the comparison panels.

    Returns:
        A :class:`ReportResult`.
    """
    if not isinstance(result, EvaluationResult):
        result = EvaluationResult.load(result)
    out = result.out_dir
    info = result.info
    patients = result.patient_records
    notes: list[str] = []

    tests_path = summary_path = None
    merged: list[dict[str, Any]] = []
    ttests: list[PairedTestResult] = []
    if any(r["method"] == result.proposed for r in patients):
        ttests = compare_to_proposed(patients, result.proposed, "ttest")
        wtests = compare_to_proposed(patients, result.proposed, "wilcoxon")
        merged = merge_tests(ttests, wtests)
        tests_path = _write_rows(out / "stats" / "tests.csv", TEST_FIELDS, merged)
        summary = summarize(patients)
        if summary:
            summary_path = _write_rows(out / "stats" / "summary.csv", list(summary[0]), summary)
    else:
        notes.append("no metric records: nothing to test (no ROI, NDCT or reference on the test slices)")

    tables = build_tables(result, ttests, alpha)
    table_paths = write_tables(tables, out / "tables")
    shown, fig_notes = make_figures(
        load_figure_slices(out / "figure_slices.npz"), out / "figures", ndct_label(info), window
    )
    notes += fig_notes
    wandb_logged = log_to_wandb and log_tables_to_wandb(tables)

    n = result.n_patients
    statements = protocol_statements(result)
    lines = [
        "# LDCT denoising evaluation",
        "",
        f"Proposed method: **{result.proposed}**. Rows: {', '.join(result.methods)} (the LDCT input is the "
        f"identity row). Test split: **{n} patients**, {info.get('n_slices')} slices"
        + (
            f" (at most {info['max_slices_per_patient']} per patient)"
            if info.get("max_slices_per_patient")
            else ""
        )
        + f". Protocols computed: {', '.join(result.protocols) or 'none'}.",
        "",
    ]
    if info.get("data"):
        lines += [f"Data: {info['data']}", ""]
    warning = patient_count_warning(n)
    if warning:
        lines += [warning, ""]
    left_out = info.get("registration_left_out") or []
    if left_out:
        lines += [
            f"**{len(left_out)} test stud{'y was' if len(left_out) == 1 else 'ies were'} left out**: the NDCT "
            f"did not register onto the LDCT (patients {', '.join(left_out)}; hashed keys). No row scores "
            "them; see the warnings of the run, or `ldct-data-summary`, for why.",
            "",
        ]
    lines += ["## Protocols", "", statements[PAPER], "", statements[REFERENCE], ""]
    lines += [
        "Cells are mean ± SD over patients of per-patient means; `*` marks p < "
        f"{alpha:g} in a paired t-test against {result.proposed} on per-patient means (uncorrected, as in "
        "the paper); Wilcoxon signed-rank and Holm-corrected p-values are in the statistics section.",
        "",
    ]
    for protocol, heading in ((PAPER, "Results: paper protocol"), (REFERENCE, "Results: reference protocol")):
        names = [k for k in tables if k.startswith(protocol)]
        if not names:
            continue
        lines += [f"## {heading}", ""]
        for name in names:
            links = " · ".join(
                f"[{p.suffix[1:]}]({p.relative_to(out).as_posix()})" for p in table_paths[name]
            )
            lines += [to_markdown(tables[name]), f"Files: {links}", ""]

    lines += ["## Statistics", ""]
    lines += [
        f"Per-patient aggregation: each patient contributes one mean per method, ROI and metric ({n} "
        "patients; slices per patient: "
        + ", ".join(f"{k} {v}" for k, v in sorted(info.get("slices_per_patient", {}).items()))
        + "). Paired tests of every method against the proposed one (scipy `ttest_rel` and `wilcoxon`), "
        "Holm correction within each protocol and metric over methods x ROIs.",
        "",
    ]
    if warning:
        lines += [warning, ""]
    for protocol in result.protocols:
        metrics = list(
            dict.fromkeys(m for name, t in tables.items() if name.startswith(protocol) for m in t.metrics)
        )
        lines += [
            f"<details><summary>Paired tests, {protocol} protocol</summary>",
            "",
            tests_markdown(merged, protocol, metrics, alpha),
            "</details>",
            "",
        ]
    if tests_path is not None:
        lines += [
            f"All tests: [{tests_path.relative_to(out).as_posix()}]({tests_path.relative_to(out).as_posix()}); "
            + (
                f"mean, SD, n per cell: [{summary_path.relative_to(out).as_posix()}]"
                f"({summary_path.relative_to(out).as_posix()})."
                if summary_path
                else ""
            ),
            "",
        ]

    if result.registration:
        lines += ["## Registration", ""]
        before = [r["rmse_before_hu"] for r in result.registration]
        after = [r["rmse_after_hu"] for r in result.registration]
        shift = [math.hypot(r["shift_y_px"], r["shift_x_px"]) for r in result.registration]
        lines += [
            f"NDCT -> input, {len(after)} slices: residual RMSE {np.mean(after):.1f} ± {np.std(after):.1f} HU "
            f"(before {np.mean(before):.1f} ± {np.std(before):.1f} HU), shift {np.mean(shift):.2f} px on "
            "average. Per slice: [registration.csv](registration.csv).",
            "",
        ]

    lines += ["## Figures", ""]
    for caption, path in shown:
        rel = path.relative_to(out).as_posix()
        lines += [
            f"![{caption}]({rel})",
            "",
            f"*{caption}* ([PDF]({Path(rel).with_suffix('.pdf').as_posix()}))",
            "",
        ]
    for note in notes:
        lines += [f"- {note}"]
    if notes:
        lines.append("")

    seconds = info.get("seconds_per_slice", {})
    if seconds:
        lines += ["## Run time", "", "| Method | seconds per slice |", "|---|---:|"]
        lines += [f"| {m} | {s:.4f} |" for m, s in seconds.items()]
        lines.append("")

    lines += ["## Methods and their exact configuration", ""]
    for name in result.methods:
        lines += _method_section(name, info.get("methods", {}).get(name, {}))

    lines += [
        "## Files",
        "",
        "- `records.csv`: every slice, method, protocol, ROI and metric",
        "- `patient_records.csv`: per-patient means (the unit of the tests)",
        "- `volumes/<method>/<patient_key>.npy`: denoised slices, float32 HU; `volumes/index.json`: slice indices",
        "- `stack.npz`: slices for the blinded reader study (`ldct-reader-study export --stack stack.npz`)",
        "- `tables/`, `stats/`, `figures/`: as linked above",
        "",
    ]
    report_path = out / "report.md"
    write_text_atomic(report_path, "\n".join(lines))
    return ReportResult(
        report_path,
        tables,
        table_paths,
        [p for _, p in shown],
        tests_path,
        summary_path,
        notes,
        bool(wandb_logged),
    )

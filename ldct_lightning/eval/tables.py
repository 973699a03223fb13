"""Result tables in the paper's layout (Table 3: methods x ROIs + Mean, one block per metric; Table 4: ablations).

Cells are means over patients of per-patient means; ``Mean`` is the mean of the ROI columns, as in the paper
(a ``slice`` column, the full slice of the reference protocol, is shown but left out of the Mean).
A ``*`` marks a paired test against the proposed method with p < alpha (raw p as in the paper, or Holm).
The input (LDCT) is always a row. Rendered as Markdown, CSV and LaTeX without pandas.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from ldct_lightning.eval.rois import PAPER_ROIS
from ldct_lightning.eval.stats import (
    PairedTestResult,
    PatientRecord,
    compare_to_proposed,
    format_mean_sd,
    mean_sd,
)

PAPER_METRICS: tuple[str, ...] = ("psnr", "ssim", "rmse")
ABLATIONS: tuple[str, ...] = ("oneStep", "firstStep")
# column headers of the ROIs that are not organs; neither counts in the Mean of the ROI columns
ROI_HEADERS: dict[str, str] = {"slice": "Full slice", "bone_band": "Bone band"}


def metric_label(metric: str) -> str:
    """Display name: ``psnr`` -> ``PSNR``, ``psnr_abdomen`` -> ``PSNR (abdomen)``, ``rmse_hu`` -> ``RMSE (HU)``."""
    named = {
        "psnr": "PSNR",
        "ssim": "SSIM",
        "rmse": "RMSE",
        "psnr_max1": "PSNR (MAX=1)",
        "rmse_hu": "RMSE (HU)",
        "max_abs_err_hu": "Max abs. error (HU)",
        "noise_sd_diff_hu": "Noise SD of difference (HU)",
        "sd_hu": "SD (HU)",
        "cnr": "CNR",
    }
    if metric in named:
        return named[metric]
    head, _, tail = metric.partition("_")
    return f"{head.upper()} ({tail})" if tail else metric.upper()


def metric_digits(metric: str) -> int:
    """Decimals shown for a metric (the paper's: PSNR 2, SSIM 3, RMSE 4; HU values 1)."""
    if metric.startswith("psnr") or metric == "cnr":
        return 2
    if metric.startswith("ssim"):
        return 3
    if metric == "rmse":
        return 4
    return 1


@dataclass(frozen=True)
class Cell:
    """One table cell: mean (± SD) over patients, number of patients, and the significance mark."""

    mean: float
    sd: float
    n: int
    marked: bool


@dataclass
class ResultTable:
    """A Table 3/4-style table, independent of the output format."""

    title: str
    protocol: str
    metrics: list[str]
    methods: list[str]
    rois: list[str]
    cells: dict[tuple[str, str, str], Cell]  # (metric, method, roi)
    row_means: dict[tuple[str, str], float]  # (metric, method) -> mean of the ROI columns
    footnote: str
    display_names: dict[str, str] = field(default_factory=dict)
    with_sd: bool = False

    def header(self) -> list[str]:
        return [
            "Metric",
            "Method",
            *(ROI_HEADERS.get(r, r.capitalize()) for r in self.rois),
            "Mean",
        ]

    def rows(self) -> list[list[str]]:
        """Body rows as display strings (metric name only on the first row of each block)."""
        out = []
        for metric in self.metrics:
            digits = metric_digits(metric)
            for i, method in enumerate(self.methods):
                row = [metric_label(metric) if i == 0 else "", self.display_names.get(method, method)]
                for roi in self.rois:
                    cell = self.cells.get((metric, method, roi))
                    if cell is None or math.isnan(cell.mean):
                        row.append("-")
                        continue
                    text = format_mean_sd(cell.mean, cell.sd if self.with_sd else float("nan"), digits)
                    row.append(text + ("*" if cell.marked else ""))
                mean = self.row_means.get((metric, method), float("nan"))
                row.append("-" if math.isnan(mean) else f"{mean:.{digits}f}")
                out.append(row)
        return out


def build_table(
    patient_records: Iterable[PatientRecord],
    methods: Sequence[str],
    *,
    proposed: str,
    input_method: str = "LDCT",
    rois: Sequence[str] = PAPER_ROIS,
    metrics: Sequence[str] = PAPER_METRICS,
    protocol: str = "paper",
    tests: Sequence[PairedTestResult] | None = None,
    test: Literal["ttest", "wilcoxon"] = "ttest",
    mark: Literal["p", "p_holm"] = "p",
    alpha: float = 0.05,
    title: str = "",
    display_names: Mapping[str, str] | None = None,
    with_sd: bool = False,
) -> ResultTable:
    """Build a methods x ROIs table, one block per metric, the input first.

    Args:
        patient_records: output of ``stats.per_patient``.
        methods: method rows in order (the input is prepended when missing).
        proposed: the method others are tested against (its row carries no marks).
        input_method: name of the input (LDCT) rows; it must have records.
        rois: ROI columns.
        metrics: metric blocks.
        protocol: which protocol's records to use.
        tests: results of ``stats.compare_to_proposed``; computed with ``test`` when None.
        test: test used when ``tests`` is None.
        mark: ``"p"`` (raw, as in the paper) or ``"p_holm"``.
        alpha: significance threshold.
        title: caption.
        display_names: method -> name shown.
        with_sd: show ``mean±SD`` in cells.

    Returns:
        A :class:`ResultTable`.
    """
    records = [r for r in patient_records if r["protocol"] == protocol]
    present = {r["method"] for r in records}
    if input_method not in present:
        raise ValueError(
            f"no {protocol!r} records for the input method {input_method!r}: score the LDCT input too"
        )
    rows = [input_method, *[m for m in methods if m != input_method]]
    missing = [m for m in rows if m not in present]
    if missing:
        raise ValueError(f"no {protocol!r} records for method(s) {missing}; scored: {sorted(present)}")
    if tests is None:
        tests = compare_to_proposed(records, proposed, test=test)
    pvals = {(t["method"], t["roi"], t["metric"]): t[mark] for t in tests if t["protocol"] == protocol}
    values: dict[tuple[str, str, str], list[float]] = {}
    for r in records:
        values.setdefault((r["metric"], r["method"], r["roi"]), []).append(r["value"])
    cells: dict[tuple[str, str, str], Cell] = {}
    row_means: dict[tuple[str, str], float] = {}
    for metric in metrics:
        for method in rows:
            roi_means = []
            for roi in rois:
                vals = values.get((metric, method, roi))
                if not vals:
                    continue
                m, s = mean_sd(vals)
                p = pvals.get((method, roi, metric), float("nan"))
                marked = method != proposed and not math.isnan(p) and p < alpha
                cells[(metric, method, roi)] = Cell(m, s, sum(not math.isnan(v) for v in vals), marked)
                if roi not in ROI_HEADERS:  # the full slice and the bone band are not organ ROIs of the Mean
                    roi_means.append(m)
            finite = [v for v in roi_means if not math.isnan(v)]
            row_means[(metric, method)] = float(np.mean(finite)) if finite else float("nan")
    n_patients = len({r["patient_key"] for r in records})
    test_used = tests[0]["test"] if tests else test
    test_name = {"ttest": "paired t-test", "wilcoxon": "Wilcoxon signed-rank test"}.get(test_used, test_used)
    correction = "Holm-adjusted" if mark == "p_holm" else "uncorrected, as in the paper"
    footnote = (
        f"* p < {alpha:g} ({test_name} against {(display_names or {}).get(proposed, proposed)}"
        f" on per-patient means, {correction}); {n_patients} patients; protocol '{protocol}'; "
        "Mean = mean of the organ ROI columns."
    )
    return ResultTable(
        title=title,
        protocol=protocol,
        metrics=list(metrics),
        methods=rows,
        rois=list(rois),
        cells=cells,
        row_means=row_means,
        footnote=footnote,
        display_names=dict(display_names or {}),
        with_sd=with_sd,
    )


def table3(
    patient_records: Iterable[PatientRecord],
    baselines: Sequence[str],
    proposed: str = "proposed",
    **kwargs: object,
) -> ResultTable:
    """Table 3: input, baselines, proposed (keyword arguments as :func:`build_table`)."""
    kwargs.setdefault("title", "Evaluation metrics of the methods on the ROIs")
    return build_table(patient_records, [*baselines, proposed], proposed=proposed, **kwargs)  # type: ignore[arg-type]


def table4(
    patient_records: Iterable[PatientRecord],
    proposed: str = "proposed",
    ablations: Sequence[str] = ABLATIONS,
    **kwargs: object,
) -> ResultTable:
    """Table 4: input, proposed, then the ablations (``oneStep``, ``firstStep``)."""
    kwargs.setdefault("title", "Ablation: two-stage training against its single stages")
    return build_table(patient_records, [proposed, *ablations], proposed=proposed, **kwargs)  # type: ignore[arg-type]


def to_markdown(table: ResultTable) -> str:
    """Render as a GitHub Markdown table with the caption above and the footnote below."""
    lines = [f"**{table.title}**", ""] if table.title else []
    header = table.header()
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join(["---", "---"] + ["---:"] * (len(header) - 2)) + "|")
    lines += ["| " + " | ".join(row) + " |" for row in table.rows()]
    lines += ["", table.footnote]
    return "\n".join(lines) + "\n"


def to_csv(table: ResultTable) -> str:
    """Render as CSV in the displayed layout (``*`` kept in the cells)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(table.header())
    writer.writerows(table.rows())
    return buf.getvalue()


_LATEX_ESCAPES = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
}


def latex_escape(text: str) -> str:
    """Escape LaTeX special characters."""
    return "".join(_LATEX_ESCAPES.get(c, c) for c in text)


def _latex_cell(text: str) -> str:
    star = text.endswith("*")
    body = latex_escape(text[:-1] if star else text).replace("±", r"$\pm$")
    return body + (r"$^{*}$" if star else "")


def to_latex(table: ResultTable) -> str:
    """Render as a plain ``tabular`` in a ``table`` float (no extra packages needed)."""
    header = table.header()
    spec = "ll" + "r" * (len(header) - 2)
    lines = [r"\begin{table}[t]", r"\centering"]
    if table.title:
        lines.append(rf"\caption{{{latex_escape(table.title)}}}")
    lines += [
        rf"\begin{{tabular}}{{{spec}}}",
        r"\hline",
        " & ".join(latex_escape(h) for h in header) + r" \\",
    ]
    for row in table.rows():
        if row[0]:
            lines.append(r"\hline")
        lines.append(" & ".join(_latex_cell(c) for c in row) + r" \\")
    lines += [r"\hline", r"\end{tabular}", "", r"\smallskip", latex_escape(table.footnote), r"\end{table}"]
    return "\n".join(lines) + "\n"

"""Statistics on metric records: per-patient aggregation, paired tests against the proposed method, Holm.

Slices of one patient are not independent, so every test here runs on per-patient means (one number per
patient, method, protocol, ROI and metric), paired by patient.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Literal, TypedDict

import numpy as np
from scipy import stats

GROUP_KEYS: tuple[str, ...] = ("method", "patient_key", "protocol", "roi", "metric")


class PatientRecord(TypedDict):
    """Mean of one metric over a patient's slices."""

    method: str
    patient_key: str
    protocol: str
    roi: str
    metric: str
    value: float
    n_slices: int


class PairedTestResult(TypedDict):
    """One paired comparison ``method`` vs ``proposed`` on one protocol, ROI and metric."""

    method: str
    proposed: str
    protocol: str
    roi: str
    metric: str
    test: str
    n: int
    mean_diff: float  # mean over patients of (method - proposed)
    statistic: float
    p: float
    p_holm: float


def per_patient(records: Iterable[Mapping[str, object]]) -> list[PatientRecord]:
    """Average slice records per patient (NaN values are ignored; all-NaN gives NaN).

    Args:
        records: flat records with the keys of ``metrics.Record``.

    Returns:
        One :class:`PatientRecord` per (method, patient_key, protocol, roi, metric), sorted by those keys.
    """
    groups: dict[tuple[str, ...], list[float]] = defaultdict(list)
    for r in records:
        groups[tuple(str(r[k]) for k in GROUP_KEYS)].append(float(r["value"]))  # type: ignore[arg-type]
    out: list[PatientRecord] = []
    for key in sorted(groups):
        vals = np.asarray(groups[key], dtype=np.float64)
        finite = vals[~np.isnan(vals)]
        value = float(finite.mean()) if finite.size else float("nan")
        out.append(
            PatientRecord(**dict(zip(GROUP_KEYS, key, strict=True)), value=value, n_slices=int(finite.size))
        )
    return out


def mean_sd(values: Iterable[float], ddof: int = 1) -> tuple[float, float]:
    """Mean and sample SD of the finite values (SD is NaN for fewer than ``ddof + 1`` values).

    Returns:
        ``(mean, sd)``.
    """
    arr = np.asarray([v for v in values if not math.isnan(v)], dtype=np.float64)
    if arr.size == 0:
        return float("nan"), float("nan")
    sd = float(np.std(arr, ddof=ddof)) if arr.size > ddof else float("nan")
    return float(arr.mean()), sd


def format_mean_sd(mean: float, sd: float, digits: int = 2) -> str:
    """``"8.25±0.35"`` (``"8.25"`` when the SD is NaN, ``"-"`` when the mean is NaN)."""
    if math.isnan(mean):
        return "-"
    if math.isnan(sd):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f}±{sd:.{digits}f}"


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-Bonferroni step-down adjusted p-values (NaN entries are kept and not counted).

    Written here because scipy offers no Holm adjustment for a list of p-values (``false_discovery_control``
    is Benjamini-Hochberg only) and statsmodels is not a dependency: sort ascending, multiply the i-th
    smallest (0-based) by ``m - i``, enforce monotonicity with a running maximum, cap at 1.

    Args:
        pvalues: raw p-values.

    Returns:
        Adjusted p-values in the input order.
    """
    p = np.asarray(pvalues, dtype=np.float64)
    out = np.full(p.shape, np.nan)
    idx = np.flatnonzero(~np.isnan(p))
    m = idx.size
    if m == 0:
        return out.tolist()
    order = idx[np.argsort(p[idx], kind="stable")]
    adjusted = np.maximum.accumulate(p[order] * (m - np.arange(m)))
    out[order] = np.minimum(adjusted, 1.0)
    return out.tolist()


def paired_test(
    a: Sequence[float], b: Sequence[float], test: Literal["ttest", "wilcoxon"] = "ttest"
) -> tuple[float, float]:
    """Paired two-sided test of ``a`` against ``b`` (``scipy.stats.ttest_rel`` or ``scipy.stats.wilcoxon``).

    Returns:
        ``(statistic, p)``; NaN for fewer than 2 pairs; for Wilcoxon, ``(0, 1)`` when all differences are 0.
    """
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"paired samples differ in length: {x.size} vs {y.size}")
    if x.size < 2:
        return float("nan"), float("nan")
    if test == "ttest":
        res = stats.ttest_rel(x, y)
    elif test == "wilcoxon":
        if np.all(x == y):
            return 0.0, 1.0
        res = stats.wilcoxon(x, y)
    else:
        raise ValueError(f"unknown test {test!r}; use 'ttest' or 'wilcoxon'")
    return float(res.statistic), float(res.pvalue)


def compare_to_proposed(
    patient_records: Iterable[PatientRecord],
    proposed: str,
    test: Literal["ttest", "wilcoxon"] = "ttest",
    family: Sequence[str] = ("protocol", "metric"),
) -> list[PairedTestResult]:
    """Paired test of every method against the proposed one per protocol, ROI and metric.

    Pairs are the patients that have a finite value for both methods. Holm adjustment runs within each
    family: by default all methods x ROIs tested for one protocol and metric (one block of Table 3).

    Args:
        patient_records: output of :func:`per_patient`.
        proposed: the method every other one is compared with.
        test: ``"ttest"`` (paired Student t, the paper's test) or ``"wilcoxon"`` (signed-rank).
        family: keys of a Holm family.

    Returns:
        :class:`PairedTestResult` rows, with raw ``p`` and Holm-adjusted ``p_holm``.
    """
    table: dict[tuple[str, str, str], dict[str, dict[str, float]]] = defaultdict(lambda: defaultdict(dict))
    for r in patient_records:
        table[(r["protocol"], r["roi"], r["metric"])][r["method"]][r["patient_key"]] = r["value"]
    if not any(proposed in by_method for by_method in table.values()):
        raise KeyError(
            f"proposed method {proposed!r} has no records; known: {sorted({m for t in table.values() for m in t})}"
        )
    results: list[PairedTestResult] = []
    for (protocol, roi, metric), by_method in sorted(table.items()):
        ref = by_method.get(proposed)
        if ref is None:
            continue
        for method in sorted(by_method):
            if method == proposed:
                continue
            keys = [k for k in sorted(ref) if k in by_method[method]]
            keys = [k for k in keys if not (math.isnan(ref[k]) or math.isnan(by_method[method][k]))]
            a = [by_method[method][k] for k in keys]
            b = [ref[k] for k in keys]
            statistic, p = paired_test(a, b, test)
            diff = float(np.mean(np.subtract(a, b))) if keys else float("nan")
            results.append(
                PairedTestResult(
                    method=method,
                    proposed=proposed,
                    protocol=protocol,
                    roi=roi,
                    metric=metric,
                    test=test,
                    n=len(keys),
                    mean_diff=diff,
                    statistic=statistic,
                    p=p,
                    p_holm=float("nan"),
                )
            )
    families: dict[tuple[str, ...], list[int]] = defaultdict(list)
    for i, r in enumerate(results):
        families[tuple(str(r[k]) for k in family)].append(i)  # type: ignore[literal-required]
    for idx in families.values():
        for i, adj in zip(idx, holm([results[i]["p"] for i in idx]), strict=True):
            results[i]["p_holm"] = adj
    return results


def summarize(patient_records: Iterable[PatientRecord]) -> list[dict[str, object]]:
    """Mean ± SD over patients for each (method, protocol, roi, metric).

    Returns:
        Rows with ``method, protocol, roi, metric, mean, sd, n_patients``.
    """
    groups: dict[tuple[str, str, str, str], list[float]] = defaultdict(list)
    for r in patient_records:
        groups[(r["method"], r["protocol"], r["roi"], r["metric"])].append(r["value"])
    rows = []
    for (method, protocol, roi, metric), vals in sorted(groups.items()):
        m, s = mean_sd(vals)
        n = sum(not math.isnan(v) for v in vals)
        rows.append(
            {
                "method": method,
                "protocol": protocol,
                "roi": roi,
                "metric": metric,
                "mean": m,
                "sd": s,
                "n_patients": n,
            }
        )
    return rows

"""Per-patient aggregation, paired tests, Holm, and the Table 3/4 renderers."""

from __future__ import annotations

import csv
import io
import math

import numpy as np
import pytest
from scipy import stats as sps

from ldct_lightning.eval import stats, tables

# Student's sleep data (Cushny & Peebles 1905): R's t.test(..., paired=TRUE) gives t = -4.0621, p = 0.002833.
SLEEP_1 = [0.7, -1.6, -0.2, -1.2, -0.1, 3.4, 3.7, 0.8, 0.0, 2.0]
SLEEP_2 = [1.9, 0.8, 1.1, 0.1, -0.1, 4.4, 5.5, 1.6, 4.6, 3.4]


def rec(method, patient, slice_index, roi, metric, value, protocol="paper"):
    return {"method": method, "patient_key": patient, "slice_index": slice_index, "protocol": protocol,
            "roi": roi, "metric": metric, "value": value}  # fmt: skip


def test_per_patient_mean_by_hand():
    records = [
        rec("a", "p1", 0, "liver", "psnr", 30.0),
        rec("a", "p1", 1, "liver", "psnr", 32.0),
        rec("a", "p1", 2, "liver", "psnr", float("nan")),
        rec("a", "p2", 0, "liver", "psnr", 40.0),
        rec("b", "p1", 0, "liver", "psnr", 10.0),
    ]
    out = {(r["method"], r["patient_key"]): (r["value"], r["n_slices"]) for r in stats.per_patient(records)}
    assert out == {("a", "p1"): (31.0, 2), ("a", "p2"): (40.0, 1), ("b", "p1"): (10.0, 1)}
    # the patient, not the slice, is the unit: mean over patients is (31 + 40) / 2, not (30 + 32 + 40) / 3
    summary = {r["method"]: r for r in stats.summarize(stats.per_patient(records))}
    assert summary["a"]["mean"] == pytest.approx(35.5)
    assert summary["a"]["sd"] == pytest.approx(np.std([31.0, 40.0], ddof=1))
    assert summary["a"]["n_patients"] == 2


def test_holm_textbook_example():
    assert stats.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    adj = stats.holm([0.5, float("nan"), 0.4])
    assert adj[0] == pytest.approx(0.8) and math.isnan(adj[1]) and adj[2] == pytest.approx(0.8)
    assert stats.holm([0.6, 0.7]) == pytest.approx([1.0, 1.0])  # capped at 1


def test_paired_tests_against_scipy_and_known_values():
    t, p = stats.paired_test(SLEEP_1, SLEEP_2, "ttest")
    assert t == pytest.approx(-4.0621, abs=1e-4) and p == pytest.approx(0.002833, abs=1e-6)
    ref = sps.wilcoxon(SLEEP_1, SLEEP_2)
    assert stats.paired_test(SLEEP_1, SLEEP_2, "wilcoxon") == pytest.approx((ref.statistic, ref.pvalue))
    # six positive distinct differences: exact two-sided p = 2 / 2**6
    assert stats.paired_test([1, 2, 3, 4, 5, 6], [0] * 6, "wilcoxon")[1] == pytest.approx(2 / 64)
    assert stats.paired_test([1, 2], [1, 2], "wilcoxon") == (0.0, 1.0)
    assert all(math.isnan(v) for v in stats.paired_test([1.0], [2.0]))


def patient_records():
    """5 patients; 'bad' is 3 dB worse than 'prop' on liver (significant) and noisy on heart (not)."""
    rng = np.random.default_rng(1)
    out = []
    for i in range(5):
        p = f"p{i}"
        base = {"liver": 40.0 + i, "heart": 45.0 + i}
        for roi, v in base.items():
            out.append(rec("prop", p, 0, roi, "psnr", v))
            out.append(rec("LDCT", p, 0, roi, "psnr", v - 10 + 0.1 * i))
            noise = [0.5, -0.4, 0.3, -0.6, 0.2][i] if roi == "heart" else 0.1 * rng.normal()
            out.append(rec("bad", p, 0, roi, "psnr", v + (noise if roi == "heart" else -3.0 + noise)))
            out.append(rec("prop", p, 0, roi, "ssim", 0.99))
            out.append(rec("LDCT", p, 0, roi, "ssim", 0.9 + 0.003 * i))
            out.append(rec("bad", p, 0, roi, "ssim", 0.95 - 0.002 * i))
            out.append(rec("prop", p, 0, roi, "rmse", 0.004))
            out.append(rec("LDCT", p, 0, roi, "rmse", 0.02 + 0.001 * i))
            out.append(rec("bad", p, 0, roi, "rmse", 0.006 + 0.0002 * i))
    return stats.per_patient(out)


def test_compare_to_proposed_pairs_by_patient_and_holm():
    pr = patient_records()
    pr = [r for r in pr if not (r["method"] == "bad" and r["patient_key"] == "p4" and r["roi"] == "liver")]
    res = {(r["method"], r["roi"], r["metric"]): r for r in stats.compare_to_proposed(pr, "prop")}
    liver = res[("bad", "liver", "psnr")]
    assert liver["n"] == 4
    val = {(r["method"], r["patient_key"], r["roi"], r["metric"]): r["value"] for r in pr}
    a = [val[("bad", f"p{i}", "liver", "psnr")] for i in range(4)]
    b = [val[("prop", f"p{i}", "liver", "psnr")] for i in range(4)]
    assert liver["p"] == pytest.approx(sps.ttest_rel(a, b).pvalue)
    assert liver["mean_diff"] == pytest.approx(np.mean(np.subtract(a, b)))
    family = [r for r in res.values() if r["metric"] == "psnr"]
    assert [r["p_holm"] for r in family] == pytest.approx(stats.holm([r["p"] for r in family]))
    wil = stats.compare_to_proposed(pr, "prop", test="wilcoxon")
    assert {r["test"] for r in wil} == {"wilcoxon"}
    with pytest.raises(KeyError, match="nobody"):
        stats.compare_to_proposed(pr, "nobody")


def test_format_mean_sd():
    assert stats.format_mean_sd(8.254, 0.349) == "8.25±0.35"
    assert stats.format_mean_sd(8.0, float("nan"), 1) == "8.0"
    assert stats.format_mean_sd(float("nan"), 1.0) == "-"
    assert stats.mean_sd([1.0, 3.0, float("nan")]) == pytest.approx((2.0, math.sqrt(2.0)))


def test_table3_rows_marks_and_formats():
    t = tables.table3(patient_records(), baselines=["bad"], proposed="prop", rois=("heart", "liver"))
    assert t.methods == ["LDCT", "bad", "prop"]  # the input is always the first row
    rows = t.rows()
    assert len(rows) == 3 * 3 and [r[0] for r in rows[::3]] == ["PSNR", "SSIM", "RMSE"]
    psnr = {r[1]: r for r in rows[:3]}
    assert psnr["bad"][3].endswith("*") and not psnr["bad"][2].endswith("*")  # liver significant, heart not
    assert psnr["LDCT"][2].endswith("*") and not any(c.endswith("*") for c in psnr["prop"])
    # Mean = mean of the ROI columns; prop liver = mean(40..44) = 42, heart = 47
    assert psnr["prop"][2:] == ["47.00", "42.00", "44.50"]
    assert rows[3 + 2][2] == "0.990" and rows[6 + 2][2] == "0.0040"  # SSIM 3, RMSE 4 decimals

    md = tables.to_markdown(t)
    assert "| Metric | Method | Heart | Liver | Mean |" in md
    assert "| PSNR | LDCT |" in md and "paired t-test against prop" in md
    parsed = list(csv.reader(io.StringIO(tables.to_csv(t))))
    assert parsed[0] == ["Metric", "Method", "Heart", "Liver", "Mean"] and parsed[1:] == rows
    tex = tables.to_latex(t)
    assert r"\begin{tabular}{llrrr}" in tex and r"$^{*}$" in tex and tex.count(r"\\") == 1 + 9


def test_table4_order_display_names_and_errors():
    pr = [r | {"method": {"bad": "oneStep"}.get(r["method"], r["method"])} for r in patient_records()]
    pr += [r | {"method": "firstStep"} for r in pr if r["method"] == "oneStep"]
    t = tables.table4(pr, proposed="prop", rois=("liver",), display_names={"oneStep": "WGAN (oneStep)"},
                      mark="p_holm", with_sd=True)  # fmt: skip
    assert t.methods == ["LDCT", "prop", "oneStep", "firstStep"]
    assert [r[1] for r in t.rows()[:4]] == ["LDCT", "prop", "WGAN (oneStep)", "firstStep"]
    assert "±" in t.rows()[1][2] and "Holm-adjusted" in t.footnote
    # every body row of the LaTeX table names its method in display order, in all three metric blocks
    tex = tables.to_latex(t)
    body = [line for line in tex.splitlines() if line.count(" & ") == 3 and not line.startswith("Metric")]
    assert [line.split(" & ")[1] for line in body] == ["LDCT", "prop", "WGAN (oneStep)", "firstStep"] * 3
    # prop's liver PSNR over patients 40..44 dB: mean 42, sample SD sqrt(2.5) = 1.58, not significant
    assert rf" & prop & 42.00$\pm${math.sqrt(2.5):.2f} & 42.00 \\" in tex
    # a full-slice column is shown but is not part of the Mean
    pr_slice = pr + [r | {"roi": "slice", "value": r["value"] + 100} for r in pr if r["roi"] == "liver"]
    t = tables.table4(pr_slice, proposed="prop", rois=("slice", "liver"), metrics=("psnr",))
    assert t.header()[2] == "Full slice" and t.rows()[1][2:] == ["142.00", "42.00", "42.00"]
    with pytest.raises(ValueError, match="input method"):
        tables.table4([r for r in pr if r["method"] != "LDCT"], proposed="prop")
    assert tables.latex_escape("a_b & 5%") == r"a\_b \& 5\%"

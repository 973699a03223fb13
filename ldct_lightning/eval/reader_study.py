"""Blinded reader study kit (the paper's subjective evaluation, Table 2) and its analysis.

``export_reader_study`` writes, for N seeded random slices, one group of windowed PNGs per slice (input,
reference and methods, shuffled, named ``case_003_img_B.png``), a score sheet (CSV and a self-contained HTML
form: inline CSS/JS, images by relative path inside the kit) and, outside the kit, the key mapping image
letters to methods. Nothing a reader receives names a method: not the file names, not the PNG metadata (PIL
writes no text chunks), not the sheet or the form.

``analyze`` joins filled sheets from several readers with the key and reports mean ± SD per method and
criterion, inter-reader agreement as ICC(2,1), and a Friedman test with pairwise Wilcoxon + Holm post hoc.
"""

from __future__ import annotations

import csv
import html
import itertools
import json
import math
import string
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import stats

from ldct_lightning.data.normalize import WINDOWS, apply_window
from ldct_lightning.errors import LDCTError
from ldct_lightning.eval.stats import format_mean_sd, holm, mean_sd

CRITERIA: tuple[str, ...] = ("noise_suppression", "artifact_correction", "detail_restoration", "overall")
CRITERIA_LABELS: dict[str, str] = {
    "noise_suppression": "Noise suppression",
    "artifact_correction": "Artifact correction",
    "detail_restoration": "Detail restoration",
    "overall": "Overall quality",
}
SCALE: tuple[int, int] = (1, 10)
KIT_DIR = "reader_kit"
KEY_FILE = "key.csv"
SHEET_FIELDS: tuple[str, ...] = ("reader", "case", "image", "file")


class ReaderStudyError(LDCTError):
    """Bad reader-study input; the message names the file and row."""


@dataclass(frozen=True)
class SliceImages:
    """One slice shown to readers: every version of it, by method name (input, reference, methods)."""

    patient_key: str
    slice_index: int
    images: Mapping[str, np.ndarray]  # method -> (H, W) HU


@dataclass(frozen=True)
class ExportResult:
    """Paths written by :func:`export_reader_study`."""

    kit_dir: Path
    key_path: Path
    sheet_csv: Path
    sheet_html: Path
    images: list[Path]


# ------------------------------------------------------------------------------------------- stacks


def save_stack(
    path: str | Path,
    images: Mapping[str, np.ndarray],
    patient_keys: Sequence[str],
    slice_indices: Sequence[int],
) -> Path:
    """Save slices of several methods as one ``.npz`` (the input of ``ldct-reader-study export``).

    Args:
        path: output ``.npz``.
        images: method -> (N, H, W) HU array; all methods share N, H, W and the slice order.
        patient_keys: hashed patient key of each of the N slices.
        slice_indices: slice index of each of the N slices.

    Returns:
        The path written.
    """
    shapes = {name: np.shape(arr) for name, arr in images.items()}
    if len(set(shapes.values())) != 1 or len(next(iter(shapes.values()))) != 3:
        raise ReaderStudyError(f"{path}: every method needs an (N, H, W) array of one shape, got {shapes}")
    n = next(iter(shapes.values()))[0]
    if len(patient_keys) != n or len(slice_indices) != n:
        raise ReaderStudyError(
            f"{path}: need {n} patient keys and slice indices, got {len(patient_keys)}, {len(slice_indices)}"
        )
    arrays = {f"image/{name}": np.asarray(arr, dtype=np.float32) for name, arr in images.items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        path,
        patient_key=np.asarray(patient_keys, dtype=str),
        slice_index=np.asarray(slice_indices, dtype=np.int64),
        **arrays,
    )
    return path


def load_stack(path: str | Path, methods: Sequence[str] | None = None) -> list[SliceImages]:
    """Read a stack written by :func:`save_stack`.

    Args:
        path: ``.npz`` file.
        methods: keep only these methods (in this order); default all.

    Returns:
        One :class:`SliceImages` per slice.
    """
    path = Path(path)
    with np.load(path) as data:
        names = [k.split("/", 1)[1] for k in data.files if k.startswith("image/")]
        if not names or "patient_key" not in data.files or "slice_index" not in data.files:
            raise ReaderStudyError(
                f"{path}: not a reader-study stack (needs image/<method>, patient_key, slice_index)"
            )
        if methods:
            unknown = [m for m in methods if m not in names]
            if unknown:
                raise ReaderStudyError(f"{path}: no method(s) {unknown}; the stack holds {names}")
            names = list(methods)
        arrays = {m: data[f"image/{m}"] for m in names}
        keys, idx = data["patient_key"], data["slice_index"]
    return [
        SliceImages(str(keys[i]), int(idx[i]), {m: arrays[m][i] for m in names}) for i in range(len(keys))
    ]


# ------------------------------------------------------------------------------------------- export


def _write_png(path: Path, image_hu: np.ndarray, center: float, width: float) -> None:
    pixels = np.round(apply_window(np.asarray(image_hu, dtype=np.float64), center, width) * 255).astype(
        np.uint8
    )
    Image.fromarray(pixels).save(path, format="PNG")  # no pnginfo: no text chunks


def _criteria_header(criteria: Sequence[str]) -> list[str]:
    return [*SHEET_FIELDS, *criteria, "comment"]


def _html_form(cases: list[tuple[str, list[tuple[str, str]]]], criteria: Sequence[str]) -> str:
    lo, hi = SCALE
    header = json.dumps(_criteria_header(criteria))
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8"><title>Reader study score sheet</title>',
        "<style>body{font-family:sans-serif;margin:1em}figure{display:inline-block;margin:.4em;vertical-align:top}"
        "img{max-width:360px;display:block}label{display:block;font-size:.85em}input[type=number]{width:3.5em}"
        "section{border-top:1px solid #999;padding:.5em 0}</style></head><body>",
        "<h1>Reader study score sheet</h1>",
        f"<p>Score every image from {lo} (unacceptable) to {hi} (excellent) on each criterion. "
        "Images are shown in random order and carry no method names. When done, press "
        "<b>Download CSV</b> and send the file back.</p>",
        '<p><label>Reader ID <input id="reader" required></label></p>',
        '<form id="sheet">',
    ]
    for case, images in cases:
        parts.append(f"<section><h2>{html.escape(case)}</h2>")
        for letter, file in images:
            parts.append(
                f'<figure><img src="images/{html.escape(file)}" alt="{html.escape(case)} image {letter}">'
            )
            parts.append(f"<figcaption>Image {letter}</figcaption>")
            for c in criteria:
                name = html.escape(f"{case}|{letter}|{file}|{c}")
                parts.append(
                    f"<label>{html.escape(CRITERIA_LABELS.get(c, c))} "
                    f'<input type="number" min="{lo}" max="{hi}" step="1" name="{name}"></label>'
                )
            name = html.escape(f"{case}|{letter}|{file}|comment")
            parts.append(f'<label>Comment <input type="text" name="{name}"></label></figure>')
        parts.append("</section>")
    parts += [
        "</form>",
        '<button type="button" onclick="download()">Download CSV</button>',
        "<script>",
        f"const HEADER = {header};",
        "function q(v){v=String(v);return /[\",\\n]/.test(v)?'\"'+v.replace(/\"/g,'\"\"')+'\"':v;}",
        "function download(){",
        "  const reader=document.getElementById('reader').value.trim();",
        "  if(!reader){alert('Enter your reader ID first.');return;}",
        "  const rows={};",
        "  for(const el of document.getElementById('sheet').elements){",
        "    if(!el.name)continue; const [c,l,f,k]=el.name.split('|'); const id=c+'|'+l;",
        "    rows[id]=rows[id]||{reader:reader,case:c,image:l,file:f}; rows[id][k]=el.value;}",
        "  const lines=[HEADER.join(',')];",
        "  for(const r of Object.values(rows)) lines.push(HEADER.map(h=>q(r[h]??'')).join(','));",
        "  const a=document.createElement('a');",
        "  a.href=URL.createObjectURL(new Blob([lines.join('\\n')+'\\n'],{type:'text/csv'}));",
        "  a.download='scores_'+reader.replace(/[^A-Za-z0-9_-]/g,'_')+'.csv'; a.click();}",
        "</script></body></html>",
    ]
    return "\n".join(parts) + "\n"


def export_reader_study(
    slices: Sequence[SliceImages],
    out_dir: str | Path,
    n: int = 20,
    seed: int = 0,
    window: str | tuple[float, float] = "abdomen",
    criteria: Sequence[str] = CRITERIA,
) -> ExportResult:
    """Export a blinded reader study of ``n`` seeded random slices.

    Layout: ``out_dir/reader_kit/`` (give this to readers: ``images/``, ``score_sheet.csv``,
    ``score_sheet.html``, ``README.txt``) and ``out_dir/key.csv`` (keep it; columns case, image, file, method,
    patient_key, slice_index). Each case gets a fresh random letter order.

    Args:
        slices: candidate slices, each with every method's image.
        out_dir: output folder.
        n: number of slices (cases); all of them when there are fewer.
        seed: seed of the slice choice and of the shuffles.
        window: display window (name in ``normalize.WINDOWS`` or ``(center, width)``).
        criteria: score sheet columns.

    Returns:
        An :class:`ExportResult`.
    """
    if not slices:
        raise ReaderStudyError("no slices to export")
    methods = list(slices[0].images)
    if len(methods) > len(string.ascii_uppercase):
        raise ReaderStudyError(f"at most {len(string.ascii_uppercase)} images per case, got {len(methods)}")
    center, width = WINDOWS[window] if isinstance(window, str) else window
    out_dir = Path(out_dir)
    kit = out_dir / KIT_DIR
    if (kit / "images").is_dir() and any((kit / "images").iterdir()):
        raise ReaderStudyError(
            f"{kit}: already holds an export. Choose another output folder or delete it first."
        )
    (kit / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(slices), size=min(n, len(slices)), replace=False)
    key_rows, sheet_rows, written = [], [], []
    cases: list[tuple[str, list[tuple[str, str]]]] = []
    for case_no, i in enumerate(chosen, start=1):
        item = slices[int(i)]
        if list(item.images) != methods:
            raise ReaderStudyError(
                f"slice {item.slice_index}: methods {list(item.images)} differ from {methods}"
            )
        case = f"case_{case_no:03d}"
        order = rng.permutation(len(methods))
        images = []
        for letter, m in zip(string.ascii_uppercase, order, strict=False):
            method = methods[int(m)]
            file = f"{case}_img_{letter}.png"
            _write_png(kit / "images" / file, item.images[method], center, width)
            written.append(kit / "images" / file)
            key_rows.append([case, letter, file, method, item.patient_key, item.slice_index])
            sheet_rows.append(["", case, letter, file] + [""] * (len(criteria) + 1))
            images.append((letter, file))
        cases.append((case, images))
    key_path = out_dir / KEY_FILE
    with key_path.open("w", newline="") as fh:
        csv.writer(fh).writerows(
            [["case", "image", "file", "method", "patient_key", "slice_index"], *key_rows]
        )
    sheet_csv = kit / "score_sheet.csv"
    with sheet_csv.open("w", newline="") as fh:
        csv.writer(fh).writerows([_criteria_header(criteria), *sheet_rows])
    sheet_html = kit / "score_sheet.html"
    sheet_html.write_text(_html_form(cases, criteria), encoding="utf-8")
    lo, hi = SCALE
    (kit / "README.txt").write_text(
        f"Blinded reader study: {len(cases)} cases, {len(methods)} images each, in random order.\n"
        f"Score each image {lo} (unacceptable) to {hi} (excellent) for: "
        + ", ".join(CRITERIA_LABELS.get(c, c) for c in criteria)
        + f".\nFill score_sheet.csv (put your reader ID in the 'reader' column) or open score_sheet.html.\n"
        f"Images are shown in window C{center:g}/W{width:g}.\n"
    )
    return ExportResult(kit, key_path, sheet_csv, sheet_html, written)


# ------------------------------------------------------------------------------------------ analysis


def read_key(path: str | Path) -> dict[tuple[str, str], str]:
    """Read the key: ``{(case, image letter): method}``."""
    path = Path(path)
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or not {"case", "image", "method"} <= set(rows[0]):
        raise ReaderStudyError(f"{path}: not a reader-study key (needs columns case, image, method)")
    return {(r["case"], r["image"]): r["method"] for r in rows}


def read_score_sheets(
    paths: Sequence[str | Path], criteria: Sequence[str] = CRITERIA
) -> list[dict[str, object]]:
    """Read filled score sheets (CSV as exported).

    The reader ID comes from the ``reader`` column, else the file name. Blank scores are skipped; a score
    outside the scale or not a number is an error.

    Returns:
        Long rows ``{reader, case, image, criterion, score}``.
    """
    lo, hi = SCALE
    out: list[dict[str, object]] = []
    for p in map(Path, paths):
        with p.open(newline="") as fh:
            rows = list(csv.DictReader(fh))
        missing = [c for c in ("case", "image", *criteria) if rows and c not in rows[0]]
        if not rows or missing:
            raise ReaderStudyError(
                f"{p}: empty or missing columns {missing}. Use the exported score_sheet.csv."
            )
        for line, r in enumerate(rows, start=2):
            reader = (r.get("reader") or "").strip() or p.stem
            for c in criteria:
                text = (r.get(c) or "").strip()
                if not text:
                    continue
                try:
                    score = float(text)
                except ValueError as exc:
                    raise ReaderStudyError(f"{p}: line {line}: {c} = {text!r} is not a number.") from exc
                if not lo <= score <= hi:
                    raise ReaderStudyError(f"{p}: line {line}: {c} = {score:g} is outside {lo}-{hi}.")
                out.append(
                    {"reader": reader, "case": r["case"], "image": r["image"], "criterion": c, "score": score}
                )
    return out


def icc_2_1(ratings: np.ndarray) -> float:
    """ICC(2,1) of Shrout & Fleiss (1979): two-way random effects, absolute agreement, single rater.

    Written from its ANOVA formula (no ICC in scipy, and pingouin/statsmodels are not dependencies):
    ``(BMS - EMS) / (BMS + (k - 1) EMS + k (JMS - EMS) / n)`` with BMS the between-targets, JMS the
    between-raters and EMS the residual mean square of the n x k table.

    Args:
        ratings: (n targets, k raters), complete.

    Returns:
        ICC(2,1), or NaN with fewer than 2 targets or raters or a zero denominator.
    """
    x = np.asarray(ratings, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2 or x.shape[1] < 2 or np.isnan(x).any():
        return float("nan")
    n, k = x.shape
    grand = x.mean()
    ss_rows = k * ((x.mean(axis=1) - grand) ** 2).sum()
    ss_cols = n * ((x.mean(axis=0) - grand) ** 2).sum()
    ss_err = ((x - grand) ** 2).sum() - ss_rows - ss_cols
    bms, jms, ems = ss_rows / (n - 1), ss_cols / (k - 1), ss_err / ((n - 1) * (k - 1))
    denom = bms + (k - 1) * ems + k * (jms - ems) / n
    return float((bms - ems) / denom) if denom != 0 else float("nan")


@dataclass
class ReaderStudyResult:
    """Output of :func:`analyze` (``to_dict`` for JSON, :func:`to_markdown` for a report)."""

    methods: list[str]
    criteria: list[str]
    readers: list[str]
    n_cases: int
    summary: dict[str, dict[str, dict[str, float]]] = field(
        default_factory=dict
    )  # crit -> method -> mean/sd/n
    icc: dict[str, dict[str, float]] = field(default_factory=dict)  # crit -> icc, n_targets
    friedman: dict[str, dict[str, float]] = field(default_factory=dict)  # crit -> statistic, p, n_cases
    posthoc: list[dict[str, object]] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        """Plain dict for JSON (NaN becomes None, so the output is strict JSON)."""

        def clean(v: object) -> object:
            if isinstance(v, float) and math.isnan(v):
                return None
            if isinstance(v, dict):
                return {k: clean(x) for k, x in v.items()}
            if isinstance(v, list):
                return [clean(x) for x in v]
            return v

        return clean(asdict(self))  # type: ignore[return-value]


def analyze(
    scores: Sequence[Mapping[str, object]],
    key: Mapping[tuple[str, str], str],
    criteria: Sequence[str] = CRITERIA,
    methods: Sequence[str] | None = None,
) -> ReaderStudyResult:
    """Unblind and analyse reader scores.

    Per method and criterion: mean ± SD over cases of the readers' mean score. ICC(2,1) over images (targets)
    scored by every reader. Friedman test over cases scored for every method (reader means), then pairwise
    Wilcoxon signed-rank tests with Holm adjustment within each criterion.

    Args:
        scores: rows from :func:`read_score_sheets`.
        key: from :func:`read_key`.
        criteria: criteria to analyse.
        methods: method order; default sorted.

    Returns:
        A :class:`ReaderStudyResult`.
    """
    # per (criterion, case, method, reader) -> score
    table: dict[str, dict[tuple[str, str], dict[str, float]]] = defaultdict(lambda: defaultdict(dict))
    readers: set[str] = set()
    for s in scores:
        pair = (str(s["case"]), str(s["image"]))
        if pair not in key:
            raise ReaderStudyError(
                f"score for {pair[0]} image {pair[1]} (reader {s['reader']}) is not in the key"
            )
        table[str(s["criterion"])][(pair[0], key[pair])][str(s["reader"])] = float(s["score"])  # type: ignore[arg-type]
        readers.add(str(s["reader"]))
    all_methods = sorted(set(key.values()))
    methods = list(methods) if methods else all_methods
    cases = sorted({c for c, _ in key})
    result = ReaderStudyResult(methods, list(criteria), sorted(readers), len(cases))
    for crit in criteria:
        by = table.get(crit, {})
        case_means = {cm: float(np.mean(list(r.values()))) for cm, r in by.items() if r}
        result.summary[crit] = {}
        for m in methods:
            m_, s_ = mean_sd([v for (c, mm), v in case_means.items() if mm == m])
            result.summary[crit][m] = {"mean": m_, "sd": s_, "n": sum(mm == m for _, mm in case_means)}
        ordered = sorted(readers)
        complete = [[r[x] for x in ordered] for r in by.values() if all(x in r for x in ordered)]
        result.icc[crit] = {
            "icc": icc_2_1(np.asarray(complete)) if complete else float("nan"),
            "n_targets": len(complete),
        }
        blocks = [c for c in cases if all((c, m) in case_means for m in methods)]
        cols = [[case_means[(c, m)] for c in blocks] for m in methods]
        stat, p = float("nan"), float("nan")
        if len(methods) >= 3 and len(blocks) >= 2:
            res = stats.friedmanchisquare(*cols)
            stat, p = float(res.statistic), float(res.pvalue)
        result.friedman[crit] = {"statistic": stat, "p": p, "n_cases": len(blocks)}
        pairs = []
        for (i, a), (j, b) in itertools.combinations(enumerate(methods), 2):
            x, y = np.asarray(cols[i]), np.asarray(cols[j])
            if len(blocks) < 2:
                w, pw = float("nan"), float("nan")
            elif np.all(x == y):
                w, pw = 0.0, 1.0
            else:
                r = stats.wilcoxon(x, y)
                w, pw = float(r.statistic), float(r.pvalue)
            pairs.append({"criterion": crit, "a": a, "b": b, "statistic": w, "p": pw})
        for row, adj in zip(pairs, holm([float(r["p"]) for r in pairs]), strict=True):
            row["p_holm"] = adj
        result.posthoc += pairs
    return result


def to_markdown(result: ReaderStudyResult, digits: int = 2) -> str:
    """Report in the paper's Table 2 layout plus agreement and tests."""
    lines = [f"Readers: {len(result.readers)}; cases: {result.n_cases}; scale {SCALE[0]}-{SCALE[1]}.", ""]
    lines.append("| Criterion | " + " | ".join(result.methods) + " |")
    lines.append("|---|" + "---:|" * len(result.methods))
    for crit in result.criteria:
        cells = [
            format_mean_sd(result.summary[crit][m]["mean"], result.summary[crit][m]["sd"], digits)
            for m in result.methods
        ]
        lines.append(f"| {CRITERIA_LABELS.get(crit, crit)} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Mean ± SD over cases of the readers' mean score.",
        "",
        "| Criterion | ICC(2,1) | Friedman chi2 | p |",
    ]
    lines.append("|---|---:|---:|---:|")

    def num(v: float, fmt: str) -> str:
        return "-" if math.isnan(v) else format(v, fmt)

    for crit in result.criteria:
        f = result.friedman[crit]
        lines.append(
            f"| {CRITERIA_LABELS.get(crit, crit)} | {num(result.icc[crit]['icc'], '.3f')} | "
            f"{num(f['statistic'], '.2f')} | {num(f['p'], '.3g')} |"
        )
    lines += [
        "",
        "Post hoc: pairwise Wilcoxon signed-rank, Holm-adjusted within each criterion.",
        "",
        "| Criterion | A | B | p | p (Holm) |",
        "|---|---|---|---:|---:|",
    ]
    for r in result.posthoc:
        crit = str(r["criterion"])
        lines.append(
            f"| {CRITERIA_LABELS.get(crit, crit)} | {r['a']} | {r['b']} | {num(float(r['p']), '.3g')} | "
            f"{num(float(r['p_holm']), '.3g')} |"
        )
    return "\n".join(lines) + "\n"

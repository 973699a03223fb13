"""Reader study kit: blinding (file names, PNG chunks, sheets, HTML), seeding, and the analysis round trip."""

from __future__ import annotations

import csv
import re
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import stats

from ldct_lightning.cli.reader_study import main
from ldct_lightning.eval import reader_study as rs

METHODS = ["LDCT", "NDCT", "CycleGAN", "proposed"]
LEAK = re.compile("|".join(METHODS), re.I)
LEVEL = {"LDCT": 3, "NDCT": 8.5, "CycleGAN": 5, "proposed": 8}  # a method's score in the filled-in sheets


def make_slices(n: int = 6, size: int = 24) -> list[rs.SliceImages]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        clean = np.full((size, size), 40.0) + 20 * i
        noise_sd = {"LDCT": 60, "NDCT": 10, "CycleGAN": 30, "proposed": 5}
        out.append(
            rs.SliceImages(
                f"key{i}", i, {m: clean + rng.normal(0, sd, clean.shape) for m, sd in noise_sd.items()}
            )
        )
    return out


def png_chunk_types(path: Path) -> list[bytes]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, types = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        types.append(data[pos + 4 : pos + 8])
        pos += 12 + length
    return types


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def test_export_is_blinded_and_keyed(tmp_path):
    slices = make_slices()
    res = rs.export_reader_study(slices, tmp_path / "study", n=4, seed=3)
    assert len(res.images) == 4 * len(METHODS)
    assert res.key_path.parent == tmp_path / "study" and res.kit_dir not in res.key_path.parents
    for path in res.kit_dir.rglob("*"):
        assert not LEAK.search(path.name), path.name
    for png in res.images:
        assert re.fullmatch(r"case_\d{3}_img_[A-Z]\.png", png.name)
        with Image.open(png) as im:
            assert im.text == {} and not (set(im.info) - {"dpi"})
        assert set(png_chunk_types(png)) == {b"IHDR", b"IDAT", b"IEND"}
    for text_file in (res.sheet_csv, res.sheet_html, res.kit_dir / "README.txt"):
        assert not LEAK.search(text_file.read_text()), text_file
    html = res.sheet_html.read_text()
    assert "<script>" in html and "http" not in html  # self-contained: no external resources
    key = read_csv(res.key_path)
    by_case: dict[str, set[str]] = {}
    for row in key:
        by_case.setdefault(row["case"], set()).add(row["method"])
    assert len(by_case) == 4 and all(v == set(METHODS) for v in by_case.values())
    # the PNG shows the keyed method's slice in the abdomen window
    row = key[0]
    item = next(s for s in slices if s.slice_index == int(row["slice_index"]))
    # abdomen window C40/W400 by hand: -160 HU -> 0, 240 HU -> 255, clipped outside
    windowed = np.clip((item.images[row["method"]] - (40.0 - 400.0 / 2)) / 400.0, 0.0, 1.0)
    expected = np.round(windowed * 255).astype(np.uint8)
    assert 0 < expected.min() < expected.max() < 255  # the image is inside the window, not clipped flat
    assert np.array_equal(np.asarray(Image.open(res.kit_dir / "images" / row["file"])), expected)
    # seeded: same seed, same key; another seed, another draw or order
    again = rs.export_reader_study(slices, tmp_path / "again", n=4, seed=3)
    assert read_csv(again.key_path) == key
    other = rs.export_reader_study(slices, tmp_path / "other", n=4, seed=4)
    assert read_csv(other.key_path) != key
    with pytest.raises(rs.ReaderStudyError, match="already holds an export"):
        rs.export_reader_study(slices, tmp_path / "other", n=4, seed=4)


def test_icc_shrout_fleiss_1979():
    # Shrout & Fleiss (1979) Table 2: 6 targets x 4 judges; ICC(2,1) = .29
    ratings = np.array([[9, 2, 5, 8], [6, 1, 3, 2], [8, 4, 6, 8], [7, 1, 2, 6], [10, 5, 6, 9], [6, 2, 4, 7]])
    assert rs.icc_2_1(ratings) == pytest.approx(0.29, abs=0.005)
    assert rs.icc_2_1(np.array([[1, 1], [2, 2], [3, 3]])) == pytest.approx(1.0)  # perfect agreement
    assert np.isnan(rs.icc_2_1(np.ones((1, 3))))


def fill_sheets(study: Path, readers: dict[str, float]) -> tuple[list[Path], dict]:
    """Fill the exported sheet: score = method level + reader offset + a case-dependent wobble."""
    key = {(r["case"], r["image"]): r["method"] for r in read_csv(study / "key.csv")}
    template = read_csv(study / rs.KIT_DIR / "score_sheet.csv")
    paths = []
    for reader, offset in readers.items():
        rows = []
        for r in template:
            wobble = int(r["case"][-3:]) % 3 * 0.5
            base = LEVEL[key[(r["case"], r["image"])]] + offset + wobble
            rows.append(
                r
                | {"reader": reader}
                | {c: f"{min(10, base + i * 0.25):g}" for i, c in enumerate(rs.CRITERIA)}
            )
        path = study / f"{reader}.csv"
        with path.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(template[0]))
            writer.writeheader()
            writer.writerows(rows)
        paths.append(path)
    return paths, key


def test_cli_export_and_analyze_round_trip(tmp_path, capsys):
    slices = make_slices()
    stack = rs.save_stack(
        tmp_path / "stack.npz",
        {m: np.stack([s.images[m] for s in slices]) for m in METHODS},
        [s.patient_key for s in slices],
        [s.slice_index for s in slices],
    )
    assert (
        main(["export", "--stack", str(stack), "--out", str(tmp_path / "study"), "--n", "5", "--seed", "1"])
        == 0
    )
    sheets, key = fill_sheets(tmp_path / "study", {"r1": 0.0, "r2": 0.5})
    out, js = tmp_path / "report.md", tmp_path / "report.json"
    args = ["analyze", "--key", str(tmp_path / "study" / "key.csv"), "--sheets", *map(str, sheets)]
    assert main([*args, "--out", str(out), "--json", str(js)]) == 0
    report = out.read_text()
    assert "Noise suppression" in report and "ICC(2,1)" in report and "proposed" in report

    result = rs.analyze(rs.read_score_sheets(sheets), rs.read_key(tmp_path / "study" / "key.csv"))
    assert result.readers == ["r1", "r2"] and result.n_cases == 5
    # by hand: per-case mean over readers = level + 0.25 (mean offset) + wobble; then mean over cases
    wobbles = [int(c[-3:]) % 3 * 0.5 for c in sorted({c for c, _ in key})]
    ns = result.summary["noise_suppression"]
    assert ns["proposed"]["mean"] == pytest.approx(8 + 0.25 + np.mean(wobbles))
    assert ns["LDCT"]["sd"] == pytest.approx(np.std(wobbles, ddof=1))
    # Friedman against scipy on the same cases x methods matrix
    cols = [[level + 0.25 + w for w in wobbles] for level in (3, 8.5, 5, 8)]
    expected = stats.friedmanchisquare(*[cols[i] for i in np.argsort(METHODS)])
    assert result.friedman["noise_suppression"]["p"] == pytest.approx(expected.pvalue)
    # ICC(2,1) by hand: reader 2 = reader 1 + c on every image (c = 0.5, no score capped at 10 in this
    # criterion), so the residual mean square is 0, BMS = 2 s^2 (s^2 the variance of the images' scores) and
    # JMS = n c^2 / 2: ICC = 2 s^2 / (2 s^2 + c^2) = s^2 / (s^2 + c^2 / 2)
    image_scores = [LEVEL[m] + int(case[-3:]) % 3 * 0.5 for (case, _), m in key.items()]
    s2 = np.var(image_scores, ddof=1)
    icc = result.icc["noise_suppression"]
    assert icc["n_targets"] == len(key) == 5 * len(METHODS)
    assert icc["icc"] == pytest.approx(s2 / (s2 + 0.5**2 / 2), rel=1e-12)
    assert result.icc["overall"]["icc"] < 1.0  # a constant offset lowers absolute agreement
    assert len(result.posthoc) == len(rs.CRITERIA) * 6
    assert all(r["p_holm"] >= r["p"] for r in result.posthoc)


def test_analyze_rejects_bad_scores(tmp_path, capsys):
    rs.export_reader_study(make_slices(3), tmp_path / "study", n=2, seed=0)
    sheets, _ = fill_sheets(tmp_path / "study", {"r1": 0.0})
    text = sheets[0].read_text().splitlines()
    header = text[0].split(",")
    cells = text[1].split(",")
    cells[header.index("overall")] = "11"
    sheets[0].write_text("\n".join([text[0], ",".join(cells), *text[2:]]) + "\n")
    code = main(["analyze", "--key", str(tmp_path / "study" / "key.csv"), "--sheets", str(sheets[0])])
    err = capsys.readouterr().err
    assert code == 2 and "r1.csv: line 2: overall = 11 is outside 1-10" in err


def test_help_mentions_both_commands(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "export" in out and "analyze" in out

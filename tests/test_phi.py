"""No leaks: PHI planted in the input DICOM never reaches anything that training, evaluation or denoising write.

The tiny synthetic set is copied and re-tagged with a patient name, IDs, a birth date and other identifying
tags; then ``train.py`` trains both stages on it (CSV and offline W&B loggers, image panels),
``ldct-evaluate`` writes its report and ``ldct-denoise`` its series. Every file written (contents, and the
names of files and folders), the console output, log records and every text drawn by matplotlib is
searched for each PHI string and for the source DICOM UIDs. The denoised DICOM files legitimately keep the
patient tags (a PACS needs them): only their names are checked.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path

import matplotlib.text
import pydicom
import pytest

from ldct_lightning.privacy import KEY_FILE_NAME, hash_identifier

REPO = Path(__file__).resolve().parents[1]

PHI_TAGS = {
    "PatientName": "DOE^JANE^PHI",
    "PatientBirthDate": "19010203",
    "OtherPatientIDs": "OTHER-PHI-777",
    "InstitutionName": "ST PHI HOSPITAL",
    "AccessionNumber": "ACC-PHI-4242",
    "ReferringPhysicianName": "HOUSE^GREG^PHI",
}
PATIENT_ID = "PHI-12345-XYZ"  # each patient gets PATIENT_ID-<n>
# the strings searched for, besides the UIDs (case-insensitive); name variants as tools may format them
PHI_STRINGS = [
    *PHI_TAGS.values(),
    PATIENT_ID,
    "DOE^JANE",
    "DOE, JANE",
    "JANE DOE",
    "1901-02-03",
    "HOUSE^GREG",
]
UID_KEYWORDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID")


def plant_phi(source: Path, dest: Path) -> list[str]:
    """Copy the synthetic set ``source`` to ``dest`` with PHI in every DICOM file.

    Returns:
        The UIDs of the source series (study, series, instance, frame of reference).
    """
    for name in ("dicom", "truth"):
        shutil.copytree(source / name, dest / name)
    for name in ("manifest.csv", "labels.json", KEY_FILE_NAME):  # the key travels with the data
        shutil.copy2(source / name, dest / name)
    new_ids: dict[str, str] = {}
    uids: set[str] = set()
    for path in sorted(p for p in (dest / "dicom").rglob("*") if p.is_file()):
        ds = pydicom.dcmread(path)
        old = str(ds.PatientID)
        new_ids.setdefault(old, f"{PATIENT_ID}-{len(new_ids) + 1}")
        ds.PatientID = new_ids[old]
        for keyword, value in PHI_TAGS.items():
            setattr(ds, keyword, value)
        uids.update(str(ds.get(k)) for k in UID_KEYWORDS if ds.get(k))
        ds.save_as(path)
    for old, new in new_ids.items():  # truth files are named by the hashed PatientID
        (dest / "truth" / f"{hash_identifier(old, dest)}.npz").rename(
            dest / "truth" / f"{hash_identifier(new, dest)}.npz"
        )
    return sorted(uids)


def _pdf_texts(data: bytes) -> list[bytes]:
    """The decompressed (Flate) content streams of a PDF, and the strings its text operators show.

    Matplotlib kerns text as ``[ (S) -0.65 (T) ... ] TJ``: the pieces of each TJ array are joined.
    """
    out = []
    for match in re.finditer(rb"stream\r?\n(.*?)\r?\nendstream", data, re.S):
        try:
            stream = zlib.decompress(match.group(1))
        except zlib.error:
            continue
        out.append(stream)
        for shown in re.finditer(rb"\[(.*?)\]\s*TJ", stream, re.S):
            out.append(b"".join(re.findall(rb"\(((?:\\.|[^\\)])*)\)", shown.group(1))))
    return out


def _contents(path: Path) -> list[bytes]:
    """A file's bytes plus what a search must also see: zip members (npz, ckpt), PDF streams."""
    data = path.read_bytes()
    parts = [data]
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            parts += [z.read(name) for name in z.namelist()]
    if data.startswith(b"%PDF"):
        parts += _pdf_texts(data)
    return parts


def find_leaks(roots: list[Path], needles: list[str], skip_contents: Path | None = None) -> list[str]:
    """Every (path, needle) where a needle occurs in a name under ``roots`` or in a file's contents."""
    # UTF-16/32 too: numpy writes str arrays (e.g. in .npz files) as UTF-32
    encoded = [(n, [n.lower().encode(c) for c in ("utf-8", "utf-16-le", "utf-32-le")]) for n in needles]
    leaks = []
    for root in roots:
        for path in [root, *root.rglob("*")]:
            leaks += [f"name {path}: {n}" for n in needles if n.lower() in path.name.lower()]
            if not path.is_file() or path.is_symlink():
                continue
            if skip_contents is not None and skip_contents in path.parents and path.suffix == ".dcm":
                continue
            for part in _contents(path):
                low = part.lower()
                leaks += [f"file {path}: {n}" for n, forms in encoded if any(b in low for b in forms)]
    return leaks


def find_in_texts(texts: dict[str, str], needles: list[str]) -> list[str]:
    return [f"{where}: {n}" for where, text in texts.items() for n in needles if n.lower() in text.lower()]


@pytest.fixture
def drawn_texts(monkeypatch) -> list[str]:
    """Every string matplotlib draws while the test runs (titles, labels, annotations)."""
    texts: list[str] = []
    original = matplotlib.text.Text.set_text

    def set_text(self, s) -> None:
        texts.append(str(s))
        original(self, s)

    monkeypatch.setattr(matplotlib.text.Text, "set_text", set_text)
    return texts


def test_no_phi_in_anything_written(
    tiny_dataset: Path, tmp_path: Path, capsys, caplog, drawn_texts: list[str]
) -> None:
    from ldct_lightning.cli import denoise, evaluate

    data = tmp_path / "phi-data"
    uids = plant_phi(tiny_dataset, data)
    inputs = {p for p in data.rglob("*")}
    secret = (data / KEY_FILE_NAME).read_text().strip()  # the pseudonym secret must not leave its file either
    needles = [*PHI_STRINGS, *uids, secret]
    assert len(uids) > 20
    # the planted tags are really there
    first = pydicom.dcmread(next(p for p in (data / "dicom").rglob("*") if p.is_file()))
    assert str(first.PatientName) == PHI_TAGS["PatientName"] and str(first.PatientID).startswith(PATIENT_ID)

    # 1. training, both stages, CSV + offline W&B, as a user runs it
    run_dir, home, tmp = tmp_path / "run", tmp_path / "wandb-home", tmp_path / "tmp"
    tmp.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "WANDB_API_KEY"}
    env.update(
        WANDB_MODE="offline",
        WANDB_SILENT="true",
        WANDB_CACHE_DIR=str(home / "cache"),
        WANDB_CONFIG_DIR=str(home / "config"),
        WANDB_DATA_DIR=str(home / "data"),
        WANDB_ARTIFACT_DIR=str(home / "artifacts"),
        TMPDIR=str(tmp),
        PYTHONWARNINGS="default",
    )
    train = subprocess.run(
        [
            sys.executable,
            str(REPO / "train.py"),
            "experiment=tiny",
            "ablation=proposed",
            "logger=wandb",
            f"data.root={data}",
            f"hydra.run.dir={run_dir}",
            "stages.first.max_epochs=1",
            "stages.second.max_epochs=1",
            "stages.first.module.loss.perceptual_weight=0",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert train.returncode == 0, train.stderr[-3000:]
    for stage in ("first", "second"):  # each stage its own W&B run
        assert list((run_dir / stage / "wandb").glob("offline-run-*/*.wandb")), stage
    assert list((run_dir / "second" / "images").glob("*.png"))

    # 2. evaluation and 3. denoising, in-process (so that logs and drawn texts are captured too)
    caplog.set_level(logging.DEBUG)
    eval_dir, denoised = tmp_path / "eval", tmp_path / "denoised"
    second = run_dir / "second" / "checkpoints" / "last.ckpt"
    first_ckpt = run_dir / "first" / "checkpoints" / "last.ckpt"
    argv = [
        "--data", str(data), "--method", f"proposed={second}", "--method", f"firstStep={first_ckpt}",
        "--proposed", "proposed", "--out", str(eval_dir), "--max-slices", "2", "--no-progress",
    ]  # fmt: skip
    assert evaluate.main(argv) == 0
    assert denoise.main([str(data / "dicom"), str(denoised), "--checkpoint", str(second)]) == 0
    out, err = capsys.readouterr()
    written_dicom = list(denoised.rglob("*.dcm"))
    assert len(written_dicom) == len([p for p in (data / "dicom").rglob("*") if p.is_file()])
    assert (
        str(pydicom.dcmread(written_dicom[0]).PatientName) == PHI_TAGS["PatientName"]
    )  # kept, as a PACS needs
    assert list(eval_dir.rglob("*.png")) or list(eval_dir.rglob("*.pdf"))

    # 4. search everything
    created_in_data = [p for p in data.rglob("*") if p not in inputs and p.is_file()]
    assert created_in_data  # the cache and the split file
    leaks = find_leaks([run_dir, eval_dir, denoised, home, tmp], needles, skip_contents=denoised)
    leaks += [leak for p in created_in_data for leak in find_leaks([p], needles)]
    leaks += find_in_texts(
        {
            "train.py stdout": train.stdout,
            "train.py stderr": train.stderr,
            "stdout": out,
            "stderr": err,
            "log records": "\n".join(r.getMessage() for r in caplog.records),
            "matplotlib texts": "\n".join(drawn_texts),
        },
        needles,
    )
    assert drawn_texts  # figures were drawn in-process
    # the search does see the PHI where it is meant to be: in the input and in the denoised DICOM payloads
    assert find_leaks([data / "dicom"], needles) and find_leaks([denoised], needles)
    assert not leaks, "\n".join(leaks[:50])


def test_the_search_finds_planted_strings(tmp_path: Path) -> None:
    """The search itself: names, plain bytes, zip members and compressed PDF streams."""
    import numpy as np
    from matplotlib.figure import Figure

    (tmp_path / "a-DOE^JANE^PHI").mkdir()
    (tmp_path / "log.txt").write_text("patient phi-12345-xyz-1 done")
    np.savez_compressed(tmp_path / "x.npz", key=np.asarray("19010203"))
    fig = Figure()
    fig.suptitle("ST PHI HOSPITAL")
    fig.savefig(tmp_path / "f.pdf")
    leaks = find_leaks([tmp_path], PHI_STRINGS)
    assert any(leak.startswith("name ") and "DOE^JANE^PHI" in leak for leak in leaks)
    for needle, name in [(PATIENT_ID, "log.txt"), ("19010203", "x.npz"), ("ST PHI HOSPITAL", "f.pdf")]:
        assert any(name in leak and leak.endswith(needle) for leak in leaks), (needle, leaks)

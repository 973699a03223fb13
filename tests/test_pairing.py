"""Tests of ldct_lightning.data.pairing: roles from dose tags and manifests, patient-level splits."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import yaml
from pydicom.uid import generate_uid

from ldct_lightning.data.dicom import SeriesInfo, scan_dicom_folder
from ldct_lightning.data.pairing import (
    PairingError,
    Study,
    build_studies,
    compute_inputs_hash,
    load_or_create_split,
    make_split,
)
from ldct_lightning.privacy import Pseudonymizer

SECRET = "SECRET-ID-4711"
_key = Pseudonymizer(bytes(range(32))).key  # the keys of the hand-made SeriesInfo objects


def make_series(
    root: Path,
    patient: str,
    ctdi: float | None = None,
    ma: float | None = None,
    mas: float | None = None,
    n_files: int = 2,
    description: str = "",
) -> SeriesInfo:
    """A SeriesInfo whose files exist (the inputs hash reads their sizes); no DICOM needed for pairing."""
    uid = generate_uid()
    folder = root / patient / _key(uid)
    folder.mkdir(parents=True)
    files = []
    for i in range(n_files):
        files.append(folder / f"slice{i}")
        files[-1].write_bytes(b"x" * (100 + i))
    return SeriesInfo(
        series_uid=uid,
        series_key=_key(uid),
        patient_key=_key(patient),
        modality="CT",
        files=tuple(files),
        positions_mm=tuple(1.25 * i for i in range(n_files)),
        rows=8,
        cols=8,
        pixel_spacing_mm=(0.7, 0.7),
        slice_thickness_mm=1.25,
        kvp=120.0,
        tube_current_ma=ma,
        exposure_mas=mas,
        ctdi_vol=ctdi,
        series_description=description,
    )


def _assert_clean(message: str, *series: SeriesInfo) -> None:
    assert SECRET not in message
    for s in series:
        assert s.series_uid not in message


def _pair(root: Path, patient: str, **kw) -> tuple[SeriesInfo, SeriesInfo]:
    return make_series(root, patient, ctdi=1.5, **kw), make_series(root, patient, ctdi=12.0, **kw)


# -------------------------------------------------------------------------------------------- dose tags


def test_roles_from_ctdivol(tmp_path):
    ld_a, nd_a = _pair(tmp_path, "A")
    ld_b, nd_b = _pair(tmp_path, "B")
    studies = build_studies([nd_a, ld_b, ld_a, nd_b])
    assert [s.patient_key for s in studies] == sorted([_key("A"), _key("B")])
    by_patient = {s.patient_key: s for s in studies}
    assert by_patient[_key("A")] == Study(_key("A"), ld_a, nd_a, aligned=False)
    assert by_patient[_key("B")] == Study(_key("B"), ld_b, nd_b, aligned=False)
    assert all(s.aligned for s in build_studies([ld_a, nd_a], aligned=True))


@pytest.mark.parametrize(
    ("low", "high"),
    [
        ({"ctdi": None, "ma": 40.0}, {"ctdi": 12.0, "ma": 300.0}),  # CTDIvol on one only: tube current
        ({"mas": 20.0}, {"mas": 150.0}),  # only Exposure
        ({"ctdi": 2.0, "ma": 400.0}, {"ctdi": 12.0, "ma": 100.0}),  # CTDIvol wins over tube current
    ],
)
def test_dose_tag_fallbacks(tmp_path, low, high):
    ld, nd = make_series(tmp_path, "P", **low), make_series(tmp_path, "P", **high)
    (study,) = build_studies([nd, ld])
    assert study.ldct is ld and study.ndct is nd


def test_dose_pairing_errors_are_clear(tmp_path):
    ld, nd = make_series(tmp_path, SECRET, ctdi=10.0), make_series(tmp_path, SECRET, ctdi=12.0)
    with pytest.raises(PairingError, match=r"too close.*ratio 1.20 < 1.5.*manifest") as err:
        build_studies([ld, nd])
    assert _key(SECRET) in str(err.value)
    _assert_clean(str(err.value), ld, nd)
    assert build_studies([ld, nd], min_dose_ratio=1.1)[0].ldct is ld

    bare = [make_series(tmp_path, SECRET), make_series(tmp_path, SECRET, ctdi=1.0)]
    with pytest.raises(PairingError, match="no dose tag .*CTDIvol.*XRayTubeCurrent.*Exposure") as err:
        build_studies(bare)
    _assert_clean(str(err.value), *bare)

    three = [*_pair(tmp_path, SECRET), make_series(tmp_path, SECRET, ctdi=6.0, description="dose report")]
    with pytest.raises(PairingError, match="3 series, expected one LDCT and one NDCT") as err:
        build_studies(three)
    assert all(s.series_key in str(err.value) for s in three) and "dose report" in str(err.value)
    _assert_clean(str(err.value), *three)


def test_single_series_patients_are_skipped(tmp_path):
    ld, nd = _pair(tmp_path, "A")
    lonely = make_series(tmp_path, SECRET, ctdi=3.0)
    with pytest.warns(UserWarning, match=_key(SECRET)) as record:
        studies = build_studies([ld, lonely, nd])
    assert SECRET not in str(record[0].message)
    assert [s.patient_key for s in studies] == [_key("A")]
    with pytest.raises(PairingError, match="no patient has both"), pytest.warns(UserWarning):
        build_studies([lonely])


# -------------------------------------------------------------------------------------------- manifests


def test_csv_manifest_by_series_uid(tmp_path):
    ld_a, nd_a = _pair(tmp_path, "A")
    ld_b, nd_b = _pair(tmp_path, "B")
    extra = make_series(tmp_path, "A", ctdi=5.0)  # not named in the manifest: ignored
    manifest = tmp_path / "manifest.csv"
    # roles against the dose tags, to show the manifest wins
    manifest.write_text(
        "series_uid,role,aligned\n"
        f"{ld_a.series_uid},ndct,true\n{nd_a.series_uid},ldct,\n"
        f"{ld_b.series_uid},LDCT,\n{nd_b.series_uid},ndct,\n"
    )
    studies = {s.patient_key: s for s in build_studies([ld_a, nd_a, extra, ld_b, nd_b], manifest=manifest)}
    assert studies[_key("A")] == Study(_key("A"), nd_a, ld_a, aligned=True)
    assert studies[_key("B")] == Study(_key("B"), ld_b, nd_b, aligned=False)


def test_yaml_manifest_by_relative_path(tmp_path):
    ld, nd = _pair(tmp_path, "A")
    rows = [
        {"path": str(ld.files[0].parent.relative_to(tmp_path)), "role": "ldct"},
        {"path": str(nd.files[0].parent), "role": "ndct"},
    ]
    manifest = tmp_path / "manifest.yaml"
    manifest.write_text(yaml.safe_dump({"series": rows}))
    (study,) = build_studies([nd, ld], manifest=manifest, aligned=True)
    assert study.ldct is ld and study.ndct is nd and study.aligned
    manifest.write_text(yaml.safe_dump([{**rows[0], "aligned": False}, rows[1]]))
    assert not build_studies([nd, ld], manifest=manifest, aligned=True)[0].aligned


def test_manifest_from_scanned_dicom(write_series, tmp_path):
    write_series("dicom/p1/ld", n_slices=2, patient_id=SECRET, ctdi_vol=1.5)
    write_series("dicom/p1/nd", n_slices=3, patient_id=SECRET, ctdi_vol=12.0)
    series = scan_dicom_folder(tmp_path / "dicom")
    by_dose = build_studies(series)[0]
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("path,role\ndicom/p1/ld,ldct\ndicom/p1/nd,ndct\n")
    assert build_studies(series, manifest=manifest)[0] == by_dose
    assert by_dose.ldct.n_slices == 2 and by_dose.ndct.n_slices == 3


@pytest.mark.parametrize(
    ("rows", "problem"),
    [
        (lambda ld, nd: [(ld.series_uid, "low"), (nd.series_uid, "ndct")], "role must be ldct or ndct"),
        (lambda ld, nd: [("1.2.3.999", "ldct"), (nd.series_uid, "ndct")], "not among the scanned series"),
        (lambda ld, nd: [(ld.series_uid, "ldct")], "has no ndct row"),
        (lambda ld, nd: [(ld.series_uid, "ldct"), (ld.series_uid, "ndct")], "already named in"),
        (lambda ld, nd: [(ld.series_uid, "ldct"), (nd.series_uid, "ldct")], "already has an ldct"),
        (lambda ld, nd: [("", "ldct"), (nd.series_uid, "ndct")], "needs a series_uid or a path"),
        (
            lambda ld, nd: [(ld.series_uid, "ldct", "yes"), (nd.series_uid, "ndct", "no")],
            "conflicting aligned",
        ),
        (lambda ld, nd: [(ld.series_uid, "ldct", "maybe"), (nd.series_uid, "ndct")], "aligned must be true"),
    ],
)
def test_manifest_errors_name_the_file_and_row(tmp_path, rows, problem):
    ld, nd = _pair(tmp_path, SECRET)
    manifest = tmp_path / "manifest.csv"
    lines = ["series_uid,role,aligned"] + [",".join((*row, "")[:3]) for row in rows(ld, nd)]
    manifest.write_text("\n".join(lines) + "\n")
    with pytest.raises(PairingError, match=problem) as err:
        build_studies([ld, nd], manifest=manifest)
    assert str(manifest) in str(err.value)
    _assert_clean(str(err.value), ld, nd)
    assert "1.2.3.999" not in str(err.value)


def test_manifest_path_must_hold_one_series(tmp_path):
    ld, nd = _pair(tmp_path, "A")
    manifest = tmp_path / "m.yaml"
    manifest.write_text(yaml.safe_dump([{"path": "A", "role": "ldct"}, {"path": "A", "role": "ndct"}]))
    with pytest.raises(PairingError, match="holds 2 series"):
        build_studies([ld, nd], manifest=manifest)
    (tmp_path / "m.json").write_text("[]")
    with pytest.raises(PairingError, match="unknown manifest format"):
        build_studies([ld, nd], manifest=tmp_path / "m.json")
    with pytest.raises(PairingError, match="manifest not found"):
        build_studies([ld, nd], manifest=tmp_path / "missing.csv")


# ----------------------------------------------------------------------------------------------- splits


def _studies(root: Path, n: int) -> list[Study]:
    studies = []
    for i in range(n):
        ld = make_series(root, f"patient-{i}", ctdi=1.5, n_files=1)
        nd = make_series(root, f"patient-{i}", ctdi=12.0, n_files=1)
        studies.append(Study(ld.patient_key, ld, nd, aligned=False))
    return studies


@pytest.fixture(scope="module")
def studies64(tmp_path_factory) -> list[Study]:
    return _studies(tmp_path_factory.mktemp("split64"), 64)


def test_paper_split_46_train_18_test(studies64):
    split = make_split(studies64, n_val=0, n_test=18, seed=0)
    assert (len(split.train), len(split.val), len(split.test)) == (46, 0, 18)
    assert set(split.train).isdisjoint(split.test)
    assert set(split.train) | set(split.test) == {s.patient_key for s in studies64}


def test_split_is_patient_level_and_deterministic(studies64):
    split = make_split(studies64, n_val=0.1, n_test=0.2, seed=7)
    assert (len(split.train), len(split.val), len(split.test)) == (45, 6, 13)  # round(6.4), round(12.8)
    parts = [set(split.train), set(split.val), set(split.test)]
    assert sum(len(p) for p in parts) == len(set().union(*parts)) == 64  # no patient in two splits
    shuffled = random.Random(1).sample(studies64, len(studies64))
    assert make_split(shuffled, n_val=0.1, n_test=0.2, seed=7) == split
    assert make_split(studies64, n_val=0.1, n_test=0.2, seed=8).test != split.test
    assert split.inputs_hash == compute_inputs_hash(studies64)


@pytest.mark.parametrize(("n_val", "n_test"), [(10, 60), (-1, 2), (0, 1.5), ("2", 1)])
def test_invalid_split_sizes(studies64, n_val, n_test):
    with pytest.raises(PairingError):
        make_split(studies64, n_val=n_val, n_test=n_test, seed=0)


def test_split_file_is_written_once_and_reused(tmp_path):
    studies = _studies(tmp_path / "data", 10)
    path = tmp_path / "splits" / "split.yaml"
    split = load_or_create_split(path, studies, n_val=2, n_test=3, seed=0)
    stored = yaml.safe_load(path.read_text())
    assert stored["inputs_hash"] == split.inputs_hash == compute_inputs_hash(studies)
    assert stored["params"]["n_test"] == 3 and stored["test"] == list(split.test)
    assert os.listdir(path.parent) == ["split.yaml"]  # no temporary file left behind
    before = path.stat().st_mtime_ns
    # reused (not rewritten) when the same studies come in another order
    again = load_or_create_split(path, list(reversed(studies)), n_val=2, n_test=3, seed=0)
    assert again == split and path.stat().st_mtime_ns == before


def test_split_file_detects_changed_inputs_and_parameters(tmp_path):
    studies = _studies(tmp_path / "data", 10)
    path = tmp_path / "split.yaml"
    load_or_create_split(path, studies, n_val=2, n_test=3, seed=0)
    with pytest.raises(PairingError, match="other parameters.*n_test_count 3 -> 4") as err:
        load_or_create_split(path, studies, n_val=2, n_test=4, seed=0)
    assert str(path) in str(err.value) and "Delete" in str(err.value)
    with pytest.raises(PairingError, match="other data"):
        load_or_create_split(path, studies[:-1], n_val=2, n_test=3, seed=0)  # a patient removed
    studies[0].ldct.files[0].write_bytes(b"re-exported")  # a file changed size
    with pytest.raises(PairingError, match="other data") as err:
        load_or_create_split(path, studies, n_val=2, n_test=3, seed=0)
    assert str(path) in str(err.value) and "Delete" in str(err.value)


def test_all_as_a_split_size_makes_every_patient_a_test_patient(studies64):
    import argparse

    from ldct_lightning.data.split_defaults import split_params, split_size

    assert split_size("all") == "all" and split_size("0.25") == 0.25
    with pytest.raises(argparse.ArgumentTypeError, match="'most'"):
        split_size("most")
    params = split_params(
        Path("/nonexistent/split.yaml"), {"n_val": 2, "n_test": 3, "split_seed": 0}, 0.0, "all"
    )
    assert params == {"n_val": 0.0, "n_test": 1.0, "split_seed": 0}
    split = make_split(studies64, params["n_val"], params["n_test"], 0)
    assert len(split.test) == 64 and not split.train and not split.val

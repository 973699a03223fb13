"""A folder as users have them: good CT series among broken, foreign and unrelated files.

``ldct-denoise`` must denoise every readable CT series, name each bad file once, print no traceback and
exit with code 2; ``--strict`` stops at the first bad file; single files and several inputs work.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pydicom
import pytest
import test_denoise
from pydicom.data import get_testdata_file
from test_denoise import SHAPE, _run_cli

from ldct_lightning.data.dicom import scan_dicom

run_checkpoint = test_denoise.run_checkpoint  # the fixture


def _source_uids(paths: list[Path]) -> set[str]:
    return {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths}


def _denoised_sources(out: Path) -> list[set[str]]:
    """Per output series folder: the source SOPInstanceUIDs its files reference."""
    series = []
    for folder in sorted(p for p in out.iterdir() if p.is_dir()):
        refs = set()
        for f in folder.iterdir():
            ds = pydicom.dcmread(f, stop_before_pixels=True)
            refs.add(str(ds.SourceImageSequence[0].ReferencedSOPInstanceUID))
        series.append(refs)
    return series


def _bad_folder(root: Path, write_series) -> tuple[list[set[str]], list[Path]]:
    """Write the folder; returns the good series (their source SOP UIDs) and the bad files."""
    good = [
        write_series(root / "study1", n_slices=3, shape=SHAPE, seed=1),
        # two series interleaved in one folder (random file names mix them)
        write_series(root / "mixed", n_slices=3, shape=SHAPE, seed=2, patient_id="PAT-002"),
        write_series(root / "mixed", n_slices=2, shape=SHAPE, seed=3, patient_id="PAT-002"),
    ]
    good_sets = [_source_uids(w.paths) for w in good]
    ct_small = root / "pydicom" / "CT_small.dcm"
    ct_small.parent.mkdir(parents=True)
    shutil.copy(get_testdata_file("CT_small.dcm"), ct_small)
    good_sets.append(_source_uids([ct_small]))

    bad = []
    truncated = root / "broken" / "truncated_header.dcm"
    truncated.parent.mkdir(parents=True)
    truncated.write_bytes(good[0].paths[0].read_bytes()[:300])
    bad.append(truncated)
    (root / "broken" / "zero_bytes.dcm").write_bytes(b"")
    bad.append(root / "broken" / "zero_bytes.dcm")
    (root / "README.txt").write_text("exported by a viewer\n")
    bad.append(root / "README.txt")
    for name in ("MR_small.dcm", "rtdose.dcm", "rtplan.dcm"):
        shutil.copy(get_testdata_file(name), root / "broken" / name)
        bad.append(root / "broken" / name)
    # a series whose last file lost its pixel data: the header scan accepts it, decoding fails
    cut = write_series(root / "cut", n_slices=2, shape=SHAPE, seed=4)
    cut.paths[1].write_bytes(cut.paths[1].read_bytes()[:-500])
    bad.append(cut.paths[1])
    return good_sets, bad


def test_every_readable_series_is_denoised_and_each_bad_file_named_once(
    write_series, run_checkpoint, tmp_path, capsys
):
    good, bad = _bad_folder(tmp_path / "in", write_series)
    rc, out, err = _run_cli([tmp_path / "in", tmp_path / "out", "-c", run_checkpoint()], capsys)
    text = out + err
    assert rc == 2, text
    assert "Traceback" not in text
    assert sorted(map(sorted, _denoised_sources(tmp_path / "out"))) == sorted(map(sorted, good))
    for path in bad:
        assert text.count(str(path)) == 1, (path, text)
    errors = [line for line in err.splitlines() if line.startswith("ldct-denoise: error:")]
    assert len(errors) == 1 and "1 of 5 series not denoised" in errors[0], err
    assert "6 of" in errors[0] and "file(s) skipped" in errors[0]


def test_strict_stops_at_the_first_bad_file(write_series, run_checkpoint, tmp_path, capsys):
    _bad_folder(tmp_path / "in", write_series)
    rc, out, err = _run_cli([tmp_path / "in", tmp_path / "out", "-c", run_checkpoint(), "--strict"], capsys)
    assert rc == 2 and "Traceback" not in out + err
    errors = [line for line in err.splitlines() if line.startswith("ldct-denoise: error:")]
    assert len(errors) == 1 and "truncated_header.dcm" in errors[0], err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_a_single_file_and_several_inputs_are_accepted(write_series, run_checkpoint, tmp_path, capsys):
    a = write_series("a", n_slices=3, shape=SHAPE, seed=1)
    b = write_series("b", n_slices=2, shape=SHAPE, seed=2, patient_id="PAT-002")
    ckpt = run_checkpoint()
    rc, out, err = _run_cli([a.paths[1], tmp_path / "out1", "-c", ckpt], capsys)
    assert rc == 0, err
    assert _denoised_sources(tmp_path / "out1") == [_source_uids([a.paths[1]])]
    rc, out, err = _run_cli([a.paths[0], a.paths[2], tmp_path / "b", tmp_path / "out2", "-c", ckpt], capsys)
    assert rc == 0, err
    expected = [_source_uids([a.paths[0], a.paths[2]]), _source_uids(b.paths)]
    assert sorted(map(sorted, _denoised_sources(tmp_path / "out2"))) == sorted(map(sorted, expected))
    rc, _, err = _run_cli([tmp_path / "missing.dcm", tmp_path / "out3", "-c", ckpt], capsys)
    assert rc == 2 and "missing.dcm: no such INPUT" in err


@pytest.mark.parametrize("strict", [False, True])
def test_scan_lists_each_bad_file_once_or_stops(write_series, tmp_path, strict):
    good, bad = _bad_folder(tmp_path / "in", write_series)
    if strict:
        with pytest.raises(Exception, match="truncated_header.dcm"):
            scan_dicom([tmp_path / "in"], strict=True, allow_non_ct=True)
        return
    scan = scan_dicom([tmp_path / "in"])
    assert len(scan.series) == len(good) + 1  # the series with the cut file fails only when decoded
    assert sorted(s.path for s in scan.skipped) == sorted(bad[:-1])
    assert all("\n" not in s.message and s.message.startswith(f"{s.path}: ") for s in scan.skipped)


def test_every_error_class_of_the_package_is_an_ldct_error() -> None:
    """Entry points catch one class: every ``*Error`` defined in the package derives from ``LDCTError``."""
    import importlib
    import inspect
    import pkgutil

    import ldct_lightning
    from ldct_lightning.errors import LDCTError

    found = {}
    for info in pkgutil.walk_packages(ldct_lightning.__path__, "ldct_lightning."):
        module = importlib.import_module(info.name)
        for name, obj in inspect.getmembers(module, inspect.isclass):
            if name.endswith("Error") and obj.__module__ == info.name:
                found[f"{info.name}.{name}"] = obj
    assert len(found) >= 16  # the classes there were when the base class came (guards against an empty walk)
    not_ldct = sorted(name for name, cls in found.items() if not issubclass(cls, LDCTError))
    assert not_ldct == []
    assert issubclass(LDCTError, ValueError)  # callers that caught ValueError keep working

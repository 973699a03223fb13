"""Studies (one LDCT and one NDCT series per patient), manifests and patient-level splits.

A study's roles come from an explicit manifest (CSV or YAML) when one is given, otherwise from the dose
tags of the patient's two series. Splits are made once per data set, written with a hash of the inputs,
and reused by every stage and baseline.
"""

from __future__ import annotations

import csv
import hashlib
import random
import warnings
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from ldct_lightning.atomic import write_text_atomic
from ldct_lightning.data.dicom import SeriesInfo
from ldct_lightning.errors import LDCTError

ROLES = ("ldct", "ndct")
# Dose tags compared to tell LDCT from NDCT, in order of preference: (SeriesInfo attribute, keyword, unit).
DOSE_TAGS = (
    ("ctdi_vol", "CTDIvol", "mGy"),
    ("tube_current_ma", "XRayTubeCurrent", "mA"),
    ("exposure_mas", "Exposure", "mAs"),
)


class PairingError(LDCTError):
    """Studies or a split cannot be built from the given series, manifest or split file."""


@dataclass(frozen=True)
class Study:
    """One patient's low-dose and normal-dose series.

    Attributes:
        patient_key: hashed PatientID.
        ldct: the low-dose series.
        ndct: the normal-dose series.
        aligned: True only when flagged (manifest or argument): slice i of both series then shows the
            same anatomy; by default pairs are unaligned.
    """

    patient_key: str
    ldct: SeriesInfo
    ndct: SeriesInfo
    aligned: bool


@dataclass(frozen=True)
class Split:
    """Patient keys of each split, and the hash of the inputs the split was made from."""

    train: tuple[str, ...]
    val: tuple[str, ...]
    test: tuple[str, ...]
    inputs_hash: str


# ---------------------------------------------------------------------------------------------- studies


def _describe(s: SeriesInfo) -> str:
    doses = ", ".join(
        f"{kw} {getattr(s, attr):g} {unit}" for attr, kw, unit in DOSE_TAGS if getattr(s, attr) is not None
    )
    return f"series {s.series_key} ('{s.series_description}', {s.n_slices} slices, {doses or 'no dose tags'})"


def _roles_from_dose(
    patient_key: str, a: SeriesInfo, b: SeriesInfo, min_dose_ratio: float
) -> tuple[SeriesInfo, SeriesInfo]:
    """Return (ldct, ndct) by the first dose tag present on both series."""
    hint = "Give a manifest (series_uid or path, role ldct|ndct) to set the roles explicitly"
    for attr, keyword, unit in DOSE_TAGS:
        da, db = getattr(a, attr), getattr(b, attr)
        if da is None or db is None:
            continue
        low, high = (a, b) if da < db else (b, a)
        dose_low, dose_high = min(da, db), max(da, db)
        ratio = dose_high / dose_low if dose_low > 0 else float("inf") if dose_high > 0 else 1.0
        if ratio < min_dose_ratio:
            raise PairingError(
                f"patient {patient_key}: {keyword} {dose_low:g} vs {dose_high:g} {unit} is too close to tell LDCT "
                f"from NDCT (ratio {ratio:.2f} < {min_dose_ratio:g}): {_describe(a)}; {_describe(b)}. {hint}"
            )
        return low, high
    raise PairingError(
        f"patient {patient_key}: no dose tag ({', '.join(kw for _, kw, _ in DOSE_TAGS)}) is present on both "
        f"series: {_describe(a)}; {_describe(b)}. {hint}"
    )


def _studies_from_dose(series: Sequence[SeriesInfo], aligned: bool, min_dose_ratio: float) -> list[Study]:
    by_patient: dict[str, list[SeriesInfo]] = defaultdict(list)
    for s in series:
        by_patient[s.patient_key].append(s)
    studies = []
    for patient_key, items in sorted(by_patient.items()):
        if len(items) == 1:
            warnings.warn(
                f"patient {patient_key}: only one series ({_describe(items[0])}); patient skipped",
                stacklevel=3,
            )
            continue
        if len(items) > 2:
            listing = "; ".join(_describe(s) for s in items)
            raise PairingError(
                f"patient {patient_key}: {len(items)} series, expected one LDCT and one NDCT: {listing}. "
                "Remove the extra series from the folder or give a manifest that names the two to use"
            )
        ldct, ndct = _roles_from_dose(patient_key, items[0], items[1], min_dose_ratio)
        studies.append(Study(patient_key, ldct, ndct, aligned))
    return studies


def _parse_bool(value: object, where: str) -> bool | None:
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "y"):
        return True
    if text in ("0", "false", "no", "n"):
        return False
    raise PairingError(f"{where}: aligned must be true or false, got '{value}'. Fix the manifest")


def _load_manifest_rows(path: Path) -> list[dict]:
    """Rows of a CSV or YAML manifest (YAML: a list of mappings, or a mapping with a ``series`` list)."""
    if not path.is_file():
        raise PairingError(f"{path}: manifest not found. Check the manifest path")
    if path.suffix.lower() == ".csv":
        with open(path, newline="", encoding="utf-8-sig") as f:  # utf-8-sig: spreadsheet exports add a BOM
            rows = list(csv.DictReader(f))
    elif path.suffix.lower() in (".yaml", ".yml"):
        data = yaml.safe_load(path.read_text())
        rows = data.get("series") if isinstance(data, dict) else data
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise PairingError(
                f"{path}: expected a list of rows (or a 'series:' list) with series_uid or path and role. "
                "Fix the manifest"
            )
    else:
        raise PairingError(f"{path}: unknown manifest format '{path.suffix}'. Use a .csv, .yaml or .yml file")
    return [{str(k).strip().lower(): v for k, v in row.items() if k is not None} for row in rows]


def _series_in_folder(folder: Path, series: Sequence[SeriesInfo], where: str) -> SeriesInfo:
    """The one series whose files lie under ``folder`` (judged by each series' first file)."""
    folder = folder.resolve()
    found = [s for s in series if folder in s.files[0].resolve().parents]
    if len(found) != 1:
        what = (
            "no scanned series"
            if not found
            else f"{len(found)} series ({', '.join(s.series_key for s in found)})"
        )
        raise PairingError(f"{where}: folder {folder} holds {what}, expected exactly one. Fix the path")
    return found[0]


def _studies_from_manifest(series: Sequence[SeriesInfo], manifest: Path, aligned: bool) -> list[Study]:
    by_uid = {s.series_uid: s for s in series}
    roles: dict[str, dict[str, SeriesInfo]] = defaultdict(dict)  # patient -> role -> series
    flags: dict[str, set[bool]] = defaultdict(set)  # patient -> aligned flags given
    used: dict[str, str] = {}  # series key -> where it was named
    rows = _load_manifest_rows(manifest)
    if not rows:
        raise PairingError(f"{manifest}: the manifest has no rows. Add one row per series")
    for i, row in enumerate(rows, start=1):
        where = f"{manifest} row {i}"
        role = str(row.get("role") or "").strip().lower()
        if role not in ROLES:
            raise PairingError(f"{where}: role must be ldct or ndct, got '{role}'. Fix the manifest")
        uid, folder = str(row.get("series_uid") or "").strip(), str(row.get("path") or "").strip()
        if uid:
            if uid not in by_uid:
                raise PairingError(
                    f"{where}: its series_uid is not among the scanned series. "
                    "Check the series_uid and the data folder"
                )
            s = by_uid[uid]
        elif folder:
            path = Path(folder)
            s = _series_in_folder(path if path.is_absolute() else manifest.parent / path, series, where)
        else:
            raise PairingError(f"{where}: needs a series_uid or a path. Fix the manifest")
        if s.series_key in used:
            raise PairingError(
                f"{where}: series {s.series_key} is already named in {used[s.series_key]}. Fix the manifest"
            )
        used[s.series_key] = where
        if role in roles[s.patient_key]:
            raise PairingError(
                f"{where}: patient {s.patient_key} already has an {role} series. Give each patient one ldct "
                "and one ndct row"
            )
        roles[s.patient_key][role] = s
        flag = _parse_bool(row.get("aligned"), where)
        if flag is not None:
            flags[s.patient_key].add(flag)
    studies = []
    for patient_key, pair in sorted(roles.items()):
        if len(pair) != 2:
            missing = next(r for r in ROLES if r not in pair)
            raise PairingError(
                f"{manifest}: patient {patient_key} has no {missing} row. Add it to the manifest"
            )
        if len(flags[patient_key]) > 1:
            raise PairingError(
                f"{manifest}: patient {patient_key} has conflicting aligned flags. Use one value per patient"
            )
        is_aligned = flags[patient_key].pop() if flags[patient_key] else aligned
        studies.append(Study(patient_key, pair["ldct"], pair["ndct"], is_aligned))
    return studies


def build_studies(
    series: Sequence[SeriesInfo],
    manifest: str | Path | None = None,
    aligned: bool = False,
    min_dose_ratio: float = 1.5,
) -> list[Study]:
    """Pair each patient's LDCT and NDCT series.

    With a manifest, its rows set the roles (series not named in it are ignored). Without one, each
    patient must have exactly two series and the lower dose one (CTDIvol, else XRayTubeCurrent, else
    Exposure) is the LDCT; patients with a single series are skipped with a warning.

    Args:
        series: series from :func:`ldct_lightning.data.dicom.scan_dicom_folder`.
        manifest: CSV or YAML file, one row per series: ``series_uid`` or ``path`` (a folder holding
            exactly that series, relative to the manifest), ``role`` (ldct|ndct), optional ``aligned``.
        aligned: flag for studies whose manifest rows say nothing (and for all studies without one).
        min_dose_ratio: the higher dose must be at least this many times the lower one.

    Returns:
        Studies sorted by patient key.

    Raises:
        PairingError: roles cannot be told, the manifest is invalid, or no study could be built.
    """
    if manifest is not None:
        studies = _studies_from_manifest(series, Path(manifest), aligned)
    else:
        studies = _studies_from_dose(series, aligned, min_dose_ratio)
    if not studies:
        raise PairingError(
            f"no patient has both an LDCT and an NDCT series among {len(series)} series. "
            "Check the data folder (each patient needs two series) or give a manifest"
        )
    return studies


# ------------------------------------------------------------------------------------------------ splits


def compute_inputs_hash(studies: Sequence[Study]) -> str:
    """sha256 over the sorted patient keys, their series keys and roles, and the file names and sizes.

    Args:
        studies: the studies a split is made from.

    Returns:
        A hex digest that changes when patients, series or files change.
    """
    digest = hashlib.sha256()
    for study in sorted(studies, key=lambda s: s.patient_key):
        digest.update(f"patient {study.patient_key}\n".encode())
        for role, s in (("ldct", study.ldct), ("ndct", study.ndct)):
            digest.update(f"{role} {s.series_key}\n".encode())
            for f in sorted(s.files, key=lambda p: p.name):
                digest.update(f"{f.name} {f.stat().st_size}\n".encode())
    return digest.hexdigest()


def _count(value: int | float, n: int, name: str) -> int:
    """A split size given as a count (int) or a fraction of ``n`` patients (float)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise PairingError(f"{name} must be an int (patients) or a float (fraction), got {value!r}")
    if isinstance(value, float):
        if not 0.0 <= value <= 1.0:
            raise PairingError(f"{name} as a fraction must lie in [0, 1], got {value}")
        return int(round(value * n))
    if value < 0:
        raise PairingError(f"{name} must be >= 0, got {value}")
    return value


def _split_counts(n: int, n_val: int | float, n_test: int | float) -> tuple[int, int]:
    val, test = _count(n_val, n, "n_val"), _count(n_test, n, "n_test")
    if val + test > n:
        raise PairingError(
            f"n_val ({val}) + n_test ({test}) exceed the {n} patients. Lower them (data.n_val/data.n_test for "
            "train.py, --n-val/--n-test for ldct-data-summary and ldct-evaluate)"
        )
    return val, test


def make_split(studies: Sequence[Study], n_val: int | float, n_test: int | float, seed: int) -> Split:
    """Split patients into train/val/test, deterministically for a seed.

    Args:
        studies: one study per patient.
        n_val: validation patients, a count (int) or a fraction (float).
        n_test: test patients, a count (int) or a fraction (float). The paper's 46 train / 18 test
            split of 64 patients is ``n_val=0, n_test=18``.
        seed: random seed.

    Returns:
        The split; each patient is in exactly one part.
    """
    keys = sorted({s.patient_key for s in studies})
    val, test = _split_counts(len(keys), n_val, n_test)
    random.Random(seed).shuffle(keys)
    return Split(
        train=tuple(sorted(keys[val + test :])),
        val=tuple(sorted(keys[test : test + val])),
        test=tuple(sorted(keys[:test])),
        inputs_hash=compute_inputs_hash(studies),
    )


def write_yaml_atomic(data: dict, path: Path) -> None:
    """Write ``data`` as YAML to ``path`` atomically (:func:`ldct_lightning.atomic.atomic_path`)."""
    write_text_atomic(path, yaml.safe_dump(data, sort_keys=False))


def load_or_create_split(
    path: str | Path,
    studies: Sequence[Study],
    n_val: int | float,
    n_test: int | float,
    seed: int,
    write: bool = True,
) -> Split:
    """Reuse the split stored at ``path``, or make it and write it there (YAML, atomically).

    Args:
        path: the split file.
        studies: one study per patient.
        n_val: validation patients, a count or a fraction.
        n_test: test patients, a count or a fraction.
        seed: random seed.
        write: write a new split (False: only return the split that would be written).

    Returns:
        The split.

    Raises:
        PairingError: the stored split was made from other data or other split parameters.
    """
    path = Path(path)
    inputs_hash = compute_inputs_hash(studies)
    val, test = _split_counts(len({s.patient_key for s in studies}), n_val, n_test)
    redo = f"Delete {path} to make a new split, or point the split path to a new file"
    if path.is_file():
        stored = yaml.safe_load(path.read_text()) or {}
        if not isinstance(stored, dict) or "inputs_hash" not in stored:
            raise PairingError(f"{path}: not a split file (no inputs_hash). {redo}")
        if stored["inputs_hash"] != inputs_hash:
            raise PairingError(
                f"{path}: the split was made for other data (inputs hash {stored['inputs_hash'][:12]}, now "
                f"{inputs_hash[:12]}): patients, series or files changed. {redo}"
            )
        params = stored.get("params", {})
        wanted = {"n_val_count": val, "n_test_count": test, "seed": seed}
        changed = {k: (params.get(k), v) for k, v in wanted.items() if params.get(k) != v}
        if changed:
            detail = ", ".join(f"{k} {old} -> {new}" for k, (old, new) in changed.items())
            raise PairingError(f"{path}: the split was made with other parameters ({detail}). {redo}")
        return Split(
            train=tuple(stored["train"]),
            val=tuple(stored["val"]),
            test=tuple(stored["test"]),
            inputs_hash=inputs_hash,
        )
    split = make_split(studies, n_val, n_test, seed)
    if not write:
        return split
    write_yaml_atomic(
        {
            "inputs_hash": split.inputs_hash,
            "params": {
                "n_val": n_val,
                "n_test": n_test,
                "seed": seed,
                "n_val_count": val,
                "n_test_count": test,
            },
            "counts": {"train": len(split.train), "val": len(split.val), "test": len(split.test)},
            "train": list(split.train),
            "val": list(split.val),
            "test": list(split.test),
        },
        path,
    )
    return split

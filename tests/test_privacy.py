"""Keyed pseudonyms (HMAC-SHA256 under a per-data-root secret), checked against the standard library."""

from __future__ import annotations

import hashlib
import hmac
import logging
import stat
from pathlib import Path

import pytest

from ldct_lightning import privacy
from ldct_lightning.cli import data_summary
from ldct_lightning.privacy import KEY_FILE_NAME, PrivacyError, hash_identifier, pseudonymizer

IDS = [f"MRN{n:07d}" for n in range(200)]  # low-entropy IDs, as medical record numbers are


def _secret(root: Path) -> bytes:
    return bytes.fromhex((root / KEY_FILE_NAME).read_text().strip())


def test_keys_are_hmac_sha256_under_the_roots_secret(tmp_path: Path) -> None:
    key = hash_identifier("MRN0000042", tmp_path)
    path = tmp_path / KEY_FILE_NAME
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    secret = _secret(tmp_path)
    assert len(secret) == 32
    assert key == hmac.new(secret, b"MRN0000042", hashlib.sha256).hexdigest()[:12]
    assert key != hashlib.sha256(b"MRN0000042").hexdigest()[:12]
    assert hash_identifier("MRN0000042", tmp_path, length=20).startswith(key)
    privacy._loaded.clear()  # stable: the same key after a restart
    assert hash_identifier("MRN0000042", tmp_path) == key and path.read_bytes() == path.read_bytes()


def test_two_data_roots_give_unrelated_keys(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    keys_a = [hash_identifier(i, a) for i in IDS]
    keys_b = [hash_identifier(i, b) for i in IDS]
    assert _secret(a) != _secret(b)
    assert not set(keys_a) & set(keys_b)
    assert len(set(keys_a)) == len(IDS)


def test_a_second_creator_keeps_the_first_secret(tmp_path: Path) -> None:
    first = hash_identifier("X", tmp_path)
    privacy._create(tmp_path / KEY_FILE_NAME)  # as a concurrent process would, losing the race
    privacy._loaded.clear()
    assert hash_identifier("X", tmp_path) == first
    assert [p.name for p in tmp_path.iterdir()] == [KEY_FILE_NAME]  # no temporary file left


def test_read_only_root_keeps_its_secret_in_the_user_folder(tmp_path: Path, monkeypatch) -> None:
    root = tmp_path / "cdrom"
    root.mkdir()
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(privacy.os, "access", lambda path, mode: False)
    key = hash_identifier("X", root)
    assert not (root / KEY_FILE_NAME).exists()
    (user_file,) = (tmp_path / "home" / "ldct-lightning" / "pseudonym-keys").iterdir()
    assert stat.S_IMODE(user_file.stat().st_mode) == 0o600
    assert hash_identifier("X", root) == key and privacy.key_file(root) == user_file


def test_a_damaged_key_file_is_named(tmp_path: Path) -> None:
    (tmp_path / KEY_FILE_NAME).write_text("not hex\n")
    with pytest.raises(PrivacyError, match=f"{tmp_path / KEY_FILE_NAME}: not a pseudonym key file"):
        pseudonymizer(tmp_path)


def test_the_secret_never_reaches_output_or_logs(tiny_dataset: Path, capsys, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    assert data_summary.main([str(tiny_dataset), "--n-val", "1", "--n-test", "1"]) == 0
    out, err = capsys.readouterr()
    secret = (tiny_dataset / KEY_FILE_NAME).read_text().strip()
    logs = "\n".join(r.getMessage() for r in caplog.records)
    assert secret not in out + err + logs and "patient_key" in out
    assert secret not in repr(pseudonymizer(tiny_dataset))


def test_truth_files_under_another_key_are_reported(tmp_path: Path) -> None:
    from test_datamodule import make_dm, write_dataset

    from ldct_lightning.data.datamodule import DataConfigError

    root = tmp_path / "data"
    write_dataset(root, truth=True)
    for i, f in enumerate(sorted((root / "truth").glob("*.npz"))):  # as named by an older, unkeyed hash
        f.rename(f.with_name(f"{hashlib.sha256(f'PAT-{i:03d}'.encode()).hexdigest()[:12]}.npz"))
    with pytest.raises(DataConfigError, match="another pseudonym key.*--overwrite"):
        make_dm(root, tmp_path).setup("fit")


def test_a_subfolder_is_keyed_as_its_data_root(tmp_path: Path) -> None:
    from ldct_lightning.privacy import find_key_root

    key = hash_identifier("X", tmp_path)
    (tmp_path / "dicom" / "p1").mkdir(parents=True)
    assert find_key_root(tmp_path / "dicom" / "p1") == tmp_path
    assert hash_identifier("X", find_key_root(tmp_path / "dicom")) == key
    assert not (tmp_path / "dicom" / KEY_FILE_NAME).exists()

"""``ldct-data-summary``: it reads a split or shows the one training would make, never writes one; bad files."""

from __future__ import annotations

from pathlib import Path

import yaml
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from test_datamodule import write_dataset

from ldct_lightning.cli import data_summary
from ldct_lightning.data.split_defaults import CONF_DIR


def _training_datamodule(root: Path):
    """The DataModule as ``train.py data=dicom data.root=ROOT`` builds it (small crops for the tiny images)."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            config_name="config",
            overrides=["data=dicom", f"data.root={root}", "data.crop_size=32", "data.num_workers=0"],
        )
    return instantiate(cfg.data)


def _split_rows(out: str) -> dict[str, str]:
    """patient_key -> split, from the summary table."""
    rows = {}
    for line in out.splitlines():
        cells = line.split()
        if len(cells) >= 3 and cells[0] in ("train", "val", "test") and cells[2] in ("ldct", "ndct"):
            rows[cells[1]] = cells[0]
    return rows


def test_summary_then_training_on_a_fresh_user_folder(tmp_path, capsys):
    root = tmp_path / "user"
    write_dataset(root, n_patients=8, subdir="export")
    assert data_summary.main([str(root)]) == 0
    out = capsys.readouterr().out
    assert not (root / "split.yaml").exists()
    assert "nothing was written" in out and "train.py data=dicom" in out
    preview = _split_rows(out)
    # 8 patients with conf/data/dicom.yaml's n_val 0.1 and n_test 0.28: 1 val, 2 test
    assert sorted(preview.values()).count("test") == 2 and list(preview.values()).count("val") == 1

    dm = _training_datamodule(root)
    dm.setup("fit")  # training accepts the data and writes its split: the one the summary showed
    stored = yaml.safe_load((root / "split.yaml").read_text())
    assert {k: p for p in ("train", "val", "test") for k in stored[p]} == preview

    assert data_summary.main([str(root)]) == 0
    out = capsys.readouterr().out
    assert f"split: read from {root / 'split.yaml'}" in out and _split_rows(out) == preview


def test_summary_skips_bad_files_names_each_once_and_exits_2(tmp_path, capsys):
    root = tmp_path / "user"
    write_dataset(root, n_patients=4, subdir="export")
    empty = root / "export" / "empty.dcm"
    empty.write_bytes(b"")
    files = sorted(p for p in (root / "export" / "PAT-001").rglob("*") if p.is_file())
    files[0].write_bytes(files[0].read_bytes()[:300])
    assert data_summary.main([str(root)]) == 2
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err and "4 patients" in out
    for bad in (empty, files[0]):
        assert (out + err).count(str(bad)) == 1, err
    assert err.strip().splitlines()[-1].startswith("ldct-data-summary: error: 2 file(s)")

    assert data_summary.main([str(root), "--strict"]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("ldct-data-summary: error:")]
    assert len(errors) == 1 and ("empty.dcm" in errors[0] or str(files[0]) in errors[0])
    assert not (root / "split.yaml").exists()

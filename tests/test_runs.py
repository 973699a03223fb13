"""Run and sweep folders (ldct_lightning.runs) on hand-built folders: the layout's one reader and writer."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from ldct_lightning.cli import evaluate as evaluate_cli
from ldct_lightning.runs import CheckpointError, Run, RunError, Sweep, latest_checkpoint


def _run(root: Path, summary: dict | None, config: dict) -> Run:
    root.mkdir(parents=True)
    (root / "run_info.yaml").write_text(yaml.safe_dump({"git_commit": "x", "config": config}))
    if summary is not None:
        (root / "summary.yaml").write_text(yaml.safe_dump(summary))
    return Run(root)


def test_run_reads_what_the_pipeline_wrote(tmp_path: Path) -> None:
    config = {
        "ablation": {"name": "proposed"},
        "seed": 3,
        "model": {"generator": {"base_channels": 8}},
        "data": {"batch_size": 16, "crop_size": 128, "samples_per_epoch": None},
        "stages": {"second": {"max_epochs": 2, "data": {"batch_size": 20}}},
    }
    summary = {
        "first": {"best_ckpt": "f/best.ckpt", "last_ckpt": "f/last.ckpt"},
        "second": {"last_ckpt": "s.ckpt"},
    }
    run = _run(tmp_path / "run", summary, config)
    assert (run.ablation, run.seed, run.finished) == ("proposed", 3, True)
    assert run.generator_config() == {"base_channels": 8}
    assert run.stage_config("second")["data"] == {
        "batch_size": 20,
        "crop_size": 128,
        "samples_per_epoch": None,
    }
    assert run.checkpoint("first") == Path("f/best.ckpt")
    assert run.checkpoint("first", "last") == Path("f/last.ckpt")
    assert run.checkpoint("second") == Path("s.ckpt")  # no best: the last
    assert run.final_checkpoint() == Path("s.ckpt")


def test_a_checkpoint_knows_its_run_only_inside_one(tmp_path: Path) -> None:
    ckpt = tmp_path / "run" / "first" / "checkpoints" / "last.ckpt"
    assert Run.of_checkpoint(ckpt) == Run(tmp_path.resolve() / "run")
    assert Run.of_checkpoint(tmp_path / "copied" / "last.ckpt") is None
    assert Run(tmp_path / "nothing").info() is None and Run(tmp_path / "nothing").config() == {}


def test_write_info_and_summary_round_trip(tmp_path: Path) -> None:
    run = Run(tmp_path / "run")
    run.write_info({"seed": 1}, "abc", "hash")
    run.write_summary({"first": {"last_ckpt": "a.ckpt"}})
    assert yaml.safe_load(run.info_path.read_text()) == {
        "git_commit": "abc",
        "split_inputs_hash": "hash",
        "config": {"seed": 1},
    }
    assert run.final_checkpoint() == Path("a.ckpt")
    assert sorted(p.name for p in run.root.iterdir()) == ["run_info.yaml", "summary.yaml"]


def test_errors_name_the_folder(tmp_path: Path) -> None:
    with pytest.raises(RunError, match=r"empty: no finished job \(no \*/summary.yaml\)"):
        Sweep(tmp_path / "empty").jobs()
    debug = _run(tmp_path / "debug", {"first": {}}, {"ablation": {"name": "firstStep"}})
    with pytest.raises(RunError, match="debug/summary.yaml: the run saved no checkpoint"):
        debug.final_checkpoint()
    with pytest.raises(CheckpointError, match="no such directory"):
        latest_checkpoint(tmp_path / "nowhere")


def test_evaluate_run_option_gives_the_rows_of_one_run(tmp_path: Path) -> None:
    summary = {"first": {"best_ckpt": "b.ckpt"}, "second": {"last_ckpt": "l.ckpt"}}
    _run(tmp_path / "demo", summary, {"ablation": {"name": "proposed"}, "seed": 42})
    rows = evaluate_cli.run_methods(None, [tmp_path / "demo"])
    assert rows == {"proposed": Path("l.ckpt"), "firstStep": Path("b.ckpt")}
    _run(tmp_path / "running", None, {"ablation": {"name": "proposed"}})
    with pytest.raises(RunError, match="running: no summary.yaml"):
        evaluate_cli.run_methods(None, [tmp_path / "running"])

"""DDP: every rank runs train.py, and only rank 0 writes the run's files (run_info.yaml, summary.yaml)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf
from test_pipeline import _train_py

from ldct_lightning import pipeline

DDP_CPU = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32"]


def test_only_rank_zero_writes_the_run_files(tmp_path: Path, monkeypatch) -> None:
    cfg = OmegaConf.create({"seed": 1})
    monkeypatch.setattr(pipeline.rank_zero_only, "rank", 1)
    pipeline.write_run_info(tmp_path / "run", cfg, split_hash=None)
    assert not (tmp_path / "run" / "run_info.yaml").exists()
    monkeypatch.setattr(pipeline.rank_zero_only, "rank", 0)
    pipeline.write_run_info(tmp_path / "run", cfg, split_hash="abc")
    info = yaml.safe_load((tmp_path / "run" / "run_info.yaml").read_text())
    assert info["split_inputs_hash"] == "abc" and info["config"] == {"seed": 1}
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["run_info.yaml"]  # no temporary file left


@pytest.mark.slow
def test_cpu_ddp_with_a_fixed_run_dir_passes_repeatedly(tiny_dataset: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"  # as `make demo` does: rm -rf DIR, then train.py ... hydra.run.dir=DIR
    for attempt in range(3):
        shutil.rmtree(run_dir, ignore_errors=True)
        proc = _train_py(
            [
                "experiment=tiny",
                f"data.root={tiny_dataset}",
                f"hydra.run.dir={run_dir}",
                "ablation=firstStep",
                "stages.first.max_epochs=1",
                "stages.first.module.panel_every_n_epochs=0",
                "stages.first.module.loss.perceptual_weight=0",
                *DDP_CPU,
            ],
            tmp_path,
        )
        assert proc.returncode == 0, (attempt, proc.stderr[-3000:])
        assert yaml.safe_load((run_dir / "run_info.yaml").read_text())["split_inputs_hash"]
        assert "first" in yaml.safe_load((run_dir / "summary.yaml").read_text())
        assert not list(run_dir.glob(".*.tmp*")), attempt
        assert (run_dir / "train_ddp_process_1.log").is_file()  # the second process ran

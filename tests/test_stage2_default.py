"""Tiny fit: the default stage 2, started from a trained stage-1 generator, keeps its validation PSNR."""

from __future__ import annotations

from pathlib import Path

import pytest

from ldct_lightning.pipeline import run
from tests.test_pipeline import epoch_means, read_metrics, tiny_cfg


@pytest.mark.slow  # about 1 min on 2 idle cores: stage 1 must learn something first
def test_default_stage2_does_not_lower_the_stage1_validation_psnr(tiny_dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    cfg = tiny_cfg(
        tiny_dataset,
        out,
        [
            "ablation=proposed",
            "stages.first.max_epochs=8",
            "+stages.first.data.samples_per_epoch=24",
            # the default recipe; only the warm-up is scaled to this budget (2 batches of 3 critic updates)
            "stages.second.module.critic_warmup_steps=6",
            "stages.second.max_epochs=4",
            "+stages.second.data.samples_per_epoch=16",
        ],
    )
    summary = run(cfg)
    first = read_metrics(out / "first" / "metrics.csv")
    second = read_metrics(out / "second" / "metrics.csv")
    psnr_first = epoch_means(first, "val/psnr_abdomen")
    psnr_second = epoch_means(second, "val/psnr_abdomen")
    # both stages validate on the same whole slices (same input numbers)
    assert epoch_means(first, "val/input_psnr_abdomen")[0] == epoch_means(second, "val/input_psnr_abdomen")[0]
    best_epoch = int(Path(summary["first"]["best_ckpt"]).stem.split("epoch")[-1])
    stage1 = psnr_first[best_epoch]
    assert sorted(psnr_second) == [0, 1, 2, 3]
    assert min(psnr_second.values()) >= stage1 - 0.05, (stage1, psnr_second)

"""GPU checks (mixed precision, one GPU): skipped without CUDA; run them on a GPU machine with `make test-full`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_pipeline import read_metrics, tiny_cfg

from ldct_lightning.pipeline import run

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

LOSSES = {"first": "train/loss", "second": "train/loss_critic"}


def first_step_losses(summary: dict, out: Path) -> dict[str, float]:
    """Each stage's loss at its first step (logged before any update: the same weights and batch in any precision)."""
    losses = {}
    for stage, key in LOSSES.items():
        rows = [r for r in read_metrics(out / stage / "metrics.csv") if r.get(key)]
        assert rows and all(torch.isfinite(torch.tensor(float(r[key]))) for r in rows), stage
        losses[stage] = float(rows[0][key])
    return losses


def fit_both_stages(tiny_dataset: Path, out: Path, trainer: list[str]) -> tuple[dict, dict[str, float]]:
    summary = run(tiny_cfg(tiny_dataset, out, trainer))
    return summary, first_step_losses(summary, out)


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_both_stages_train_on_one_gpu_in_mixed_precision(
    precision: str, tiny_dataset: Path, tmp_path: Path
) -> None:
    if precision == "bf16-mixed" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    _, reference = fit_both_stages(
        tiny_dataset, tmp_path / "fp32", ["trainer=gpu", "trainer.precision=32-true"]
    )
    summary, mixed = fit_both_stages(
        tiny_dataset, tmp_path / "run", ["trainer=gpu", f"trainer.precision={precision}"]
    )
    for stage in LOSSES:
        # the same seed, data and initial weights: mixed precision changes the first loss by rounding only
        assert mixed[stage] == pytest.approx(reference[stage], rel=0.03), stage
        state = torch.load(summary[stage]["last_ckpt"], map_location="cpu", weights_only=True)["state_dict"]
        weights = [v for k, v in state.items() if k.startswith("generator.") and v.is_floating_point()]
        assert weights and all(w.dtype == torch.float32 and torch.isfinite(w).all() for w in weights), stage
        assert summary[stage]["device"].startswith("cuda"), stage

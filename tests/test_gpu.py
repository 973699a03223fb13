"""GPU checks (mixed precision, one GPU): skipped without CUDA; run them on a GPU machine with `make test-full`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_pipeline import tiny_cfg

from ldct_lightning.pipeline import run

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_both_stages_train_on_one_gpu_in_mixed_precision(
    precision: str, tiny_dataset: Path, tmp_path: Path
) -> None:
    if precision == "bf16-mixed" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    cfg = tiny_cfg(tiny_dataset, tmp_path / "run", ["trainer=gpu", f"trainer.precision={precision}"])
    summary = run(cfg)
    for stage in ("first", "second"):
        state = torch.load(summary[stage]["last_ckpt"], map_location="cpu", weights_only=True)["state_dict"]
        weights = [v for k, v in state.items() if k.startswith("generator.") and v.is_floating_point()]
        assert weights and all(torch.isfinite(w).all() for w in weights), stage
        loss_key = "train/loss" if stage == "first" else "train/loss_critic"
        assert torch.isfinite(torch.tensor(summary[stage]["metrics"][loss_key])), stage

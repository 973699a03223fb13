"""Baseline model options (redcnn, pix2pix, cyclegan, oracle): compose, validate, and train a tiny run."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import open_dict
from test_config import compose_cfg
from test_pipeline import tiny_cfg

from ldct_lightning.inference import Denoiser
from ldct_lightning.pipeline import check_config, run

BASELINES = {
    "redcnn": (["first"], "Stage1Module", "REDCNN"),
    "pix2pix": (["second"], "Pix2PixModule", "UNetGenerator"),
    "cyclegan": (["second"], "CycleGANModule", "ResNetGenerator"),
    "oracle": (["first"], "Stage1Module", "AttentionResUNet"),
}
# tiny networks for 32x32 crops (experiment=tiny's generator keys fit only the proposed U-Net)
TINY_NETS = {
    "redcnn": {"channels": 8},
    "pix2pix": {"base_channels": 8, "depth": 5},
    "cyclegan": {"base_channels": 8, "n_blocks": 1},
    "oracle": {},  # experiment=tiny's generator already fits
}


@pytest.mark.parametrize("model", sorted(BASELINES))
def test_baseline_composes_resolves_and_passes_check(model: str) -> None:
    stages, module, generator = BASELINES[model]
    cfg, resolved = compose_cfg([f"model={model}"])
    assert check_config(cfg) == stages
    stage = resolved["stages"][stages[0]]
    assert stage["module"]["_target_"].endswith(module)
    assert resolved["model"]["generator"]["_target_"].endswith(generator)
    assert resolved["ablation"]["name"] == model
    for net in stage["nets"]:
        assert "_target_" in resolved["model"][net], net
    if stages == ["second"]:
        assert stage["generator_init"] == "random"
        assert "n_critic" not in stage["module"] and "lambda_gp" not in stage["module"]


def test_baseline_hyperparameters() -> None:
    cfg, _ = compose_cfg(["model=redcnn"])
    assert cfg.stages.first.module.optimizer.lr == 1e-4
    assert cfg.stages.first.module.loss.loss._target_ == "torch.nn.MSELoss"
    cfg, _ = compose_cfg(["model=pix2pix"])
    assert cfg.stages.second.module.lambda_l1 == 100.0 and cfg.model.discriminator.in_channels == 2
    cfg, _ = compose_cfg(["model=cyclegan"])
    assert cfg.stages.second.module.lambda_cycle == 10.0
    assert cfg.model.discriminator_ndct.norm == "instance"
    cfg, _ = compose_cfg(["model=oracle"])
    assert cfg.stages.first.data.train_mode == "paired" and cfg.data.train_ldct == "truth"
    assert cfg.stages.first.module.loss.ssim_weight == 2.0


@pytest.mark.parametrize("model", sorted(TINY_NETS))
def test_tiny_fit_of_baseline_writes_last_checkpoint(model: str, tiny_dataset: Path, tmp_path: Path) -> None:
    stage = BASELINES[model][0][0]
    cfg = tiny_cfg(
        tiny_dataset,
        tmp_path / "run",
        [f"model={model}", f"stages.{stage}.max_epochs=1", "trainer.num_sanity_val_steps=0"],
    )
    with open_dict(cfg):
        for net in cfg.stages[stage].nets:
            for key in ("base_channels", "depth"):  # from experiment=tiny, for the proposed U-Net
                cfg.model[net].pop(key, None)
            if net.startswith("discriminator"):
                cfg.model[net].base_channels = 8
        cfg.model.generator.update(TINY_NETS[model])
    summary = run(cfg)
    assert list(summary) == [stage]
    last = Path(summary[stage]["last_ckpt"])
    assert last.is_file()
    assert summary[stage]["train_batches"] == 8 // 4  # experiment=tiny: samples_per_epoch / batch_size
    assert math.isfinite(summary[stage]["metrics"]["val/psnr_abdomen"])
    # the checkpoint holds every network of the stage, under the names the stage gives them
    state = torch.load(last, map_location="cpu", weights_only=True)["state_dict"]
    for net in cfg.stages[stage].nets:
        assert any(k.startswith(f"{net}.") for k in state), net
    # ldct-denoise / ldct-evaluate rebuild the baseline's own generator from run_info.yaml and load it strictly
    denoiser = Denoiser.from_checkpoint(last)
    assert type(denoiser.generator).__name__ == BASELINES[model][2]
    for k, v in denoiser.generator.state_dict().items():
        assert torch.equal(v, state[f"generator.{k}"]), k
    hu = np.random.default_rng(0).uniform(-200, 200, (1, 32, 32)).astype(np.float32)
    out = denoiser.denoise(hu)
    assert out.shape == hu.shape and np.isfinite(out).all()


@pytest.mark.parametrize("model", sorted(BASELINES))
def test_demo_experiment_gives_each_baseline_only_arguments_its_classes_take(model: str) -> None:
    """`make baselines` runs `experiment=demo model=...`: no stage-specific key may leak into another module."""
    import inspect

    from hydra.utils import get_class

    cfg, resolved = compose_cfg(["experiment=demo", f"model={model}"])
    for stage in check_config(cfg):
        module = resolved["stages"][stage]["module"]
        accepted = inspect.signature(get_class(module["_target_"]).__init__).parameters
        assert set(module) - {"_target_"} <= set(accepted), (stage, set(module) - set(accepted))
        loss = module.get("loss")
        if loss:
            loss_args = inspect.signature(get_class(loss["_target_"]).__init__).parameters
            assert set(loss) - {"_target_"} <= set(loss_args), set(loss) - set(loss_args)

"""The GPU speed-up callback: channels-last weights and in-place compile keep the checkpoint keys."""

from __future__ import annotations

from types import SimpleNamespace

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from torch import nn

from ldct_lightning.callbacks_speed import ModelSpeedups
from ldct_lightning.models.critic import WGANCritic
from ldct_lightning.models.generator import AttentionResUNet


class _Module(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.generator = AttentionResUNet(base_channels=8)
        self.critic = WGANCritic(patch_size=32)


def _trainer(device: str) -> SimpleNamespace:
    return SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device(device)))


def _convs(module: nn.Module) -> list[nn.Conv2d]:
    return [
        m for m in module.modules() if isinstance(m, nn.Conv2d) and m.in_channels > 1 and m.kernel_size[0] > 1
    ]


def test_auto_is_channels_last_on_cuda_only():
    module = _Module()
    ModelSpeedups().setup(_trainer("cpu"), module, "fit")
    assert all(c.weight.is_contiguous() for c in _convs(module))
    ModelSpeedups().setup(_trainer("cuda"), module, "fit")  # only the device type is looked at
    assert all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in _convs(module))
    assert not any(c.weight.is_contiguous() for c in _convs(module))


def test_channels_last_training_step_matches_contiguous():
    torch.manual_seed(0)
    module = _Module()
    x = torch.rand(2, 1, 32, 32)
    expected = module.generator(x)
    expected.mean().backward()
    grad = module.generator.out_conv.weight.grad.clone()
    module.zero_grad()
    ModelSpeedups(channels_last=True).setup(_trainer("cpu"), module, "fit")
    got = module.generator(x.contiguous(memory_format=torch.channels_last))
    got.mean().backward()
    # training-mode batch norm on 2 samples divides float32 rounding by small batch deviations: 1e-4
    # (normalised, 0.4 HU) covers it; a wrong layout or a dropped channel would differ by orders more
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(module.generator.out_conv.weight.grad, grad, atol=1e-4, rtol=1e-3)


def test_compile_is_in_place_and_keeps_checkpoint_keys():
    module = _Module()
    keys = list(module.state_dict())
    ModelSpeedups(channels_last=False, compile=True).setup(_trainer("cpu"), module, "fit")
    assert module.generator._compiled_call_impl is not None  # nn.Module.compile was applied
    assert module.critic._compiled_call_impl is None  # double backward of the gradient penalty
    assert list(module.state_dict()) == keys  # no `_orig_mod.` prefix
    with pytest.raises(ValueError, match="channels_last"):
        ModelSpeedups(channels_last="yes")


def test_default_callbacks_config_builds_the_callback(tmp_path):
    from pathlib import Path

    conf = Path(__file__).resolve().parents[1] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base=None):
        cfg = compose(config_name="config", overrides=["trainer=gpu"])
    callback = instantiate(cfg.callbacks.speedups)
    assert isinstance(callback, ModelSpeedups) and callback.channels_last == "auto" and not callback.compile
    assert cfg.trainer.precision == "bf16-mixed" and cfg.trainer.benchmark is True

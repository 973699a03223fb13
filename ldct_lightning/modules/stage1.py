"""Stage 1 (``firstStep``): supervised training of the generator on simulated, pixel-aligned pairs (eq. 8)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ldct_lightning.data.normalize import HU_MAX, HU_MIN
from ldct_lightning.modules.base import DenoisingModule, OptimizerFactory, SchedulerFactory, optimizer_config


class Stage1Module(DenoisingModule):
    """Supervised generator training: L1 + 2 (1 - SSIM) + perceptual loss on ``simulated`` batches.

    A batch with a ``mask`` (``registered`` mode) restricts the loss to the masked pixels.

    Args:
        generator: the denoising network.
        loss: a module returning ``(total, {term: value})`` for ``(pred, target)``, e.g.
            :class:`ldct_lightning.losses.Stage1Loss`.
        optimizer: a partial optimizer taking the parameters (Hydra ``_partial_: true``).
        scheduler: a partial LR scheduler taking the optimizer, stepped once per epoch; or None.
        panel_every_n_epochs: see :class:`DenoisingModule`.
        hu_min: HU mapped to 0 by the data normalisation.
        hu_max: HU mapped to 1 by the data normalisation.
    """

    def __init__(
        self,
        generator: nn.Module,
        loss: nn.Module,
        optimizer: OptimizerFactory,
        scheduler: SchedulerFactory | None = None,
        panel_every_n_epochs: int = 10,
        hu_min: float = HU_MIN,
        hu_max: float = HU_MAX,
    ) -> None:
        super().__init__(generator, panel_every_n_epochs, hu_min, hu_max)
        self.save_hyperparameters(ignore=["generator", "loss", "optimizer", "scheduler"])
        self.loss = loss
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        # the loss holds a frozen VGG loaded from its own file: keep it out of checkpoints (tens of MB)
        self.strict_loading = False

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith("loss.")]:
            del state[key]

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        pred = self(batch["input"])
        target = batch["target"]
        if "mask" in batch:
            # registered pairs: outside the well-registered mask the target is the (detached) prediction,
            # so those pixels give no gradient (exact for L1; SSIM/perceptual windows see the blend)
            mask = batch["mask"].to(pred.dtype)
            target = mask * target + (1 - mask) * pred.detach()
            self.log("train/mask_fraction", mask.mean(), batch_size=pred.shape[0])
        total, terms = self.loss(pred, target)
        batch_size = pred.shape[0]
        self.log("train/loss", total, prog_bar=True, batch_size=batch_size)
        self.log_dict({f"train/{k}": v for k, v in terms.items()}, batch_size=batch_size)
        return total

    def configure_optimizers(self) -> dict[str, Any]:
        return optimizer_config(self.generator.parameters(), self.optimizer_factory, self.scheduler_factory)

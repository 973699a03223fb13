"""What every denoising LightningModule shares: the generator, validation metrics and image panels.

Validation runs on whole slices with keys ``input`` and ``target`` (both in the normalised [0, 1] domain of
:func:`ldct_lightning.data.normalize.hu_to_unit`). Metrics are logged under the same names by every stage, so
stage-1 and stage-2 curves compare in one dashboard:

- ``val/psnr_abdomen``, ``val/ssim_abdomen``: in the abdomen window C40/W400, data range 1 (= 400 HU);
- ``val/psnr_full``: over the full normalised range [-1024, 3071] HU, data range 1 (= 4095 HU);
- ``val/rmse_hu``: RMSE in HU;
- the same for the un-denoised input under ``val/input_*``, so the improvement is visible.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import lightning as L
import torch
from torch import nn
from torchmetrics import MeanSquaredError, MetricCollection
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

from ldct_lightning.data.normalize import HU_MAX, HU_MIN, WINDOWS, apply_window, unit_to_hu
from ldct_lightning.image_logging import log_image_panel
from ldct_lightning.modules.handoff import CHECKPOINT_META

OptimizerFactory = Callable[..., torch.optim.Optimizer]
SchedulerFactory = Callable[..., torch.optim.lr_scheduler.LRScheduler]


def optimizer_config(
    params: Iterable[nn.Parameter], make_opt: OptimizerFactory, make_sched: SchedulerFactory | None
) -> dict[str, Any]:
    """One entry of ``configure_optimizers``: the optimizer and, if given, its per-epoch scheduler."""
    optimizer = make_opt(params)
    config: dict[str, Any] = {"optimizer": optimizer}
    if make_sched is not None:
        config["lr_scheduler"] = {"scheduler": make_sched(optimizer), "interval": "epoch"}
    return config


def _window_metrics(prefix: str) -> MetricCollection:
    return MetricCollection(
        {
            "psnr_abdomen": PeakSignalNoiseRatio(data_range=1.0),
            "ssim_abdomen": StructuralSimilarityIndexMeasure(data_range=1.0),
            "psnr_full": PeakSignalNoiseRatio(data_range=1.0),
            "rmse_hu": MeanSquaredError(squared=False),
        },
        prefix=prefix,
        compute_groups=False,
    )


class DenoisingModule(L.LightningModule):
    """Base class: holds the generator and does validation on whole slices.

    Every checkpoint it writes describes itself (``checkpoint["ldct_lightning"]``): the generator's config
    (``generator_config``, a Hydra ``_target_`` dict set by the pipeline; None when unknown) and the HU range
    of the normalisation, so a checkpoint file alone is enough to denoise (:meth:`Denoiser.from_checkpoint`).

    Args:
        generator: the denoising network (input and output in the normalised domain).
        panel_every_n_epochs: log an input / output / target panel every N validation epochs (0: never).
        hu_min: HU mapped to 0 by the data normalisation.
        hu_max: HU mapped to 1 by the data normalisation.
    """

    def __init__(
        self,
        generator: nn.Module,
        panel_every_n_epochs: int = 10,
        hu_min: float = HU_MIN,
        hu_max: float = HU_MAX,
    ) -> None:
        super().__init__()
        self.generator = generator
        self.panel_every_n_epochs = panel_every_n_epochs
        self.hu_min = hu_min
        self.hu_max = hu_max
        self.generator_config: dict[str, Any] | None = None
        self.val_metrics = _window_metrics("val/")
        self.val_input_metrics = _window_metrics("val/input_")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Denoise a batch (B, 1, H, W) in the normalised domain."""
        return self.generator(x)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Write the generator's config and the HU range into the checkpoint (plain values only)."""
        checkpoint[CHECKPOINT_META] = {
            "generator": self.generator_config,
            "hu_min": float(self.hu_min),
            "hu_max": float(self.hu_max),
        }

    def _update(self, metrics: MetricCollection, pred: torch.Tensor, target: torch.Tensor) -> None:
        pred_hu = unit_to_hu(pred.float().clamp(0, 1), self.hu_min, self.hu_max)
        target_hu = unit_to_hu(target.float(), self.hu_min, self.hu_max)
        center, width = WINDOWS["abdomen"]
        pred_w, target_w = apply_window(pred_hu, center, width), apply_window(target_hu, center, width)
        metrics["psnr_abdomen"].update(pred_w, target_w)
        metrics["ssim_abdomen"].update(pred_w, target_w)
        metrics["psnr_full"].update(pred.float().clamp(0, 1), target.float())
        metrics["rmse_hu"].update(pred_hu, target_hu)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        x, y = batch["input"], batch["target"]
        pred = self(x)
        self._update(self.val_metrics, pred, y)
        self._update(self.val_input_metrics, x, y)
        # logging the metric objects lets Lightning compute, sync across processes and reset them per epoch
        self.log_dict(self.val_metrics, on_step=False, on_epoch=True, batch_size=x.shape[0])
        self.log_dict(self.val_input_metrics, on_step=False, on_epoch=True, batch_size=x.shape[0])
        if batch_idx == 0 and self._panel_due():
            log_image_panel(
                self,
                "val/panel",
                {"input": x[0], "output": pred[0], "target": y[0]},
                hu_range=(self.hu_min, self.hu_max),
            )

    def _panel_due(self) -> bool:
        if self.panel_every_n_epochs <= 0 or self.trainer.sanity_checking:
            return False
        last_epoch = self.trainer.max_epochs is not None and self.current_epoch == self.trainer.max_epochs - 1
        return self.current_epoch % self.panel_every_n_epochs == 0 or last_epoch

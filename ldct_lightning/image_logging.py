"""Image panels (e.g. input / output / target) sent to whichever loggers a Trainer has.

CSV runs get PNG files under ``<log_dir>/images``; W&B gets ``wandb.Image``; TensorBoard gets a figure.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger  # noqa: E402

from ldct_lightning.data.normalize import WINDOWS, apply_window, unit_to_hu  # noqa: E402


def panel_figure(
    images: dict[str, torch.Tensor], hu_range: tuple[float, float], window: str = "abdomen"
) -> plt.Figure:
    """Draw normalised single-channel images side by side in a display window.

    Args:
        images: title -> (1, H, W) or (H, W) tensor in the normalised [0, 1] domain.
        hu_range: (hu_min, hu_max) of the normalisation, to convert back to HU.
        window: a key of :data:`WINDOWS`.

    Returns:
        The matplotlib figure (the caller closes it).
    """
    center, width = WINDOWS[window]
    fig, axes = plt.subplots(1, len(images), figsize=(3 * len(images), 3.2), squeeze=False)
    for ax, (title, img) in zip(axes[0], images.items(), strict=True):
        hu = unit_to_hu(img.detach().float().cpu().squeeze(), *hu_range)
        ax.imshow(apply_window(hu, center, width).numpy(), cmap="gray", vmin=0, vmax=1)
        ax.set_title(title)
        ax.axis("off")
    fig.suptitle(f"window C{center:g}/W{width:g}", fontsize=8)
    fig.tight_layout()
    return fig


def log_image_panel(
    module: L.LightningModule,
    key: str,
    images: dict[str, torch.Tensor],
    hu_range: tuple[float, float],
) -> None:
    """Log a panel to every logger of the module's trainer (rank zero only).

    Args:
        module: the LightningModule being trained.
        key: panel name, e.g. ``val/panel``.
        images: title -> normalised image.
        hu_range: (hu_min, hu_max) of the normalisation.
    """
    trainer = module.trainer
    if not trainer.is_global_zero or not trainer.loggers:
        return
    fig = panel_figure(images, hu_range)
    step, epoch = trainer.global_step, trainer.current_epoch
    try:
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                import wandb

                logger.experiment.log({key: wandb.Image(fig, caption=f"epoch {epoch}"), "epoch": epoch})
            elif isinstance(logger, TensorBoardLogger):
                logger.experiment.add_figure(key, fig, global_step=step)
            elif isinstance(logger, CSVLogger):
                out = Path(logger.log_dir) / "images" / f"{key.replace('/', '_')}_epoch{epoch:04d}.png"
                out.parent.mkdir(parents=True, exist_ok=True)
                fig.savefig(out, dpi=100)
    finally:
        plt.close(fig)

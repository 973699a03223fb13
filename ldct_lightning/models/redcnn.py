"""RED-CNN (Chen et al. 2017, IEEE TMI 36(12):2524-35): residual encoder-decoder CNN for LDCT denoising.

A supervised baseline: trained with :class:`ldct_lightning.modules.stage1.Stage1Module` and an MSE loss
(:class:`ldct_lightning.baselines.losses.TermLoss`), as in the paper, on pixel-aligned pairs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class REDCNN(nn.Module):
    """Five 5x5 convolutions and five 5x5 transposed convolutions, 96 filters, stride 1, no padding, ReLU.

    Shortcuts every two layers, added before the ReLU (Fig. 1 of the paper): the output of conv2 to that
    of deconv3, conv4 to deconv1, the input image to deconv5. Each convolution shrinks the image by
    ``kernel_size - 1`` pixels and each transposed convolution grows it back, so any input of at least
    ``5 * (kernel_size - 1) + 1`` pixels (21 by default) keeps its size; the paper trains on 55x55 patches.

    Parameters with the defaults: conv1 1*96*25 + 96 = 2,496; conv2-5 and deconv1-4 8 x (96*96*25 + 96)
    = 1,843,968; deconv5 96*1*25 + 1 = 2,401; total 1,848,865 (the "1.85 M" usually quoted).

    Args:
        in_channels: image channels (input and output).
        channels: filters of every hidden layer (96 in the paper).
        kernel_size: kernel size of every layer (5 in the paper).
        init_std: if given, weights ~ N(0, init_std) and zero biases (Chen et al. report 0.01; with such small
            weights the untrained network is close to ``relu(x)`` but learns slowly); None: PyTorch's default
            initialisation, as in the common public re-implementation, which learns faster on short budgets.
    """

    n_layers = 5

    def __init__(
        self, in_channels: int = 1, channels: int = 96, kernel_size: int = 5, init_std: float | None = None
    ) -> None:
        super().__init__()
        if in_channels < 1 or channels < 1 or kernel_size < 1:
            raise ValueError(
                f"REDCNN: in_channels={in_channels}, channels={channels}, kernel_size={kernel_size}: "
                "must all be >= 1"
            )
        self.in_channels = in_channels
        self.min_size = self.n_layers * (kernel_size - 1) + 1
        widths = [in_channels] + [channels] * self.n_layers
        self.encoder = nn.ModuleList(
            nn.Conv2d(widths[i], widths[i + 1], kernel_size) for i in range(self.n_layers)
        )
        self.decoder = nn.ModuleList(
            nn.ConvTranspose2d(widths[i + 1], widths[i], kernel_size) for i in reversed(range(self.n_layers))
        )
        if init_std is not None:
            for m in self.modules():
                if isinstance(m, nn.Conv2d | nn.ConvTranspose2d):
                    nn.init.normal_(m.weight, 0.0, init_std)
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Denoise a batch.

        Args:
            x: images (B, in_channels, H, W) with H, W >= ``min_size``.

        Returns:
            Denoised images, same shape (non-negative: ReLU after the last shortcut, as in the paper).
        """
        if x.ndim != 4 or x.shape[1] != self.in_channels or min(x.shape[-2:]) < self.min_size:
            raise ValueError(
                f"REDCNN: expected input (B, {self.in_channels}, H, W) with H, W >= {self.min_size}, "
                f"got {tuple(x.shape)}"
            )
        conv = self.encoder
        deconv = self.decoder
        f1 = F.relu(conv[0](x))
        f2 = F.relu(conv[1](f1))
        f4 = F.relu(conv[3](F.relu(conv[2](f2))))
        f = F.relu(conv[4](f4))
        f = F.relu(deconv[0](f) + f4)
        f = F.relu(deconv[2](F.relu(deconv[1](f))) + f2)
        f = F.relu(deconv[3](f))
        return F.relu(deconv[4](f) + x)

"""The WGAN critic of Yang et al. 2018 (WGAN-VGG), used by Hu et al. 2024 as the discriminator."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def conv_output_size(size: int, strides: Sequence[int], kernel_size: int = 3, padding: int = 1) -> int:
    """Spatial size after a stack of convolutions.

    Args:
        size: input size along one axis.
        strides: stride of each convolution.
        kernel_size: kernel size of every convolution.
        padding: padding of every convolution.

    Returns:
        The output size along that axis.
    """
    for stride in strides:
        size = (size + 2 * padding - kernel_size) // stride + 1
    return size


class WGANCritic(nn.Module):
    """Six 3x3 convolutions + LeakyReLU, FC 1024 + LeakyReLU, FC 1; no sigmoid and no batch norm (WGAN-GP).

    Strides 1,2,1,2,1,2 and channels 64,64,128,128,256,256 as in Yang et al. 2018. The first FC layer's input
    size follows from ``patch_size``: 256 * 16 * 16 = 65,536 for 128x128 crops (67.1 M parameters in that
    layer), 256 * 8 * 8 for 64x64 crops (Yang et al.'s patch size).

    Args:
        patch_size: input height and width (an int for square crops); the critic accepts only this size.
        in_channels: image channels.
        channels: output channels of the six convolutions.
        strides: strides of the six convolutions.
        hidden: width of the first fully connected layer.
        negative_slope: slope of the LeakyReLUs.
        padding: padding of the 3x3 convolutions (1: stride-1 layers keep the size; Yang et al. do not say).
        input_center: value subtracted from the crops before the first convolution.
        input_scale: the convolutions see ``(x - input_center) / input_scale`` (defaults 0, 1: the crops as
            they are). The gradient penalty stays a penalty on the gradient with respect to ``x``.
    """

    def __init__(
        self,
        patch_size: int | Sequence[int] = 128,
        in_channels: int = 1,
        channels: Sequence[int] = (64, 64, 128, 128, 256, 256),
        strides: Sequence[int] = (1, 2, 1, 2, 1, 2),
        hidden: int = 1024,
        negative_slope: float = 0.2,
        padding: int = 1,
        input_center: float = 0.0,
        input_scale: float = 1.0,
    ) -> None:
        super().__init__()
        if input_scale <= 0:
            raise ValueError(f"input_scale={input_scale}: must be > 0")
        self.input_center = float(input_center)
        self.input_scale = float(input_scale)
        if len(channels) != len(strides):
            raise ValueError(f"channels {tuple(channels)} and strides {tuple(strides)} differ in length")
        size = (patch_size, patch_size) if isinstance(patch_size, int) else tuple(int(s) for s in patch_size)
        if len(size) != 2 or min(size) < 1:
            raise ValueError(f"patch_size={patch_size!r}: give a positive int or (height, width)")
        self.patch_size: tuple[int, int] = size
        self.in_channels = in_channels
        out_h, out_w = (conv_output_size(s, strides, 3, padding) for s in size)
        if out_h < 1 or out_w < 1:
            raise ValueError(f"patch_size={patch_size!r}: too small for {len(strides)} convolutions")

        layers: list[nn.Module] = []
        previous = in_channels
        for width, stride in zip(channels, strides, strict=True):
            layers += [
                nn.Conv2d(previous, width, 3, stride=stride, padding=padding),
                nn.LeakyReLU(negative_slope),
            ]
            previous = width
        self.features = nn.Sequential(*layers)
        self.fc_in_features = previous * out_h * out_w
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(self.fc_in_features, hidden),
            nn.LeakyReLU(negative_slope),
            nn.Linear(hidden, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Score a batch of crops.

        Args:
            x: images (B, in_channels, *patch_size).

        Returns:
            Unbounded scores (B, 1).
        """
        if x.ndim != 4 or x.shape[1] != self.in_channels or tuple(x.shape[-2:]) != self.patch_size:
            h, w = self.patch_size
            raise ValueError(
                f"WGANCritic: input has shape {tuple(x.shape)} but the critic was built for "
                f"(B, {self.in_channels}, {h}, {w}) (patch_size={h}x{w}, FC input {self.fc_in_features}). "
                "Feed crops of that size or set the critic's patch_size (model.critic.patch_size) to the crop size"
            )
        return self.head(self.features((x - self.input_center) / self.input_scale))

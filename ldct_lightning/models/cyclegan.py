"""CycleGAN's ResNet generator (Zhu et al. 2017, after Johnson et al. 2016), as in the authors' reference code.

The discriminators are :class:`ldct_lightning.models.pix2pix.PatchGANDiscriminator` (unconditional, one
channel, instance norm).
"""

from __future__ import annotations

import torch
from torch import nn

from ldct_lightning.models.generator import PAD_MODES
from ldct_lightning.models.pix2pix import GAN_NORMS, crop_back, gan_norm, init_gan_weights, pad_to_multiple


class ReflectResBlock(nn.Module):
    """``x + [reflect-pad 1, conv 3x3, norm, ReLU, (dropout), reflect-pad 1, conv 3x3, norm](x)``.

    Args:
        channels: feature channels (in and out).
        norm: see :func:`ldct_lightning.models.pix2pix.gan_norm`.
        dropout: dropout probability between the two convolutions (0: none, CycleGAN's default).
    """

    def __init__(self, channels: int, norm: str = "instance", dropout: float = 0.0) -> None:
        super().__init__()
        bias = norm != "batch"
        layers: list[nn.Module] = [
            nn.ReflectionPad2d(1),
            nn.Conv2d(channels, channels, 3, bias=bias),
            gan_norm(norm, channels),
            nn.ReLU(),
        ]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        layers += [
            nn.ReflectionPad2d(1),
            nn.Conv2d(channels, channels, 3, bias=bias),
            gan_norm(norm, channels),
        ]
        self.block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


class ResNetGenerator(nn.Module):
    """c7s1-64, d128, d256, ``n_blocks`` x R256, u128, u64, c7s1-1, tanh (CycleGAN's ``resnet_9blocks``).

    ``c7s1-k``: reflection pad 3, 7x7 conv, norm, ReLU (the last one: conv and tanh only); ``dk``: 3x3
    stride-2 conv, norm, ReLU; ``R``: :class:`ReflectResBlock`; ``uk``: 3x3 stride-2 transposed conv, norm,
    ReLU. Sizes not divisible by ``2**n_downsampling`` are padded and the output cropped back.

    Parameters with the defaults (instance norm): 11,365,633 for one channel; the reference with three
    channels has 11,378,179 (printed as "11.378 M"): they differ only in the 7x7 convolutions at both ends,
    (1*64*49 + 64) + (64*1*49 + 1) against (3*64*49 + 64) + (64*3*49 + 3).

    Args:
        in_channels: image channels in.
        out_channels: image channels out.
        base_channels: channels of the first layer (the reference's ``ngf``).
        n_blocks: residual blocks at the lowest resolution (9 for 256x256 images, 6 for 128x128).
        n_downsampling: stride-2 layers down (and up).
        norm: see :func:`ldct_lightning.models.pix2pix.gan_norm` (CycleGAN: ``instance``).
        dropout: dropout in the residual blocks (CycleGAN: 0).
        pad_mode: ``reflect``, ``replicate`` or ``zeros``, for sizes not divisible by ``2**n_downsampling``.
        init_std: std of the reference's normal initialisation (None: PyTorch's default initialisation).
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        base_channels: int = 64,
        n_blocks: int = 9,
        n_downsampling: int = 2,
        norm: str = "instance",
        dropout: float = 0.0,
        pad_mode: str = "reflect",
        init_std: float | None = 0.02,
    ) -> None:
        super().__init__()
        if n_blocks < 0 or n_downsampling < 0:
            raise ValueError(
                f"ResNetGenerator: n_blocks={n_blocks}, n_downsampling={n_downsampling}: must be >= 0"
            )
        if norm not in GAN_NORMS:
            raise ValueError(f"norm={norm!r}: unknown normalisation. Use one of {', '.join(GAN_NORMS)}")
        if pad_mode not in PAD_MODES:
            raise ValueError(f"pad_mode={pad_mode!r}: use one of {', '.join(PAD_MODES)}")
        self.in_channels = in_channels
        self.multiple = 2**n_downsampling
        self.pad_mode = pad_mode
        bias = norm != "batch"
        layers: list[nn.Module] = [
            nn.ReflectionPad2d(3),
            nn.Conv2d(in_channels, base_channels, 7, bias=bias),
            gan_norm(norm, base_channels),
            nn.ReLU(),
        ]
        width = base_channels
        for _ in range(n_downsampling):
            layers += [
                nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=bias),
                gan_norm(norm, 2 * width),
                nn.ReLU(),
            ]
            width *= 2
        layers += [ReflectResBlock(width, norm, dropout) for _ in range(n_blocks)]
        for _ in range(n_downsampling):
            layers += [
                nn.ConvTranspose2d(width, width // 2, 3, stride=2, padding=1, output_padding=1, bias=bias),
                gan_norm(norm, width // 2),
                nn.ReLU(),
            ]
            width //= 2
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(width, out_channels, 7)]
        self.model = nn.Sequential(*layers)
        if init_std is not None:
            init_gan_weights(self, init_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Translate a batch.

        Args:
            x: images (B, in_channels, H, W) in [0, 1], H, W >= 4.

        Returns:
            Images (B, out_channels, H, W) in [0, 1].
        """
        if x.ndim != 4 or x.shape[1] != self.in_channels or min(x.shape[-2:]) < 4:
            raise ValueError(
                f"ResNetGenerator: expected input (B, {self.in_channels}, H, W) with H, W >= 4, got {tuple(x.shape)}"
            )
        xp, box = pad_to_multiple(x, self.multiple, self.pad_mode)
        out = torch.tanh(self.model(2 * xp - 1))
        return crop_back((out + 1) / 2, box)

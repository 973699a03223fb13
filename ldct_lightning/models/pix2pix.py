"""Pix2Pix networks (Isola et al. 2017): the U-Net generator and the 70x70 PatchGAN discriminator.

Layer by layer as in the authors' reference code (junyanz/pytorch-CycleGAN-and-pix2pix, ``networks.py``), for
one-channel CT in the normalised [0, 1] domain: the generators map their input to [-1, 1] and their tanh
output back to [0, 1], as the reference does for images normalised to [-1, 1]. The same padding helper and
weight initialisation serve :mod:`ldct_lightning.models.cyclegan`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ldct_lightning.models.generator import PAD_MODES

GAN_NORMS = ("batch", "instance", "none")


def gan_norm(norm: str, channels: int) -> nn.Module:
    """The reference code's normalisation layer by name.

    Args:
        norm: ``batch``, ``instance`` (no affine parameters and no running statistics, as in the reference,
            unlike :func:`ldct_lightning.models.blocks.make_norm`) or ``none``.
        channels: number of feature channels.

    Returns:
        The layer (``nn.Identity`` for ``none``).
    """
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    if norm == "instance":
        return nn.InstanceNorm2d(channels, affine=False, track_running_stats=False)
    if norm == "none":
        return nn.Identity()
    raise ValueError(f"norm={norm!r}: unknown normalisation. Use one of {', '.join(GAN_NORMS)}")


def init_gan_weights(module: nn.Module, std: float = 0.02) -> None:
    """The reference initialisation: conv weights ~ N(0, std), batch-norm weights ~ N(1, std), biases 0.

    Args:
        module: the network, initialised in place.
        std: standard deviation of the normal distributions.
    """
    for m in module.modules():
        if isinstance(m, nn.Conv2d | nn.ConvTranspose2d):
            nn.init.normal_(m.weight, 0.0, std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, std)
            nn.init.zeros_(m.bias)


def pad_to_multiple(
    x: torch.Tensor, multiple: int, mode: str = "reflect"
) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
    """Pad height and width up to a multiple of ``multiple`` (split between both sides).

    Args:
        x: images (B, C, H, W).
        multiple: the size divisor the network needs.
        mode: ``reflect`` (falls back to ``replicate`` when the image is smaller than the padding),
            ``replicate`` or ``zeros``.

    Returns:
        The padded images and ``(top, left, H, W)`` to crop the output back with :func:`crop_back`.
    """
    if mode not in PAD_MODES:
        raise ValueError(f"pad_mode={mode!r}: use one of {', '.join(PAD_MODES)}")
    h, w = x.shape[-2:]
    ph, pw = -h % multiple, -w % multiple
    pads = (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2)  # F.pad order: left, right, top, bottom
    box = (pads[2], pads[0], h, w)
    if ph == 0 and pw == 0:
        return x, box
    if mode == "zeros":
        return F.pad(x, pads), box
    if mode == "reflect" and (max(pads[:2]) >= w or max(pads[2:]) >= h):
        mode = "replicate"  # reflect needs the padding to be smaller than the image
    return F.pad(x, pads, mode=mode), box


def crop_back(x: torch.Tensor, box: tuple[int, int, int, int]) -> torch.Tensor:
    """Undo :func:`pad_to_multiple` on a network output."""
    top, left, h, w = box
    return x[..., top : top + h, left : left + w]


class UNetSkipBlock(nn.Module):
    """One U-Net level: down (LeakyReLU 0.2, 4x4/2 conv, norm), the inner levels, up (ReLU, 4x4/2 transposed
    conv, norm, optional dropout), then the level's input concatenated to its output.

    The outermost level has no activation or norm on the way down, no norm on the way up and no
    concatenation; the innermost has no norm on the way down and no inner levels.

    Args:
        outer_channels: channels this level returns to the level above (before the concatenation).
        inner_channels: channels of the downsampled features.
        in_channels: channels of this level's input (``outer_channels`` unless outermost).
        submodule: the inner levels, None for the innermost.
        outermost: the first level (input image in, output image out).
        norm: see :func:`gan_norm`.
        dropout: dropout probability after the up path (0: none).
    """

    def __init__(
        self,
        outer_channels: int,
        inner_channels: int,
        in_channels: int | None = None,
        submodule: nn.Module | None = None,
        outermost: bool = False,
        norm: str = "batch",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.outermost = outermost
        innermost = submodule is None
        bias = norm != "batch"  # the reference drops conv biases that a batch norm follows
        in_channels = outer_channels if in_channels is None else in_channels
        up_in = inner_channels if innermost else 2 * inner_channels
        down_conv = nn.Conv2d(in_channels, inner_channels, 4, stride=2, padding=1, bias=bias)
        if outermost:
            up_conv = nn.ConvTranspose2d(up_in, outer_channels, 4, stride=2, padding=1)
            layers = [down_conv, submodule, nn.ReLU(), up_conv]
        else:
            up_conv = nn.ConvTranspose2d(up_in, outer_channels, 4, stride=2, padding=1, bias=bias)
            down = [nn.LeakyReLU(0.2), down_conv]
            if not innermost:
                down += [gan_norm(norm, inner_channels), submodule]
            layers = [*down, nn.ReLU(), up_conv, gan_norm(norm, outer_channels)]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.outermost:
            return self.model(x)
        return torch.cat([x, self.model(x)], dim=1)


class UNetGenerator(nn.Module):
    """The Pix2Pix U-Net generator with ``depth`` stride-2 levels (``unet_256``: depth 8).

    Level ``i`` has ``base_channels * 2**i`` channels, capped at ``8 * base_channels`` (64, 128, 256, 512,
    512, ... by default). Dropout acts in the levels where both sides have the capped width, except the
    innermost (three levels for depth 8), as in the reference. The input needs height and width of at
    least ``2**depth`` (depth <= 6 for 64x64 crops, <= 7 for 128x128); other sizes are padded to a multiple
    of ``2**depth`` and the output cropped back.

    Parameters with the defaults (batch norm): 54,407,809 for one channel; the reference ``unet_256`` with
    three channels has 54,413,955 (printed as "54.414 M"): the two differ only in the outer convolutions,
    1*64*16 + (128*1*16 + 1) against 3*64*16 + (128*3*16 + 3).

    Args:
        in_channels: image channels in.
        out_channels: image channels out.
        depth: number of stride-2 levels (the reference's ``num_downs``), at least 2.
        base_channels: channels of the first level (the reference's ``ngf``).
        norm: see :func:`gan_norm` (Pix2Pix: ``batch``).
        dropout: dropout probability in the inner levels (Pix2Pix: 0.5; 0 turns it off).
        pad_mode: ``reflect``, ``replicate`` or ``zeros``, for sizes not divisible by ``2**depth``.
        init_std: std of the reference's normal initialisation (None: PyTorch's default initialisation).
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        depth: int = 8,
        base_channels: int = 64,
        norm: str = "batch",
        dropout: float = 0.5,
        pad_mode: str = "reflect",
        init_std: float | None = 0.02,
    ) -> None:
        super().__init__()
        if depth < 2:
            raise ValueError(f"UNetGenerator: depth={depth}: must be >= 2")
        if norm not in GAN_NORMS:
            raise ValueError(f"norm={norm!r}: unknown normalisation. Use one of {', '.join(GAN_NORMS)}")
        if pad_mode not in PAD_MODES:
            raise ValueError(f"pad_mode={pad_mode!r}: use one of {', '.join(PAD_MODES)}")
        self.in_channels = in_channels
        self.depth = depth
        self.pad_mode = pad_mode
        cap = 8 * base_channels
        widths = [min(base_channels * 2**i, cap) for i in range(depth)]
        block: nn.Module | None = None
        for i in reversed(range(1, depth)):
            use_dropout = dropout if widths[i - 1] == widths[i] == cap and block is not None else 0.0
            block = UNetSkipBlock(widths[i - 1], widths[i], submodule=block, norm=norm, dropout=use_dropout)
        self.model = UNetSkipBlock(
            out_channels, widths[0], in_channels=in_channels, submodule=block, outermost=True, norm=norm
        )
        if init_std is not None:
            init_gan_weights(self, init_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Translate a batch.

        Args:
            x: images (B, in_channels, H, W) in [0, 1], H, W >= ``2**depth``.

        Returns:
            Images (B, out_channels, H, W) in [0, 1].
        """
        m = 2**self.depth
        if x.ndim != 4 or x.shape[1] != self.in_channels or min(x.shape[-2:]) < m:
            raise ValueError(
                f"UNetGenerator: expected input (B, {self.in_channels}, H, W) with H, W >= 2**depth = {m}, "
                f"got {tuple(x.shape)}. Use crops of at least {m} pixels or a smaller depth "
                "(model.generator.depth)"
            )
        xp, box = pad_to_multiple(x, m, self.pad_mode)
        out = torch.tanh(self.model(2 * xp - 1))
        return crop_back((out + 1) / 2, box)


def conv_output_size(size: int, kernel: int, stride: int, padding: int) -> int:
    """Output size of a convolution along one axis."""
    return (size + 2 * padding - kernel) // stride + 1


class PatchGANDiscriminator(nn.Module):
    """The 70x70 PatchGAN (``n_layers=3``): C64-C128-C256-C512, 4x4 convolutions, LeakyReLU 0.2, one logit
    per patch, no sigmoid (the loss takes logits or, for LSGAN, raw scores).

    Strides 2, 2, 2, 1, then a stride-1 convolution to one channel; no norm on the first layer; conv biases
    only where no batch norm follows, as in the reference. Pix2Pix conditions on the input image
    (``in_channels=2``: input and output concatenated); CycleGAN's is unconditional (``in_channels=1``).

    Parameters with the defaults: 2,763,585 for one channel with batch norm; the reference with three
    channels has 2,765,633 (batch norm), 2,764,737 (instance norm, CycleGAN: "2.765 M"), and with six
    channels (Pix2Pix, batch norm) 2,768,705 ("2.769 M").

    Args:
        in_channels: image channels in.
        base_channels: channels of the first layer (the reference's ``ndf``).
        n_layers: number of stride-2 layers (3: 70x70 receptive field).
        norm: see :func:`gan_norm` (Pix2Pix: ``batch``, CycleGAN: ``instance``).
        init_std: std of the reference's normal initialisation (None: PyTorch's default initialisation).
    """

    kernel_size = 4

    def __init__(
        self,
        in_channels: int = 1,
        base_channels: int = 64,
        n_layers: int = 3,
        norm: str = "batch",
        init_std: float | None = 0.02,
    ) -> None:
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"PatchGANDiscriminator: n_layers={n_layers}: must be >= 1")
        if norm not in GAN_NORMS:
            raise ValueError(f"norm={norm!r}: unknown normalisation. Use one of {', '.join(GAN_NORMS)}")
        self.in_channels = in_channels
        bias = norm != "batch"
        k = self.kernel_size
        widths = [base_channels * min(2**i, 8) for i in range(n_layers + 1)]
        self.strides = [2] * n_layers + [1, 1]
        layers: list[nn.Module] = [nn.Conv2d(in_channels, widths[0], k, 2, 1), nn.LeakyReLU(0.2)]
        for i in range(1, n_layers + 1):
            stride = 2 if i < n_layers else 1
            layers += [
                nn.Conv2d(widths[i - 1], widths[i], k, stride, 1, bias=bias),
                gan_norm(norm, widths[i]),
                nn.LeakyReLU(0.2),
            ]
        layers.append(nn.Conv2d(widths[-1], 1, k, 1, 1))
        self.model = nn.Sequential(*layers)
        if init_std is not None:
            init_gan_weights(self, init_std)

    @property
    def receptive_field(self) -> int:
        """Side of the input patch that one output logit sees (70 for ``n_layers=3``)."""
        rf = 1
        for stride in reversed(self.strides):
            rf = (rf - 1) * stride + self.kernel_size
        return rf

    def output_size(self, size: int) -> int:
        """Side of the logit map for an input of side ``size``."""
        for stride in self.strides:
            size = conv_output_size(size, self.kernel_size, stride, 1)
        return size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Score every patch.

        Args:
            x: images (B, in_channels, H, W).

        Returns:
            Logits (B, 1, h, w), one per overlapping patch.
        """
        if (
            x.ndim != 4
            or x.shape[1] != self.in_channels
            or min(self.output_size(s) for s in x.shape[-2:]) < 1
        ):
            raise ValueError(
                f"PatchGANDiscriminator: expected input (B, {self.in_channels}, H, W) large enough for "
                f"{len(self.strides)} 4x4 convolutions (H, W >= {self._min_size()}), got {tuple(x.shape)}"
            )
        return self.model(x)

    def _min_size(self) -> int:
        size = 1
        while self.output_size(size) < 1:
            size += 1
        return size

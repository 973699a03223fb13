"""Building blocks of the generator: residual block and CBAM attention (Woo et al. 2018), as in Hu et al. 2024.

Each attention operation is a pure function taking its learned part as a callable, plus a thin ``nn.Module``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

NORMS = ("batch", "instance", "none")
ACTIVATIONS = ("relu", "leaky_relu", "elu", "gelu", "silu")


def make_norm(norm: str, channels: int) -> nn.Module:
    """A 2-D normalisation layer by name.

    Args:
        norm: ``batch``, ``instance`` (affine, no running statistics) or ``none``.
        channels: number of feature channels.

    Returns:
        The layer (``nn.Identity`` for ``none``).
    """
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    if norm == "instance":
        return nn.InstanceNorm2d(channels, affine=True)
    if norm == "none":
        return nn.Identity()
    raise ValueError(f"norm={norm!r}: unknown normalisation. Use one of {', '.join(NORMS)}")


def make_activation(act: str) -> nn.Module:
    """An activation layer by name (``leaky_relu`` has slope 0.2).

    Args:
        act: one of ``relu``, ``leaky_relu``, ``elu``, ``gelu``, ``silu``.

    Returns:
        The layer.
    """
    layers: dict[str, Callable[[], nn.Module]] = {
        "relu": nn.ReLU,
        "leaky_relu": lambda: nn.LeakyReLU(0.2),
        "elu": nn.ELU,
        "gelu": nn.GELU,
        "silu": nn.SiLU,
    }
    if act not in layers:
        raise ValueError(f"act={act!r}: unknown activation. Use one of {', '.join(ACTIVATIONS)}")
    return layers[act]()


class ResidualBlock(nn.Module):
    """Two 3x3 conv + norm + activation with a 1x1 conv + norm shortcut (He et al. 2016; Hu et al. 2024 Fig. 2).

    ``out = act(norm(conv3x3(act(norm(conv3x3(x))))) + norm(conv1x1(x)))``. Convolutions carry a bias only when
    ``norm="none"`` (a bias before a normalisation layer is cancelled by it).

    Args:
        in_channels: input channels.
        out_channels: output channels.
        norm: ``batch``, ``instance`` or ``none``.
        act: activation name (see :func:`make_activation`).
    """

    def __init__(self, in_channels: int, out_channels: int, norm: str = "batch", act: str = "relu") -> None:
        super().__init__()
        bias = norm == "none"
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=bias)
        self.norm1 = make_norm(norm, out_channels)
        self.act1 = make_activation(act)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=bias)
        self.norm2 = make_norm(norm, out_channels)
        self.shortcut = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 1, bias=bias), make_norm(norm, out_channels)
        )
        self.act2 = make_activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act1(self.norm1(self.conv1(x)))
        h = self.norm2(self.conv2(h))
        return self.act2(h + self.shortcut(x))


def channel_attention_map(x: torch.Tensor, mlp: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Channel weights of eq. 1: ``sigmoid(FC(avgpool(x)) + FC(maxpool(x)))``.

    Args:
        x: features (B, C, H, W).
        mlp: the shared fully connected network, mapping (B, C) to (B, C).

    Returns:
        Weights in (0, 1), shape (B, C, 1, 1).
    """
    avg = x.mean(dim=(2, 3))
    mx = x.amax(dim=(2, 3))
    return torch.sigmoid(mlp(avg) + mlp(mx))[:, :, None, None]


def spatial_attention_map(x: torch.Tensor, conv: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Spatial weights of eq. 3: ``sigmoid(conv([mean_c(x), max_c(x)]))``.

    Args:
        x: features (B, C, H, W).
        conv: a convolution mapping (B, 2, H, W) to (B, 1, H, W) (7x7 in the paper).

    Returns:
        Weights in (0, 1), shape (B, 1, H, W).
    """
    pooled = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
    return torch.sigmoid(conv(pooled))


class ChannelAttention(nn.Module):
    """CBAM channel attention (eq. 1-2): ``x * sigmoid(FC(avg) + FC(max))``.

    The shared FC is ``Linear(C, C // reduction) -> ReLU -> Linear(C // reduction, C)`` without biases
    (the hidden width is at least 1).

    Args:
        channels: feature channels C.
        reduction: reduction ratio of the hidden layer (16 in Woo et al. 2018).
    """

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        if reduction < 1:
            raise ValueError(f"reduction={reduction}: must be >= 1")
        hidden = max(1, channels // reduction)
        self.mlp = nn.Sequential(
            nn.Linear(channels, hidden, bias=False), nn.ReLU(), nn.Linear(hidden, channels, bias=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * channel_attention_map(x, self.mlp)


class SpatialAttention(nn.Module):
    """CBAM spatial attention (eq. 3-4): ``x * sigmoid(conv7x7([mean_c(x), max_c(x)]))``.

    Args:
        kernel_size: odd kernel size of the convolution (7 in the paper).
    """

    def __init__(self, kernel_size: int = 7) -> None:
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size={kernel_size}: must be odd")
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * spatial_attention_map(x, self.conv)


class CBAM(nn.Module):
    """Convolutional block attention module: channel attention, then spatial attention (Woo et al. 2018).

    Args:
        channels: feature channels.
        reduction: reduction ratio of the channel attention's shared FC.
        kernel_size: kernel size of the spatial attention's convolution.
    """

    def __init__(self, channels: int, reduction: int = 16, kernel_size: int = 7) -> None:
        super().__init__()
        self.channel = ChannelAttention(channels, reduction)
        self.spatial = SpatialAttention(kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.spatial(self.channel(x))

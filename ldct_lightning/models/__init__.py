"""Networks (generator, critic, VGG-19 features) and model-size utilities."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ldct_lightning.models.blocks import CBAM, ChannelAttention, ResidualBlock, SpatialAttention
from ldct_lightning.models.critic import WGANCritic
from ldct_lightning.models.generator import AttentionResUNet
from ldct_lightning.models.vgg import VGG19Features

__all__ = [
    "CBAM",
    "AttentionResUNet",
    "ChannelAttention",
    "FlopCount",
    "ResidualBlock",
    "SpatialAttention",
    "VGG19Features",
    "WGANCritic",
    "count_flops",
    "count_parameters",
]


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements (buffers such as BatchNorm running statistics excluded).

    Args:
        model: the network.
        trainable_only: count only parameters with ``requires_grad``.

    Returns:
        The count.
    """
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


@dataclass(frozen=True)
class FlopCount:
    """Forward cost of one input, as counted by ``torch.utils.flop_counter.FlopCounterMode``.

    Convention: ``flops`` counts 2 FLOPs per multiply-accumulate (``macs = flops / 2``) and covers only the
    operations FlopCounterMode knows (convolutions, matrix products, attention); normalisation, activations,
    pooling, interpolation and element-wise products are not counted.
    """

    flops: int
    input_shape: tuple[int, ...]

    @property
    def macs(self) -> int:
        return self.flops // 2

    @property
    def gflops(self) -> float:
        return self.flops / 1e9

    @property
    def gmacs(self) -> float:
        return self.macs / 1e9


def count_flops(model: nn.Module, input_shape: Sequence[int] = (1, 1, 512, 512)) -> FlopCount:
    """Count the forward FLOPs of ``model`` on a zero input (default: one 512x512 slice).

    The model is run in eval mode under ``torch.no_grad`` on its own device and dtype, then its mode is restored.

    Args:
        model: the network.
        input_shape: shape of the input batch.

    Returns:
        A :class:`FlopCount` (``flops`` = 2 x MACs).
    """
    ref = next(model.parameters(), None)
    x = torch.zeros(
        tuple(input_shape),
        device=ref.device if ref is not None else None,
        dtype=ref.dtype if ref is not None else None,
    )
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
    return FlopCount(flops=int(counter.get_total_flops()), input_shape=tuple(input_shape))

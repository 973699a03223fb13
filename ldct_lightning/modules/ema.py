"""Exponential moving average (EMA) of a network's weights, for the stage-2 generator.

Why not ``torch.optim.swa_utils.AveragedModel``: it wraps the network (``module.*`` keys plus an ``n_averaged``
buffer), while the stage-2 checkpoint exports the EMA as a plain generator state dict (``generator.*``) that
ldct-denoise and stage-2 hand-offs load unchanged; the update itself is one ``lerp_`` per parameter.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def frozen_copy(net: nn.Module) -> nn.Module:
    """A deep copy of ``net`` in eval mode whose parameters need no gradient."""
    twin = copy.deepcopy(net).eval()
    for p in twin.parameters():
        p.requires_grad_(False)
    return twin


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """``ema <- decay * ema + (1 - decay) * model`` for every floating-point parameter; buffers are copied.

    Buffers (batch-norm running statistics, counters) are copied rather than averaged, so the EMA network
    normalises as the trained one does.

    Args:
        ema: the averaged network (changed in place), same architecture as ``model``.
        model: the trained network.
        decay: weight of the old average, in [0, 1).
    """
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"ema_update: decay must lie in [0, 1), got {decay}")
    for p_ema, p in zip(ema.parameters(), model.parameters(), strict=True):
        p_ema.lerp_(p.detach().to(p_ema.dtype), 1.0 - decay)
    for b_ema, b in zip(ema.buffers(), model.buffers(), strict=True):
        b_ema.copy_(b)

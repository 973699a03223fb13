"""A wrapper that gives any plain loss the ``(total, {term: value})`` interface of the supervised module."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class TermLoss(nn.Module):
    """Wrap a loss ``(pred, target) -> scalar`` (e.g. ``nn.MSELoss()``) to return ``(total, {name: total})``.

    Lets :class:`ldct_lightning.modules.stage1.Stage1Module` train a baseline with a single loss, e.g.
    RED-CNN with MSE (``train/mse`` in the logs).

    Args:
        loss: the loss; a module or a function.
        name: the term's name in the returned dict (and the logs).
    """

    def __init__(
        self, loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None, name: str = "mse"
    ):
        super().__init__()
        self.loss = nn.MSELoss() if loss is None else loss
        self.name = name

    def forward(
        self, pred: torch.Tensor, target: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Compute the loss.

        Args:
            pred: network output.
            target: reference.

        Returns:
            The loss and ``{name: loss.detach()}``.
        """
        total = self.loss(pred, target)
        return total, {self.name: total.detach()}

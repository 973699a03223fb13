"""GPU training speed-ups as a callback: channels-last weights and ``torch.compile`` of chosen networks.

A callback (configured in ``conf/callbacks/default.yaml``, key ``speedups``) keeps the training modules
unchanged. ``nn.Module.compile`` compiles in place, so parameter names and checkpoints stay the same (wrapping
with ``torch.compile(module)`` would prefix every key with ``_orig_mod.``). The critic is not compiled by
default: its gradient penalty needs a double backward, which compiled graphs do not support.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import lightning as L
import torch
from torch import nn

log = logging.getLogger(__name__)


class ModelSpeedups(L.Callback):
    """Channels-last memory format and optional ``torch.compile`` for the networks of a training module.

    Args:
        channels_last: ``auto`` (only when training on a CUDA device), True or False.
        compile: compile the networks named in ``compile_modules`` with ``nn.Module.compile``.
        compile_modules: attribute names of the networks to compile (missing ones are skipped).
        compile_mode: ``torch.compile`` mode (None: default; ``max-autotune`` compiles longer for more speed).
    """

    def __init__(
        self,
        channels_last: bool | str = "auto",
        compile: bool = False,
        compile_modules: Sequence[str] = ("generator",),
        compile_mode: str | None = None,
    ) -> None:
        if channels_last not in ("auto", True, False):
            raise ValueError(f"callbacks.speedups.channels_last={channels_last!r}: use auto, true or false")
        self.channels_last = channels_last
        self.compile = compile
        self.compile_modules = tuple(compile_modules)
        self.compile_mode = compile_mode

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Convert the weights and compile, before the first step."""
        on_cuda = trainer.strategy.root_device.type == "cuda"
        if self.channels_last is True or (self.channels_last == "auto" and on_cuda):
            pl_module.to(memory_format=torch.channels_last)
            log.info("speedups: channels-last weights")
        if self.compile:
            for name in self.compile_modules:
                module = getattr(pl_module, name, None)
                if isinstance(module, nn.Module):
                    module.compile(mode=self.compile_mode)
                    log.info("speedups: torch.compile(%s, mode=%s)", name, self.compile_mode)

"""What the adversarial modules share (stage 2, Pix2Pix, CycleGAN): two optimizers under manual optimization.

One optimizer for the generator side, one for the discriminator side (a critic, or two discriminators), each
with an optional per-epoch scheduler; the schedulers are stepped at the end of every epoch (Lightning does not
under manual optimization); the gradient norm of each side is taken after unscaling and logged with the
learning rates (synchronised across DDP processes).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ldct_lightning.modules.base import DenoisingModule, OptimizerFactory, SchedulerFactory, optimizer_config


class AdversarialModule(DenoisingModule):
    """Base class: a generator-side and a discriminator-side optimizer, schedulers, learning-rate and
    gradient-norm logs.

    Subclasses call :meth:`use_optimizers` in ``__init__``, give :meth:`discriminator_parameters` (and
    :meth:`generator_parameters` when more than the generator trains on that side) and write ``training_step``
    with ``opt_g, opt_d = self.optimizers()``. Their ``optimizer_g`` / ``scheduler_g`` arguments are the generator
    side's partial optimizer (Hydra ``_partial_: true``) and per-epoch LR scheduler (or None), ``optimizer_d`` /
    ``scheduler_d`` (stage 2: ``optimizer_c`` / ``scheduler_c``) the discriminator side's.

    Args: those of :class:`DenoisingModule`.
    """

    # the discriminator side's name in the logs: train/lr_<name>, train/grad_norm_<name>
    discriminator_name = "discriminator"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.automatic_optimization = False
        self.optimizer_factories: tuple[OptimizerFactory, OptimizerFactory] | None = None
        self.scheduler_factories: tuple[SchedulerFactory | None, SchedulerFactory | None] = (None, None)
        self._grad_norms: dict[str, torch.Tensor] = {}

    def use_optimizers(
        self,
        optimizers: tuple[OptimizerFactory, OptimizerFactory],
        schedulers: tuple[SchedulerFactory | None, SchedulerFactory | None] = (None, None),
    ) -> None:
        """Set the partial optimizers (and per-epoch schedulers) of the generator and discriminator sides.

        Args:
            optimizers: ``(optimizer_g, optimizer_d)``, each taking its side's parameters (Hydra ``_partial_``).
            schedulers: ``(scheduler_g, scheduler_d)``, each taking its optimizer, stepped once per epoch; or None.
        """
        self.optimizer_factories = optimizers
        self.scheduler_factories = schedulers

    def generator_parameters(self) -> Iterable[nn.Parameter]:
        """The parameters of the generator side's optimizer (default: the generator's)."""
        return self.generator.parameters()

    def discriminator_parameters(self) -> Iterable[nn.Parameter]:
        """The parameters of the discriminator side's optimizer."""
        raise NotImplementedError

    def configure_optimizers(self) -> list[dict[str, Any]]:
        if self.optimizer_factories is None:
            raise ValueError(f"{type(self).__name__}: call use_optimizers() in __init__")
        sides = (self.generator_parameters(), self.discriminator_parameters())
        return [
            optimizer_config(params, make_opt, make_sched)
            for params, make_opt, make_sched in zip(
                sides, self.optimizer_factories, self.scheduler_factories, strict=True
            )
        ]

    def on_train_epoch_end(self) -> None:
        # manual optimization: Lightning does not step the schedulers
        schedulers = self.lr_schedulers()
        if schedulers is None:
            return
        for scheduler in schedulers if isinstance(schedulers, list) else [schedulers]:
            scheduler.step()

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # called after the precision plugin unscales 16-mixed gradients, so the norm is the true one
        opt_g, _ = self.optimizers()
        name = "generator" if optimizer is opt_g.optimizer else self.discriminator_name
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if grads:
            self._grad_norms[name] = torch.nn.utils.get_total_norm(grads).detach()

    def grad_norm_logs(self, *names: str) -> dict[str, torch.Tensor]:
        """``train/grad_norm_<side>`` of the last update of each side (of ``names`` only, when given)."""
        return {f"train/grad_norm_{k}": v for k, v in self._grad_norms.items() if not names or k in names}

    def log_learning_rates(self, batch_size: int) -> None:
        """Log both sides' current learning rates once per epoch."""
        opt_g, opt_d = self.optimizers()
        self.log_dict(
            {
                "train/lr_generator": opt_g.param_groups[0]["lr"],
                f"train/lr_{self.discriminator_name}": opt_d.param_groups[0]["lr"],
            },
            on_step=False,
            on_epoch=True,
            batch_size=batch_size,
            sync_dist=True,
        )

"""Pix2Pix baseline (Isola et al. 2017): conditional GAN + L1, trained on the same unaligned pairs as stage 2.

As in Hu et al. 2024's comparison, the LDCT crop is the input and the NDCT crop of the same patient and
similar z is the "target", although the two are not pixel-aligned: the L1 term then pulls towards a
blurred average of nearby anatomy, one reason why the paper finds Pix2Pix blurry and noisy. ``simulated``
or ``paired`` batches (keys ``input`` / ``target``) work too.

Per batch (manual optimization, the reference's order): one discriminator update, then one generator
update; ``trainer.global_step`` advances by 2. Schedulers are stepped once per epoch. DDP needs
``strategy=ddp_find_unused_parameters_true`` (each backward leaves the other network without gradients).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ldct_lightning.data.normalize import HU_MAX, HU_MIN
from ldct_lightning.modules.adversarial import AdversarialModule
from ldct_lightning.modules.base import OptimizerFactory, SchedulerFactory


def source_target(batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """The (LDCT, NDCT) pair of a training batch: keys ``ldct``/``ndct`` (unaligned) or ``input``/``target``.

    Args:
        batch: a training batch.

    Returns:
        The network input and the image it should resemble.
    """
    for src, tgt in (("ldct", "ndct"), ("input", "target")):
        if src in batch and tgt in batch:
            return batch[src], batch[tgt]
    raise KeyError(
        f"training batch has keys {sorted(batch)}: expected ldct/ndct (data.train_mode=unaligned) "
        "or input/target (simulated, paired)"
    )


def bce_gan_loss(logits: torch.Tensor, real: bool) -> torch.Tensor:
    """Vanilla GAN loss: binary cross-entropy of the logits against all-real (1) or all-fake (0) labels."""
    target = torch.ones_like(logits) if real else torch.zeros_like(logits)
    return F.binary_cross_entropy_with_logits(logits, target)


class Pix2PixModule(AdversarialModule):
    """Pix2Pix: the discriminator sees (input, output) pairs; the generator loss adds ``lambda_l1`` x L1.

    Discriminator loss: ``0.5 [BCE(D(x, y), 1) + BCE(D(x, G(x)), 0)]``; generator loss:
    ``BCE(D(x, G(x)), 1) + lambda_l1 * |G(x) - y|_1``, with ``x`` the LDCT and ``y`` the NDCT crop. The
    reference trains with Adam (lr 2e-4, betas (0.5, 0.999)).

    Args:
        generator: the network used at inference, e.g. :class:`ldct_lightning.models.pix2pix.UNetGenerator`.
        discriminator: a conditional discriminator taking the input and an output image concatenated along
            the channels, e.g. ``PatchGANDiscriminator(in_channels=2)``; returns logits.
        optimizer_g, optimizer_d, scheduler_g, scheduler_d: see :class:`AdversarialModule`.
        lambda_l1: weight of the L1 term (100 in Pix2Pix).
        panel_every_n_epochs, hu_min, hu_max: see :class:`DenoisingModule`.
    """

    def __init__(
        self,
        generator: nn.Module,
        discriminator: nn.Module,
        optimizer_g: OptimizerFactory,
        optimizer_d: OptimizerFactory,
        scheduler_g: SchedulerFactory | None = None,
        scheduler_d: SchedulerFactory | None = None,
        lambda_l1: float = 100.0,
        panel_every_n_epochs: int = 10,
        hu_min: float = HU_MIN,
        hu_max: float = HU_MAX,
    ) -> None:
        super().__init__(generator, panel_every_n_epochs, hu_min, hu_max)
        self.use_optimizers((optimizer_g, optimizer_d), (scheduler_g, scheduler_d))
        if lambda_l1 < 0:
            raise ValueError(f"lambda_l1={lambda_l1}: must be >= 0")
        d_in = getattr(discriminator, "in_channels", None)
        g_in = getattr(generator, "in_channels", None)
        if d_in is not None and g_in is not None and d_in != 2 * g_in:
            raise ValueError(
                f"Pix2PixModule: the discriminator takes {d_in} channels but sees the input and the output "
                f"concatenated ({2 * g_in}): set model.discriminator.in_channels={2 * g_in}"
            )
        self.save_hyperparameters(
            ignore=["generator", "discriminator", "optimizer_g", "optimizer_d", "scheduler_g", "scheduler_d"]
        )
        self.discriminator = discriminator
        self.lambda_l1 = lambda_l1

    def discriminator_parameters(self) -> Iterator[nn.Parameter]:
        return self.discriminator.parameters()

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        ldct, ndct = source_target(batch)
        opt_g, opt_d = self.optimizers()
        batch_size = ldct.shape[0]
        fake = self.generator(ldct)

        with self.toggled_optimizer(opt_d):
            logits_real = self.discriminator(torch.cat([ldct, ndct], dim=1))
            logits_fake = self.discriminator(torch.cat([ldct, fake.detach()], dim=1))
            loss_d = 0.5 * (bce_gan_loss(logits_real, True) + bce_gan_loss(logits_fake, False))
            opt_d.zero_grad()
            self.manual_backward(loss_d)
            opt_d.step()

        with self.toggled_optimizer(opt_g):
            loss_adv = bce_gan_loss(self.discriminator(torch.cat([ldct, fake], dim=1)), True)
            loss_l1 = F.l1_loss(fake, ndct)
            loss_g = loss_adv + self.lambda_l1 * loss_l1
            opt_g.zero_grad()
            self.manual_backward(loss_g)
            opt_g.step()

        self.log("train/loss_generator", loss_g.detach(), prog_bar=True, batch_size=batch_size)
        self.log_dict(
            {
                "train/loss_discriminator": loss_d.detach(),
                "train/loss_adversarial": loss_adv.detach(),
                "train/l1": loss_l1.detach(),
                # mean probability the discriminator gives real and generated pairs (before its update)
                "train/d_real": torch.sigmoid(logits_real.detach()).mean(),
                "train/d_fake": torch.sigmoid(logits_fake.detach()).mean(),
                **self.grad_norm_logs(),
            },
            batch_size=batch_size,
        )
        self.log_learning_rates(batch_size)

"""CycleGAN baseline (Zhu et al. 2017): two generators, two PatchGAN discriminators, LSGAN + cycle + identity.

Trained on the same unpaired LDCT / NDCT crops as stage 2 (``unaligned`` batches; ``input``/``target``
batches work too and are used unpaired). ``self.generator`` maps LDCT to NDCT and is the network used at
inference; ``generator_b`` maps NDCT back to LDCT and serves only the cycle.

Per batch (manual optimization, the reference's order): one update of both generators, then one of both
discriminators, each fed generated images through an :class:`ImagePool`; ``trainer.global_step`` advances
by 2. Schedulers are stepped once per epoch. DDP needs ``strategy=ddp_find_unused_parameters_true``; each
process keeps its own image pool.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ldct_lightning.data.normalize import HU_MAX, HU_MIN
from ldct_lightning.modules.adversarial import AdversarialModule
from ldct_lightning.modules.base import OptimizerFactory, SchedulerFactory
from ldct_lightning.modules.pix2pix import source_target


class ImagePool:
    """History of generated images for the discriminator updates (Shrivastava et al. 2017), as in CycleGAN.

    While the pool holds fewer than ``pool_size`` images, each queried image is stored and returned as is.
    Once full, each image is, with probability 0.5, returned as is, otherwise swapped for a random stored
    image (which is returned, the new one taking its place). Hand-written (about 20 lines): torch,
    torchvision, Lightning and kornia have no such buffer, and the authors' reference code is not a package.
    Not saved in checkpoints (as in the reference): a resumed run refills it.

    Args:
        pool_size: images kept (50 in CycleGAN; 0 returns every query unchanged).
        generator: random source (CPU); None draws from torch's global generator (seeded by
            ``lightning.seed_everything``).
    """

    def __init__(self, pool_size: int = 50, generator: torch.Generator | None = None) -> None:
        if pool_size < 0:
            raise ValueError(f"pool_size={pool_size}: must be >= 0")
        self.pool_size = pool_size
        self.generator = generator
        self.images: list[torch.Tensor] = []

    def __len__(self) -> int:
        return len(self.images)

    def query(self, images: torch.Tensor) -> torch.Tensor:
        """Return a batch of the same shape mixing the given images with stored ones.

        Args:
            images: generated images (B, C, H, W); stored detached.

        Returns:
            A detached batch (B, C, H, W).
        """
        images = images.detach()
        if self.pool_size == 0:
            return images
        out = []
        for image in images:
            if len(self.images) < self.pool_size:
                self.images.append(image.clone())
                out.append(image)
            elif torch.rand((), generator=self.generator) < 0.5:
                index = int(torch.randint(self.pool_size, (), generator=self.generator))
                out.append(self.images[index])
                self.images[index] = image.clone()
            else:
                out.append(image)
        return torch.stack(out)


def lsgan_loss(scores: torch.Tensor, real: bool) -> torch.Tensor:
    """Least-squares GAN loss: mean squared distance of the scores to 1 (real) or 0 (fake)."""
    target = torch.ones_like(scores) if real else torch.zeros_like(scores)
    return F.mse_loss(scores, target)


class CycleGANModule(AdversarialModule):
    """CycleGAN with LSGAN losses, cycle consistency and identity terms (the reference's defaults).

    With ``G`` = ``generator`` (LDCT -> NDCT), ``F`` = ``generator_b`` (NDCT -> LDCT), ``D_N`` / ``D_L``
    the NDCT / LDCT discriminators, ``a`` an LDCT and ``b`` an NDCT crop:

    - generators: ``(D_N(G(a)) - 1)^2 + (D_L(F(b)) - 1)^2 + lambda_cycle (|F(G(a)) - a|_1 + |G(F(b)) - b|_1)
      + lambda_identity * lambda_cycle (|G(b) - b|_1 + |F(a) - a|_1)`` (means over pixels);
    - each discriminator: ``0.5 [(D(real) - 1)^2 + D(pool(fake))^2]``.

    The reference trains with Adam (lr 2e-4, betas (0.5, 0.999)), batch 1, constant lr for 100 epochs then a
    linear decay to 0 over 100 more (``LambdaLR`` as ``scheduler_g`` / ``scheduler_d``).

    Args:
        generator: LDCT -> NDCT, used at inference, e.g. :class:`ldct_lightning.models.cyclegan.ResNetGenerator`.
        generator_b: NDCT -> LDCT.
        discriminator_ndct: judges NDCT-domain images (real NDCT against ``generator``'s outputs).
        discriminator_ldct: judges LDCT-domain images (real LDCT against ``generator_b``'s outputs).
        optimizer_g, optimizer_d, scheduler_g, scheduler_d: see :class:`AdversarialModule` (the generator side
            is both generators, the discriminator side both discriminators).
        lambda_cycle: weight of both cycle terms (10 in CycleGAN).
        lambda_identity: weight of the identity terms relative to ``lambda_cycle`` (0.5 in CycleGAN; 0: off).
        pool_size: images kept by each :class:`ImagePool` (50 in CycleGAN).
        panel_every_n_epochs, hu_min, hu_max: see :class:`DenoisingModule`.
    """

    def __init__(
        self,
        generator: nn.Module,
        generator_b: nn.Module,
        discriminator_ndct: nn.Module,
        discriminator_ldct: nn.Module,
        optimizer_g: OptimizerFactory,
        optimizer_d: OptimizerFactory,
        scheduler_g: SchedulerFactory | None = None,
        scheduler_d: SchedulerFactory | None = None,
        lambda_cycle: float = 10.0,
        lambda_identity: float = 0.5,
        pool_size: int = 50,
        panel_every_n_epochs: int = 10,
        hu_min: float = HU_MIN,
        hu_max: float = HU_MAX,
    ) -> None:
        super().__init__(generator, panel_every_n_epochs, hu_min, hu_max)
        self.use_optimizers((optimizer_g, optimizer_d), (scheduler_g, scheduler_d))
        if lambda_cycle < 0 or lambda_identity < 0:
            raise ValueError(f"lambda_cycle={lambda_cycle}, lambda_identity={lambda_identity}: must be >= 0")
        self.save_hyperparameters(
            ignore=[
                "generator",
                "generator_b",
                "discriminator_ndct",
                "discriminator_ldct",
                "optimizer_g",
                "optimizer_d",
                "scheduler_g",
                "scheduler_d",
            ]
        )
        self.generator_b = generator_b
        self.discriminator_ndct = discriminator_ndct
        self.discriminator_ldct = discriminator_ldct
        self.lambda_cycle = lambda_cycle
        self.lambda_identity = lambda_identity
        self.pool_ndct = ImagePool(pool_size)  # generated NDCT-like images, for discriminator_ndct
        self.pool_ldct = ImagePool(pool_size)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        ldct, ndct = source_target(batch)
        opt_g, opt_d = self.optimizers()
        batch_size = ldct.shape[0]
        fake_ndct = self.generator(ldct)
        fake_ldct = self.generator_b(ndct)

        with self.toggled_optimizer(opt_g):
            adv_ndct = lsgan_loss(self.discriminator_ndct(fake_ndct), True)
            adv_ldct = lsgan_loss(self.discriminator_ldct(fake_ldct), True)
            cycle_ldct = F.l1_loss(self.generator_b(fake_ndct), ldct)
            cycle_ndct = F.l1_loss(self.generator(fake_ldct), ndct)
            loss_g = adv_ndct + adv_ldct + self.lambda_cycle * (cycle_ldct + cycle_ndct)
            terms = {
                "adv_ndct": adv_ndct,
                "adv_ldct": adv_ldct,
                "cycle_ldct": cycle_ldct,
                "cycle_ndct": cycle_ndct,
            }
            if self.lambda_identity > 0:
                identity_ndct = F.l1_loss(self.generator(ndct), ndct)
                identity_ldct = F.l1_loss(self.generator_b(ldct), ldct)
                loss_g = loss_g + self.lambda_identity * self.lambda_cycle * (identity_ndct + identity_ldct)
                terms |= {"identity_ndct": identity_ndct, "identity_ldct": identity_ldct}
            opt_g.zero_grad()
            self.manual_backward(loss_g)
            opt_g.step()

        with self.toggled_optimizer(opt_d):
            loss_d_ndct = self._discriminator_loss(
                self.discriminator_ndct, ndct, self.pool_ndct.query(fake_ndct)
            )
            loss_d_ldct = self._discriminator_loss(
                self.discriminator_ldct, ldct, self.pool_ldct.query(fake_ldct)
            )
            opt_d.zero_grad()
            self.manual_backward(loss_d_ndct + loss_d_ldct)
            opt_d.step()

        self.log("train/loss_generator", loss_g.detach(), prog_bar=True, batch_size=batch_size)
        self.log_dict(
            {
                "train/loss_discriminator": (loss_d_ndct + loss_d_ldct).detach(),
                "train/loss_d_ndct": loss_d_ndct.detach(),
                "train/loss_d_ldct": loss_d_ldct.detach(),
                **{f"train/{k}": v.detach() for k, v in terms.items()},
                **self.grad_norm_logs(),
            },
            batch_size=batch_size,
        )
        self.log_learning_rates(batch_size)

    @staticmethod
    def _discriminator_loss(discriminator: nn.Module, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        return 0.5 * (lsgan_loss(discriminator(real), True) + lsgan_loss(discriminator(fake), False))

    def generator_parameters(self) -> Iterator[nn.Parameter]:
        return itertools.chain(self.generator.parameters(), self.generator_b.parameters())

    def discriminator_parameters(self) -> Iterator[nn.Parameter]:
        return itertools.chain(self.discriminator_ndct.parameters(), self.discriminator_ldct.parameters())

"""Stage 2: WGAN-GP (eq. 9) on unaligned LDCT / NDCT crops, generator initialised from stage 1 (or randomly).

Per training batch: ``n_critic`` critic updates, then one generator update (manual optimization).

Budgets are in epochs: with manual optimization every ``optimizer.step()`` counts towards ``trainer.global_step``,
so one batch advances it by ``n_critic + 1`` (``max_steps`` and step-based intervals count optimizer steps).
Logs are per batch (Lightning's logging step counts batches).

DDP: each backward leaves one network without gradients (the generator in the critic's backward, the critic in
the generator's, as the optimizers are toggled), so DDP needs ``strategy=ddp_find_unused_parameters_true``.
Gradient clipping is not applied (Lightning does not clip under manual optimization).

Beyond eq. 9 (each off by the module's defaults; the configs' default turns them on, see README):

- a critic warm-up: the first ``critic_warmup_steps`` critic updates run against the frozen initial (stage-1)
  generator, with no generator update, so that the generator never follows a random critic;
- a fidelity term (:class:`ldct_lightning.losses.Stage2Fidelity`): L1/SSIM to the frozen stage-1 output
  ("anchor") and a low-frequency consistency with the LDCT input;
- an EMA of the generator's weights: validated, and written as the checkpoint's ``generator.*`` weights (the
  ones evaluation and denoising load); the trained weights are kept as ``online_generator.*`` for resuming.
- ``critic_real="stage1_ndct"``: the critic's real samples are the frozen stage-1 network's output on the NDCT
  crops instead of the NDCT crops (eq. 9), so that the adversarial term asks for the output on LDCT to look like
  the network's output on NDCT, not for NDCT noise.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ldct_lightning.data.normalize import HU_MAX, HU_MIN
from ldct_lightning.losses import Stage2Fidelity, gradient_penalty
from ldct_lightning.modules.adversarial import AdversarialModule
from ldct_lightning.modules.base import OptimizerFactory, SchedulerFactory
from ldct_lightning.modules.ema import ema_update, frozen_copy
from ldct_lightning.modules.handoff import load_generator_weights

EMA_PREFIX = "ema_generator."
CRITIC_REAL = ("ndct", "stage1_ndct")
ONLINE_PREFIX = "online_generator."


def masked_l1(pred: torch.Tensor, batch: dict[str, Any], weight: float) -> torch.Tensor:
    """Mean |pred - registered| over the well-registered pixels of the batch (0 when there are none)."""
    if "registered" not in batch or "registered_mask" not in batch:
        raise KeyError(
            f"registered_weight={weight:g} needs the registered NDCT in the batch: set data.unaligned_registered=true "
            "(data with a registration: LDCT and NDCT in two frames of reference)"
        )
    mask = batch["registered_mask"].to(pred.dtype)
    return ((pred - batch["registered"]).abs() * mask).sum() / mask.sum().clamp_min(1.0)


class Stage2Module(AdversarialModule):
    """Adversarial generator training with a Wasserstein critic and gradient penalty on ``unaligned`` batches.

    Critic loss: ``D(G(ldct)) - D(ndct) + lambda_gp * GP``; generator loss: ``-D(G(ldct))`` plus, optionally,
    ``content_weight * content_loss(G(ldct), ldct)`` (eq. 9 has no content term: weight 0 by default).
    The paper gives Adam with lr 1e-5, batch 20, 128x128 crops and StepLR (40 epochs, x0.6) but not Adam's
    betas; the configs use (0.5, 0.999) as in stage 1.

    Args:
        generator: the denoising network.
        critic: the Wasserstein critic (one score per image, no sigmoid).
        optimizer_g: a partial optimizer taking the generator's parameters (Hydra ``_partial_: true``).
        optimizer_c: a partial optimizer taking the critic's parameters.
        scheduler_g: a partial LR scheduler for ``optimizer_g``, stepped once per epoch; or None.
        scheduler_c: the same for ``optimizer_c``.
        n_critic: critic updates per generator update.
        lambda_gp: weight of the gradient penalty.
        content_loss: a module ``(pred, ldct) -> loss`` (or ``-> (loss, terms)``); None with
            ``content_weight > 0`` means L1 to the LDCT input.
        content_weight: weight of the content term in the generator loss (0: adversarial only).
        registered_weight: weight of an L1 term to the NDCT registered onto the LDCT crop, inside its
            well-registered mask (batch keys ``registered``, ``registered_mask``: ``data.unaligned_registered``);
            0 (default) adds nothing.
        generator_init: ``None`` / ``"random"`` (keep the generator's initialisation) or the path of a
            checkpoint (e.g. stage 1's) whose ``generator.*`` weights are loaded.
        panel_every_n_epochs: see :class:`DenoisingModule`.
        freeze_generator_norm: keep the generator's batch-norm layers in eval mode (stage-1 running statistics,
            not updated) during training. The paper says nothing; off by default. On the synthetic sets, merely
            re-estimating the statistics on LDCT crops cost the stage-1 generator about 3 dB.
        critic_warmup_steps: critic-only updates (``n_critic`` per batch) against the frozen initial generator
            before the first generator update (0: none, as in the paper).
        fidelity: a :class:`ldct_lightning.losses.Stage2Fidelity` added to the generator loss; None: none (eq. 9).
            Its anchor terms need a stage-1 generator (``generator_init`` a checkpoint): with a random
            initialisation they are skipped (a random network is no anchor).
        ema_decay: decay of the EMA of the generator's weights (None: no EMA, the trained weights are used).
        critic_real: what the critic sees as real: ``ndct`` (eq. 9: the NDCT crops) or ``stage1_ndct`` (the
            frozen stage-1 generator's output on the NDCT crops: the NDCT with its own, milder noise
            removed as stage 1 removes it). With ``ndct`` a critic that is satisfied asks for NDCT noise in
            the output; with ``stage1_ndct`` it asks that the output on LDCT look like the stage-1 network's
            output on NDCT. Needs ``generator_init`` a checkpoint (with a random start it falls back to ``ndct``).
        hu_min: HU mapped to 0 by the data normalisation.
        hu_max: HU mapped to 1 by the data normalisation.
    """

    discriminator_name = "critic"

    def __init__(
        self,
        generator: nn.Module,
        critic: nn.Module,
        optimizer_g: OptimizerFactory,
        optimizer_c: OptimizerFactory,
        scheduler_g: SchedulerFactory | None = None,
        scheduler_c: SchedulerFactory | None = None,
        n_critic: int = 3,
        lambda_gp: float = 10.0,
        content_loss: nn.Module | None = None,
        content_weight: float = 0.0,
        registered_weight: float = 0.0,
        generator_init: str | None = None,
        panel_every_n_epochs: int = 10,
        freeze_generator_norm: bool = False,
        critic_warmup_steps: int = 0,
        fidelity: Stage2Fidelity | None = None,
        ema_decay: float | None = None,
        critic_real: str = "ndct",
        hu_min: float = HU_MIN,
        hu_max: float = HU_MAX,
    ) -> None:
        super().__init__(generator, panel_every_n_epochs, hu_min, hu_max)
        self.use_optimizers((optimizer_g, optimizer_c), (scheduler_g, scheduler_c))
        self.freeze_generator_norm = freeze_generator_norm
        if n_critic < 1:
            raise ValueError(f"n_critic={n_critic}: must be at least 1")
        if content_weight < 0 or registered_weight < 0:
            raise ValueError(
                f"content_weight={content_weight}, registered_weight={registered_weight}: must be >= 0"
            )
        if critic_warmup_steps < 0:
            raise ValueError(f"critic_warmup_steps={critic_warmup_steps}: must be >= 0")
        if critic_real not in CRITIC_REAL:
            raise ValueError(f"critic_real={critic_real!r}: use one of {', '.join(CRITIC_REAL)}")
        if ema_decay is not None and not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay={ema_decay}: must lie in [0, 1), or null for no EMA")
        self.save_hyperparameters(
            ignore=[
                "generator",
                "critic",
                "optimizer_g",
                "optimizer_c",
                "scheduler_g",
                "scheduler_c",
                "content_loss",
                "fidelity",
            ]
        )
        self.critic = critic
        self.n_critic = n_critic
        self.lambda_gp = lambda_gp
        self.content_weight = content_weight
        self.registered_weight = registered_weight
        if content_loss is None and content_weight > 0:
            content_loss = nn.L1Loss()
        self.content_loss = content_loss
        if content_loss is not None and content_loss.state_dict():
            # e.g. a frozen VGG loaded from its own file: kept out of checkpoints (see on_save_checkpoint)
            self.strict_loading = False
        from_checkpoint = generator_init not in (None, "random")
        if from_checkpoint:
            load_generator_weights(self.generator, generator_init)
        self.critic_warmup_steps = int(critic_warmup_steps)
        # critic updates done so far (a buffer: saved in checkpoints, so a resumed run does not warm up again)
        self.register_buffer("critic_updates", torch.zeros((), dtype=torch.long))
        self.fidelity = fidelity
        # the frozen stage-1 generator; rebuilt from generator_init when resuming, never saved
        self.anchor: nn.Module | None = None
        self.critic_real = critic_real if from_checkpoint else "ndct"
        uses_anchor = (fidelity is not None and fidelity.uses_anchor) or self.critic_real == "stage1_ndct"
        if uses_anchor and from_checkpoint:
            self.anchor = frozen_copy(self.generator)
            self.strict_loading = False
        self.ema_decay = ema_decay
        self.ema_generator = frozen_copy(self.generator) if ema_decay is not None else None

    def discriminator_parameters(self) -> Iterator[nn.Parameter]:
        return self.critic.parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Denoise with the EMA generator when there is one (validation, prediction), else the trained one."""
        return (self.ema_generator if self.ema_generator is not None else self.generator)(x)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith(("content_loss.", "anchor.", "fidelity."))]:
            del state[key]
        if self.ema_generator is not None:
            # export: generator.* holds the EMA weights (what evaluation and denoising load)
            for key in [k for k in state if k.startswith("generator.")]:
                state[ONLINE_PREFIX + key[len("generator.") :]] = state.pop(key)
            for key in [k for k in state if k.startswith(EMA_PREFIX)]:
                state["generator." + key[len(EMA_PREFIX) :]] = state.pop(key)
        # the weights are in this checkpoint: reloading it must not need the stage-1 file any more
        hparams = checkpoint.get("hyper_parameters", {})
        if hparams.get("generator_init") not in (None, "random"):
            checkpoint["generator_init_source"] = str(hparams["generator_init"])
            hparams["generator_init"] = None

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # undo the export of on_save_checkpoint: generator.* back to the EMA, online_generator.* to the generator
        state = checkpoint["state_dict"]
        online = [k for k in state if k.startswith(ONLINE_PREFIX)]
        if not online:
            return
        if self.ema_generator is None:
            raise ValueError(
                "this stage-2 checkpoint holds an EMA generator: load it with ema_decay set (as it was trained)"
            )
        for key in [k for k in state if k.startswith("generator.")]:
            state[EMA_PREFIX + key[len("generator.") :]] = state.pop(key)
        for key in online:
            state["generator." + key[len(ONLINE_PREFIX) :]] = state.pop(key)

    def on_train_epoch_start(self) -> None:
        if self.freeze_generator_norm:
            for m in self.generator.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()

    def in_critic_warmup(self) -> bool:
        """Whether the next batch only updates the critic (warm-up against the frozen initial generator)."""
        return int(self.critic_updates) < self.critic_warmup_steps

    def _frozen_forward(self, net: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``net(x)`` in eval mode without a graph; the modes of its layers are restored afterwards."""
        modes = [(m, m.training) for m in net.modules()]
        net.eval()
        try:
            with torch.no_grad():
                return net(x)
        finally:
            for m, mode in modes:
                m.train(mode)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        ldct, ndct = batch["ldct"], batch["ndct"]
        opt_g, opt_c = self.optimizers()
        batch_size = ldct.shape[0]
        warmup = self.in_critic_warmup()
        # The generator does not change during the critic updates, so one forward pass serves them (detached)
        # and the generator update (with its graph): the same numbers as recomputing G(ldct) each time, one
        # batch-norm statistics update per batch, at the cost of keeping its activations through the critic updates.
        # During the warm-up the generator is frozen: eval mode, no graph, no statistics update.
        fake = self._frozen_forward(self.generator, ldct) if warmup else self.generator(ldct)
        real = self._frozen_forward(self.anchor, ndct) if self.critic_real == "stage1_ndct" else ndct

        with self.toggled_optimizer(opt_c):
            for _ in range(self.n_critic):
                score_real = self.critic(real).mean()
                score_fake = self.critic(fake.detach()).mean()
                gp = gradient_penalty(self.critic, real, fake.detach())
                loss_c = score_fake - score_real + self.lambda_gp * gp
                opt_c.zero_grad()
                self.manual_backward(loss_c)
                opt_c.step()
                self.critic_updates += 1

        critic_logs = {
            # the last critic update's estimate; its negative is the critic's loss without the penalty
            "train/wasserstein": (score_real - score_fake).detach(),
            "train/gp": gp.detach(),
            "train/loss_critic": loss_c.detach(),
        }
        if warmup:
            norms = self.grad_norm_logs(self.discriminator_name)
            self.log_dict({**critic_logs, **norms, "train/critic_warmup": 1.0}, batch_size=batch_size)
            return

        with self.toggled_optimizer(opt_g):
            loss_adv = -self.critic(fake).mean()
            loss_g = loss_adv
            if self.content_loss is not None and self.content_weight > 0:
                content = self.content_loss(fake, ldct)
                content = content[0] if isinstance(content, tuple) else content
                loss_g = loss_g + self.content_weight * content
                self.log("train/content", content, batch_size=batch_size)
            if self.registered_weight > 0:
                registered = masked_l1(fake, batch, self.registered_weight)
                loss_g = loss_g + self.registered_weight * registered
                self.log("train/registered_l1", registered, batch_size=batch_size)
            if self.fidelity is not None:
                anchor = (
                    self._frozen_forward(self.anchor, ldct)
                    if self.anchor is not None and self.fidelity.uses_anchor
                    else None
                )
                fidelity, terms = self.fidelity(fake, ldct, anchor)
                loss_g = loss_g + fidelity
                self.log_dict({f"train/{k}": v for k, v in terms.items()}, batch_size=batch_size)
            opt_g.zero_grad()
            self.manual_backward(loss_g)
            opt_g.step()
        if self.ema_generator is not None:
            ema_update(self.ema_generator, self.generator, self.ema_decay)

        self.log("train/loss_generator", loss_g, prog_bar=True, batch_size=batch_size)
        self.log_dict(
            {
                **critic_logs,
                "train/critic_warmup": 0.0,
                "train/loss_adversarial": loss_adv.detach(),
                **self.grad_norm_logs(),
            },
            batch_size=batch_size,
        )
        self.log_learning_rates(batch_size)

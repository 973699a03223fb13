"""Training fault handling: a resumable checkpoint on interruption, and a guard against non-finite losses.

Both are plain Lightning callbacks configured in ``conf/callbacks/default.yaml``; they need no change to the
modules, as they work through hooks that automatic and manual optimization both call
(``on_before_backward``, ``on_before_optimizer_step``, ``on_exception``).

What Lightning already does, and what is added here:

- SIGTERM: Lightning's signal connector sets a flag, the loops finish the current batch and raise
  ``SIGTERMException`` (a ``SystemExit`` with exit status 0), which reaches ``Callback.on_exception``; nothing is
  saved. Ctrl-C: Lightning catches ``KeyboardInterrupt`` in ``trainer.fit``, calls ``on_exception`` and exits
  with status 1; nothing is saved. :class:`InterruptCheckpoint` saves ``<stage>/checkpoints/last.ckpt`` in
  ``on_exception`` and prints how to resume (``ckpt_path=last`` with the same run directory); ``train.py``
  turns the SIGTERM exit into status 143.
- ``last.ckpt``: Lightning 2.6's ModelCheckpoint writes it only together with a new best checkpoint, so a run
  (a resumed one in particular) whose best epoch is not its last leaves an older model there, which stage 2's
  hand-off, ``ldct-evaluate`` and ``--sweep`` would then read. :class:`LastCheckpoint` writes it every epoch
  and at the end of training.
- Non-finite losses: Lightning does not check them (``detect_anomaly`` is a slow debugging aid).
  :class:`NonFiniteGuard` checks every loss that is backpropagated and, before each optimizer step, the
  gradients; then it stops the run (:class:`NonFiniteLossError`, raised before the step, so the weights and
  the checkpoints on disk stay finite) or skips the step (all gradients of that optimizer are dropped, which
  every torch optimizer treats as "no update").
"""

from __future__ import annotations

import logging
import math
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from ldct_lightning.errors import LDCTError

log = logging.getLogger(__name__)

NONFINITE_MODES = ("stop", "skip")


class NonFiniteLossError(LDCTError, RuntimeError):
    """Training met a NaN/Inf loss or gradient; the message names the stage, epoch and step."""


def stage_name(trainer: L.Trainer) -> str:
    """The stage a trainer trains: the name of its ``default_root_dir`` (``<run>/<stage>``, see pipeline)."""
    return Path(trainer.default_root_dir).name


def checkpoint_dir(trainer: L.Trainer) -> Path:
    """The stage's checkpoint folder: the ModelCheckpoint's ``dirpath``, else ``<default_root_dir>/checkpoints``."""
    dirpath = getattr(trainer.checkpoint_callback, "dirpath", None)
    return Path(dirpath) if dirpath else Path(trainer.default_root_dir) / "checkpoints"


def resume_hint(trainer: L.Trainer) -> str:
    """How to continue this run: ``train.py`` with the same arguments plus ``ckpt_path=last`` and the run dir."""
    run_dir = Path(trainer.default_root_dir).resolve().parent
    return f"resume with the same arguments plus: ckpt_path=last hydra.run.dir={run_dir}"


def _where(trainer: L.Trainer) -> str:
    return f"stage {stage_name(trainer)}, epoch {trainer.current_epoch}, global step {trainer.global_step}"


def _all_finite(tensors: list[torch.Tensor]) -> bool:
    """True when every tensor is finite, with one device synchronisation for all of them."""
    tensors = [t for t in tensors if t.is_floating_point() or t.is_complex()]
    if not tensors:
        return True
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


def _say(trainer: L.Trainer, message: str) -> None:
    if trainer.is_global_zero:
        print(message, file=sys.stderr, flush=True)


class LastCheckpoint(ModelCheckpoint):
    """ModelCheckpoint whose ``last.ckpt`` always holds the latest epoch and global step.

    Lightning (2.6) saves ``last.ckpt`` only at steps where a top-k checkpoint was saved; this subclass saves
    it after every epoch's top-k check and at the end of training as well (once per global step).
    Same arguments as :class:`~lightning.pytorch.callbacks.ModelCheckpoint`.
    """

    def _save_last_if_stale(self, trainer: L.Trainer) -> None:
        # _should_skip_saving_checkpoint is also true when this global step was saved already
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    # each after the hook where ModelCheckpoint makes its top-k save, so that one is not skipped
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._save_last_if_stale(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._save_last_if_stale(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        self._save_last_if_stale(trainer)


class InterruptCheckpoint(L.Callback):
    """Save a resumable ``last.ckpt`` when training is interrupted by SIGTERM or Ctrl-C.

    The checkpoint goes where ModelCheckpoint keeps ``last.ckpt`` (``<run>/<stage>/checkpoints``), so
    ``ckpt_path=last`` resumes with the same epoch and global step. Nothing is saved when the interruption
    comes before the first optimizer step, during the sanity check, or when the weights are not finite.
    Other exceptions save nothing: the last checkpoint written by ModelCheckpoint stays the last good one.
    """

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        if isinstance(exception, SIGTERMException):
            cause = "SIGTERM"
        elif isinstance(exception, KeyboardInterrupt):
            cause = "Ctrl-C"
        else:
            return
        if trainer.state.fn != TrainerFn.FITTING or trainer.sanity_checking or trainer.global_step == 0:
            _say(trainer, f"interrupted by {cause} in {_where(trainer)}: nothing trained yet, nothing saved")
            return
        if not _all_finite(list(pl_module.state_dict().values())):
            _say(
                trainer,
                f"interrupted by {cause} in {_where(trainer)}: the weights are not finite, so last.ckpt was not "
                "overwritten; resume from an earlier checkpoint",
            )
            return
        path = checkpoint_dir(trainer) / "last.ckpt"
        trainer.save_checkpoint(path, weights_only=False)
        _say(trainer, f"interrupted by {cause} in {_where(trainer)}; saved {path}; {resume_hint(trainer)}")


class NonFiniteGuard(L.Callback):
    """Stop the run, or skip the optimizer step, when a loss or gradient is NaN or infinite.

    Every loss passed to ``backward`` (``manual_backward`` included, so both stage-2 losses) is checked in
    ``on_before_backward``; the gradients in ``on_before_optimizer_step`` (not under a 16-bit gradient scaler,
    which skips such steps itself). The action comes before the optimizer step, so the weights never take a
    non-finite update and the checkpoints on disk stay the last good ones.

    Args:
        mode: ``stop`` raise :class:`NonFiniteLossError` naming the stage, epoch and step; ``skip`` drop the
            step's gradients (no update) with a warning and go on.
        max_consecutive_skips: ``skip`` mode: stop anyway after this many non-finite steps in a row (the
            weights or the data are broken, skipping cannot recover).
        check_gradients: also check the gradients (one device synchronisation per optimizer step).

    Raises:
        ValueError: an unknown ``mode`` or a negative ``max_consecutive_skips``.
    """

    def __init__(
        self, mode: str = "stop", max_consecutive_skips: int = 20, check_gradients: bool = True
    ) -> None:
        if mode not in NONFINITE_MODES:
            raise ValueError(f"callbacks.nonfinite.mode={mode!r}: choose one of {', '.join(NONFINITE_MODES)}")
        if max_consecutive_skips < 0:
            raise ValueError(
                f"callbacks.nonfinite.max_consecutive_skips={max_consecutive_skips}: must be >= 0"
            )
        self.mode = mode
        self.max_consecutive_skips = max_consecutive_skips
        self.check_gradients = check_gradients
        self.skipped = 0
        self._consecutive = 0
        self._bad_loss: float | None = None
        self._owner: dict[int, str] = {}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # which network an optimizer trains, for the message (e.g. generator, critic)
        self._owner = {id(p): name for name, child in pl_module.named_children() for p in child.parameters()}

    def on_before_backward(
        self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor
    ) -> None:
        if self._bad_loss is None and not bool(torch.isfinite(loss.detach()).all()):
            self._bad_loss = float(loss.detach().float().flatten()[0]) if loss.numel() else math.nan

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        bad_loss, self._bad_loss = self._bad_loss, None
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if bad_loss is not None:
            what = f"loss ({bad_loss})"
        elif self._check_grads(trainer) and not _all_finite([p.grad for p in params if p.grad is not None]):
            what = "gradient"
        else:
            self._consecutive = 0
            return
        network = next((self._owner[id(p)] for p in params if id(p) in self._owner), "model")
        self._handle(trainer, f"non-finite {what} of the {network}", params)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        # a non-finite loss that no optimizer step followed (e.g. gradient accumulation): act now
        if self._bad_loss is not None:
            bad_loss, self._bad_loss = self._bad_loss, None
            params = [p for opt in trainer.optimizers for group in opt.param_groups for p in group["params"]]
            self._handle(trainer, f"non-finite loss ({bad_loss})", params)

    def _check_grads(self, trainer: L.Trainer) -> bool:
        precision = getattr(trainer.strategy, "precision_plugin", None)
        return self.check_gradients and getattr(precision, "scaler", None) is None

    def _handle(self, trainer: L.Trainer, problem: str, params: list[torch.Tensor]) -> None:
        where = f"{_where(trainer)} (batch {trainer.fit_loop.epoch_loop.batch_idx})"
        last = checkpoint_dir(trainer) / "last.ckpt"
        kept = f"the last good checkpoint is {last}" if last.is_file() else "no checkpoint was written yet"
        if self.mode == "stop":
            raise NonFiniteLossError(
                f"{problem} in {where}: training stopped before the optimizer step; {kept}. Lower the learning "
                f"rate or check the data and {resume_hint(trainer)}, or set callbacks.nonfinite.mode=skip to "
                "skip such steps"
            )
        self._consecutive += 1
        if self._consecutive > self.max_consecutive_skips:
            raise NonFiniteLossError(
                f"{problem} in {where}: {self._consecutive} non-finite steps in a row "
                f"(callbacks.nonfinite.max_consecutive_skips={self.max_consecutive_skips}), training stopped; "
                f"{kept}. Lower the learning rate or check the data"
            )
        for p in params:
            p.grad = None  # torch optimizers leave parameters without a gradient unchanged
        self.skipped += 1
        log.warning("%s in %s: optimizer step skipped (%d skipped so far)", problem, where, self.skipped)

"""After an interruption and a resume, each stage's ``last.ckpt`` holds the final epoch and global step.

The best checkpoint is pinned to the first validation (``monitor=step, mode=min``), so a ``last.ckpt`` that is
only written together with a new best (Lightning 2.6) would stay at epoch 0.
"""

from __future__ import annotations

import signal
from pathlib import Path

import lightning as L
import pytest
import torch
from test_pipeline import tiny_cfg
from test_robustness import FAST, STEPS_PER_EPOCH, load_ckpt

from ldct_lightning.losses import Stage1Loss
from ldct_lightning.modules import stage2
from ldct_lightning.pipeline import run

EPOCHS = 2
N_CRITIC = 3  # conf/stage/second.yaml: a stage-2 batch is 1 + n_critic optimizer steps
PINNED_BEST = ["callbacks.model_checkpoint.monitor=step", "callbacks.model_checkpoint.mode=min"]


def _interrupt_at_call(monkeypatch, owner, name: str, n: int) -> None:
    """Raise KeyboardInterrupt (Ctrl-C) at the ``n``-th call of ``owner.name``."""
    original = getattr(owner, name)
    calls = {"n": 0}

    def wrapped(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapped)


def _run_interrupted(cfg) -> None:
    sigint = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit):  # Lightning turns Ctrl-C into sys.exit(1)
            run(cfg)
    finally:
        signal.signal(signal.SIGINT, sigint)


def _record_trained_generators(monkeypatch) -> dict[str, dict[str, torch.Tensor]]:
    """Module class name -> the generator weights it exports (the EMA when it has one) when its fit returns."""
    trained: dict[str, dict[str, torch.Tensor]] = {}
    original = L.Trainer.fit

    def fit(self, model, *args, **kwargs):
        result = original(self, model, *args, **kwargs)
        net = getattr(model, "ema_generator", None) or model.generator
        trained[type(model).__name__] = {k: v.detach().clone() for k, v in net.state_dict().items()}
        return result

    monkeypatch.setattr(L.Trainer, "fit", fit)
    return trained


def _assert_generator_equals(ckpt: dict, weights: dict[str, torch.Tensor]) -> None:
    state = {k[len("generator.") :]: v for k, v in ckpt["state_dict"].items() if k.startswith("generator.")}
    assert state.keys() == weights.keys()
    assert all(torch.equal(state[k], weights[k]) for k in weights)


def test_last_ckpt_holds_the_final_epoch_and_step_after_resume(
    tiny_dataset: Path, tmp_path: Path, monkeypatch
):
    out = tmp_path / "run"
    args = [
        "ablation=proposed",
        f"stages.first.max_epochs={EPOCHS}",
        f"stages.second.max_epochs={EPOCHS}",
        "stages.second.module.panel_every_n_epochs=0",
        # the step counts below assume a generator update in every stage-2 batch (no critic-only warm-up)
        "stages.second.module.critic_warmup_steps=0",
        *FAST,
        *PINNED_BEST,
    ]
    # stage 1: Ctrl-C in the second batch of epoch 1
    _interrupt_at_call(monkeypatch, Stage1Loss, "forward", STEPS_PER_EPOCH + 2)
    _run_interrupted(tiny_cfg(tiny_dataset, out, args))
    monkeypatch.undo()
    # resume: stage 1 to the end, then stage 2 until Ctrl-C in its second epoch
    _interrupt_at_call(monkeypatch, stage2, "gradient_penalty", N_CRITIC * (STEPS_PER_EPOCH + 1) + 1)
    trained = _record_trained_generators(monkeypatch)
    _run_interrupted(tiny_cfg(tiny_dataset, out, [*args, "ckpt_path=last"]))
    monkeypatch.undo()
    first = out / "first" / "checkpoints"
    # the weights in last.ckpt are the ones stage 1 ended its resumed fit with
    _assert_generator_equals(load_ckpt(first / "last.ckpt"), trained["Stage1Module"])
    assert (load_ckpt(first / "last.ckpt")["epoch"], load_ckpt(first / "last.ckpt")["global_step"]) == (
        EPOCHS - 1,
        EPOCHS * STEPS_PER_EPOCH,
    )
    assert [p.name for p in first.glob("best-*.ckpt")] == ["best-epoch000.ckpt"]  # the pinned best
    interrupted = load_ckpt(out / "second" / "checkpoints" / "last.ckpt")
    assert interrupted["epoch"] == 1 and interrupted["global_step"] < 2 * STEPS_PER_EPOCH * (1 + N_CRITIC)
    # resume again: stage 2 to the end
    trained = _record_trained_generators(monkeypatch)
    run(tiny_cfg(tiny_dataset, out, [*args, "ckpt_path=last"]))
    last = load_ckpt(out / "second" / "checkpoints" / "last.ckpt")
    assert (last["epoch"], last["global_step"]) == (EPOCHS - 1, EPOCHS * STEPS_PER_EPOCH * (1 + N_CRITIC))
    _assert_generator_equals(last, trained["Stage2Module"])  # the resumed stage 2's final (EMA) generator
    assert not all(  # and it trained on after the interruption
        torch.equal(last["state_dict"][k], v)
        for k, v in interrupted["state_dict"].items()
        if k.startswith("generator.")
    )
    assert [p.name for p in (out / "second" / "checkpoints").glob("best-*.ckpt")] == ["best-epoch000.ckpt"]


def test_last_ckpt_is_not_left_at_the_best_epoch(tiny_dataset: Path, tmp_path: Path) -> None:
    """Without an interruption: a best at epoch 0 must not pin last.ckpt there (Lightning 2.6 would)."""
    out = tmp_path / "run"
    run(
        tiny_cfg(
            tiny_dataset,
            out,
            ["ablation=firstStep", f"stages.first.max_epochs={EPOCHS}", *FAST, *PINNED_BEST],
        )
    )
    last = load_ckpt(out / "first" / "checkpoints" / "last.ckpt")
    assert (last["epoch"], last["global_step"]) == (EPOCHS - 1, EPOCHS * STEPS_PER_EPOCH)

"""Stage 2 (WGAN-GP, manual optimization) and the stage-1 -> stage-2 generator hand-off, on tiny networks."""

from __future__ import annotations

import copy
import functools
import math
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from ldct_lightning.models.critic import WGANCritic
from ldct_lightning.models.generator import AttentionResUNet
from ldct_lightning.modules.handoff import load_generator_weights
from ldct_lightning.modules.stage1 import Stage1Module
from ldct_lightning.modules.stage2 import Stage2Module
from ldct_lightning.runs import CheckpointError, latest_checkpoint

PATCH = 32
BATCH = 2
LR = 1e-3
adam = functools.partial(torch.optim.Adam, lr=LR, betas=(0.5, 0.999))


def tiny_generator(base: int = 8) -> nn.Module:
    return AttentionResUNet(in_channels=1, base_channels=base, depth=2)


def tiny_critic() -> nn.Module:
    return WGANCritic(patch_size=PATCH, channels=(8, 8, 16, 16, 32, 32), hidden=64)


def make_stage2(seed: int = 0, **kwargs) -> Stage2Module:
    torch.manual_seed(seed)
    args = dict(
        generator=tiny_generator(),
        critic=tiny_critic(),
        optimizer_g=adam,
        optimizer_c=adam,
        panel_every_n_epochs=0,
    )
    return Stage2Module(**(args | kwargs))


def loader(keys: tuple[str, str], n_batches: int, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    items = [{k: torch.rand(1, PATCH, PATCH, generator=g) for k in keys} for _ in range(n_batches * BATCH)]
    return DataLoader(items, batch_size=BATCH)


def trainer(**kwargs) -> L.Trainer:
    args = dict(
        accelerator="cpu",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    return L.Trainer(**(args | kwargs))


def fit(module: L.LightningModule, n_batches: int = 2, val: bool = False, **kwargs) -> L.Trainer:
    t = trainer(limit_val_batches=1.0 if val else 0, **kwargs)
    keys = ("ldct", "ndct") if isinstance(module, Stage2Module) else ("input", "target")
    val_loader = loader(("input", "target"), 1, seed=1) if val else None
    t.fit(module, train_dataloaders=loader(keys, n_batches), val_dataloaders=val_loader)
    return t


def adam_steps(optimizer: torch.optim.Optimizer) -> set[int]:
    return {int(optimizer.state[p]["step"]) for group in optimizer.param_groups for p in group["params"]}


class StepRecorder(L.Callback):
    """Records which optimizer steps, and the gradients the other network holds at that moment."""

    def __init__(self) -> None:
        self.order: list[str] = []
        self.generator_grads_at_critic_steps: list[list[torch.Tensor | None]] = []
        self.critic_grads: dict[str, list[torch.Tensor]] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        opt_g = pl_module.optimizers()[0].optimizer
        name = "generator" if optimizer is opt_g else "critic"
        self.order.append(name)
        if trainer.fit_loop.epoch_loop.batch_idx != 0:
            return
        critic_grads = [p.grad.clone() for p in pl_module.critic.parameters()]
        if name == "critic":
            self.generator_grads_at_critic_steps.append([p.grad for p in pl_module.generator.parameters()])
            self.critic_grads["last_critic_step"] = critic_grads
        else:
            self.critic_grads["generator_step"] = critic_grads


def test_training_updates_both_networks_with_n_critic_steps_per_generator_step() -> None:
    module = make_stage2(n_critic=3)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    recorder = StepRecorder()
    t = fit(module, n_batches=2, val=True, callbacks=[recorder])

    after = module.state_dict()
    for net in ("generator", "critic"):
        weights = [k for k in before if k.startswith(net + ".") and k.endswith("weight")]
        assert weights and any(not torch.equal(before[k], after[k]) for k in weights), net
    opt_g, opt_c = (o.optimizer for o in module.optimizers())
    assert adam_steps(opt_g) == {2} and adam_steps(opt_c) == {6}
    assert recorder.order == (["critic"] * 3 + ["generator"]) * 2
    assert t.global_step == 8  # manual optimization: every optimizer step counts
    for key in (
        "wasserstein",
        "gp",
        "loss_critic",
        "loss_generator",
        "grad_norm_critic",
        "grad_norm_generator",
    ):
        assert math.isfinite(float(t.callback_metrics[f"train/{key}"])), key
    assert float(t.callback_metrics["train/lr_generator"]) == pytest.approx(LR)
    assert math.isfinite(float(t.callback_metrics["val/psnr_abdomen"]))
    assert "val/input_psnr_abdomen" in t.callback_metrics


def test_critic_loss_gives_the_generator_no_gradient_and_vice_versa() -> None:
    recorder = StepRecorder()
    fit(make_stage2(n_critic=2), n_batches=1, callbacks=[recorder])
    assert len(recorder.generator_grads_at_critic_steps) == 2
    for grads in recorder.generator_grads_at_critic_steps:
        assert all(g is None for g in grads)
    # the generator's backward leaves the critic's gradients (from its last update) untouched
    for a, b in zip(
        recorder.critic_grads["last_critic_step"], recorder.critic_grads["generator_step"], strict=True
    ):
        assert torch.equal(a, b)


def test_content_term_defaults_to_l1_to_the_input() -> None:
    module = make_stage2(n_critic=1, content_weight=0.5)
    assert isinstance(module.content_loss, nn.L1Loss)
    batch = next(iter(loader(("ldct", "ndct"), 1)))
    with torch.no_grad():  # the generator does not change during the critic update: its output by hand
        fake = copy.deepcopy(module.generator).train()(batch["ldct"])
    t = fit(module, n_batches=1)
    content = float(t.callback_metrics["train/content"])
    assert content == pytest.approx(float((fake - batch["ldct"]).abs().mean()), rel=1e-5)
    assert content != pytest.approx(float((fake - batch["ndct"]).abs().mean()), rel=1e-2)  # not to the NDCT
    # weighted into the generator's loss next to the adversarial term
    adversarial = float(t.callback_metrics["train/loss_adversarial"])
    assert float(t.callback_metrics["train/loss_generator"]) == pytest.approx(adversarial + 0.5 * content)
    assert make_stage2().content_loss is None


def test_learning_rates_decay_by_0_6_every_step_size_epochs() -> None:
    step_lr = functools.partial(torch.optim.lr_scheduler.StepLR, step_size=2, gamma=0.6)
    module = make_stage2(n_critic=1, scheduler_g=step_lr, scheduler_c=step_lr)

    class LRRecorder(L.Callback):
        def __init__(self) -> None:
            self.lrs: list[tuple[float, ...]] = []

        def on_train_epoch_start(self, trainer, pl_module) -> None:
            self.lrs.append(tuple(o.param_groups[0]["lr"] for o in pl_module.optimizers()))

    recorder = LRRecorder()
    fit(module, n_batches=1, max_epochs=5, callbacks=[recorder])
    expected = [LR, LR, 0.6 * LR, 0.6 * LR, 0.36 * LR]
    assert [g for g, _ in recorder.lrs] == pytest.approx(expected)
    assert [c for _, c in recorder.lrs] == pytest.approx(expected)


class L1WithTerms(nn.Module):
    def forward(
        self, pred: torch.Tensor, target: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss = F.l1_loss(pred, target)
        return loss, {"l1": loss}


@pytest.fixture(scope="module")
def stage1_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A real Lightning checkpoint of a (one step) trained Stage1Module, and its generator weights."""
    torch.manual_seed(1)
    module = Stage1Module(tiny_generator(), L1WithTerms(), adam, panel_every_n_epochs=0)
    t = fit(module, n_batches=1)
    path = tmp_path_factory.mktemp("runs") / "2024-01-01_00-00-00" / "first" / "checkpoints" / "last.ckpt"
    t.save_checkpoint(path)
    return path, {k: v.clone() for k, v in module.generator.state_dict().items()}


def test_handoff_loads_the_stage1_generator_exactly(stage1_checkpoint) -> None:
    path, weights = stage1_checkpoint
    torch.manual_seed(2)
    generator = tiny_generator()
    assert any(not torch.equal(v, weights[k]) for k, v in generator.state_dict().items())
    load_generator_weights(generator, path)
    assert generator.state_dict().keys() == weights.keys()
    for k, v in generator.state_dict().items():
        assert torch.equal(v, weights[k]), k

    module = make_stage2(seed=3, generator_init=str(path))
    for k, v in module.generator.state_dict().items():
        assert torch.equal(v, weights[k]), k
    assert latest_checkpoint(path.parents[3], stage="first") == path


def test_handoff_errors_are_clear(stage1_checkpoint, tmp_path: Path) -> None:
    path, _ = stage1_checkpoint
    with pytest.raises(
        CheckpointError, match=r"shape mismatch for generator\.\S+: checkpoint \(8, .*\), generator \(16, "
    ):
        load_generator_weights(tiny_generator(base=16), path)
    with pytest.raises(CheckpointError, match=r"no state_dict key starts with 'critic\.'"):
        load_generator_weights(tiny_generator(), path, prefix="critic.")
    with pytest.raises(CheckpointError, match="missing.ckpt: no such checkpoint file"):
        load_generator_weights(tiny_generator(), tmp_path / "missing.ckpt")
    with pytest.raises(CheckpointError, match="no last checkpoint under"):
        latest_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="no such directory"):
        latest_checkpoint(tmp_path / "nowhere")


def test_stage2_checkpoint_reloads_without_the_stage1_file(stage1_checkpoint, tmp_path: Path) -> None:
    path, stage1_weights = stage1_checkpoint
    first = tmp_path / "first.ckpt"
    first.write_bytes(path.read_bytes())
    module = make_stage2(n_critic=1, generator_init=str(first))
    t = fit(module, n_batches=1)
    second = tmp_path / "second.ckpt"
    t.save_checkpoint(second)
    first.unlink()

    nets = dict(generator=tiny_generator(), critic=tiny_critic(), optimizer_g=adam, optimizer_c=adam)
    reloaded = Stage2Module.load_from_checkpoint(second, weights_only=True, **nets)
    for k, v in module.state_dict().items():
        assert torch.equal(v, reloaded.state_dict()[k]), k
    generator = tiny_generator()
    load_generator_weights(generator, second)
    trained = module.generator.state_dict()
    assert generator.state_dict().keys() == trained.keys()
    for k, v in generator.state_dict().items():
        assert torch.equal(v, trained[k]), k
    # the stage-2 file holds the weights after stage-2 training, not stage 1's it started from
    assert any(not torch.equal(v, stage1_weights[k]) for k, v in trained.items() if k.endswith("weight"))


def test_bf16_mixed_precision_matches_float32() -> None:
    init = make_stage2(n_critic=1).state_dict()
    runs = {}
    for precision in ("32-true", "bf16-mixed"):
        module = make_stage2(n_critic=1)
        t = fit(module, n_batches=1, precision=precision)
        metrics = {
            k: float(t.callback_metrics[f"train/{k}"]) for k in ("wasserstein", "gp", "loss_generator")
        }
        runs[precision] = metrics, module.state_dict()
    (ref, ref_state), (bf16, bf16_state) = runs["32-true"], runs["bf16-mixed"]
    assert all(math.isfinite(v) for v in bf16.values())
    # the penalty runs in float32 with autocast off; the critic's scores carry bf16's ~3 significant digits
    assert bf16["gp"] == pytest.approx(ref["gp"], rel=1e-4)
    assert bf16["loss_generator"] == pytest.approx(ref["loss_generator"], rel=0.05)
    assert bf16["wasserstein"] == pytest.approx(ref["wasserstein"], abs=0.02 * abs(ref["loss_generator"]))
    # both networks took the float32 run's step: Adam's first update is +-lr, its sign the gradient's
    for net in ("generator.", "critic."):
        keys = [k for k in init if k.startswith(net) and k.endswith("weight")]
        step_ref = torch.cat([(ref_state[k] - init[k]).flatten() for k in keys])
        step_bf16 = torch.cat([(bf16_state[k] - init[k]).flatten() for k in keys])
        moved = step_ref != 0
        agree = (torch.sign(step_bf16) == torch.sign(step_ref))[moved].float().mean()
        assert moved.float().mean() > 0.9 and agree > 0.8, (net, float(agree))


@pytest.mark.parametrize("freeze", [False, True])
def test_freeze_generator_norm_keeps_the_batch_norm_statistics(freeze: bool) -> None:
    module = make_stage2(freeze_generator_norm=freeze)
    norms = [m for m in module.generator.modules() if isinstance(m, nn.BatchNorm2d)]
    before = [(m.running_mean.clone(), m.running_var.clone()) for m in norms]
    weights = {k: v.clone() for k, v in module.generator.state_dict().items() if k.endswith("conv.weight")}
    fit(module, n_batches=2)
    same = [
        torch.equal(m.running_mean, mean) and torch.equal(m.running_var, var)
        for m, (mean, var) in zip(norms, before, strict=True)
    ]
    assert all(same) if freeze else not any(same)
    # the weights train either way
    after = module.generator.state_dict()
    assert weights and any(not torch.equal(after[k], v) for k, v in weights.items())

"""Stage 2 beyond eq. 9: critic warm-up, EMA of the generator (and its export), fidelity terms."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from scipy import ndimage
from torch import nn

from ldct_lightning.losses import Stage2Fidelity, gaussian_lowpass, lowpass_l1
from ldct_lightning.modules.ema import ema_update
from ldct_lightning.modules.handoff import load_generator_weights
from ldct_lightning.modules.stage2 import Stage2Module
from tests.test_stage2 import adam, fit, make_stage2, tiny_critic, tiny_generator


def clone_state(net: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in net.state_dict().items()}


def same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class BatchRecorder(L.Callback):
    """The generator's and critic's states and the optimizer steps at the end of every training batch."""

    def __init__(self) -> None:
        self.generator: list[dict[str, torch.Tensor]] = []
        self.critic: list[dict[str, torch.Tensor]] = []
        self.order: list[str] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        opt_g = pl_module.optimizers()[0].optimizer
        self.order.append("generator" if optimizer is opt_g else "critic")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.generator.append(clone_state(pl_module.generator))
        self.critic.append(clone_state(pl_module.critic))


def test_critic_warmup_updates_only_the_critic_then_training_goes_on() -> None:
    module = make_stage2(n_critic=2, critic_warmup_steps=4)  # 2 warm-up batches of 2 critic updates
    generator0, critic0 = clone_state(module.generator), clone_state(module.critic)
    recorder = BatchRecorder()
    fit(module, n_batches=3, callbacks=[recorder])
    assert recorder.order == ["critic"] * 6 + ["generator"]
    # warm-up: the generator (weights and batch-norm statistics) is untouched, the critic changes
    for batch in (0, 1):
        assert same_state(recorder.generator[batch], generator0), batch
    assert not same_state(recorder.critic[0], critic0)
    assert not same_state(recorder.critic[1], recorder.critic[0])
    # after it, the generator trains
    assert not same_state(recorder.generator[2], generator0)
    assert int(module.critic_updates) == 6
    opt_g = module.optimizers()[0].optimizer
    assert all(int(opt_g.state[p]["step"]) == 1 for p in module.generator.parameters())


def test_ema_update_against_a_hand_computation() -> None:
    ema, model = nn.BatchNorm1d(2), nn.BatchNorm1d(2)
    with torch.no_grad():
        ema.weight.copy_(torch.tensor([1.0, 2.0]))
        model.weight.copy_(torch.tensor([3.0, -2.0]))
        model.running_mean.copy_(torch.tensor([5.0, 6.0]))
    ema_update(ema, model, decay=0.9)
    # 0.9 * 1 + 0.1 * 3 = 1.2; 0.9 * 2 + 0.1 * (-2) = 1.6; buffers copied, not averaged
    assert ema.weight.tolist() == pytest.approx([1.2, 1.6])
    assert ema.running_mean.tolist() == [5.0, 6.0]
    ema_update(ema, model, decay=0.5)
    assert ema.weight.tolist() == pytest.approx([2.1, -0.2])
    with pytest.raises(ValueError, match="decay must lie in"):
        ema_update(ema, model, decay=1.0)


def test_module_ema_follows_the_generator_by_hand_computation_and_is_exported(tmp_path: Path) -> None:
    decay = 0.75
    module = make_stage2(n_critic=1, ema_decay=decay, freeze_generator_norm=True)
    initial = {k: v.clone() for k, v in module.generator.named_parameters()}
    recorder = BatchRecorder()
    t = fit(module, n_batches=2, callbacks=[recorder])
    # two generator steps: ema = d (d w0 + (1-d) w1) + (1-d) w2
    w1, w2 = recorder.generator
    for name, p_ema in module.ema_generator.named_parameters():
        expected = decay * (decay * initial[name] + (1 - decay) * w1[name]) + (1 - decay) * w2[name]
        torch.testing.assert_close(p_ema, expected, rtol=1e-5, atol=1e-7)
    assert any(not torch.equal(p, w2[n]) for n, p in module.ema_generator.named_parameters())

    # validation and denoising use the EMA; the checkpoint's generator.* is the EMA, online_generator.* the rest
    x = torch.rand(1, 1, 32, 32)
    module.eval()
    torch.testing.assert_close(module(x), module.ema_generator(x))
    path = tmp_path / "second.ckpt"
    t.save_checkpoint(path)
    exported = tiny_generator()
    load_generator_weights(exported, path)
    assert same_state(exported.state_dict(), module.ema_generator.state_dict())
    online = tiny_generator()
    load_generator_weights(online, path, prefix="online_generator.")
    assert same_state(online.state_dict(), module.generator.state_dict())
    # and a reload (resume) restores both networks where they were
    nets = dict(generator=tiny_generator(), critic=tiny_critic(), optimizer_g=adam, optimizer_c=adam)
    reloaded = Stage2Module.load_from_checkpoint(path, weights_only=True, **nets)
    assert same_state(reloaded.generator.state_dict(), module.generator.state_dict())
    assert same_state(reloaded.ema_generator.state_dict(), module.ema_generator.state_dict())


@pytest.mark.parametrize("sigma", [1.0, 2.5])
def test_gaussian_lowpass_matches_scipy(sigma: float) -> None:
    rng = np.random.default_rng(0)
    image = rng.random((20, 24))
    ours = gaussian_lowpass(torch.from_numpy(image)[None, None].float(), sigma)[0, 0].numpy()
    # torch's "reflect" padding leaves out the edge pixel: scipy's "mirror"; same kernel radius ceil(3 sigma)
    reference = ndimage.gaussian_filter(image, sigma, mode="mirror", truncate=math.ceil(3 * sigma) / sigma)
    np.testing.assert_allclose(ours, reference, atol=1e-5)


def test_stage2_fidelity_terms_by_hand() -> None:
    torch.manual_seed(0)
    pred, ldct, anchor = (torch.rand(2, 1, 16, 16) for _ in range(3))
    fidelity = Stage2Fidelity(anchor_l1_weight=2.0, lowpass_weight=3.0, lowpass_sigma=1.5)
    total, terms = fidelity(pred, ldct, anchor)
    l1_anchor = (pred - anchor).abs().mean()
    lowpass = lowpass_l1(pred, ldct, 1.5)
    assert set(terms) == {"anchor_l1", "lowpass_l1"}
    torch.testing.assert_close(terms["anchor_l1"], l1_anchor)
    torch.testing.assert_close(total, 2.0 * l1_anchor + 3.0 * lowpass)
    # a constant offset passes the low-pass unchanged: the low-frequency term sees HU shifts
    shifted = lowpass_l1(ldct + 0.01, ldct, 1.5)
    assert float(shifted) == pytest.approx(0.01, abs=1e-6)
    # without an anchor (stage 2 from random initialisation) only the low-pass term is left
    total, terms = fidelity(pred, ldct, None)
    assert set(terms) == {"lowpass_l1"}
    with pytest.raises(ValueError, match="weights must be >= 0"):
        Stage2Fidelity(lowpass_weight=-1.0)


def test_anchor_is_the_frozen_initial_generator_and_never_saved(tmp_path: Path) -> None:
    torch.manual_seed(1)
    first = tmp_path / "first.ckpt"
    generator = tiny_generator()
    torch.save({"state_dict": {f"generator.{k}": v for k, v in generator.state_dict().items()}}, first)
    fidelity = Stage2Fidelity(anchor_l1_weight=1.0)
    module = make_stage2(n_critic=1, generator_init=str(first), fidelity=fidelity)
    t = fit(module, n_batches=2)
    assert same_state(module.anchor.state_dict(), generator.state_dict())
    assert not same_state(module.generator.state_dict(), generator.state_dict())
    assert math.isfinite(float(t.callback_metrics["train/anchor_l1"]))
    path = tmp_path / "second.ckpt"
    t.save_checkpoint(path)
    saved = torch.load(path, weights_only=True)["state_dict"]
    assert not [k for k in saved if k.startswith("anchor.")]
    # a random initialisation has no anchor: the anchor terms are off
    assert make_stage2(fidelity=fidelity).anchor is None


class FirstBatch(L.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == 0:
            self.batch = {k: v.clone() for k, v in batch.items()}


def test_critic_real_stage1_ndct_shows_the_critic_the_stage1_output_on_the_ndct(tmp_path: Path) -> None:
    torch.manual_seed(2)
    first = tmp_path / "first.ckpt"
    generator = tiny_generator()
    torch.save({"state_dict": {f"generator.{k}": v for k, v in generator.state_dict().items()}}, first)
    module = make_stage2(n_critic=1, generator_init=str(first), critic_real="stage1_ndct")
    seen: list[torch.Tensor] = []
    module.critic.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().clone()))
    recorder = FirstBatch()
    fit(module, n_batches=1, callbacks=[recorder])
    generator.eval()
    with torch.no_grad():
        expected_real = generator(recorder.batch["ndct"])
    # the first critic call scores the real crops: the frozen stage-1 network's output on the NDCT crops
    torch.testing.assert_close(seen[0], expected_real)
    assert not torch.allclose(seen[0], recorder.batch["ndct"])
    # eq. 9 scores the NDCT itself; a random start has no stage-1 network and falls back to it
    assert make_stage2(critic_real="stage1_ndct").critic_real == "ndct"
    with pytest.raises(ValueError, match="critic_real='clean'"):
        make_stage2(critic_real="clean")

"""Baselines: RED-CNN, Pix2Pix and CycleGAN networks (parameter counts against the published architectures),
their training modules on tiny networks, the image pool, and BM3D (when the optional extra is installed)."""

from __future__ import annotations

import functools
import math
import sys

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from ldct_lightning.baselines.bm3d import MISSING_MESSAGE, bm3d_available, bm3d_denoise
from ldct_lightning.baselines.losses import TermLoss
from ldct_lightning.baselines.noise_level import resolve_sigmas, slice_noise_sd_hu
from ldct_lightning.models.cyclegan import ResNetGenerator
from ldct_lightning.models.pix2pix import PatchGANDiscriminator, UNetGenerator
from ldct_lightning.models.redcnn import REDCNN
from ldct_lightning.modules.cyclegan import CycleGANModule, ImagePool
from ldct_lightning.modules.pix2pix import Pix2PixModule
from ldct_lightning.modules.stage1 import Stage1Module

PATCH = 32
BATCH = 2
adam = functools.partial(torch.optim.Adam, lr=2e-4, betas=(0.5, 0.999))


def n_params(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def conv(c_in: int, c_out: int, k: int, bias: bool = True) -> int:
    return c_in * c_out * k * k + (c_out if bias else 0)


# ---- parameter counts, by hand from the papers' layer tables ----


def test_redcnn_parameter_count_matches_chen_2017() -> None:
    # conv1 1->96, conv2-5 and deconv1-4 96->96, deconv5 96->1, all 5x5 with bias: the published ~1.85 M
    expected = conv(1, 96, 5) + 8 * conv(96, 96, 5) + conv(96, 1, 5)
    assert expected == 1_848_865
    assert n_params(REDCNN()) == expected


def unet_params(c_in: int, c_out: int, ngf: int = 64, depth: int = 8) -> int:
    # batch norm (2 parameters per channel); convs followed by a norm have no bias; 4x4 kernels
    widths = [min(ngf * 2**i, 8 * ngf) for i in range(depth)]
    total = conv(c_in, ngf, 4, bias=False) + conv(2 * ngf, c_out, 4)  # outermost down / up
    for i in range(1, depth):
        outer, inner = widths[i - 1], widths[i]
        innermost = i == depth - 1
        down = conv(outer, inner, 4, bias=False) + (0 if innermost else 2 * inner)
        up = conv(inner if innermost else 2 * inner, outer, 4, bias=False) + 2 * outer
        total += down + up
    return total


def test_unet_generator_parameter_count_matches_pix2pix_unet_256() -> None:
    # the reference's unet_256 (3 channels) prints "54.414 M"
    assert unet_params(3, 3) == 54_413_955
    assert n_params(UNetGenerator(3, 3)) == unet_params(3, 3)
    assert n_params(UNetGenerator()) == unet_params(1, 1) == 54_407_809
    assert n_params(UNetGenerator(depth=6, base_channels=8)) == unet_params(1, 1, ngf=8, depth=6)


def patchgan_params(c_in: int, norm: str, ndf: int = 64) -> int:
    # C64 (bias, no norm) - C128 - C256 - C512 (stride 1) - 1 channel; batch norm: no conv bias, 2 per channel;
    # instance norm (no affine): conv bias, nothing for the norm
    batch = norm == "batch"
    total = conv(c_in, ndf, 4) + conv(8 * ndf, 1, 4)
    for a, b in ((ndf, 2 * ndf), (2 * ndf, 4 * ndf), (4 * ndf, 8 * ndf)):
        total += conv(a, b, 4, bias=not batch) + (2 * b if batch else 0)
    return total


def test_patchgan_parameter_count_and_receptive_field() -> None:
    # reference printouts: Pix2Pix D (6 channels, batch norm) "2.769 M", CycleGAN D (3, instance) "2.765 M"
    assert patchgan_params(6, "batch") == 2_768_705
    assert patchgan_params(3, "instance") == 2_764_737
    assert n_params(PatchGANDiscriminator(6)) == patchgan_params(6, "batch")
    assert n_params(PatchGANDiscriminator(3, norm="instance")) == patchgan_params(3, "instance")
    assert n_params(PatchGANDiscriminator(2)) == patchgan_params(2, "batch")  # our conditional Pix2Pix D
    assert n_params(PatchGANDiscriminator(1, norm="instance")) == patchgan_params(1, "instance")
    # 70x70: (((((1-1)+4-1)*1+4-1)*2+4-1)*2+4-1)*2+4 working back from one logit
    assert PatchGANDiscriminator().receptive_field == 70
    d = PatchGANDiscriminator(base_channels=8)
    assert d(torch.rand(BATCH, 1, PATCH, PATCH)).shape == (BATCH, 1, 2, 2)  # 32 -> 16 -> 8 -> 4 -> 3 -> 2
    with pytest.raises(ValueError, match="PatchGANDiscriminator"):
        d(torch.rand(1, 1, 16, 16))


def resnet_params(c_in: int, c_out: int, ngf: int = 64, n_blocks: int = 9) -> int:
    # instance norm without affine parameters, every conv with bias
    return (
        conv(c_in, ngf, 7)
        + conv(ngf, 2 * ngf, 3)
        + conv(2 * ngf, 4 * ngf, 3)
        + n_blocks * 2 * conv(4 * ngf, 4 * ngf, 3)
        + conv(4 * ngf, 2 * ngf, 3)
        + conv(2 * ngf, ngf, 3)
        + conv(ngf, c_out, 7)
    )


def test_resnet_generator_parameter_count_matches_cyclegan_resnet_9blocks() -> None:
    # the reference's resnet_9blocks (3 channels) prints "11.378 M"
    assert resnet_params(3, 3) == 11_378_179
    assert n_params(ResNetGenerator(3, 3)) == resnet_params(3, 3)
    assert n_params(ResNetGenerator()) == resnet_params(1, 1) == 11_365_633


# ---- shapes ----


def test_redcnn_keeps_size_and_adds_the_input_before_the_last_relu() -> None:
    net = REDCNN(channels=8)
    x = torch.rand(BATCH, 1, 25, 31) - 0.2
    assert net(x).shape == x.shape
    for p in net.parameters():
        nn.init.zeros_(p)
    torch.testing.assert_close(net(x), F.relu(x))  # only the input shortcut is left
    with pytest.raises(ValueError, match="H, W >= 21"):
        REDCNN()(torch.rand(1, 1, 20, 40))


def test_generators_keep_size_and_range_for_any_slice_size() -> None:
    x = torch.rand(BATCH, 1, 40, 36)  # not a multiple of 2**depth: padded and cropped back
    for net in (UNetGenerator(depth=3, base_channels=8), ResNetGenerator(base_channels=8, n_blocks=1)):
        with torch.no_grad():
            y = net(x)
        assert y.shape == x.shape
        assert 0 <= float(y.min()) and float(y.max()) <= 1
    with pytest.raises(ValueError, match="model.generator.depth"):
        UNetGenerator(depth=6, base_channels=8)(torch.rand(1, 1, 32, 32))


# ---- training modules ----


def loader(keys: tuple[str, str], n_batches: int, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    items = [{k: torch.rand(1, PATCH, PATCH, generator=g) for k in keys} for _ in range(n_batches * BATCH)]
    return DataLoader(items, batch_size=BATCH)


def fit(
    module: L.LightningModule, keys: tuple[str, str] = ("ldct", "ndct"), val: bool = False, **kwargs
) -> L.Trainer:
    args = dict(
        accelerator="cpu",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=1.0 if val else 0,
    )
    trainer = L.Trainer(**(args | kwargs))
    val_loader = loader(("input", "target"), 1, seed=1) if val else None
    trainer.fit(module, train_dataloaders=loader(keys, 2), val_dataloaders=val_loader)
    return trainer


def changed(before: dict[str, torch.Tensor], module: nn.Module, prefix: str) -> bool:
    after = module.state_dict()
    keys = [k for k in before if k.startswith(prefix + ".") and k.endswith("weight")]
    assert keys, prefix
    return all(not torch.equal(before[k], after[k]) for k in keys)


def adam_steps(optimizer: torch.optim.Optimizer) -> set[int]:
    return {int(optimizer.state[p]["step"]) for group in optimizer.param_groups for p in group["params"]}


def test_pix2pix_trains_generator_and_discriminator() -> None:
    torch.manual_seed(0)
    module = Pix2PixModule(
        UNetGenerator(depth=3, base_channels=8),
        PatchGANDiscriminator(in_channels=2, base_channels=8),
        optimizer_g=adam,
        optimizer_d=adam,
        scheduler_g=functools.partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5),
        panel_every_n_epochs=0,
    )
    before = {k: v.clone() for k, v in module.state_dict().items()}
    trainer = fit(module, val=True)
    assert changed(before, module, "generator") and changed(before, module, "discriminator")
    opt_g, opt_d = (o.optimizer for o in module.optimizers())
    assert adam_steps(opt_g) == adam_steps(opt_d) == {2}
    assert trainer.global_step == 4  # manual optimization: both optimizer steps count
    for key in ("loss_generator", "loss_discriminator", "loss_adversarial", "l1", "d_real", "d_fake"):
        assert math.isfinite(float(trainer.callback_metrics[f"train/{key}"])), key
    assert opt_g.param_groups[0]["lr"] == pytest.approx(1e-4)  # stepped once at the end of the epoch
    assert opt_d.param_groups[0]["lr"] == pytest.approx(2e-4)
    assert math.isfinite(float(trainer.callback_metrics["val/psnr_abdomen"]))  # from DenoisingModule
    assert "lambda_l1" in module.hparams and "generator" not in module.hparams


def test_pix2pix_rejects_an_unconditional_discriminator() -> None:
    with pytest.raises(ValueError, match="in_channels=2"):
        Pix2PixModule(UNetGenerator(depth=2, base_channels=4), PatchGANDiscriminator(1, 4), adam, adam)


def test_cyclegan_trains_all_four_networks() -> None:
    torch.manual_seed(0)

    def gen() -> nn.Module:
        return ResNetGenerator(base_channels=8, n_blocks=1)

    def disc() -> nn.Module:
        return PatchGANDiscriminator(base_channels=8, norm="instance")

    module = CycleGANModule(gen(), gen(), disc(), disc(), adam, adam, pool_size=3, panel_every_n_epochs=0)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    trainer = fit(module, keys=("input", "target"))  # input/target batches are accepted too
    for net in ("generator", "generator_b", "discriminator_ndct", "discriminator_ldct"):
        assert changed(before, module, net), net
    opt_g, opt_d = (o.optimizer for o in module.optimizers())
    assert adam_steps(opt_g) == adam_steps(opt_d) == {2}
    assert len(opt_g.param_groups[0]["params"]) == 2 * len(list(module.generator.parameters()))
    assert len(module.pool_ndct) == len(module.pool_ldct) == 3
    for key in (
        "loss_generator",
        "loss_discriminator",
        "cycle_ldct",
        "cycle_ndct",
        "identity_ndct",
        "adv_ndct",
    ):
        assert math.isfinite(float(trainer.callback_metrics[f"train/{key}"])), key


def test_image_pool_fills_then_swaps_half_the_time() -> None:
    pool = ImagePool(pool_size=4, generator=torch.Generator().manual_seed(0))
    first = torch.arange(4.0).view(4, 1, 1, 1)
    torch.testing.assert_close(pool.query(first[:3]), first[:3])  # filling: returned as given
    torch.testing.assert_close(pool.query(first[3:]), first[3:])
    assert len(pool) == 4

    from_pool = 0
    n = 400
    for i in range(n):
        image = torch.full((1, 1, 1, 1), 100.0 + i)
        before = {float(t) for t in pool.images}
        out = float(pool.query(image))
        if out == 100.0 + i:
            assert {float(t) for t in pool.images} == before  # kept out of the pool
        else:
            from_pool += 1
            assert out in before and 100.0 + i in {float(t) for t in pool.images}  # swapped in
        assert len(pool) == 4
    assert 0.4 < from_pool / n < 0.6

    empty = ImagePool(pool_size=0)
    x = torch.rand(2, 1, 3, 3, requires_grad=True)
    out = empty.query(x)
    torch.testing.assert_close(out, x.detach())
    assert not out.requires_grad and len(empty) == 0


def test_term_loss_wraps_a_plain_loss() -> None:
    pred, target = torch.rand(2, 1, 4, 4), torch.rand(2, 1, 4, 4)
    total, terms = TermLoss()(pred, target)
    torch.testing.assert_close(total, F.mse_loss(pred, target))
    assert set(terms) == {"mse"} and torch.equal(terms["mse"], total)
    assert set(TermLoss(nn.L1Loss(), "l1")(pred, target)[1]) == {"l1"}


def noisy_flats(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    clean = (0.3 + 0.1 * torch.rand(n, 1, 1, 1, generator=g)).expand(n, 1, 24, 24)
    return clean + 0.05 * torch.randn(clean.shape, generator=g), clean


def test_redcnn_with_stage1_module_and_mse_learns_to_denoise() -> None:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    noisy, clean = noisy_flats(8, g)
    held_out_noisy, held_out_clean = noisy_flats(8, g)  # new levels and noise
    items = [{"input": a, "target": b} for a, b in zip(noisy, clean, strict=True)]
    module = Stage1Module(
        REDCNN(channels=16),
        TermLoss(),
        optimizer=functools.partial(torch.optim.Adam, lr=1e-3),
        panel_every_n_epochs=0,
    )

    def held_out_mse() -> float:
        with torch.no_grad():
            return float(F.mse_loss(module(held_out_noisy), held_out_clean))

    start = held_out_mse()
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=200,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(module, train_dataloaders=DataLoader(items, batch_size=4, shuffle=True))
    assert "train/mse" in trainer.callback_metrics
    end = held_out_mse()
    assert end < start
    assert end < 0.9 * float(F.mse_loss(held_out_noisy, held_out_clean))  # better than the noisy input


# ---- BM3D ----


def flat_phantom(n_slices: int, size: int, sd_hu: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    clean = np.full((n_slices, size, size), 40.0)
    return clean, clean + rng.normal(0, sd_hu, clean.shape)


def test_missing_bm3d_gives_the_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "bm3d", None)  # makes `import bm3d` fail
    with pytest.raises(ImportError, match=r"pip install -e \.\[bm3d\] \(non-commercial licence\)") as err:
        bm3d_denoise(np.zeros((1, 8, 8)), sigma_hu=10.0)
    assert str(err.value) == MISSING_MESSAGE


def test_noise_estimate_matches_skimage_on_white_noise() -> None:
    from skimage.restoration import estimate_sigma

    _, noisy = flat_phantom(2, 96, 25.0)
    ours = slice_noise_sd_hu(noisy)
    reference = np.array([estimate_sigma(s) for s in noisy])
    np.testing.assert_allclose(ours, 25.0, rtol=0.05)
    np.testing.assert_allclose(ours, reference, rtol=0.05)
    # air only: no soft tissue, no estimate; the per-slice sigma falls back to skimage's, with a warning
    air = np.full((2, 32, 32), -1000.0) + np.random.default_rng(1).normal(0, 20.0, (2, 32, 32))
    assert np.isnan(slice_noise_sd_hu(air)).all()
    with pytest.warns(UserWarning, match="estimate_sigma"):
        fallback = resolve_sigmas(air, "auto")
    np.testing.assert_allclose(fallback, [estimate_sigma(s) for s in air])


def test_bm3d_reduces_noise_on_a_flat_phantom() -> None:
    pytest.importorskip("bm3d")
    assert bm3d_available()
    clean, noisy = flat_phantom(2, 32, 30.0)
    out = bm3d_denoise(noisy, sigma_hu=30.0, workers=1, progress=False)
    assert out.shape == noisy.shape and out.dtype == np.float32
    assert np.std(out - clean) < 0.3 * np.std(noisy - clean)
    assert abs(float(out.mean()) - 40.0) < 3.0
    auto = bm3d_denoise(noisy[0], sigma_hu="auto", workers=1, progress=False)  # a single (H, W) slice
    assert auto.shape == noisy.shape[1:]
    assert np.std(auto - clean[0]) < 0.3 * np.std(noisy[0] - clean[0])


def test_bm3d_in_worker_processes_matches_in_process() -> None:
    pytest.importorskip("bm3d")
    _, noisy = flat_phantom(2, 32, 30.0)
    serial = bm3d_denoise(noisy, sigma_hu=30.0, workers=1, progress=False)
    parallel = bm3d_denoise(noisy, sigma_hu=30.0, workers=2, progress=False)
    # the package is not bit-reproducible from call to call (differences of ~0.03 HU even in one process)
    np.testing.assert_allclose(parallel, serial, atol=0.2)


def test_nlm_is_skimage_non_local_means_in_the_unit_domain() -> None:
    """nlm_denoise = skimage's denoise_nl_means on HU scaled to [0, 1], h = 0.8 sigma, sigma per slice."""
    from skimage.restoration import denoise_nl_means

    from ldct_lightning.baselines.nlm import nlm_denoise
    from ldct_lightning.data.normalize import HU_MAX, HU_MIN

    clean, noisy = flat_phantom(2, 48, 30.0)
    out = nlm_denoise(noisy, sigma_hu="auto", progress=False)
    assert out.shape == noisy.shape and out.dtype == np.float32
    assert np.std(out - clean) < 0.4 * np.std(noisy - clean)
    width = HU_MAX - HU_MIN
    for i in range(2):
        sigma = float(slice_noise_sd_hu(noisy[i])[0]) / width
        unit = np.clip((noisy[i].astype(np.float64) - HU_MIN) / width, 0, 1)
        expected = denoise_nl_means(
            unit, h=0.8 * sigma, sigma=sigma, patch_size=5, patch_distance=6, fast_mode=True
        )
        np.testing.assert_allclose(out[i], expected * width + HU_MIN, atol=0.05)
    with pytest.raises(ValueError, match="sigma_hu"):
        nlm_denoise(noisy, sigma_hu="guess", progress=False)

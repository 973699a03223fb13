"""Losses: L1, 1 - SSIM against skimage, perceptual, the stage-1 total and the WGAN gradient penalty."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter
from skimage.metrics import structural_similarity
from torch import nn

from ldct_lightning.losses import (
    IMAGENET_STD,
    Stage1Loss,
    gradient_penalty,
    gray_to_vgg_input,
    l1_loss,
    perceptual_loss,
    ssim,
    ssim_loss,
)
from ldct_lightning.models.critic import WGANCritic


def _smooth_pair(seed: int, shape: tuple[int, int] = (40, 48)) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    clean = gaussian_filter(rng.random(shape), 3.0)
    clean = (clean - clean.min()) / (clean.max() - clean.min())
    noisy = np.clip(clean + 0.08 * rng.standard_normal(shape), 0.0, 1.0)
    return clean, noisy


def _skimage_ssim(a: np.ndarray, b: np.ndarray) -> float:
    return structural_similarity(
        a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0
    )


def test_l1_loss_is_the_mean_absolute_error() -> None:
    a, b = torch.rand(2, 1, 5, 6), torch.rand(2, 1, 5, 6)
    assert float(l1_loss(a, b)) == pytest.approx(float(np.abs(a.numpy() - b.numpy()).mean()), rel=1e-6)


def test_ssim_loss_of_identical_images_is_zero() -> None:
    x = torch.rand(2, 1, 32, 32)
    assert float(ssim_loss(x, x)) == pytest.approx(0.0, abs=1e-6)


def test_ssim_matches_skimage() -> None:
    pairs = [_smooth_pair(seed) for seed in range(3)]
    pred = torch.tensor(np.stack([p[1] for p in pairs])[:, None], dtype=torch.float32)
    target = torch.tensor(np.stack([p[0] for p in pairs])[:, None], dtype=torch.float32)
    expected = [_skimage_ssim(clean, noisy) for clean, noisy in pairs]
    for i, value in enumerate(expected):
        assert float(ssim(pred[i : i + 1], target[i : i + 1])) == pytest.approx(value, abs=1e-4)
    # batch: mean over images of the same size
    assert float(ssim_loss(pred, target)) == pytest.approx(1.0 - np.mean(expected), abs=1e-4)
    assert 0.2 < np.mean(expected) < 0.95  # a meaningful, non-trivial comparison


def test_ssim_is_computed_in_float32_under_autocast() -> None:
    clean, noisy = _smooth_pair(7)
    a = torch.tensor(noisy, dtype=torch.float32)[None, None]
    b = torch.tensor(clean, dtype=torch.float32)[None, None]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = ssim(a, b)
    assert value.dtype == torch.float32
    assert float(value) == pytest.approx(_skimage_ssim(clean, noisy), abs=1e-4)


def test_ssim_rejects_images_smaller_than_the_window() -> None:
    with pytest.raises(ValueError, match="smaller than the 11px window"):
        ssim(torch.rand(1, 1, 8, 32), torch.rand(1, 1, 8, 32))


def test_gray_to_vgg_input_uses_imagenet_statistics() -> None:
    x = torch.full((1, 1, 2, 2), 0.5)
    out = gray_to_vgg_input(x)
    assert out.shape == (1, 3, 2, 2)
    expected = [(0.5 - 0.485) / 0.229, (0.5 - 0.456) / 0.224, (0.5 - 0.406) / 0.225]
    torch.testing.assert_close(out[0, :, 0, 0], torch.tensor(expected))


def test_perceptual_loss_is_the_feature_mse() -> None:
    a, b = torch.rand(2, 1, 6, 6), torch.rand(2, 1, 6, 6)
    # identity "features": the loss is the MSE of the normalised 3-channel images, by hand:
    # mean over channels c of mean((a - b)^2) / std_c^2
    expected = float(((a - b) ** 2).mean()) * float(np.mean([1 / s**2 for s in IMAGENET_STD]))
    assert float(perceptual_loss(a, b, lambda z: z)) == pytest.approx(expected, rel=1e-5)
    assert float(perceptual_loss(a, a, lambda z: z)) == 0.0


def test_stage1_loss_combines_the_terms_of_eq8() -> None:
    torch.manual_seed(0)
    loss = Stage1Loss(vgg_weights="random", vgg_layer="relu2_1")
    pred = torch.rand(2, 1, 24, 24, requires_grad=True)
    target = torch.rand(2, 1, 24, 24)
    total, terms = loss(pred, target)
    pred_ = pred.detach()
    assert set(terms) == {"l1", "ssim_loss", "perceptual"}
    assert all(not t.requires_grad for t in terms.values())
    assert float(terms["l1"]) == pytest.approx(float(l1_loss(pred_, target)))
    assert float(terms["ssim_loss"]) == pytest.approx(float(ssim_loss(pred_, target)))
    assert float(terms["perceptual"]) == pytest.approx(
        float(perceptual_loss(pred_, target, loss.perceptual.vgg))
    )
    assert float(total.detach()) == pytest.approx(
        float(terms["l1"] + 2 * terms["ssim_loss"] + terms["perceptual"]), rel=1e-6
    )
    total.backward()
    assert pred.grad is not None and torch.isfinite(pred.grad).all() and pred.grad.abs().sum() > 0
    assert all(k.startswith("perceptual.vgg.features.") for k in loss.state_dict())
    loss.train()
    assert not loss.perceptual.vgg.training

    weighted = Stage1Loss(l1_weight=0.5, ssim_weight=0.0, perceptual_weight=0.0)
    assert weighted.perceptual is None
    total, terms = weighted(pred_, target)
    assert set(terms) == {"l1", "ssim_loss"}
    assert float(total) == pytest.approx(0.5 * float(terms["l1"]))


def test_stage1_loss_needs_vgg_weights_for_the_perceptual_term() -> None:
    with pytest.raises(ValueError, match=r"vgg_weights \(model\.vgg\.weights\)"):
        Stage1Loss()


# ---------------------------------------------------------------- gradient penalty


class QuadraticCritic(nn.Module):
    """``D(x) = sum(w * x) + c / 2 * sum(x^2)`` per sample, so ``grad_x D = w + c * x``."""

    def __init__(self, w: torch.Tensor, c: float) -> None:
        super().__init__()
        self.w = nn.Parameter(w.clone())
        self.c = nn.Parameter(torch.tensor(float(c)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ((self.w * x).flatten(1).sum(1) + 0.5 * self.c * (x**2).flatten(1).sum(1))[:, None]


def _inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(1, 1, 3, 4, generator=g) * 0.3
    real, fake = torch.rand(4, 1, 3, 4, generator=g), torch.rand(4, 1, 3, 4, generator=g)
    alpha = torch.tensor([0.0, 0.25, 0.6, 1.0])
    return w, real, fake, alpha


def test_gradient_penalty_of_a_linear_critic_is_known() -> None:
    w, real, fake, _ = _inputs()
    critic = QuadraticCritic(w, c=0.0)
    expected = (float(w.norm()) - 1.0) ** 2  # the gradient is w everywhere
    assert gradient_penalty(critic, real, fake).item() == pytest.approx(expected, rel=1e-5)


def test_gradient_penalty_matches_hand_and_finite_differences() -> None:
    w, real, fake, alpha = _inputs()
    c = 0.7
    critic = QuadraticCritic(w, c)
    gp = gradient_penalty(critic, real, fake, alpha=alpha)

    wn, rn, fn, an = (t.double().numpy() for t in (w, real, fake, alpha))
    x_hat = an[:, None, None, None] * rn + (1 - an[:, None, None, None]) * fn
    by_hand = np.mean((np.linalg.norm((wn + c * x_hat).reshape(4, -1), axis=1) - 1.0) ** 2)
    assert gp.item() == pytest.approx(by_hand, rel=1e-5)

    # grad_x D by central differences of the critic itself (float64)
    critic64 = QuadraticCritic(w.double(), c).double()
    x = torch.tensor(x_hat)
    eps = 1e-6
    fd_grad = torch.zeros_like(x)
    with torch.no_grad():
        for idx in np.ndindex(*x.shape[1:]):
            step = torch.zeros_like(x)
            step[(slice(None), *idx)] = eps
            fd_grad[(slice(None), *idx)] = (critic64(x + step) - critic64(x - step))[:, 0] / (2 * eps)
    fd_gp = float(((fd_grad.flatten(1).norm(dim=1) - 1) ** 2).mean())
    assert gp.item() == pytest.approx(fd_gp, rel=1e-5)

    # create_graph=True: d GP / d c through the critic's gradient, against central differences in c
    (d_c,) = torch.autograd.grad(gp, critic.c)
    h = 1e-3
    plus = gradient_penalty(QuadraticCritic(w, c + h), real, fake, alpha=alpha)
    minus = gradient_penalty(QuadraticCritic(w, c - h), real, fake, alpha=alpha)
    assert d_c.item() == pytest.approx((plus - minus).item() / (2 * h), rel=1e-3)


def test_gradient_penalty_random_interpolates_are_reproducible() -> None:
    w, real, fake, _ = _inputs()
    critic = QuadraticCritic(w, c=0.5)
    a = gradient_penalty(critic, real, fake, generator=torch.Generator().manual_seed(1))
    b = gradient_penalty(critic, real, fake, generator=torch.Generator().manual_seed(1))
    assert a.item() == b.item()


def test_gradient_penalty_is_float32_and_finite_under_bf16_autocast() -> None:
    torch.manual_seed(0)
    critic = WGANCritic(patch_size=16)
    real, fake = torch.rand(3, 1, 16, 16), torch.rand(3, 1, 16, 16)
    alpha = torch.tensor([0.1, 0.5, 0.9])
    reference = gradient_penalty(critic, real, fake, alpha=alpha)
    reference.backward()
    reference_grads = {n: p.grad.clone() for n, p in critic.named_parameters() if n.endswith("weight")}
    critic.zero_grad()
    # bf16 inputs carry bf16's rounding; in float32 without autocast that rounding is all that differs
    rounded = gradient_penalty(critic, real.bfloat16().float(), fake.bfloat16().float(), alpha=alpha)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        gp = gradient_penalty(critic, real.bfloat16(), fake.bfloat16(), alpha=alpha)
        gp_same_inputs = gradient_penalty(critic, real, fake, alpha=alpha)
    assert gp.dtype == torch.float32 and math.isfinite(gp.item())
    assert torch.equal(gp, rounded)
    assert gp.item() == pytest.approx(reference.item(), rel=1e-2)
    assert torch.equal(gp_same_inputs, reference)  # autocast is off inside: the same float32 computation
    gp_same_inputs.backward()
    # biases do not enter grad_x D (LeakyReLU masks are piecewise constant): only weights get gradients
    weight_grads = {n: p.grad for n, p in critic.named_parameters() if n.endswith("weight")}
    assert all(g is not None and g.abs().sum() > 0 for g in weight_grads.values())
    for name, grad in weight_grads.items():  # the penalty's gradient is float32's too
        torch.testing.assert_close(grad, reference_grads[name], rtol=1e-5, atol=1e-7)

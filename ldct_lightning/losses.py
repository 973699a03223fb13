"""Losses of Hu et al. 2024: L1 (eq. 5), 1 - SSIM (eq. 6), VGG-19 perceptual (eq. 7), the stage-1 total (eq. 8)
and the WGAN gradient penalty (eq. 9). Each is a pure function; thin modules wrap the ones that hold state.

Images are in [0, 1] (HU scaled by ``hu_to_unit``), so SSIM uses ``data_range=1``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import kornia
import torch
import torch.nn.functional as F
from torch import nn

from ldct_lightning.models.vgg import VGG19Features

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def l1_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean absolute error (eq. 5)."""
    return F.l1_loss(pred, target)


def ssim(
    pred: torch.Tensor, target: torch.Tensor, data_range: float = 1.0, window_size: int = 11
) -> torch.Tensor:
    """Mean SSIM with an 11x11 Gaussian window (sigma 1.5), K1=0.01, K2=0.03, over the valid (unpadded) region.

    Same definition as ``skimage.metrics.structural_similarity(gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False)``, which also averages only away from the border. Computed by
    ``kornia.metrics.ssim`` in float32 with autocast off: the variances are differences of nearly equal
    numbers and lose all precision in bfloat16.

    Args:
        pred: images (B, C, H, W), H and W at least ``window_size``.
        target: reference images, same shape.
        data_range: value range of the images (1 for [0, 1] data).
        window_size: side of the Gaussian window.

    Returns:
        A scalar, the SSIM averaged over pixels, channels and batch.
    """
    if pred.shape != target.shape or pred.ndim != 4:
        raise ValueError(
            f"ssim: expected two (B, C, H, W) tensors of one shape, got {pred.shape} and {target.shape}"
        )
    if min(pred.shape[-2:]) < window_size:
        raise ValueError(f"ssim: images {tuple(pred.shape[-2:])} are smaller than the {window_size}px window")
    with torch.autocast(device_type=pred.device.type, enabled=False):
        ssim_map = kornia.metrics.ssim(
            pred.float(), target.float(), window_size, max_val=data_range, padding="valid"
        )
    return ssim_map.mean()


def ssim_loss(
    pred: torch.Tensor, target: torch.Tensor, data_range: float = 1.0, window_size: int = 11
) -> torch.Tensor:
    """``1 - SSIM`` (eq. 6); see :func:`ssim`."""
    return 1.0 - ssim(pred, target, data_range, window_size)


def gray_to_vgg_input(x: torch.Tensor) -> torch.Tensor:
    """Repeat a gray image in [0, 1] to 3 channels and normalise with the ImageNet mean and std.

    Args:
        x: images (B, 1, H, W) in [0, 1].

    Returns:
        (B, 3, H, W) input for an ImageNet-trained VGG.
    """
    if x.ndim != 4 or x.shape[1] != 1:
        raise ValueError(f"gray_to_vgg_input: expected (B, 1, H, W), got {tuple(x.shape)}")
    mean = x.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = x.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x.expand(-1, 3, -1, -1) - mean) / std


def perceptual_loss(
    pred: torch.Tensor, target: torch.Tensor, features: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """Mean squared error between VGG features of the two images (eq. 7: ``||phi(x) - phi(y)||^2 / CHW``).

    Args:
        pred: images (B, 1, H, W) in [0, 1].
        target: reference images, same shape.
        features: the feature extractor ``phi`` on ImageNet-normalised RGB, e.g. :class:`VGG19Features`.

    Returns:
        A scalar (mean over batch, channels and positions), in float32.
    """
    f_pred = features(gray_to_vgg_input(pred))
    if target.requires_grad:
        f_target = features(gray_to_vgg_input(target))
    else:
        with torch.no_grad():  # the reference needs no graph: saves the activations' memory
            f_target = features(gray_to_vgg_input(target))
    return F.mse_loss(f_pred.float(), f_target.float())


def gaussian_lowpass(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian low-pass (kernel side ``2 * ceil(3 sigma) + 1``, reflected borders) of images (B, C, H, W)."""
    if sigma <= 0:
        raise ValueError(f"gaussian_lowpass: sigma must be > 0, got {sigma}")
    side = 2 * math.ceil(3 * sigma) + 1
    with torch.autocast(device_type=x.device.type, enabled=False):
        return kornia.filters.gaussian_blur2d(x.float(), (side, side), (sigma, sigma), border_type="reflect")


def lowpass_l1(pred: torch.Tensor, reference: torch.Tensor, sigma: float) -> torch.Tensor:
    """L1 between the Gaussian low-pass images: compares anatomy and mean HU, not noise (high-frequency)."""
    return F.l1_loss(gaussian_lowpass(pred, sigma), gaussian_lowpass(reference, sigma))


def gradient_penalty(
    critic: Callable[[torch.Tensor], torch.Tensor],
    real: torch.Tensor,
    fake: torch.Tensor,
    alpha: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """WGAN-GP penalty (Gulrajani et al. 2017; eq. 9): ``mean((||grad_x D(x_hat)||_2 - 1)^2)``.

    ``x_hat = alpha * real + (1 - alpha) * fake`` with one ``alpha ~ U[0, 1)`` per sample. Computed in float32
    with autocast disabled (the penalty differentiates through the critic's gradient, which half precision
    makes noisy or non-finite), and with ``create_graph=True`` so the penalty trains the critic. The critic's
    parameters are expected in float32 (mixed precision keeps them so).

    Args:
        critic: maps (B, C, H, W) to scores (B, 1) or (B,).
        real: real images (B, C, H, W); detached here.
        fake: generated images, same shape; detached here.
        alpha: interpolation weights (B,) or (B, 1, 1, 1); random when None.
        generator: random generator for ``alpha``.

    Returns:
        The penalty, a float32 scalar.
    """
    if real.shape != fake.shape:
        raise ValueError(f"gradient_penalty: real {tuple(real.shape)} and fake {tuple(fake.shape)} differ")
    batch = real.shape[0]
    with torch.autocast(device_type=real.device.type, enabled=False):
        real32, fake32 = real.detach().float(), fake.detach().float()
        if alpha is None:
            alpha = torch.rand(batch, device=real.device, dtype=torch.float32, generator=generator)
        alpha = alpha.to(device=real.device, dtype=torch.float32).reshape(batch, *([1] * (real.ndim - 1)))
        x_hat = (alpha * real32 + (1 - alpha) * fake32).requires_grad_(True)
        scores = critic(x_hat)
        (grad,) = torch.autograd.grad(scores.sum(), x_hat, create_graph=True)
        norm = grad.flatten(1).norm(2, dim=1)
        return ((norm - 1) ** 2).mean()


class SSIMLoss(nn.Module):
    """``1 - SSIM`` as a module; see :func:`ssim`.

    Args:
        data_range: value range of the images.
        window_size: side of the Gaussian window.
    """

    def __init__(self, data_range: float = 1.0, window_size: int = 11) -> None:
        super().__init__()
        self.data_range = data_range
        self.window_size = window_size

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return ssim_loss(pred, target, self.data_range, self.window_size)


class PerceptualLoss(nn.Module):
    """VGG-19 perceptual loss (eq. 7) with its own frozen :class:`VGG19Features`.

    Args:
        weights: path to torchvision's ``vgg19-dcbb9e9d.pth`` or ``"random"`` (tests only).
        layer: VGG-19 layer whose activations are compared (default conv5_4 after ReLU).
    """

    def __init__(self, weights: str | Path, layer: str | int = "conv5_4") -> None:
        super().__init__()
        self.vgg = VGG19Features(weights, layer)

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return perceptual_loss(pred, target, self.vgg)


class Stage1Loss(nn.Module):
    """Stage-1 loss (eq. 8): ``l1_weight * L1 + ssim_weight * (1 - SSIM) + perceptual_weight * perceptual``.

    Args:
        l1_weight: weight of the L1 term (1 in the paper).
        ssim_weight: weight of the 1 - SSIM term (2 in the paper).
        perceptual_weight: weight of the perceptual term (1 in the paper); 0 builds no VGG.
        vgg_weights: path to torchvision's ``vgg19-dcbb9e9d.pth`` or ``"random"``; needed when
            ``perceptual_weight > 0``.
        vgg_layer: VGG-19 layer of the perceptual term.
        data_range: value range of the images for SSIM.
        window_size: SSIM window side.
    """

    def __init__(
        self,
        l1_weight: float = 1.0,
        ssim_weight: float = 2.0,
        perceptual_weight: float = 1.0,
        vgg_weights: str | Path | None = None,
        vgg_layer: str | int = "conv5_4",
        data_range: float = 1.0,
        window_size: int = 11,
    ) -> None:
        super().__init__()
        if min(l1_weight, ssim_weight, perceptual_weight) < 0:
            raise ValueError(
                f"Stage1Loss weights must be >= 0, got l1={l1_weight}, ssim={ssim_weight}, "
                f"perceptual={perceptual_weight}"
            )
        if perceptual_weight > 0 and vgg_weights is None:
            raise ValueError(
                "Stage1Loss: perceptual_weight > 0 needs vgg_weights (model.vgg.weights): the path of "
                "vgg19-dcbb9e9d.pth, or 'random' for tests"
            )
        self.l1_weight = l1_weight
        self.ssim_weight = ssim_weight
        self.perceptual_weight = perceptual_weight
        self.ssim = SSIMLoss(data_range, window_size)
        self.perceptual = PerceptualLoss(vgg_weights, vgg_layer) if perceptual_weight > 0 else None

    def forward(
        self, pred: torch.Tensor, target: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Total loss and its unweighted terms.

        Args:
            pred: generator output (B, 1, H, W) in [0, 1].
            target: reference (B, 1, H, W).

        Returns:
            ``(total, {"l1", "ssim_loss", "perceptual"})``; the terms are detached and unweighted
            (``perceptual`` only when its weight is > 0).
        """
        terms = {"l1": l1_loss(pred, target), "ssim_loss": self.ssim(pred, target)}
        total = self.l1_weight * terms["l1"] + self.ssim_weight * terms["ssim_loss"]
        if self.perceptual is not None:
            terms["perceptual"] = self.perceptual(pred, target)
            total = total + self.perceptual_weight * terms["perceptual"]
        return total, {k: v.detach() for k, v in terms.items()}


class Stage2Fidelity(nn.Module):
    """Fidelity terms that keep the adversarial stage 2 near what stage 1 already got right (not in eq. 9).

    ``anchor_l1_weight * L1(pred, anchor) + anchor_ssim_weight * (1 - SSIM(pred, anchor))
    + lowpass_weight * L1(lowpass(pred), lowpass(ldct))``, where ``anchor`` is the frozen stage-1 generator's
    output on the same LDCT crop and ``lowpass`` a Gaussian of ``lowpass_sigma`` pixels: noise is
    high-frequency, anatomy and HU are not, so the low-pass LDCT is a fair target for the low-pass output.

    Args:
        anchor_l1_weight: weight of L1 to the stage-1 output.
        anchor_ssim_weight: weight of 1 - SSIM to the stage-1 output.
        lowpass_weight: weight of the low-frequency consistency with the LDCT input.
        lowpass_sigma: Gaussian sigma of the low-pass, in pixels.
    """

    def __init__(
        self,
        anchor_l1_weight: float = 0.0,
        anchor_ssim_weight: float = 0.0,
        lowpass_weight: float = 0.0,
        lowpass_sigma: float = 3.0,
    ) -> None:
        super().__init__()
        if min(anchor_l1_weight, anchor_ssim_weight, lowpass_weight) < 0:
            raise ValueError(
                f"Stage2Fidelity weights must be >= 0, got anchor_l1={anchor_l1_weight}, "
                f"anchor_ssim={anchor_ssim_weight}, lowpass={lowpass_weight}"
            )
        self.anchor_l1_weight = anchor_l1_weight
        self.anchor_ssim_weight = anchor_ssim_weight
        self.lowpass_weight = lowpass_weight
        self.lowpass_sigma = lowpass_sigma

    @property
    def uses_anchor(self) -> bool:
        """Whether a term needs the stage-1 output."""
        return self.anchor_l1_weight > 0 or self.anchor_ssim_weight > 0

    def forward(
        self, pred: torch.Tensor, ldct: torch.Tensor, anchor: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Total fidelity loss and its unweighted terms.

        Args:
            pred: generator output (B, 1, H, W) in [0, 1].
            ldct: the generator's input, same shape.
            anchor: the frozen stage-1 output, same shape; None skips the anchor terms.

        Returns:
            ``(total, terms)`` with the detached, unweighted terms ``anchor_l1``, ``anchor_ssim_loss``,
            ``lowpass_l1`` (those with a weight > 0 that could be computed).
        """
        terms: dict[str, torch.Tensor] = {}
        total = pred.new_zeros(())
        if anchor is not None and self.anchor_l1_weight > 0:
            terms["anchor_l1"] = l1_loss(pred, anchor)
            total = total + self.anchor_l1_weight * terms["anchor_l1"]
        if anchor is not None and self.anchor_ssim_weight > 0:
            terms["anchor_ssim_loss"] = ssim_loss(pred, anchor)
            total = total + self.anchor_ssim_weight * terms["anchor_ssim_loss"]
        if self.lowpass_weight > 0:
            terms["lowpass_l1"] = lowpass_l1(pred, ldct, self.lowpass_sigma)
            total = total + self.lowpass_weight * terms["lowpass_l1"]
        return total, {k: v.detach() for k, v in terms.items()}

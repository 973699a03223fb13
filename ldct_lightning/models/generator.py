"""The generator of Hu et al. 2024 (Fig. 2): a residual U-Net with CBAM attention on the skip connections."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ldct_lightning.models.blocks import CBAM, ResidualBlock

PAD_MODES = ("reflect", "replicate", "zeros")


class AttentionResUNet(nn.Module):
    """Residual U-Net with CBAM on every skip; predicts a correction added to the input image.

    Encoder: ``depth`` residual blocks with ``base_channels * 2**i`` channels (32, 64, 128, 256 by default),
    each followed by 2x2 max pooling; a residual bottleneck block doubles the channels once more (512).
    Decoder, per level from the deepest: bilinear x2 upsampling, concatenation with the CBAM-weighted skip,
    a residual block down to the skip's channel count (so the channels halve from level to level).
    Output: ``x + conv3x3(features)``.

    The paper does not say how the decoder's residual block sees the concatenation; we feed it directly
    (``3C -> C`` channels, no extra convolution after the upsampling), which gives the 8.30 M parameters of
    SPEC section 5 for the default configuration.

    Inputs whose height or width is not a multiple of ``2**depth`` are padded (``pad_mode``; ``reflect``
    falls back to ``replicate`` when the image is smaller than the padding) and the output is cropped back.
    In eval mode (validation, inference) the image is first padded by ``eval_margin`` pixels on every side
    the same way: training crops come from inside the field, so the network never learns the border of a whole
    image; without the margin it left errors of 100-2500 HU in the outermost rows and columns of whole slices
    (bench preset, stage 1: whole-slice RMSE 40.0 HU without a margin, 17.9 HU with 4, 8 or 16 px, the input's 22.8; README).

    Args:
        in_channels: image channels (input and output).
        base_channels: channels of the first encoder block.
        depth: number of encoder blocks (= pooling steps).
        attention: CBAM on the skips; False gives the plain residual U-Net (ablation).
        norm: ``batch``, ``instance`` or ``none``.
        act: activation name (``relu``, ``leaky_relu``, ``elu``, ``gelu``, ``silu``).
        reduction: reduction ratio of CBAM's channel attention.
        spatial_kernel: kernel size of CBAM's spatial attention.
        zero_init_output: zero the output convolution so that the untrained network is the identity.
            Off by default: the paper does not mention it and the ``oneStep`` ablation starts from a
            standard random initialisation.
        pad_mode: ``reflect``, ``replicate`` or ``zeros``, for sizes not divisible by ``2**depth``.
        eval_margin: pixels of padding on every side in eval mode (0: none; the paper does not say).
        input_center: value subtracted from the image before the network body sees it.
        input_scale: the body sees ``(x - input_center) / input_scale``.
        residual_scale: the body's output is multiplied by this before it is added to the image:
            ``x + residual_scale * body((x - input_center) / input_scale)``. The defaults (0, 1, 1) are the
            paper's plain residual; with images in [0, 1] over 4095 HU, tissue and noise span a few
            hundredths, so a unit step of the body moves the output by thousands of HU (see README, choices).
    """

    def __init__(
        self,
        in_channels: int = 1,
        base_channels: int = 32,
        depth: int = 4,
        attention: bool = True,
        norm: str = "batch",
        act: str = "relu",
        reduction: int = 16,
        spatial_kernel: int = 7,
        zero_init_output: bool = False,
        pad_mode: str = "reflect",
        eval_margin: int = 8,
        input_center: float = 0.0,
        input_scale: float = 1.0,
        residual_scale: float = 1.0,
    ) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"depth={depth}: must be >= 1")
        if base_channels < 1 or in_channels < 1:
            raise ValueError(f"in_channels={in_channels}, base_channels={base_channels}: must be >= 1")
        if pad_mode not in PAD_MODES:
            raise ValueError(f"pad_mode={pad_mode!r}: use one of {', '.join(PAD_MODES)}")
        if eval_margin < 0:
            raise ValueError(f"eval_margin={eval_margin}: must be >= 0")
        if input_scale <= 0 or residual_scale <= 0:
            raise ValueError(f"input_scale={input_scale}, residual_scale={residual_scale}: must be > 0")
        self.eval_margin = eval_margin
        self.input_center = float(input_center)
        self.input_scale = float(input_scale)
        self.residual_scale = float(residual_scale)
        self.in_channels = in_channels
        self.depth = depth
        self.pad_mode = pad_mode
        widths = [base_channels * 2**i for i in range(depth)]

        self.encoders = nn.ModuleList()
        previous = in_channels
        for width in widths:
            self.encoders.append(ResidualBlock(previous, width, norm, act))
            previous = width
        self.pool = nn.MaxPool2d(2)
        self.bottleneck = ResidualBlock(widths[-1], 2 * widths[-1], norm, act)
        # decoder lists run from the deepest level up
        self.attentions = nn.ModuleList(
            CBAM(w, reduction, spatial_kernel) if attention else nn.Identity() for w in reversed(widths)
        )
        self.decoders = nn.ModuleList(ResidualBlock(3 * w, w, norm, act) for w in reversed(widths))
        self.out_conv = nn.Conv2d(base_channels, in_channels, 3, padding=1)
        if zero_init_output:
            nn.init.zeros_(self.out_conv.weight)
            nn.init.zeros_(self.out_conv.bias)

    def _pad(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
        h, w = x.shape[-2:]
        margin = 0 if self.training else self.eval_margin
        m = 2**self.depth
        ph, pw = -(h + 2 * margin) % m, -(w + 2 * margin) % m
        # F.pad order: left, right, top, bottom
        pads = (margin + pw // 2, margin + pw - pw // 2, margin + ph // 2, margin + ph - ph // 2)
        if max(pads) == 0:
            return x, pads
        if self.pad_mode == "zeros":
            return F.pad(x, pads), pads
        mode = self.pad_mode
        if mode == "reflect" and (max(pads[:2]) >= w or max(pads[2:]) >= h):
            mode = "replicate"  # reflect needs the padding to be smaller than the image
        return F.pad(x, pads, mode=mode), pads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Denoise a batch.

        Args:
            x: images (B, in_channels, H, W), any H, W.

        Returns:
            Denoised images, same shape as ``x``.
        """
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"AttentionResUNet: expected input (B, {self.in_channels}, H, W), got {tuple(x.shape)}"
            )
        h, w = x.shape[-2:]
        xp, (left, _, top, _) = self._pad(x)

        skips = []
        f = (xp - self.input_center) / self.input_scale
        for encoder in self.encoders:
            f = encoder(f)
            skips.append(f)
            f = self.pool(f)
        f = self.bottleneck(f)
        for decoder, attention, skip in zip(self.decoders, self.attentions, reversed(skips), strict=True):
            f = F.interpolate(f, scale_factor=2, mode="bilinear", align_corners=False)
            f = decoder(torch.cat([f, attention(skip)], dim=1))
        out = xp + self.residual_scale * self.out_conv(f)
        return out[..., top : top + h, left : left + w]

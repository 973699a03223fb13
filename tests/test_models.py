"""Generator, CBAM blocks, critic, VGG-19 features and model-size utilities."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from ldct_lightning.models import count_flops, count_parameters
from ldct_lightning.models.blocks import CBAM, ChannelAttention, ResidualBlock, SpatialAttention
from ldct_lightning.models.critic import WGANCritic
from ldct_lightning.models.generator import AttentionResUNet
from ldct_lightning.models.vgg import (
    VGG19Features,
    build_vgg19_features,
    vgg19_layer_index,
    vgg19_layer_names,
)

# ---------------------------------------------------------------- generator


@pytest.mark.parametrize("size", [(64, 64), (96, 96), (100, 100), (37, 53)])
@pytest.mark.parametrize(
    "kwargs",
    [
        dict(base_channels=8, depth=4),
        dict(base_channels=4, depth=2, attention=False, norm="instance", act="leaky_relu"),
        dict(base_channels=6, depth=3, norm="none", act="gelu", pad_mode="replicate"),
    ],
)
def test_generator_keeps_the_input_shape(size: tuple[int, int], kwargs: dict) -> None:
    torch.manual_seed(0)
    net = AttentionResUNet(**kwargs)
    x = torch.rand(2, 1, *size)
    y = net(x)
    assert y.shape == x.shape
    assert torch.isfinite(y).all()
    assert not torch.equal(y, x)  # default (random) output conv: not the identity


def test_generator_handles_images_smaller_than_the_padding() -> None:
    net = AttentionResUNet(base_channels=4, depth=4).eval()
    x = torch.rand(1, 1, 5, 7)  # padded to 16x16: reflect impossible, falls back to replicate
    assert net(x).shape == x.shape


@pytest.mark.parametrize("size", [(32, 32), (37, 53)])
def test_zero_initialised_output_conv_gives_the_identity(size: tuple[int, int]) -> None:
    net = AttentionResUNet(base_channels=8, depth=3, zero_init_output=True)
    x = torch.rand(2, 1, *size)
    assert torch.equal(net(x), x)
    net.eval()
    assert torch.equal(net(x), x)


@pytest.mark.parametrize("train", [True, False])
def test_preconditioning_rescales_the_body_input_and_its_residual(train: bool) -> None:
    """With (c, k, s) the output is x + s * r, r the plain network's residual on (x - c) / k (same weights)."""
    c, k, s = 0.25, 0.1, 0.01
    plain = AttentionResUNet(base_channels=8, depth=2, norm="none", eval_margin=4)
    pre = AttentionResUNet(
        base_channels=8, depth=2, norm="none", eval_margin=4, input_center=c, input_scale=k, residual_scale=s
    )
    pre.load_state_dict(plain.state_dict())
    plain.train(train)
    pre.train(train)
    x = 0.25 + 0.02 * torch.randn(2, 1, 20, 20, generator=torch.Generator().manual_seed(0))
    z = (x - c) / k
    expected = x + s * (plain(z) - z)
    torch.testing.assert_close(pre(x), expected, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="input_scale=0"):
        AttentionResUNet(input_scale=0)


def test_eval_mode_pads_whole_images_by_the_margin_and_training_does_not() -> None:
    """Eval mode = the margin-free network on the image reflect-padded by numpy by eval_margin, then cropped."""
    torch.manual_seed(0)
    net = AttentionResUNet(base_channels=4, depth=2, eval_margin=6)
    plain = AttentionResUNet(base_channels=4, depth=2, eval_margin=0)
    plain.load_state_dict(net.state_dict())
    x = torch.rand(2, 1, 20, 24)
    net.eval(), plain.eval()
    # 20 + 12 = 32 and 24 + 12 = 36: multiples of 2**depth = 4, so the margin is the only padding
    padded = torch.from_numpy(np.pad(x.numpy(), ((0, 0), (0, 0), (6, 6), (6, 6)), mode="reflect"))
    with torch.no_grad():
        expected = plain(padded)[..., 6:-6, 6:-6]
        torch.testing.assert_close(net(x), expected, rtol=0, atol=1e-6)
        assert (net(x) - plain(x)).abs().max() > 1e-4  # the margin changes the border: the test can fail
        net.train(), plain.train()
        torch.testing.assert_close(net(x), plain(x), rtol=0, atol=1e-6)  # no margin in training
    with pytest.raises(ValueError, match="eval_margin"):
        AttentionResUNet(eval_margin=-1)


def test_generator_layout_follows_the_paper() -> None:
    net = AttentionResUNet(base_channels=8, depth=4)
    enc = [(b.conv1.in_channels, b.conv1.out_channels) for b in net.encoders]
    assert enc == [(1, 8), (8, 16), (16, 32), (32, 64)]
    assert (net.bottleneck.conv1.in_channels, net.bottleneck.conv1.out_channels) == (64, 128)
    # decoder from the deepest level: upsampled (2C) + skip (C) in, C out
    dec = [(b.conv1.in_channels, b.conv1.out_channels) for b in net.decoders]
    assert dec == [(192, 64), (96, 32), (48, 16), (24, 8)]
    assert all(isinstance(a, CBAM) for a in net.attentions)
    assert all(
        isinstance(b.shortcut[0], nn.Conv2d) and b.shortcut[0].kernel_size == (1, 1) for b in net.encoders
    )
    assert (net.out_conv.kernel_size, net.out_conv.out_channels) == ((3, 3), 1)
    plain = AttentionResUNet(base_channels=8, depth=4, attention=False)
    assert all(isinstance(a, nn.Identity) for a in plain.attentions)
    cbam_params = sum(count_parameters(a) for a in net.attentions)
    assert count_parameters(net) - count_parameters(plain) == cbam_params > 0


def test_generator_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="norm='group'"):
        AttentionResUNet(norm="group")
    with pytest.raises(ValueError, match="act='tanh'"):
        AttentionResUNet(act="tanh")
    with pytest.raises(ValueError, match=r"expected input \(B, 1, H, W\)"):
        AttentionResUNet(base_channels=4, depth=1)(torch.rand(1, 2, 8, 8))


def conv_macs(c_in: int, c_out: int, k: int) -> int:
    """Multiply-accumulates of a k x k convolution per output pixel (= its weights, without bias)."""
    return k * k * c_in * c_out


def residual_block(c_in: int, c_out: int) -> tuple[int, int]:
    """(parameters, MACs per output pixel) of conv3x3-BN-act-conv3x3-BN + conv1x1-BN shortcut, no conv bias."""
    macs = conv_macs(c_in, c_out, 3) + conv_macs(c_out, c_out, 3) + conv_macs(c_in, c_out, 1)
    return macs + 3 * 2 * c_out, macs  # three batch norms, 2 parameters per channel


def generator_size(base: int = 32, depth: int = 4, size: int = 512) -> tuple[int, int]:
    """(parameters, FLOPs) of the generator from its layer table (SPEC section 1 / Hu et al. Fig. 2).

    Encoder level i: residual block at size / 2**i; bottleneck 2x the last width at size / 2**depth; decoder
    level i: residual block 3C -> C (upsampled 2C + skip C) at size / 2**i; CBAM on each skip: shared FC
    C -> max(1, C/16) -> C without bias, run on the average and on the max pool, and a 7x7 conv 2 -> 1 without bias;
    output conv3x3 C -> 1 with bias. FLOPs count 2 per multiply-accumulate of convolutions and FCs (norms,
    pooling, activations and upsampling not counted).
    """
    widths = [base * 2**i for i in range(depth)]
    params, macs = 0, 0
    previous = 1
    for i, w in enumerate(widths):
        pixels = (size // 2**i) ** 2
        p, m = residual_block(previous, w)  # encoder
        params, macs = params + p, macs + m * pixels
        p, m = residual_block(3 * w, w)  # decoder
        params, macs = params + p, macs + m * pixels
        hidden = max(1, w // 16)  # at least one hidden unit
        params += 2 * w * hidden + conv_macs(2, 1, 7)  # CBAM
        macs += 2 * (2 * w * hidden) + conv_macs(2, 1, 7) * pixels
        previous = w
    p, m = residual_block(widths[-1], 2 * widths[-1])
    params, macs = params + p, macs + m * (size // 2**depth) ** 2
    params += conv_macs(base, 1, 3) + 1
    macs += conv_macs(base, 1, 3) * size**2
    return params, 2 * macs


def test_default_generator_size_matches_spec() -> None:
    """32->256 channels + 512 bottleneck: 8.30 M parameters and 119.04 GFLOPs per 512x512 slice (SPEC 5)."""
    params, flops = generator_size()
    assert (params, flops) == (8_298_729, 119_035_521_536)  # the layer table above, written out
    assert count_parameters(AttentionResUNet()) == params
    with torch.device("meta"):  # FlopCounterMode counts on meta tensors: no compute
        meta_net = AttentionResUNet(eval_margin=0)
        with_margin = AttentionResUNet()
    cost = count_flops(meta_net, (1, 1, 512, 512))
    assert cost.flops == flops
    # the default eval-mode margin (8 px a side): the cost of the same network on a 528 x 528 slice (+6.3 %)
    assert count_flops(with_margin, (1, 1, 512, 512)).flops == count_flops(meta_net, (1, 1, 528, 528)).flops
    assert cost.macs * 2 == cost.flops
    assert cost.gflops == pytest.approx(119.04, abs=0.01)
    # another width and depth: the table, not a constant, is what the network follows
    small = generator_size(base=8, depth=2, size=64)
    assert count_parameters(AttentionResUNet(base_channels=8, depth=2)) == small[0]
    with torch.device("meta"):
        assert (
            count_flops(AttentionResUNet(base_channels=8, depth=2, eval_margin=0), (1, 1, 64, 64)).flops
            == small[1]
        )


def test_count_flops_counts_two_per_multiply_accumulate() -> None:
    conv = nn.Conv2d(1, 2, 3, padding=1)
    cost = count_flops(conv, (1, 1, 4, 4))
    assert cost.macs == 2 * 9 * 16  # out channels x kernel x output pixels
    assert cost.flops == 2 * cost.macs
    assert conv.training  # mode restored
    assert count_parameters(conv) == 2 * 9 + 2
    conv.bias.requires_grad_(False)
    assert count_parameters(conv, trainable_only=True) == 18


def test_residual_block_has_a_projection_shortcut() -> None:
    torch.manual_seed(0)
    block = ResidualBlock(3, 5, norm="none", act="relu")
    x = torch.randn(1, 3, 6, 6)
    main = block.conv2(torch.relu(block.conv1(x)))
    expected = torch.relu(main + block.shortcut(x))
    torch.testing.assert_close(block(x), expected)


# ---------------------------------------------------------------- CBAM


def _sigmoid(v: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-v))


def test_channel_attention_matches_hand_computation() -> None:
    x = torch.tensor(
        [
            [
                [[1.0, 2.0], [3.0, 4.0]],
                [[-1.0, 0.0], [0.0, 5.0]],
                [[2.0, 2.0], [2.0, 2.0]],
                [[0.0, -3.0], [1.0, 0.0]],
            ]
        ]
    )  # (1, 4, 2, 2)
    ca = ChannelAttention(4, reduction=2)  # hidden width 2
    w1 = torch.tensor([[0.5, -1.0, 0.25, 0.0], [1.0, 0.0, -0.5, 2.0]])
    w2 = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 1.0], [0.5, 0.5]])
    with torch.no_grad():
        ca.mlp[0].weight.copy_(w1)
        ca.mlp[2].weight.copy_(w2)

    xn = x.numpy()[0]
    avg = xn.mean(axis=(1, 2))  # [2.5, 1.0, 2.0, -0.5]
    mx = xn.max(axis=(1, 2))  # [4, 5, 2, 1]
    assert np.allclose(avg, [2.5, 1.0, 2.0, -0.5]) and np.allclose(mx, [4, 5, 2, 1])

    def mlp(v: np.ndarray) -> np.ndarray:
        return w2.numpy() @ np.maximum(w1.numpy() @ v, 0.0)

    weights = _sigmoid(mlp(avg) + mlp(mx))
    expected = xn * weights[:, None, None]
    np.testing.assert_allclose(ca(x).detach().numpy()[0], expected, rtol=1e-6, atol=1e-6)


def test_spatial_attention_matches_hand_computation() -> None:
    x = torch.tensor(
        [[[[1.0, 2.0, 0.0], [3.0, -1.0, 1.0]], [[0.0, 4.0, 2.0], [1.0, 1.0, -2.0]]]]
    )  # (1, 2, 2, 3)
    sa = SpatialAttention(kernel_size=7)
    weight = torch.zeros(1, 2, 7, 7)
    weight[0, 0, 3, 3] = 0.5  # centre tap on the channel mean
    weight[0, 1, 3, 3] = -1.0  # centre tap on the channel max
    weight[0, 1, 3, 4] = 0.25  # channel max of the right-hand neighbour (zero beyond the border)
    with torch.no_grad():
        sa.conv.weight.copy_(weight)

    xn = x.numpy()[0]
    mean_c, max_c = xn.mean(axis=0), xn.max(axis=0)
    right = np.zeros_like(max_c)
    right[:, :-1] = max_c[:, 1:]
    weights = _sigmoid(0.5 * mean_c - 1.0 * max_c + 0.25 * right)
    np.testing.assert_allclose(sa(x).detach().numpy()[0], xn * weights[None], rtol=1e-6, atol=1e-6)


def test_cbam_is_channel_then_spatial_attention() -> None:
    torch.manual_seed(0)
    cbam = CBAM(8, reduction=4, kernel_size=7)
    x = torch.randn(2, 8, 5, 6)
    torch.testing.assert_close(cbam(x), cbam.spatial(cbam.channel(x)))
    assert cbam.channel.mlp[0].out_features == 2
    assert cbam.spatial.conv.kernel_size == (7, 7)


# ---------------------------------------------------------------- critic


@pytest.mark.parametrize(("patch", "fc_in"), [(64, 256 * 8 * 8), (128, 256 * 16 * 16)])
def test_critic_fc_size_follows_the_patch_size(patch: int, fc_in: int) -> None:
    with torch.device("meta"):  # the 128 critic has 67 M FC weights: no need to allocate them
        critic = WGANCritic(patch_size=patch)
        out = critic(torch.empty(3, 1, patch, patch))
    assert critic.fc_in_features == fc_in
    assert critic.head[1].in_features == fc_in and critic.head[1].out_features == 1024
    assert out.shape == (3, 1)


def test_critic_input_standardisation_equals_rescaling_the_crops() -> None:
    """A critic with (c, k) scores x as the plain critic (same weights) scores (x - c) / k."""
    torch.manual_seed(0)
    plain = WGANCritic(patch_size=16, channels=(4, 4, 8, 8, 8, 8), hidden=8)
    std = WGANCritic(patch_size=16, channels=(4, 4, 8, 8, 8, 8), hidden=8, input_center=0.25, input_scale=0.1)
    std.load_state_dict(plain.state_dict())
    x = torch.rand(3, 1, 16, 16)
    torch.testing.assert_close(std(x), plain((x - 0.25) / 0.1))
    with pytest.raises(ValueError, match="input_scale=-1"):
        WGANCritic(patch_size=16, input_scale=-1)


def test_critic_layout_and_output() -> None:
    torch.manual_seed(0)
    critic = WGANCritic(patch_size=32)
    convs = [m for m in critic.features if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 64, 128, 128, 256, 256]
    assert [c.stride[0] for c in convs] == [1, 2, 1, 2, 1, 2]
    assert all(c.kernel_size == (3, 3) for c in convs)
    leaky = [m for m in critic.modules() if isinstance(m, nn.LeakyReLU)]
    assert len(leaky) == 7 and all(m.negative_slope == 0.2 for m in leaky)
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.Sigmoid)) for m in critic.modules())
    out = critic(torch.rand(2, 1, 32, 32))
    assert out.shape == (2, 1)
    assert critic.fc_in_features == 256 * 4 * 4
    assert WGANCritic(patch_size=(24, 40)).fc_in_features == 256 * 3 * 5


def test_critic_rejects_a_wrong_input_size() -> None:
    critic = WGANCritic(patch_size=32)
    with pytest.raises(ValueError, match=r"built for \(B, 1, 32, 32\).*patch_size"):
        critic(torch.rand(2, 1, 64, 64))


# ---------------------------------------------------------------- VGG-19


def test_vgg_layer_names_follow_torchvision_indices() -> None:
    names = vgg19_layer_names()
    assert len(names) == 37
    for index, name in [(0, "conv1_1"), (4, "pool1"), (5, "conv2_1"), (10, "conv3_1"), (19, "conv4_1")]:
        assert names[index] == name
    assert (names[28], names[34], names[35], names[36]) == ("conv5_1", "conv5_4", "relu5_4", "pool5")
    assert vgg19_layer_index("conv5_4") == vgg19_layer_index("relu5_4") == 35  # after the ReLU
    assert vgg19_layer_index(34) == 34
    with pytest.raises(ValueError, match="conv6_1"):
        vgg19_layer_index("conv6_1")


@pytest.fixture(scope="module")
def vgg_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A torchvision-format VGG-19 state dict (features + classifier keys) of a random copy."""
    torch.manual_seed(3)
    state = {f"features.{k}": v for k, v in build_vgg19_features().state_dict().items()}
    state |= {"classifier.0.weight": torch.zeros(2, 2), "classifier.0.bias": torch.zeros(2)}
    path = tmp_path_factory.mktemp("weights") / "vgg19-dcbb9e9d.pth"
    torch.save(state, path)
    return path, state


def test_vgg_loads_a_torchvision_state_dict(vgg_file) -> None:
    path, state = vgg_file
    vgg = VGG19Features(path, layer="conv5_4")
    assert len(vgg.features) == 36
    own = vgg.state_dict()
    assert set(own) == {k for k in state if k.startswith("features.")}
    for key, value in own.items():
        assert torch.equal(value, state[key]), key
    shallow = VGG19Features(path, layer="relu2_2")
    assert len(shallow.features) == 9
    assert torch.equal(shallow.features[7].weight, state["features.7.weight"])


def test_vgg_file_errors_are_clear(vgg_file, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "vgg19-dcbb9e9d.pth"
    with pytest.raises(
        FileNotFoundError, match=r"nowhere.vgg19-dcbb9e9d\.pth: VGG-19 weights file not found.*offline"
    ):
        VGG19Features(missing)
    path, state = vgg_file
    broken = tmp_path / "broken.pth"
    torch.save({k: v for k, v in state.items() if k != "features.34.bias"}, broken)
    with pytest.raises(ValueError, match=r"broken\.pth: not a torchvision VGG-19 state dict.*34\.bias"):
        VGG19Features(broken)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"junk\.pth: cannot be read"):
        VGG19Features(junk)


def test_vgg_is_frozen_and_stays_in_eval_mode(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        vgg = VGG19Features("random", layer="relu2_1")
    assert "random" in caplog.text
    assert all(not p.requires_grad for p in vgg.parameters())
    parent = nn.Sequential(nn.Conv2d(3, 3, 1), vgg)
    parent.train()
    assert parent[0].training and not vgg.training
    x = torch.rand(1, 3, 16, 16, requires_grad=True)
    vgg(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in vgg.parameters())

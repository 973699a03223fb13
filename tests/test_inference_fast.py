"""Parity of every fast inference path with the plain float32 torch path, and streaming = whole-volume.

Each test states the largest difference in HU it allows and why. The reference is always the plain path:
``Denoiser(generator)`` (float32, batch norm as its own layer, contiguous layout), which
tests/test_denoise.py checks against a hand computation.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from torch import nn

from ldct_lightning import derived_series
from ldct_lightning.cli import denoise as cli
from ldct_lightning.data.dicom import read_series_hu, scan_dicom_folder
from ldct_lightning.data.dicom_write import hu_to_stored
from ldct_lightning.data.prefetch import ordered_prefetch
from ldct_lightning.inference import Denoiser, InferenceError
from ldct_lightning.inference_backends import BackendError, fold_batch_norm, optimized_generator
from ldct_lightning.models.generator import AttentionResUNet

TINY = {"base_channels": 8}
SHAPE = (48, 40)  # not a multiple of 16: the generator's own padding runs too
# float32 rounding: the paths sum the same products in another order (folding also rescales the weights);
# a relative error of a few 1e-7 on values of order 1 (normalised) is about 1e-3 HU. 0.01 HU leaves a margin of
# 10 and is still 100 times below one stored unit (1 HU), so the written DICOM is the same.
FP32_ATOL_HU = 0.01


def _generator(seed: int = 0) -> AttentionResUNet:
    """A tiny generator with non-trivial batch-norm statistics and affine parameters (so folding matters)."""
    torch.manual_seed(seed)
    generator = AttentionResUNet(**TINY)
    for module in generator.modules():
        if isinstance(module, nn.BatchNorm2d):
            n = module.num_features
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.3, 3.0)
            with torch.no_grad():
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.3, 0.3)
            assert module.running_mean.shape == (n,)
    return generator.eval()


def _hu(n: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1000, 2000, (n, *SHAPE)).astype(np.float32)


@pytest.fixture
def onnx_cache(tmp_path, monkeypatch) -> Path:
    """ONNX files exported on the fly go to a temporary cache, never to the home folder."""
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    monkeypatch.setenv("LDCT_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / "onnx"


def test_fold_batch_norm_removes_every_norm_and_keeps_the_function():
    generator = _generator()
    n_norms = sum(isinstance(m, nn.BatchNorm2d) for m in generator.modules())
    folded = optimized_generator(generator, fold_bn=True, channels_last=False)
    assert folded is not generator
    assert n_norms == 27  # 3 per residual block (conv1, conv2, shortcut), 9 blocks
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in generator.modules())  # the original is untouched
    hu = _hu()
    plain = Denoiser(generator).denoise(hu)
    fast = Denoiser(generator, fold_bn=True).denoise(hu)
    assert np.abs(plain - hu).mean() > 1  # the network really changes the image
    assert np.abs(fast - plain).max() <= FP32_ATOL_HU
    with pytest.raises(BackendError, match="training mode"):
        fold_batch_norm(AttentionResUNet(**TINY).train())


def test_channels_last_and_folding_together_match_the_plain_path():
    generator = _generator(seed=1)
    hu = _hu(seed=1)
    plain = Denoiser(generator).denoise(hu)
    cl = Denoiser(generator, channels_last=True)
    conv = next(m for m in cl.network.module.modules() if isinstance(m, nn.Conv2d) and m.in_channels > 1)
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert not conv.weight.is_contiguous()
    assert np.abs(cl.denoise(hu) - plain).max() <= FP32_ATOL_HU
    both = Denoiser(generator, fold_bn=True, channels_last=True, batch_size=2).denoise(hu)
    assert np.abs(both - plain).max() <= FP32_ATOL_HU
    tiled = Denoiser(generator, fold_bn=True, channels_last=True, tile=32, overlap=8).denoise(hu)
    tiled_plain = Denoiser(generator, tile=32, overlap=8).denoise(hu)
    assert np.abs(tiled - tiled_plain).max() <= FP32_ATOL_HU


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bf16_autocast_stays_close_to_float32(seed):
    generator = _generator(seed=seed)
    hu = _hu(seed=seed)
    plain = Denoiser(generator).denoise(hu)
    bf16 = Denoiser(generator, half="bf16", fold_bn=True, channels_last=True).denoise(hu)
    change = np.abs(plain - hu)
    diff = np.abs(bf16 - plain)
    assert diff.max() > 0  # really computed in bf16
    # bf16 keeps 8 significant bits (relative rounding 2**-9 per operation); the input skip x + conv(f)
    # stays float32 under autocast, so the error scales with the network's correction, not with the HU value.
    # On this tiny random net (batch norms with variances down to 0.3 amplify rounding) seeds 0-5 gave
    # 0.9-7.9 % of the largest correction at worst and 0.2-2.8 % on average; a float16 or float32 mix-up would
    # give about 0 or far more.
    assert diff.max() <= 0.10 * change.max()
    assert diff.mean() <= 0.04 * change.mean()


def test_onnxruntime_matches_torch_and_caches_the_export(onnx_cache):
    generator = _generator(seed=3)
    hu = _hu(seed=3)
    plain = Denoiser(generator).denoise(hu)
    ort = Denoiser(generator, backend="onnxruntime", batch_size=2)
    (cached,) = onnx_cache.glob("generator-*.onnx")
    # ONNX Runtime fuses batch norm itself and runs its own kernels: float32 rounding, as for folding
    assert np.abs(ort.denoise(hu) - plain).max() <= FP32_ATOL_HU
    mtime = cached.stat().st_mtime_ns
    again = Denoiser(generator, backend="onnxruntime")
    assert cached.stat().st_mtime_ns == mtime and again.network.path == cached  # reused, not re-exported
    other = _generator(seed=4)  # another checkpoint gets its own file
    Denoiser(other, backend="onnxruntime")
    assert len(list(onnx_cache.glob("generator-*.onnx"))) == 2
    with pytest.raises(InferenceError, match="exported from another checkpoint"):
        Denoiser(other, backend="onnxruntime", onnx_path=cached)
    with pytest.raises(InferenceError, match="no such ONNX file"):
        Denoiser(other, backend="onnxruntime", onnx_path=onnx_cache / "missing.onnx")
    with pytest.raises(InferenceError, match="backend torch"):
        Denoiser(other, backend="onnxruntime", half="bf16")
    with pytest.raises(InferenceError, match="backend"):
        Denoiser(other, backend="tensorrt")


def test_ordered_prefetch_keeps_order_bounds_read_ahead_and_raises_in_turn():
    started: list[int] = []
    lock = threading.Lock()

    def slow_square(x: int) -> int:
        with lock:
            started.append(x)
        time.sleep(0.001 * (x % 3))  # later items may finish first
        return x * x

    for k, value in enumerate(ordered_prefetch(slow_square, range(40), workers=3, ahead=4)):
        assert value == k * k
        assert len(started) <= k + 1 + 4  # never more than `ahead` items beyond the one consumed
    assert sorted(started) == list(range(40))

    def fails_at_5(x: int) -> int:
        if x == 5:
            raise ValueError("item 5")
        return x

    got = []
    with pytest.raises(ValueError, match="item 5"):
        for value in ordered_prefetch(fails_at_5, range(10), workers=2, ahead=3):
            got.append(value)
    assert got == [0, 1, 2, 3, 4]


def test_denoise_stream_equals_denoise_of_the_stack():
    generator = _generator(seed=5)
    hu = _hu(n=7, seed=5)
    denoiser = Denoiser(generator, batch_size=3)
    items = [(f"slice{i}", s) for i, s in enumerate(hu)]
    out = list(denoiser.denoise_stream(iter(items), image=lambda item: item[1]))
    assert [item[0] for item, _ in out] == [name for name, _ in items]
    np.testing.assert_array_equal(np.stack([y for _, y in out]), denoiser.denoise(hu))


@pytest.mark.parametrize("read_workers", [0, 2])
def test_streamed_series_equals_the_whole_volume_path(write_series, tmp_path, read_workers):
    src = write_series("in", n_slices=7, shape=SHAPE, pixel_representation=1, rescale_intercept=0.0)
    series = scan_dicom_folder(tmp_path / "in")[0]
    denoiser = Denoiser(_generator(seed=6), batch_size=3)
    folder = derived_series.write_denoised_series(
        series, denoiser, tmp_path / "out", " d", "test", progress=False, read_workers=read_workers
    )
    # reference: the whole series in memory at once, denoised in one call, through the inverse modality LUT
    expected = hu_to_stored(denoiser.denoise(read_series_hu(series)), 1.0, 0.0, signed=True)
    by_source = {str(pydicom.dcmread(p).SOPInstanceUID): i for i, p in enumerate(series.files)}
    written = {}
    for path in folder.iterdir():
        ds = pydicom.dcmread(path)
        written[by_source[str(ds.SourceImageSequence[0].ReferencedSOPInstanceUID)]] = ds.pixel_array
    assert sorted(written) == list(range(7))
    np.testing.assert_array_equal(np.stack([written[i] for i in range(7)]), expected)
    assert np.abs(expected - src.hu).mean() > 1


def test_cli_fast_paths_write_what_the_plain_path_writes(
    write_series, lightning_run, tmp_path, capsys, onnx_cache
):
    write_series("in", n_slices=3, shape=SHAPE, pixel_representation=1, rescale_intercept=0.0)
    ckpt = lightning_run("runs/fast", seed=7, **TINY).checkpoint
    volumes = {}
    for name, extra in {
        "plain": ["--plain"],
        "default": [],
        "onnx": ["--backend", "onnxruntime"],
        "bf16": ["--precision", "bf16"],
    }.items():
        out = tmp_path / f"out-{name}"
        argv = [tmp_path / "in", out, "-c", ckpt, "--batch-size", "2", *extra]
        rc = cli.main([str(a) for a in argv])
        err = capsys.readouterr().err
        assert rc == 0, err
        volumes[name] = read_series_hu(scan_dicom_folder(out)[0])
    change = np.abs(volumes["plain"] - read_series_hu(scan_dicom_folder(tmp_path / "in")[0]))
    assert change.mean() > 1
    # float32 paths: rounding to stored integers can flip at most one unit (1 HU at slope 1)
    for name in ("default", "onnx"):
        assert np.abs(volumes[name] - volumes["plain"]).max() <= 1.0, name
    assert np.abs(volumes["bf16"] - volumes["plain"]).max() <= 1.0 + 0.05 * change.max()
    rc = cli.main(
        [str(tmp_path / "in"), str(tmp_path / "o2"), "-c", str(ckpt), "--onnx", str(tmp_path / "x.onnx")]
    )
    assert rc == 2 and "--backend onnxruntime" in capsys.readouterr().err

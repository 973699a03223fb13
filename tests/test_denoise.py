"""Tests of ldct_lightning.inference (Denoiser, tiling) and the ldct-denoise command (DICOM in -> DICOM out)."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from pydicom.uid import ExplicitVRLittleEndian, RLELossless

from ldct_lightning import derived_series
from ldct_lightning.cli import denoise as cli
from ldct_lightning.data.dicom import read_series_hu, scan_dicom_folder
from ldct_lightning.inference import (
    Denoiser,
    InferenceError,
    ramp_window,
    tile_starts,
)
from ldct_lightning.models.generator import AttentionResUNet
from ldct_lightning.runs import Run

SECRET_ID = "SECRET-ID-4711"
SECRET_NAME = "Doe^Secretname"
SHAPE = (32, 32)
TINY = {"base_channels": 8}


def _generator(identity: bool = False, seed: int = 0) -> AttentionResUNet:
    torch.manual_seed(seed)
    return AttentionResUNet(**TINY, zero_init_output=identity).eval()


@pytest.fixture
def run_checkpoint(lightning_run):
    """Factory: a real Lightning checkpoint (tiny stage-1 fit) inside a run folder whose run_info.yaml names
    the tiny generator; ``run_checkpoint.generators[path]`` is the trained generator the file holds."""

    def _make(identity: bool = False, seed: int = 0) -> Path:
        trained = lightning_run(f"runs/run-{int(identity)}-{seed}", seed=seed, identity=identity, **TINY)
        _make.generators[trained.checkpoint] = trained.generator
        return trained.checkpoint

    _make.generators = {}
    return _make


def _run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _stored_range_hu(slope: float, intercept: float, signed: bool) -> tuple[float, float]:
    lo, hi = (-(2**15), 2**15 - 1) if signed else (0, 2**16 - 1)
    return lo * slope + intercept, hi * slope + intercept


# --- inference -------------------------------------------------------------------------------------------


def test_ramp_window_and_tile_starts_cover_the_image():
    w = ramp_window(6, 10, overlap=2)
    assert w.shape == (6, 10) and float(w.min()) > 0 and float(w.max()) == 1.0
    np.testing.assert_allclose(w[0, :4].numpy(), [1 / 9, 2 / 9, 1 / 3, 1 / 3], atol=1e-6)  # (1/3 ramp)^2
    for size, tile, overlap in [(64, 32, 8), (70, 32, 8), (32, 32, 8), (20, 32, 8), (100, 48, 16)]:
        starts = tile_starts(size, tile, overlap)
        covered = np.zeros(size, dtype=int)
        for s in starts:
            covered[s : s + tile] += 1
        assert covered.min() >= 1 and starts[-1] + min(tile, size) == size
        assert all(b - a <= tile - overlap for a, b in zip(starts, starts[1:], strict=False))


def test_identity_network_returns_the_input_for_numpy_and_torch():
    hu = np.random.default_rng(0).uniform(-1000, 2000, (3, *SHAPE)).astype(np.float32)
    denoiser = Denoiser(_generator(identity=True), batch_size=2)
    out = denoiser.denoise(hu)
    assert isinstance(out, np.ndarray) and out.shape == hu.shape and out.dtype == np.float32
    np.testing.assert_allclose(out, hu, atol=1e-2)
    single = denoiser(torch.from_numpy(hu[1]))
    assert isinstance(single, torch.Tensor) and single.shape == SHAPE
    np.testing.assert_allclose(single.numpy(), hu[1], atol=1e-2)
    single += 1  # a normal tensor, not an inference tensor
    with pytest.raises(InferenceError, match="shape"):
        denoiser.denoise(hu[None])


def test_batched_equals_one_by_one_and_matches_the_generator():
    hu = np.random.default_rng(1).uniform(-1000, 2000, (5, *SHAPE)).astype(np.float32)
    generator = _generator()
    batched = Denoiser(generator, batch_size=4).denoise(hu)
    single = np.stack([Denoiser(generator, batch_size=1).denoise(s) for s in hu])
    np.testing.assert_allclose(batched, single, atol=1e-2)
    with torch.no_grad():  # hand computation of the normalisation around the network
        x = torch.from_numpy((np.clip(hu, -1024, 3071) + 1024) / 4095)[:, None]
        expected = np.clip(generator(x)[:, 0].numpy(), 0, 1) * 4095 - 1024
    np.testing.assert_allclose(batched, expected, atol=1e-2)
    assert np.abs(batched - hu).mean() > 1  # a random network really changes the image


class _Overshoot(torch.nn.Module):
    """A network whose output leaves the [0, 1] domain on both sides: 3 x - 1."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 3 * x - 1


def test_output_is_clamped_to_the_hu_range_of_the_network_domain():
    # a residual network can put air below -1024 HU; the output is clipped like the targets and the validation
    hu = np.array([[-1024.0, -800.0, 0.0, 1000.0, 2500.0, 3071.0]], dtype=np.float32)
    out = Denoiser(_Overshoot()).denoise(hu)
    by_hand = np.clip(3 * (hu + 1024) / 4095 - 1, 0, 1) * 4095 - 1024
    np.testing.assert_allclose(out, by_hand, atol=1e-2)
    assert out.min() == pytest.approx(-1024, abs=1e-2) and out.max() == pytest.approx(3071, abs=1e-2)


def test_tiling_matches_whole_slices():
    hu = np.random.default_rng(2).uniform(-1000, 2000, (2, 64, 80)).astype(np.float32)
    identity = _generator(identity=True)
    np.testing.assert_allclose(
        Denoiser(identity, tile=32, overlap=8).denoise(hu), Denoiser(identity).denoise(hu), atol=1e-2
    )
    generator = _generator(seed=3)
    whole = Denoiser(generator).denoise(hu)
    tiled = Denoiser(generator, tile=48, overlap=16).denoise(hu)
    change = np.abs(whole - hu).mean()
    # tiles see less context at their borders; ramps keep the difference small against the network's change
    assert np.abs(tiled - whole).mean() < 0.02 * change
    assert np.abs(tiled - whole).max() < 0.5 * change
    with pytest.raises(InferenceError, match="tile"):
        Denoiser(generator, tile=16, overlap=16)


def test_half_precision_on_cpu():
    hu = np.random.default_rng(4).uniform(-1000, 2000, (2, *SHAPE)).astype(np.float32)
    generator = _generator()
    full = Denoiser(generator).denoise(hu)
    with pytest.warns(UserWarning, match="fp16"):  # fp16 is for GPUs: float32 on the CPU
        fp16 = Denoiser(generator, half=True)
    np.testing.assert_array_equal(fp16.denoise(hu), full)
    bf16 = Denoiser(generator, half="bf16").denoise(hu)  # CPU autocast: close, not equal
    assert np.abs(bf16 - full).mean() < 0.02 * np.abs(full - hu).mean()
    with pytest.raises(InferenceError, match="half"):
        Denoiser(generator, half="fp8")


def test_from_checkpoint_reads_run_info_and_checks_targets(run_checkpoint, tmp_path):
    ckpt = run_checkpoint()
    assert Run.of_checkpoint(ckpt).info_path == ckpt.resolve().parents[2] / "run_info.yaml"
    denoiser = Denoiser.from_checkpoint(ckpt)
    assert denoiser.generator_source == str(Run.of_checkpoint(ckpt).info_path)
    reference = run_checkpoint.generators[ckpt]  # the trained weights, not the initialisation
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(denoiser.generator.state_dict()[key], value)
    assert not denoiser.generator.training
    explicit = Denoiser.from_checkpoint(ckpt, generator_kwargs=TINY)
    assert explicit.generator_source == "generator_kwargs"
    with pytest.raises(InferenceError, match="not a class of ldct_lightning"):
        Denoiser.from_checkpoint(ckpt, generator_kwargs={"_target_": "os.system", "command": "true"})
    bare = tmp_path / "bare.ckpt"  # no run folder: default generator
    bare.write_bytes(ckpt.read_bytes())
    with pytest.raises(ValueError, match="shape mismatch"):
        Denoiser.from_checkpoint(bare)


def test_denoise_series_returns_one_volume_per_series(write_series, run_checkpoint, tmp_path):
    a = write_series("data/a", n_slices=2, shape=SHAPE, patient_id="P1")
    write_series("data/b", n_slices=3, shape=SHAPE, patient_id="P2", seed=1)
    results = Denoiser.from_checkpoint(run_checkpoint(identity=True)).denoise_series(tmp_path / "data")
    assert sorted(v.shape[0] for _, v in results) == [2, 3]
    series, volume = next((s, v) for s, v in results if s.n_slices == 2)
    np.testing.assert_allclose(volume, a.hu, atol=0.51)


# --- ldct-denoise ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("signed", "slope", "intercept"),
    [(False, 1.0, -1024.0), (True, 1.0, 0.0), (True, 0.5, -20.0)],
)
def test_cli_writes_derived_series(write_series, run_checkpoint, tmp_path, capsys, signed, slope, intercept):
    src = write_series(
        "in/s",
        n_slices=3,
        shape=SHAPE,
        patient_id=SECRET_ID,
        patient_name=SECRET_NAME,
        pixel_representation=int(signed),
        rescale_slope=slope,
        rescale_intercept=intercept,
        series_description="chest LD",
    )
    ckpt = run_checkpoint(seed=4)
    rc, out, err = _run_cli(
        [tmp_path / "in", tmp_path / "out", "--checkpoint", ckpt, "--batch-size", "2"], capsys
    )
    assert rc == 0, err
    for secret in (SECRET_ID, SECRET_NAME, "Secretname", src.spec.series_uid):
        assert secret not in out + err
    source = scan_dicom_folder(tmp_path / "in")[0]
    assert [p.name for p in (tmp_path / "out").iterdir()] == [source.series_key]
    assert "1 denoised, 0 skipped" in out and source.series_key in out

    outputs = sorted((tmp_path / "out" / source.series_key).iterdir())
    assert len(outputs) == 3
    sources = {str(pydicom.dcmread(p).SOPInstanceUID): pydicom.dcmread(p) for p in src.paths}
    new_sops, new_series = set(), set()
    for path in outputs:
        ds = pydicom.dcmread(path)
        ref = ds.SourceImageSequence[0].ReferencedSOPInstanceUID
        orig = sources[str(ref)]
        for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "SliceThickness"):
            assert list(np.atleast_1d(ds[keyword].value)) == list(np.atleast_1d(orig[keyword].value)), keyword
        for keyword in ("StudyInstanceUID", "PatientID", "FrameOfReferenceUID", "RescaleSlope", "KVP"):
            assert ds.get(keyword) == orig.get(keyword), keyword
        assert ds.SOPInstanceUID != orig.SOPInstanceUID
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert ds.SeriesInstanceUID != orig.SeriesInstanceUID
        assert list(ds.ImageType[:2]) == ["DERIVED", "SECONDARY"]
        assert ds.SeriesDescription == "chest LD denoised"
        assert "ldct-lightning" in ds.DerivationDescription
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert ds.PixelRepresentation == int(signed)
        new_sops.add(ds.SOPInstanceUID)
        new_series.add(ds.SeriesInstanceUID)
    assert len(new_sops) == 3 and len(new_series) == 1

    # HU written == model output (clipped to the stored range) within one stored unit
    expected = Denoiser.from_checkpoint(ckpt).denoise(read_series_hu(source))
    lo, hi = _stored_range_hu(slope, intercept, signed)
    written = read_series_hu(scan_dicom_folder(tmp_path / "out")[0])
    assert np.abs(expected - read_series_hu(source)).mean() > 1  # the network changed the image
    assert np.abs(written - np.clip(expected, lo, hi)).max() <= slope + 1e-3


def test_identity_network_reproduces_the_input_hu(write_series, run_checkpoint, tmp_path, capsys):
    src = write_series("in", n_slices=2, shape=SHAPE, rescale_slope=1.0, rescale_intercept=-1024.0)
    rc, _, err = _run_cli(
        [
            tmp_path / "in",
            tmp_path / "out",
            "-c",
            run_checkpoint(identity=True),
            "--tile",
            "16",
            "--overlap",
            "4",
        ],
        capsys,
    )
    assert rc == 0, err
    written = read_series_hu(scan_dicom_folder(tmp_path / "out")[0])
    np.testing.assert_allclose(written, src.hu, atol=1.0)


def test_compressed_source_gives_uncompressed_output(write_series, run_checkpoint, tmp_path, capsys):
    src = write_series("in", n_slices=2, shape=SHAPE)
    for path in src.paths:
        ds = pydicom.dcmread(path)
        ds.compress(RLELossless)
        ds.save_as(path)
    assert pydicom.dcmread(src.paths[0]).file_meta.TransferSyntaxUID == RLELossless
    rc, _, err = _run_cli([tmp_path / "in", tmp_path / "out", "-c", run_checkpoint(identity=True)], capsys)
    assert rc == 0, err
    for path in next((tmp_path / "out").iterdir()).iterdir():
        ds = pydicom.dcmread(path)
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert not ds["PixelData"].is_undefined_length  # native, not encapsulated
        assert len(ds.PixelData) == 2 * SHAPE[0] * SHAPE[1]
    written = read_series_hu(scan_dicom_folder(tmp_path / "out")[0])
    np.testing.assert_allclose(written, src.hu, atol=1.0)


def test_padding_pixels_stay_padding(write_series, run_checkpoint, tmp_path, capsys):
    hu = np.full((1, *SHAPE), 40.0)
    hu[0, :4] = -2000.0  # outside the field of view
    src = write_series("in", hu=hu, pixel_representation=1, rescale_intercept=0.0)
    ds = pydicom.dcmread(src.paths[0])
    ds.add_new("PixelPaddingValue", "SS", -2000)
    ds.save_as(src.paths[0])
    rc, _, err = _run_cli([tmp_path / "in", tmp_path / "out", "-c", run_checkpoint(seed=4)], capsys)
    assert rc == 0, err
    written = read_series_hu(scan_dicom_folder(tmp_path / "out")[0])
    assert (written[0, :4] == -2000).all() and (written[0, 4:] > -1100).all()


def test_overwrite_replaces_the_series(write_series, run_checkpoint, tmp_path, capsys):
    write_series("in", n_slices=2, shape=SHAPE)
    args = [tmp_path / "in", tmp_path / "out", "-c", run_checkpoint(identity=True)]
    assert _run_cli(args, capsys)[0] == 0
    (folder,) = (tmp_path / "out").iterdir()
    first_uid = pydicom.dcmread(next(folder.iterdir())).SeriesInstanceUID
    rc, _, err = _run_cli(args, capsys)
    assert rc == 2 and "--overwrite" in err
    assert _run_cli([*args, "--overwrite"], capsys)[0] == 0
    assert [p.name for p in (tmp_path / "out").iterdir()] == [folder.name]
    assert len(list(folder.iterdir())) == 2
    assert pydicom.dcmread(next(folder.iterdir())).SeriesInstanceUID != first_uid


def test_interrupted_run_leaves_nothing_half_written(
    write_series, run_checkpoint, tmp_path, capsys, monkeypatch
):
    write_series("in", n_slices=3, shape=SHAPE)
    calls = []
    real_save = derived_series.save_atomic

    def flaky_save(ds, path):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real_save(ds, path)

    monkeypatch.setattr(derived_series, "save_atomic", flaky_save)
    rc, _, err = _run_cli(
        [tmp_path / "in", tmp_path / "out", "-c", run_checkpoint(), "--batch-size", "1"], capsys
    )
    assert rc == 130 and "interrupted" in err and "Traceback" not in err
    assert list((tmp_path / "out").iterdir()) == []  # neither the series nor its temporary folder


def _empty_input(tmp_path, write_series):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "sub").mkdir()


def _no_ct(tmp_path, write_series):
    write_series("in/mr", n_slices=1, shape=SHAPE, modality="MR")
    (tmp_path / "in" / "notes.txt").write_text("not DICOM")


def _output_not_empty(tmp_path, write_series):
    write_series("in", n_slices=1, shape=SHAPE)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")


def _corrupt_header(tmp_path, write_series):
    src = write_series("in", n_slices=2, shape=SHAPE)
    src.paths[0].write_bytes(src.paths[0].read_bytes()[:300])  # cut inside the header


def _truncated_pixels(tmp_path, write_series):
    src = write_series("in", n_slices=2, shape=SHAPE)
    src.paths[1].write_bytes(src.paths[1].read_bytes()[:-500])


def _output_inside_input(tmp_path, write_series):
    write_series("in", n_slices=1, shape=SHAPE)
    return ["in/out"]


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (_empty_input, "holds no file"),
        (_no_ct, "no DICOM CT image"),
        (_output_not_empty, "not empty"),
        (_corrupt_header, "truncated"),
        (_truncated_pixels, "1 of 1 series not denoised"),
        (_output_inside_input, "inside INPUT"),
    ],
)
def test_bad_input_gives_one_line_and_exit_code_2(
    setup, message, write_series, run_checkpoint, tmp_path, capsys
):
    ckpt = run_checkpoint()
    secret_series = functools.partial(write_series, patient_id=SECRET_ID, patient_name=SECRET_NAME)
    out = setup(tmp_path, secret_series) or ["out"]
    # positive control: the input files carry the identifiers whose absence from the output is checked
    inputs = [f for f in (tmp_path / "in").rglob("*") if f.is_file()]
    assert setup is _empty_input or any(SECRET_ID.encode() in f.read_bytes() for f in inputs)
    assert setup is _empty_input or any(b"Secretname" in f.read_bytes() for f in inputs)
    rc, stdout, err = _run_cli([tmp_path / "in", tmp_path / out[0], "-c", ckpt], capsys)
    assert rc == 2
    assert "Traceback" not in err + stdout
    errors = [line for line in err.splitlines() if line.startswith("ldct-denoise: error:")]
    assert len(errors) == 1 and message in errors[0], err
    for secret in (SECRET_ID, "Secretname"):
        assert secret not in err + stdout


def test_bad_checkpoint_and_device_give_exit_code_2(write_series, run_checkpoint, tmp_path, capsys):
    write_series("in", n_slices=1, shape=SHAPE)
    rc, _, err = _run_cli([tmp_path / "in", tmp_path / "out", "-c", tmp_path / "missing.ckpt"], capsys)
    assert rc == 2 and "no such checkpoint" in err and "Traceback" not in err
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    rc, _, err = _run_cli([tmp_path / "in", tmp_path / "out", "-c", bad], capsys)
    assert rc == 2 and str(bad) in err and len(err.strip().splitlines()) == 1
    if not torch.cuda.is_available():
        ckpt = run_checkpoint()
        rc, _, err = _run_cli([tmp_path / "in", tmp_path / "out", "-c", ckpt, "--device", "cuda"], capsys)
        assert rc == 2 and "no CUDA device" in err

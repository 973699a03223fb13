"""Tests of the built-in synthetic data set (tiny preset): layout, DICOM, noise level and texture, pose."""

from __future__ import annotations

import csv
import dataclasses
import json
from collections import defaultdict
from pathlib import Path

import matplotlib.image
import numpy as np
import pydicom
import pytest

from ldct_lightning.cli.simulate import main as simulate_main
from ldct_lightning.data import synthetic
from ldct_lightning.data.synthetic import LABELS, PRESETS, generate_dataset, liver_noise_sd, simulate_patient
from ldct_lightning.privacy import hash_identifier

TINY = PRESETS["tiny"]


def _read_series(root: Path) -> dict[str, list[pydicom.Dataset]]:
    """All DICOM files under root grouped by SeriesInstanceUID, each sorted by slice position."""
    series: dict[str, list[pydicom.Dataset]] = defaultdict(list)
    for path in (root / "dicom").rglob("*.dcm"):
        ds = pydicom.dcmread(path)
        series[ds.SeriesInstanceUID].append(ds)
    return {
        uid: sorted(files, key=lambda d: float(d.ImagePositionPatient[2])) for uid, files in series.items()
    }


def _hu(files: list[pydicom.Dataset]) -> np.ndarray:
    return np.stack([d.pixel_array * float(d.RescaleSlope) + float(d.RescaleIntercept) for d in files])


@pytest.fixture(scope="module")
def dataset(tiny_dataset: Path) -> dict:
    manifest = list(csv.DictReader((tiny_dataset / "manifest.csv").open()))
    return {
        "root": tiny_dataset,
        "summary": json.loads((tiny_dataset / "summary.json").read_text()),
        "manifest": {row["series_uid"]: row for row in manifest},
        "series": _read_series(tiny_dataset),
    }


def test_layout_manifest_and_labels(dataset: dict, tmp_path: Path) -> None:
    # a fresh set: the shared one also holds the split and cache that other tests' DataModules write into it
    root = tmp_path / "fresh"
    generate_dataset(root, PRESETS["tiny"], progress=False)
    assert sorted(p.name for p in root.iterdir()) == [
        ".ldct-pseudonym.key",  # the secret of the keys (ldct_lightning.privacy)
        "dicom",
        "labels.json",
        "manifest.csv",
        "overview.png",
        "summary.json",
        "truth",
    ]
    assert json.loads((root / "labels.json").read_text()) == {str(k): v for k, v in LABELS.items()}
    assert LABELS[1] == "heart" and LABELS[2] == "liver" and LABELS[10] == "table"
    assert set(dataset["manifest"]) == set(dataset["series"])
    roles = sorted(row["role"] for row in dataset["manifest"].values())
    assert roles == ["ldct"] * TINY.n_patients + ["ndct"] * TINY.n_patients
    assert all(row["aligned"] == "false" for row in dataset["manifest"].values())
    assert len(list((root / "truth").glob("*.npz"))) == TINY.n_patients
    # file names and folders carry no information: several folders, each mixing series
    folders = {p.parent for p in (root / "dicom").rglob("*.dcm")}
    assert len(folders) > 1
    assert matplotlib.image.imread(root / "overview.png").ndim == 3


def test_dicom_tags_and_truth_match_series(dataset: dict) -> None:
    root = dataset["root"]
    by_patient = defaultdict(dict)
    for uid, files in dataset["series"].items():
        by_patient[files[0].PatientID][dataset["manifest"][uid]["role"]] = files
    assert sorted(by_patient) == [f"SYN-{i:04d}" for i in range(1, TINY.n_patients + 1)]
    for patient_id, roles in by_patient.items():
        ld, nd = roles["ldct"], roles["ndct"]
        # the LDCT is a second study: its own scan range (up to scan_range_slices more or fewer at each end)
        assert len(nd) == TINY.n_slices
        assert abs(len(ld) - TINY.n_slices) <= 2 * TINY.scan_range_slices
        for files in (ld, nd):
            assert len({d.SeriesInstanceUID for d in files}) == 1
            ds = files[0]
            assert ds.Modality == "CT" and float(ds.KVP) == 120.0
            assert [float(v) for v in ds.PixelSpacing] == pytest.approx([TINY.pixel_mm] * 2)
            assert ds.Rows == ds.Columns == TINY.image_size
            assert str(ds.PatientName).startswith("SYNTHETIC^")
        assert 1.0 <= float(ld[0].CTDIvol) <= 2.0 and 20 <= int(ld[0].XRayTubeCurrent) <= 80
        assert 6.0 <= float(nd[0].CTDIvol) <= 20.0 and 150 <= int(nd[0].XRayTubeCurrent) <= 500
        assert ld[0].StudyInstanceUID != nd[0].StudyInstanceUID  # different days
        assert ld[0].FrameOfReferenceUID != nd[0].FrameOfReferenceUID  # and table positions
        truth = np.load(root / "truth" / f"{hash_identifier(patient_id, root)}.npz")
        assert truth["clean_ld"].shape == truth["labels_ld"].shape == _hu(ld).shape
        assert (
            truth["clean_nd"].shape == truth["labels_nd"].shape == truth["lowdose_nd"].shape == _hu(nd).shape
        )
        np.testing.assert_allclose(truth["z_ld"], [float(d.ImagePositionPatient[2]) for d in ld], atol=1e-3)
        np.testing.assert_allclose(truth["z_nd"], [float(d.ImagePositionPatient[2]) for d in nd], atol=1e-3)


def test_written_hu_within_one_unit(dataset: dict) -> None:
    scans = {f"SYN-{i + 1:04d}": simulate_patient(TINY, i) for i in range(TINY.n_patients)}
    for uid, files in dataset["series"].items():
        scan = scans[files[0].PatientID]
        expected = scan.ldct if dataset["manifest"][uid]["role"] == "ldct" else scan.ndct
        written = _hu(files)
        expected = np.clip(expected, -1024, None)  # unsigned storage with intercept -1024
        assert np.abs(written - expected).max() <= 0.5 + 1e-3


def _liver_sd(noisy: np.ndarray, clean: np.ndarray, labels: np.ndarray) -> float:
    """SD of noisy - clean in the liver, eroded in-plane by 5 mm (4-connected), written out here."""
    mask = labels == 2
    for _ in range(round(5.0 / TINY.pixel_mm)):
        inner = mask.copy()
        inner[:, 1:, :] &= mask[:, :-1, :]
        inner[:, :-1, :] &= mask[:, 1:, :]
        inner[:, :, 1:] &= mask[:, :, :-1]
        inner[:, :, :-1] &= mask[:, :, 1:]
        inner[:, [0, -1], :] = False
        inner[:, :, [0, -1]] = False
        mask = inner
    assert mask.sum() > 100
    return float(np.std((noisy - clean)[mask]))


def _abdomen_psnr(image: np.ndarray, clean: np.ndarray) -> float:
    """PSNR in the C40/W400 window, data range 1, by hand."""
    window = lambda hu: np.clip((hu + 160.0) / 400.0, 0.0, 1.0)  # noqa: E731
    return float(10 * np.log10(1.0 / np.mean((window(image) - window(clean)) ** 2)))


def test_noise_levels_in_preset_band(dataset: dict) -> None:
    """The noise measured on the written DICOM against the truth files, not the numbers the simulator reports."""
    root, summary = dataset["root"], dataset["summary"]
    reported = {p["patient_key"]: p for p in summary["patients"]}
    measured = defaultdict(dict)
    for uid, files in dataset["series"].items():
        role = dataset["manifest"][uid]["role"]
        key = hash_identifier(files[0].PatientID, root)
        truth = np.load(root / "truth" / f"{key}.npz")
        clean, labels = (
            (truth["clean_ld"], truth["labels_ld"])
            if role == "ldct"
            else (truth["clean_nd"], truth["labels_nd"])
        )
        measured[key][f"sd_{role}"] = _liver_sd(_hu(files), clean, labels)
        measured[key][f"psnr_{role}"] = _abdomen_psnr(_hu(files), clean)
        if role == "ndct":  # the same pose as the NDCT at 1/8 of its dose, kept in the truth file
            measured[key]["sd_lowdose_nd"] = _liver_sd(truth["lowdose_nd"], clean, labels)
    assert sorted(measured) == sorted(reported) and len(measured) == TINY.n_patients
    for key, m in measured.items():
        assert 30.0 <= m["sd_ldct"] <= 60.0 and 8.0 <= m["sd_ndct"] <= 15.0, m
        # the same pose and the same tube current at 1/8 of the dose: SD ratio sqrt(8)
        assert m["sd_lowdose_nd"] / m["sd_ndct"] == pytest.approx(np.sqrt(8), rel=0.2)
        assert m["sd_ldct"] / m["sd_ndct"] == pytest.approx(np.sqrt(8), rel=0.25)
        assert 24.0 <= m["psnr_ldct"] <= 32.0 and m["psnr_ndct"] > m["psnr_ldct"] + 6, m
        # what summary.json reports is what is on disk (the DICOM stores whole HU: +-0.5 rounding)
        r = reported[key]
        assert r["noise_sd_ldct"] == pytest.approx(m["sd_ldct"], rel=0.02)
        assert r["noise_sd_ndct"] == pytest.approx(m["sd_ndct"], rel=0.02)
        assert r["noise_sd_lowdose_nd"] == pytest.approx(m["sd_lowdose_nd"], rel=1e-6)
        assert r["psnr_ldct_abdomen"] == pytest.approx(m["psnr_ldct"], abs=0.05)
    assert summary["noise_sd_ldct_mean"] == pytest.approx(
        np.mean([m["sd_ldct"] for m in measured.values()]), rel=0.02
    )
    assert summary["config"]["n_patients"] == TINY.n_patients
    assert summary["seconds_total"] > 0


def test_noise_is_spatially_correlated(dataset: dict) -> None:
    root = dataset["root"]
    for uid, files in dataset["series"].items():
        if dataset["manifest"][uid]["role"] != "ldct":
            continue
        truth = np.load(root / "truth" / f"{hash_identifier(files[0].PatientID, root)}.npz")
        noise = _hu(files) - truth["clean_ld"]
        body = truth["labels_ld"] > 0
        body[:, :, :-1] &= body[:, :, 1:]
        a, b = noise[:, :, :-1][body[:, :, :-1]], noise[:, :, 1:][body[:, :, :-1]]
        assert np.corrcoef(a, b)[0, 1] > 0.3  # white noise would give ~0
        # the noise power spectrum is not flat: mid frequencies dominate the highest ones
        nps = (
            np.abs(np.fft.fftshift(np.fft.fft2(noise - noise.mean(axis=(1, 2), keepdims=True)))) ** 2
        ).mean(0)
        n = nps.shape[0]
        f = np.hypot(*np.meshgrid(np.arange(n) - n // 2, np.arange(n) - n // 2)) / n
        assert nps[(f > 0.1) & (f < 0.25)].mean() > 3 * nps[f > 0.45].mean()


def test_ldct_is_misaligned_and_aligned_without_misalignment(dataset: dict) -> None:
    scan = simulate_patient(dataclasses.replace(TINY, scan_range_slices=0), 1)  # same slice count
    body = (scan.labels_nd > 0) | (scan.labels_ld > 0)
    rms = np.sqrt(np.mean((scan.clean_ld - scan.clean_nd)[body] ** 2))
    assert rms > 3 * liver_noise_sd(scan.ndct, scan.clean_nd, scan.labels_nd, TINY.pixel_mm)
    assert not np.array_equal(scan.z_ld, scan.z_nd)
    aligned = simulate_patient(dataclasses.replace(TINY, misalignment=0.0), 1)
    np.testing.assert_allclose(aligned.clean_ld, aligned.clean_nd, atol=1e-2)
    assert (aligned.labels_ld == aligned.labels_nd).all()


def test_phantom_contents(dataset: dict) -> None:
    truth = [np.load(p) for p in sorted((dataset["root"] / "truth").glob("*.npz"))]
    labels = np.concatenate([t["labels_nd"] for t in truth])
    clean = np.concatenate([t["clean_nd"] for t in truth])
    for name in ("heart", "liver", "spleen", "muscle", "fat", "lung", "bone", "table"):
        label = next(k for k, v in LABELS.items() if v == name)
        assert (labels == label).any(), name
    liver = clean[labels == 2]
    assert 30.0 < np.median(liver) < 80.0
    assert np.median(clean[labels == 6]) < -600.0
    assert np.percentile(clean[labels == 7], 90) > 200.0  # blurred at 5.6 mm pixels, still bright


def test_seeded_reproducibility() -> None:
    small = dataclasses.replace(TINY, n_slices=2)
    a, b = simulate_patient(small, 0), simulate_patient(small, 0)
    for field in ("clean_ld", "clean_nd", "ldct", "ndct", "lowdose_nd", "labels_ld", "z_ld"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    c = simulate_patient(dataclasses.replace(small, seed=1), 0)
    assert not np.array_equal(a.clean_nd, c.clean_nd)
    assert not np.array_equal(a.ldct, c.ldct)


def test_cli_refuses_to_overwrite_and_runs(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert simulate_main([str(out), "--preset", "tiny", "--patients", "1", "--slices", "1", "--quiet"]) == 2
    assert "overwrite" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    args = [str(out), "--preset", "tiny", "--patients", "1", "--slices", "2", "--size", "48", "--quiet"]
    assert simulate_main([*args, "--overwrite", "--seed", "3"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["image_size"] == 48 and summary["config"]["seed"] == 3
    assert not (out / "keep.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folders left


def test_regenerating_with_a_seed_gives_the_same_patient_keys(tmp_path: Path) -> None:
    """Synthetic keys are HMAC-SHA256 of the patient ID under sha256 of the seed's phrase (hand computation)."""
    import hashlib
    import hmac

    args = ["--preset", "tiny", "--patients", "2", "--slices", "2", "--size", "48", "--quiet"]
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        assert simulate_main([str(tmp_path / name), *args, "--seed", str(seed)]) == 0

    def keys(name: str) -> list[str]:
        return sorted(p.stem for p in (tmp_path / name / "truth").glob("*.npz"))

    secret = hashlib.sha256(b"ldct-lightning synthetic data, seed 0").digest()
    expected = sorted(
        hmac.new(secret, f"SYN-{i:04d}".encode(), hashlib.sha256).hexdigest()[:12] for i in (1, 2)
    )
    assert keys("a") == keys("b") == expected
    assert not set(keys("c")) & set(expected)


def test_interrupted_run_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(out: Path, *args: object) -> dict:
        (out / "dicom" / "partial.dcm").parent.mkdir(parents=True)
        (out / "dicom" / "partial.dcm").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(synthetic, "_generate", boom)
    with pytest.raises(KeyboardInterrupt):
        generate_dataset(tmp_path / "data", TINY, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_bad_config_names_the_key() -> None:
    with pytest.raises(ValueError, match="n_views"):
        dataclasses.replace(TINY, n_views=90).validate()
    with pytest.raises(ValueError, match="dose_ratio"):
        dataclasses.replace(TINY, dose_ratio=2.0).validate()
    with pytest.raises(ValueError, match="kernels"):
        dataclasses.replace(TINY, kernels=("bone",)).validate()
    with pytest.raises(ValueError, match="habitus"):
        dataclasses.replace(TINY, habitus=(1.2, 0.9)).validate()
    with pytest.raises(ValueError, match="dose_ratio_max"):
        dataclasses.replace(TINY, dose_ratio_max=0.05).validate()


def test_a_preset_without_variety_draws_the_old_protocol() -> None:
    """The variety options draw from their own stream: presets without them keep their data."""
    for i in range(3):
        assert synthetic.draw_protocol(TINY, i) == synthetic.Protocol()


def test_protocol_variety_stays_in_the_preset_ranges() -> None:
    cfg = dataclasses.replace(
        TINY,
        kernels=("hann", "ramp"),
        dose_ratio=0.1,
        dose_ratio_max=0.2,
        habitus=(0.9, 1.1),
        dicom_variety=True,
    )
    protocols = [synthetic.draw_protocol(cfg, i) for i in range(40)]
    assert {p.kernel for p in protocols} == {"hann", "ramp"}
    assert all(0.1 <= p.dose_ratio <= 0.2 and 0.9 <= p.habitus <= 1.1 for p in protocols)
    storages = {p.storage_ldct for p in protocols} | {p.storage_ndct for p in protocols}
    assert len(storages) >= 4
    # unsigned pixels cannot hold air (-1000 HU) with intercept 0
    assert all(s.signed or s.intercept == -1024.0 for s in storages)
    assert protocols == [synthetic.draw_protocol(cfg, i) for i in range(40)]  # deterministic


def test_exposure_profile_by_hand() -> None:
    """Bowtie exp(-2 (t/250)^2) across the detector; view modulation sqrt(attenuation), mean 1."""
    import torch

    n_views, n_det, pixel = 8, 301, 1.2
    loss = torch.linspace(2.0, 6.0, n_views)  # per-view line integral through the centre
    sino = loss[None, :, None].expand(1, n_views, n_det)
    profile = synthetic.exposure_profile(sino, pixel).numpy()
    t = (np.arange(n_det) - 150) * pixel
    modulation = np.exp(loss.numpy() / 2)
    expected = (modulation / modulation.mean())[:, None] * np.exp(-2 * (t / 250) ** 2)[None, :]
    np.testing.assert_allclose(profile, expected, rtol=1e-6)
    assert profile[:, 150].mean() == pytest.approx(1.0)


def test_sharp_kernel_is_noisier_and_tagged(tmp_path: Path) -> None:
    cfg = dataclasses.replace(TINY, n_patients=1, kernels=("ramp",))
    smooth, sharp = simulate_patient(TINY, 0), simulate_patient(cfg, 0)
    sd_smooth = liver_noise_sd(smooth.ldct, smooth.clean_ld, smooth.labels_ld, TINY.pixel_mm)
    sd_sharp = liver_noise_sd(sharp.ldct, sharp.clean_ld, sharp.labels_ld, TINY.pixel_mm)
    assert sd_sharp > 1.3 * sd_smooth
    generate_dataset(tmp_path / "d", cfg, progress=False)
    kernels = {ds.ConvolutionKernel for files in _read_series(tmp_path / "d").values() for ds in files}
    assert kernels == {synthetic.KERNELS["ramp"]}


def test_dicom_variety_decodes_to_the_same_hu(tmp_path: Path) -> None:
    """Every storage convention, read back by pydicom with its rescale tags, gives the simulated HU."""
    cfg = dataclasses.replace(TINY, n_patients=3, dicom_variety=True)
    generate_dataset(tmp_path / "d", cfg, progress=False)
    scans = {f"SYN-{i + 1:04d}": simulate_patient(cfg, i) for i in range(cfg.n_patients)}
    manifest = {r["series_uid"]: r["role"] for r in csv.DictReader((tmp_path / "d" / "manifest.csv").open())}
    seen = set()
    for uid, files in _read_series(tmp_path / "d").items():
        ds = files[0]
        seen.add((int(ds.PixelRepresentation), float(ds.RescaleIntercept), ds.original_encoding[0]))
        scan = scans[ds.PatientID]
        expected = scan.ldct if manifest[uid] == "ldct" else scan.ndct
        if int(ds.PixelRepresentation) == 0:  # unsigned with intercept -1024 cannot go below -1024 HU
            expected = np.clip(expected, -1024, None)
        assert np.abs(_hu(files) - expected).max() <= 0.5 + 1e-3
    assert len(seen) >= 2


def test_habitus_changes_the_fat_not_the_organs() -> None:
    """A factor f scales the body's semi-axes by f (area ~ f^2), the cavity stays."""
    from ldct_lightning.data import phantom

    rng = np.random.default_rng(5)
    anatomy = phantom.random_anatomy(rng)
    large = phantom.with_habitus(anatomy, 1.1)
    assert large.body_a == pytest.approx(1.1 * anatomy.body_a)
    assert large.body_a - large.fat_side == pytest.approx(anatomy.body_a - anatomy.fat_side)
    assert large.fat_front - large.fat_back == pytest.approx(anatomy.fat_front - anatomy.fat_back)
    slim = phantom.with_habitus(anatomy, 0.7)
    assert min(slim.fat_side, slim.fat_front, slim.fat_back) >= 3.0 - 1e-9
    hu0, lab0 = phantom.render_slices(anatomy, [-60.0], 128, 2.8)
    hu1, lab1 = phantom.render_slices(large, [-60.0], 128, 2.8)
    area0, area1 = int((hu0 > -500).sum()), int((hu1 > -500).sum())
    assert area1 / area0 == pytest.approx(1.21, rel=0.08)  # the table is outside the body and small
    assert int((lab0 == phantom.LIVER).sum()) == int((lab1 == phantom.LIVER).sum())
    # the chest widens the body by a share of its size, which moves the ribs a little
    assert int((lab1 == phantom.BONE).sum()) == pytest.approx(int((lab0 == phantom.BONE).sum()), rel=0.1)


def test_trabecular_bone_mean_and_network() -> None:
    """The network's mean HU is the bone's (the Gaussian-field fill fraction, erf(w / sqrt 2)), with fine
    structure: a large SD inside the marrow at a few-mm scale."""
    import math

    import torch

    from ldct_lightning.data import phantom

    rng = np.random.default_rng(3)
    anatomy = phantom.random_anatomy(rng)
    anatomy.trabecular_k, anatomy.trabecular_phase = phantom.random_trabecular(rng)
    points = torch.as_tensor(np.random.default_rng(4).uniform(-200, 200, (3, 200_000)), dtype=torch.float32)
    hu = phantom.trabecular_bone(anatomy, *points, mean_hu=250.0).numpy()
    assert phantom.TRABECULAR_FILL == pytest.approx(math.erf(0.5 / math.sqrt(2)))
    assert hu.mean() == pytest.approx(250.0, rel=0.1)
    assert hu.min() >= phantom.MARROW_SPACE_HU - 1e-3 and hu.std() > 150.0
    again = phantom.trabecular_bone(anatomy, *points[:, :1000], mean_hu=250.0).numpy()
    np.testing.assert_array_equal(again, hu[:1000])

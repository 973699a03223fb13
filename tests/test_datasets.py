"""Datasets and noise models on small numpy volumes, checked against hand computations."""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from ldct_lightning.data.datasets import (
    EpochSampler,
    PairedDataset,
    PatientBatchSampler,
    PatientVolumes,
    SimulatedDataset,
    SliceDataset,
    UnalignedDataset,
    nearest_slices,
)
from ldct_lightning.data.noise import (
    GaussianNoise,
    ProjectionNoise,
    calibrate_photons,
    estimate_noise_sd_hu,
    simulation_sigma,
)
from ldct_lightning.data.normalize import HU_MAX, HU_MIN

RANGE = HU_MAX - HU_MIN


def to_hu(x: torch.Tensor) -> np.ndarray:
    return np.rint(x.numpy() * RANGE + HU_MIN)


def dihedral(a: np.ndarray) -> list[np.ndarray]:
    """The 8 flips/rotations by 90 degrees of a square image."""
    rots = [np.rot90(a, k) for k in range(4)]
    return rots + [r[:, ::-1] for r in rots]


def coded_volume(n: int = 3, size: int = 24, offset: int = 0) -> np.ndarray:
    """Every pixel a distinct HU value, so a crop reveals where it came from."""
    return (np.arange(n * size * size).reshape(n, size, size) % 4000 - 1000 + offset).astype(np.int16)


def find_crop(volume: np.ndarray, crop: np.ndarray) -> tuple[int, int, int, int]:
    """(slice, y, x, transform) of a (transformed) crop of ``volume``; raises when there is none."""
    s = crop.shape[0]
    for k in range(volume.shape[0]):
        for y in range(volume.shape[1] - s + 1):
            for x in range(volume.shape[2] - s + 1):
                for t, candidate in enumerate(dihedral(volume[k, y : y + s, x : x + s])):
                    if np.array_equal(candidate, crop):
                        return k, y, x, t
    raise AssertionError("the crop is not a (flipped/rotated) crop of the volume")


# ------------------------------------------------------------------------------------------ simulated


def test_simulated_target_is_the_clean_crop_and_input_has_sigma() -> None:
    volume = coded_volume()
    ds = SimulatedDataset(
        [PatientVolumes("p", ndct=volume)], GaussianNoise(0.0), crop_size=8, samples_per_epoch=20
    )
    transforms = set()
    for i in range(20):
        item = ds[i]
        assert item["input"].shape == item["target"].shape == (1, 8, 8)
        assert item["input"].dtype == torch.float32
        torch.testing.assert_close(item["input"], item["target"])  # sigma 0: identical crops
        transforms.add(find_crop(volume, to_hu(item["target"][0]))[3])
    assert len(transforms) > 1  # augmentation happened

    flat = np.full((4, 64, 64), 40, np.int16)
    ds = SimulatedDataset(
        [PatientVolumes("p", ndct=flat)], GaussianNoise(25.0), crop_size=32, samples_per_epoch=40
    )
    diffs = []
    for i in range(40):
        item = ds[i]
        np.testing.assert_array_equal(to_hu(item["target"]), 40)
        diffs.append(((item["input"] - item["target"]) * RANGE).numpy())
    diffs = np.concatenate(diffs)
    assert abs(diffs.std() - 25.0) < 0.5  # 40960 samples: SE of the SD ~0.09 HU
    assert abs(diffs.mean()) < 0.5


def test_crop_positions_cover_the_image_without_augment() -> None:
    volume = coded_volume(n=2, size=12)
    ds = SimulatedDataset(
        [PatientVolumes("p", ndct=volume)],
        GaussianNoise(0.0),
        crop_size=10,
        samples_per_epoch=60,
        augment=False,
    )
    found = {find_crop(volume, to_hu(ds[i]["target"][0])) for i in range(60)}
    assert {t for *_, t in found} == {0}
    assert {(k, y, x) for k, y, x, _ in found} == {
        (k, y, x) for k in range(2) for y in range(3) for x in range(3)
    }


def test_min_foreground_skips_air() -> None:
    volume = np.full((2, 64, 64), -1000, np.int16)
    volume[:, :, :16] = 40  # body in a quarter of the image: 9 of 49 crop columns hold >= 50 % body
    kwargs = {"crop_size": 16, "samples_per_epoch": 50, "augment": False}
    plain = SimulatedDataset([PatientVolumes("p", ndct=volume)], GaussianNoise(0.0), **kwargs)
    picky = SimulatedDataset(
        [PatientVolumes("p", ndct=volume)], GaussianNoise(0.0), min_foreground=0.5, max_tries=100, **kwargs
    )

    def body_fraction(ds):
        return [float((to_hu(ds[i]["target"]) > -500).mean()) for i in range(50)]

    assert min(body_fraction(plain)) == 0.0
    assert min(body_fraction(picky)) >= 0.5


# ------------------------------------------------------------------------------------------ unaligned


def test_unaligned_pairs_one_patient_at_similar_z() -> None:
    # HU encodes patient and slice: 1000 * patient + 10 * slice (+ 5 for NDCT)
    patients, z_ld, z_nd = [], np.arange(6) * 2.5, np.arange(15) * 1.0 + 0.4
    for p in range(3):
        ldct = (1000 * p + 10 * np.arange(6))[:, None, None] * np.ones((1, 20, 20))
        ndct = (1000 * p + 10 * np.arange(15) + 5)[:, None, None] * np.ones((1, 20, 20))
        patients.append(
            PatientVolumes(
                f"p{p}", ldct=ldct.astype(np.int16), ndct=ndct.astype(np.int16), z_ldct=z_ld, z_ndct=z_nd
            )
        )
    ds = UnalignedDataset(patients, crop_size=8, samples_per_epoch=200, z_tolerance_mm=1.0)
    expected_nd = [int(np.argmin(np.abs(z_nd - z))) for z in z_ld]  # hand: nearest NDCT slice
    seen = set()
    for i in range(200):
        item = ds[i]
        ld, nd = to_hu(item["ldct"]), to_hu(item["ndct"])
        assert len(np.unique(ld)) == len(np.unique(nd)) == 1
        p_ld, k_ld = divmod(int(ld.flat[0]), 1000)
        p_nd, rest = divmod(int(nd.flat[0]) - 5, 1000)
        assert p_ld == p_nd, "a pair mixed two patients"
        assert rest // 10 == expected_nd[k_ld // 10]
        assert abs(z_nd[rest // 10] - z_ld[k_ld // 10]) <= 1.0
        seen.add(p_ld)
    assert seen == {0, 1, 2}


def test_unaligned_without_z_overlap_fails_clearly() -> None:
    vol = np.zeros((3, 16, 16), np.int16)
    p = PatientVolumes("abc", ldct=vol, ndct=vol, z_ldct=[0, 1, 2], z_ndct=[100, 101, 102])
    with pytest.raises(ValueError, match="patient abc.*z_tolerance_mm"):
        UnalignedDataset([p], crop_size=8)


@pytest.mark.parametrize("cls", [UnalignedDataset, PairedDataset])
def test_flips_and_rotations_identical_on_both(cls) -> None:
    volume = coded_volume(size=16)
    p = PatientVolumes("p", ldct=volume, ndct=volume + 100, aligned=True)
    kwargs = {"xy_jitter": 0} if cls is UnalignedDataset else {}
    ds = cls([p], crop_size=8, samples_per_epoch=80, **kwargs)
    first, second = ds.keys
    transforms = set()
    for i in range(80):
        item = ds[i]
        np.testing.assert_array_equal(to_hu(item[second]) - to_hu(item[first]), 100)
        transforms.add(find_crop(volume, to_hu(item[first][0]))[3])
    assert transforms == set(range(8))


def test_paired_requires_aligned_studies() -> None:
    vol = np.zeros((2, 16, 16), np.int16)
    with pytest.raises(ValueError, match="not flagged aligned.*train_mode=unaligned"):
        PairedDataset([PatientVolumes("p", ldct=vol, ndct=vol)], crop_size=8)
    with pytest.raises(ValueError, match="slices or matrix size"):
        PairedDataset([PatientVolumes("p", ldct=vol, ndct=np.zeros((2, 20, 20)), aligned=True)], crop_size=8)


def test_crop_larger_than_image_fails_clearly() -> None:
    with pytest.raises(ValueError, match="crop_size=32 is larger than .*16x16"):
        SimulatedDataset([PatientVolumes("p", ndct=np.zeros((2, 16, 16)))], GaussianNoise(1.0), crop_size=32)


def test_nearest_slices_by_hand() -> None:
    idx, dist = nearest_slices(np.array([-5.0, 0.4, 0.6, 2.0, 9.0]), np.array([0.0, 1.0, 2.0]))
    np.testing.assert_array_equal(idx, [0, 0, 1, 2, 2])
    np.testing.assert_allclose(dist, [5.0, 0.4, 0.4, 0.0, 7.0])


# ------------------------------------------------------------------------------------------ randomness


def test_samples_are_deterministic_for_a_seed() -> None:
    p = PatientVolumes("p", ndct=coded_volume(size=32))

    def make(seed):
        return SimulatedDataset([p], GaussianNoise(10.0), crop_size=8, samples_per_epoch=16, seed=seed)

    a, b, c = make(1), make(1), make(2)
    torch.testing.assert_close(a[5], b[5])
    assert not torch.equal(a[5]["input"], c[5]["input"])
    assert not torch.equal(a[5]["input"], a[6]["input"])


def test_loader_is_the_same_for_any_worker_count_and_new_each_epoch() -> None:
    p = PatientVolumes("p", ndct=coded_volume(size=32))
    ds = SimulatedDataset([p], GaussianNoise(10.0), crop_size=8, samples_per_epoch=8, seed=3)

    def epochs(num_workers):
        sampler = EpochSampler(len(ds))
        loader = DataLoader(ds, batch_size=4, sampler=sampler, num_workers=num_workers)
        return [torch.cat([b["input"] for b in loader]) for _ in range(2)]

    single, multi = epochs(0), epochs(2)
    for a, b in zip(single, multi, strict=True):
        torch.testing.assert_close(a, b)
    assert not torch.equal(single[0], single[1])
    # the 8 samples of one epoch differ from each other
    assert len({tuple(x.flatten()[:8].tolist()) for x in single[0]}) == 8


def test_epoch_sampler_indices() -> None:
    sampler = EpochSampler(3)
    assert list(sampler) == [0, 1, 2]
    assert list(sampler) == [3, 4, 5]
    sampler.set_epoch(5)
    assert list(sampler) == [15, 16, 17]
    assert len(sampler) == 3


def test_memmap_volumes_pickle_as_their_location(tmp_path: Path) -> None:
    path = tmp_path / "v.npy"
    np.save(path, coded_volume(n=4, size=64))
    volume = np.load(path, mmap_mode="r")
    p = PatientVolumes("p", ndct=volume)
    blob = pickle.dumps(p)
    assert len(blob) < 2000  # not the 32 kB of data
    restored = pickle.loads(blob)
    assert isinstance(restored.ndct, np.memmap)
    np.testing.assert_array_equal(restored.ndct, volume)


# ------------------------------------------------------------------------------------------ slices


def test_slice_dataset_val_sources() -> None:
    flat = np.full((4, 16, 16), 40, np.int16)
    with_ref = PatientVolumes("r", ldct=flat + 7, ndct=flat, reference=flat.astype(np.float32) - 3)
    aligned = PatientVolumes("a", ldct=flat + 9, ndct=flat, aligned=True)
    plain = PatientVolumes("n", ldct=flat + 5, ndct=flat)
    ds = SliceDataset([with_ref, aligned, plain], "val", GaussianNoise(20.0), max_slices=6, seed=1)
    assert len(ds) == 6 and ds.patient_of_item == [0, 0, 1, 1, 2, 2]
    assert [k for _, _, k, _ in ds.items] == [0, 3, 0, 3, 0, 3]  # evenly spaced
    r, a, n = ds[0], ds[2], ds[4]
    np.testing.assert_array_equal(to_hu(r["input"]), 47)
    np.testing.assert_array_equal(to_hu(r["target"]), 37)
    np.testing.assert_array_equal(to_hu(a["input"]), 49)
    np.testing.assert_array_equal(to_hu(a["target"]), 40)
    np.testing.assert_array_equal(to_hu(n["target"]), 40)
    # white Gaussian noise of 20 HU on 256 pixels: the sample SD is 20 +- 0.9 (20 / sqrt(2 * 255)); 4 sigma here
    noise = ((n["input"] - n["target"]) * RANGE).double()
    assert float(noise.std()) == pytest.approx(20.0, abs=4 * 20.0 / math.sqrt(2 * 255))
    assert abs(float(noise.mean())) < 4 * 20.0 / 16  # zero mean: 4 standard errors
    torch.testing.assert_close(ds[4]["input"], n["input"])  # the simulated noise is the same in every epoch
    assert n["patient_key"] == "n" and n["slice_index"] == 0


def test_slice_dataset_eval_keys_and_labels() -> None:
    vol = np.zeros((3, 16, 16), np.int16)
    labels = np.zeros((3, 16, 16), np.uint8)
    labels[:, 4:8, 4:8] = 2
    p = PatientVolumes(
        "e",
        ldct=vol,
        ndct=vol + np.arange(5)[:, None, None][:3],
        z_ldct=[0, 1, 2],
        z_ndct=[0.1, 1.1, 2.1],
        reference=vol.astype(np.float32),
        labels=labels,
    )
    item = SliceDataset([p], "eval")[1]
    assert set(item) == {"input", "ndct", "reference", "labels", "patient_key", "slice_index"}
    assert item["labels"].dtype == torch.int64 and item["labels"].shape == (1, 16, 16)
    assert int(item["labels"].sum()) == 2 * 16
    np.testing.assert_array_equal(to_hu(item["ndct"]), 1)  # NDCT slice nearest to z=1
    no_truth = SliceDataset([PatientVolumes("x", ldct=vol, ndct=vol)], "eval")[0]
    assert set(no_truth) == {"input", "ndct", "patient_key", "slice_index"}


def test_patient_batch_sampler_never_mixes_patients() -> None:
    batches = list(PatientBatchSampler([0, 0, 0, 1, 1, 2], batch_size=2))
    assert batches == [[0, 1], [2], [3, 4], [5]]


# ------------------------------------------------------------------------------------------ noise


def test_gaussian_noise_numpy_and_torch() -> None:
    x = np.zeros((200, 200), np.float32)
    a = GaussianNoise(12.0)(x, np.random.default_rng(0))
    b = GaussianNoise(12.0)(x, np.random.default_rng(0))
    assert isinstance(a, np.ndarray)
    np.testing.assert_array_equal(a, b)
    assert abs(a.std() - 12.0) < 0.2
    t = GaussianNoise(12.0)(torch.zeros(200, 200), torch.Generator().manual_seed(0))
    assert isinstance(t, torch.Tensor) and abs(float(t.std()) - 12.0) < 0.2
    with pytest.raises(ValueError, match="sigma_hu"):
        GaussianNoise(-1.0)


def test_estimate_noise_sd_on_white_noise_and_masks_air() -> None:
    rng = np.random.default_rng(0)
    volume = 40 + rng.normal(0, 30, (4, 128, 128))
    volume[:, :, :48] = -1000  # air and an edge: ignored
    volume[:, :, 48:52] = 600
    assert abs(estimate_noise_sd_hu([volume]) - 30.0) < 0.6
    with pytest.raises(ValueError, match="noise.sigma_hu"):
        estimate_noise_sd_hu([np.full((2, 64, 64), -1000.0)])


def test_simulation_sigma_by_hand() -> None:
    assert simulation_sigma(50.0, 30.0) == pytest.approx(40.0)
    assert simulation_sigma(10.0, 12.0) == 0.0
    assert simulation_sigma(5.0, 0.0) == pytest.approx(5.0)


def test_projection_noise_is_reproducible_zero_mean_and_calibrates() -> None:
    image = np.full((32, 32), 40.0, np.float32)
    model = ProjectionNoise(photons_per_ray=1e4, n_views=32, pixel_mm=1.0)
    a = model(image, np.random.default_rng(0))
    b = model(image, np.random.default_rng(0))
    np.testing.assert_array_equal(a, b)
    noise = a - image
    assert abs(noise.mean()) < 0.3 * noise.std()
    # quantum noise: 4x the photons halves the SD
    big = ProjectionNoise(photons_per_ray=4e4, n_views=32, pixel_mm=1.0)
    stack = torch.full((8, 32, 32), 40.0)
    sd1 = float(model.noise_field(stack, torch.Generator().manual_seed(1)).std())
    sd4 = float(big.noise_field(stack, torch.Generator().manual_seed(1)).std())
    assert sd1 / sd4 == pytest.approx(2.0, rel=0.1)
    photons = calibrate_photons([stack[0]] * 4, target_sd_hu=15.0, n_views=32, pixel_mm=1.0)
    check = ProjectionNoise(photons, n_views=32, pixel_mm=1.0).noise_field(
        stack, torch.Generator().manual_seed(2)
    )
    assert float(check.std()) == pytest.approx(15.0, rel=0.1)


def test_gaussian_noise_scale_range_draws_log_uniform_sds() -> None:
    """Per call one SD, sigma * exp(U(log low, log high)): the SDs of many crops span the range, their
    log is uniform (mean = log-midpoint, by hand), and the default range is the plain model."""
    rng = np.random.default_rng(0)
    model = GaussianNoise(20.0, (0.5, 2.0))
    sds = np.array([np.std(model(np.zeros((64, 64), np.float32), rng)) for _ in range(400)])
    assert sds.min() == pytest.approx(10.0, rel=0.1) and sds.max() == pytest.approx(40.0, rel=0.1)
    assert np.mean(np.log(sds / 20.0)) == pytest.approx(0.0, abs=0.06)  # (log 0.5 + log 2) / 2 = 0
    a = GaussianNoise(20.0)(np.zeros((8, 8), np.float32), np.random.default_rng(1))
    b = GaussianNoise(20.0, (1.0, 1.0))(np.zeros((8, 8), np.float32), np.random.default_rng(1))
    np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="scale_range"):
        GaussianNoise(20.0, (2.0, 1.0))

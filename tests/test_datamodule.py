"""LDCTDataModule end to end on a tiny DICOM set: setup, one batch of each loader, config errors."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from pydicom.uid import generate_uid

from ldct_lightning.data.cache import SeriesCache
from ldct_lightning.data.datamodule import DataConfigError, LDCTDataModule
from ldct_lightning.data.dicom_write import CTSeriesSpec, write_ct_series
from ldct_lightning.data.normalize import HU_MAX, HU_MIN
from ldct_lightning.privacy import hash_identifier

SIZE, N_SLICES = 48, 5
ND_SD, LD_SD = 8.0, 32.0


def write_dataset(
    root: Path, n_patients: int = 4, truth: bool = False, subdir: str = "dicom", seed: int = 0
) -> dict[str, dict]:
    """Per patient a disc phantom (40 HU in air) as an NDCT (CTDIvol 12) and an LDCT (CTDIvol 1.5) series.

    The LDCT series sits 0.4 mm higher in z; with ``truth`` a ``truth/<patient_key>.npz`` holds the clean
    LDCT volume (40 HU, but 100 HU in a square ROI, label 2) like the synthetic data set.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:SIZE, :SIZE] - (SIZE - 1) / 2
    body = (yy**2 + xx**2) < (0.45 * SIZE) ** 2
    clean = np.where(body, 40.0, -1000.0)
    clean[10:18, 20:28] = 100.0
    labels = np.where(clean == 100.0, 2, 0).astype(np.uint8)
    out = {}
    for i in range(n_patients):
        pid = f"PAT-{i:03d}"
        z = {}
        study = generate_uid()  # one study, one frame of reference: z positions are comparable
        for role, sd, ctdi, dz in (("ndct", ND_SD, 12.0, 0.0), ("ldct", LD_SD, 1.5, 0.4)):
            volume = clean[None] + rng.normal(0, sd, (N_SLICES, SIZE, SIZE)) * body
            z[role] = np.arange(N_SLICES) * 1.25 + dz
            spec = CTSeriesSpec(
                patient_id=pid,
                ctdi_vol=ctdi,
                series_description=role,
                study_uid=study,
                extra={"FrameOfReferenceUID": study},
            )
            write_ct_series(volume, spec, z[role], root / subdir / pid / role)
        key = hash_identifier(pid, root)
        if truth:
            (root / "truth").mkdir(exist_ok=True)
            np.savez(
                root / "truth" / f"{key}.npz",
                clean_ld=np.repeat(clean[None], N_SLICES, 0).astype(np.float32),
                labels_ld=np.repeat(labels[None], N_SLICES, 0),
                z_ld=z["ldct"],
            )
        out[key] = {"patient_id": pid}
    return out


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny")
    write_dataset(root)
    return root


def make_dm(root: Path, tmp_path: Path, **kwargs) -> LDCTDataModule:
    args = {
        "root": root,
        "cache_dir": tmp_path / "cache",
        "split_file": tmp_path / "split.yaml",
        "n_val": 1,
        "n_test": 1,
        "crop_size": 32,
        "batch_size": 4,
        "val_batch_size": 2,
        "num_workers": 0,
        "samples_per_epoch": 8,
        "seed": 0,
    } | kwargs
    return LDCTDataModule(**args)


def first_batch(loader) -> dict:
    return next(iter(loader))


def test_simulated_end_to_end(dataset: Path, tmp_path: Path) -> None:
    dm = make_dm(dataset, tmp_path, noise={"kind": "gaussian", "sigma_hu": "auto"})
    dm.prepare_data()
    dm.setup("fit")
    dm.setup("test")
    assert len(dm.studies) == 4
    assert (len(dm.split.train), len(dm.split.val), len(dm.split.test)) == (2, 1, 1)
    train = first_batch(dm.train_dataloader())
    assert set(train) == {"input", "target"}
    assert train["input"].shape == train["target"].shape == (4, 1, 32, 32)
    assert train["input"].dtype == torch.float32
    assert 0.0 <= float(train["input"].min()) and float(train["input"].max()) <= 1.0

    # sigma auto = sqrt(LD^2 - ND^2) of the training series
    assert dm.noise_info["sigma_hu"] == pytest.approx(math.sqrt(LD_SD**2 - ND_SD**2), rel=0.1)

    val = first_batch(dm.val_dataloader())
    assert set(val) == {"input", "target", "patient_key", "slice_index"}
    assert val["input"].shape == (2, 1, SIZE, SIZE)
    assert set(val["patient_key"]) == set(dm.split.val)
    again = first_batch(dm.val_dataloader())
    torch.testing.assert_close(val["input"], again["input"])  # fixed-seed noise: same in every epoch

    test = first_batch(dm.test_dataloader())
    assert set(test) == {"input", "ndct", "patient_key", "slice_index"}
    assert test["ndct"].shape == (2, 1, SIZE, SIZE)
    assert set(test["patient_key"]) == set(dm.split.test)


def test_unaligned_and_paired_modes(dataset: Path, tmp_path: Path) -> None:
    dm = make_dm(dataset, tmp_path, train_mode="unaligned")
    dm.setup("fit")
    batch = first_batch(dm.train_dataloader())
    assert set(batch) == {"ldct", "ndct"} and batch["ldct"].shape == (4, 1, 32, 32)

    with pytest.raises(DataConfigError, match="data.train_mode='paired'.*not flagged aligned"):
        make_dm(dataset, tmp_path, train_mode="paired").setup("fit")
    dm = make_dm(dataset, tmp_path, train_mode="paired", aligned=True, split_file=tmp_path / "split2.yaml")
    dm.setup("fit")
    batch = first_batch(dm.train_dataloader())
    assert set(batch) == {"input", "target"}
    # aligned val without truth: LDCT slice i against NDCT slice i
    val = first_batch(dm.val_dataloader())
    diff = (val["input"] - val["target"]) * (HU_MAX - HU_MIN)
    assert 25 < float(diff.std()) < 45


def test_truth_gives_reference_targets_and_labels(tmp_path: Path) -> None:
    root = tmp_path / "data"
    write_dataset(root, n_patients=3, truth=True)
    dm = make_dm(root, tmp_path)
    dm.setup()
    val = first_batch(dm.val_dataloader())
    target_hu = val["target"][0, 0] * (HU_MAX - HU_MIN) + HU_MIN
    assert float(target_hu[SIZE // 2, SIZE // 2]) == pytest.approx(40.0, abs=0.01)
    assert float(target_hu[12, 22]) == pytest.approx(100.0, abs=0.01)
    test = first_batch(dm.test_dataloader())
    assert set(test) == {"input", "ndct", "reference", "labels", "patient_key", "slice_index"}
    assert test["labels"].dtype == torch.int64
    assert int((test["labels"][0] == 2).sum()) == 64


def test_truth_low_dose_trains_on_aligned_pairs_and_keeps_the_series_elsewhere(tmp_path: Path) -> None:
    """train_ldct=truth (the oracle): training LDCT = truth lowdose_nd, pixel-aligned with the NDCT."""
    root = tmp_path / "data"
    write_dataset(root, n_patients=3, truth=True)
    series = make_dm(root, tmp_path)
    series.setup("fit")
    for (
        key
    ) in series.split.train:  # planted: the NDCT volume + 100 HU, so input - target = 100 HU at every pixel
        truth = root / "truth" / f"{key}.npz"
        arrays = dict(np.load(truth))
        arrays["lowdose_nd"] = np.asarray(series._patients[key].ndct, dtype=np.float32) + 100.0
        np.savez(truth, **arrays)

    dm = make_dm(root, tmp_path, train_mode="paired", train_ldct="truth", min_foreground=0.5)
    dm.setup("fit")
    (key,) = dm.split.train
    patient = dm.patients("train")[0]
    assert patient.aligned and np.array_equal(patient.z_ldct, patient.z_ndct)
    batch = first_batch(dm.train_dataloader())
    diff_hu = (batch["input"] - batch["target"]) * (HU_MAX - HU_MIN)
    inside = batch["target"] * (HU_MAX - HU_MIN) + HU_MIN > -900  # away from the -1024 HU clip
    assert float(diff_hu[inside].min()) == pytest.approx(100.0, abs=0.1)
    assert float(diff_hu[inside].max()) == pytest.approx(100.0, abs=0.1)
    # validation keeps the real LDCT series
    (val_key,) = dm.split.val
    np.testing.assert_array_equal(dm._patients[val_key].ldct, series._patients[val_key].ldct)


def test_truth_low_dose_without_truth_files_names_the_key(dataset: Path, tmp_path: Path) -> None:
    with pytest.raises(DataConfigError, match=r"data\.train_ldct='truth'.*no such file.*ldct-simulate"):
        make_dm(dataset, tmp_path, train_mode="paired", train_ldct="truth").setup("fit")


def test_cache_is_reused_and_split_is_stable(dataset: Path, tmp_path: Path) -> None:
    first = make_dm(dataset, tmp_path)
    first.setup("fit")
    second = make_dm(dataset, tmp_path)
    second.setup("fit")
    assert first.cache.builds == 8 and second.cache.builds == 0
    assert first.split == second.split


def test_batches_are_deterministic_for_a_seed(dataset: Path, tmp_path: Path) -> None:
    def batch(seed):
        dm = make_dm(dataset, tmp_path, seed=seed, noise={"kind": "gaussian", "sigma_hu": 20.0})
        dm.setup("fit")
        return first_batch(dm.train_dataloader())["input"]

    torch.testing.assert_close(batch(1), batch(1))
    assert not torch.equal(batch(1), batch(2))


def test_summary_lists_series_without_identifiers(dataset: Path, tmp_path: Path) -> None:
    dm = make_dm(dataset, tmp_path)
    dm.setup("fit")
    text = dm.summary()
    for study in dm.studies:
        assert study.patient_key in text and study.ldct.series_key in text
    assert "PAT-0" not in text
    rows = dm.summary_rows()
    assert len(rows) == 8 and {r["role"] for r in rows} == {"ldct", "ndct"}
    assert {r["ctdi_vol"] for r in rows} == {1.5, 12.0}


def test_own_files_inside_the_scanned_tree_do_not_warn(tmp_path: Path) -> None:
    root = tmp_path / "flat"
    write_dataset(root, n_patients=3, subdir=".")
    kwargs = {"root": root, "n_val": 1, "n_test": 1, "crop_size": 32, "batch_size": 4, "num_workers": 0}
    LDCTDataModule(**kwargs).setup("fit")  # writes <root>/.cache and <root>/split.yaml
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dm = LDCTDataModule(**kwargs)
        dm.setup("fit")
    assert isinstance(dm.cache, SeriesCache) and dm.cache.builds == 0


def test_fit_with_lightning(dataset: Path, tmp_path: Path) -> None:
    class Tiny(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.sums: list[float] = []

        def training_step(self, batch, batch_idx):
            self.sums.append(float(batch["input"].sum()))
            return ((batch["input"] - batch["target"]).mean() + self.w).pow(2).sum()

        def validation_step(self, batch, batch_idx) -> None:
            assert batch["input"].shape[-1] == SIZE

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    dm = make_dm(dataset, tmp_path, noise={"kind": "gaussian", "sigma_hu": 20.0})
    model = Tiny()
    trainer = L.Trainer(
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, datamodule=dm)
    assert len(model.sums) == 4 and model.sums[:2] != model.sums[2:]  # new crops in the second epoch


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"train_mode": "cycle"}, "data.train_mode"),
        ({"crop_size": 0}, "data.crop_size"),
        ({"batch_size": 2.5}, "data.batch_size"),
        ({"num_workers": -1}, "data.num_workers"),
        ({"samples_per_epoch": 2}, "data.samples_per_epoch"),
        ({"val_max_slices": 0}, "data.val_max_slices"),
        ({"hu_min": 100.0, "hu_max": 0.0}, "data.hu_max"),
        ({"min_foreground": 1.5}, "data.min_foreground"),
        ({"noise": {"kind": "poisson"}}, "data.noise.kind"),
        ({"noise": {"kind": "gaussian", "sigma_hu": -3}}, "data.noise.sigma_hu"),
        ({"noise": {"kind": "gaussian", "photons_per_ray": 1e4}}, "data.noise.photons_per_ray"),
        ({"noise": {"kind": "projection", "photons_per_ray": 0}}, "data.noise.photons_per_ray"),
        ({"noise": {"kind": "gaussian", "sigma_hu": 20, "sigma_scale": [2, 1]}}, "data.noise.sigma_scale"),
        ({"noise": {"kind": "projection", "sigma_scale": [0.5, 2]}}, "data.noise.sigma_scale"),
        ({"manifest": "/no/such/manifest.csv"}, "data.manifest"),
        ({"train_ldct": "aligned"}, "data.train_ldct"),
        ({"root": "???"}, "data.root"),
    ],
)
def test_bad_config_values_fail_early_naming_the_key(tmp_path: Path, kwargs: dict, key: str) -> None:
    root = kwargs.pop("root", tmp_path)
    with pytest.raises(DataConfigError, match=key.replace(".", r"\.")):
        make_dm(root, tmp_path, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"crop_size": 64}, "data.crop_size=64.*larger than"),
        ({"n_val": 2, "n_test": 2}, "no training patient"),
        ({"root": "MISSING"}, "data.root=.*not a folder"),
    ],
)
def test_data_dependent_errors_at_setup(dataset: Path, tmp_path: Path, kwargs: dict, key: str) -> None:
    root = tmp_path / "missing" if kwargs.pop("root", None) == "MISSING" else dataset
    with pytest.raises(DataConfigError, match=key):
        make_dm(root, tmp_path, **kwargs).setup("fit")


def test_a_set_of_test_patients_only_serves_testing(dataset: Path, tmp_path: Path) -> None:
    """Another site's data, all of it test patients: testing works, training says why it cannot."""
    dm = make_dm(dataset, tmp_path, n_val=0.0, n_test=1.0)
    dm.setup("test")
    assert len(dm.patients("test")) == len(dm.studies) >= 2 and not dm.split.train
    assert len(dm.test_dataset) == sum(p.ldct.shape[0] for p in dm.patients("test"))
    with pytest.raises(DataConfigError, match="no training patient"):
        dm.setup("fit")


def test_projection_noise_mode(dataset: Path, tmp_path: Path) -> None:
    photons, sd = {}, {}
    for sigma in (20.0, 40.0):
        dm = make_dm(
            dataset,
            tmp_path / str(sigma),
            crop_size=16,
            noise={"kind": "projection", "sigma_hu": sigma, "n_views": 16},
        )
        dm.setup("fit")
        photons[sigma] = dm.noise_info["photons_per_ray"]
        batch = first_batch(dm.train_dataloader())
        target_hu = batch["target"] * (HU_MAX - HU_MIN) + HU_MIN
        noise_hu = (batch["input"] - batch["target"]) * (HU_MAX - HU_MIN)
        soft = (target_hu > -100) & (target_hu < 200)  # where the calibration measures (the 40 HU disc)
        assert soft.sum() > 500
        sd[sigma] = float(noise_hu[soft].std())
        # the calibrated SD in soft tissue (the sample SD of ~800 correlated pixels varies by a few %)
        assert sd[sigma] == pytest.approx(sigma, rel=0.15)
        assert abs(float(noise_hu[soft].mean())) < 0.15 * sigma
    # quantum noise: twice the SD needs a quarter of the photons
    assert photons[20.0] / photons[40.0] == pytest.approx(4.0, rel=0.15)
    assert sd[40.0] / sd[20.0] == pytest.approx(2.0, rel=0.15)

"""LightningDataModule: DICOM folder -> studies -> patient split -> int16 cache -> crops and slices.

The DataModule knows data, never training stages: a stage picks ``train_mode`` (``simulated`` for stage 1,
``unaligned`` for stage 2 and the baselines, ``paired`` for aligned data) and the crop and batch sizes.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ldct_lightning.data.cache import SeriesCache
from ldct_lightning.data.datasets import (
    EpochSampler,
    PairedDataset,
    PatientBatchSampler,
    PatientVolumes,
    RegisteredDataset,
    SimulatedDataset,
    SliceDataset,
    UnalignedDataset,
)
from ldct_lightning.data.dicom import DicomError, SeriesInfo, SkippedFile, scan_dicom
from ldct_lightning.data.noise import (
    GaussianNoise,
    ProjectionNoise,
    calibrate_photons,
    estimate_noise_sd_hu,
    simulation_sigma,
)
from ldct_lightning.data.normalize import HU_MAX, HU_MIN
from ldct_lightning.data.pairing import Split, Study, build_studies, load_or_create_split
from ldct_lightning.errors import LDCTError
from ldct_lightning.privacy import KEY_FILE_NAME
from ldct_lightning.registration import (
    RegistrationCache,
    RegistrationConfig,
    RegistrationError,
    VolumeGeometry,
)
from ldct_lightning.registration.register import check_registrable

log = logging.getLogger(__name__)

TRAIN_MODES = ("simulated", "unaligned", "paired", "registered")
REGISTRATION_MODES = ("auto", "always", "off")
TRAIN_LDCT_SOURCES = ("series", "truth")
NOISE_KINDS = ("gaussian", "projection")
_NOISE_KEYS = {
    "gaussian": {"kind", "sigma_hu", "sigma_scale"},
    "projection": {"kind", "sigma_hu", "photons_per_ray", "electronic_noise_sd", "n_views"},
}


class DataConfigError(LDCTError):
    """A data config value that cannot work; the message names the key (``data.<key>``)."""


def _is_int(value: Any) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool)


class LDCTDataModule(L.LightningDataModule):
    """Low-dose CT data: studies from a DICOM tree, a fixed patient split, cached volumes, loaders.

    Loaders: ``train`` gives random crops (keys by ``train_mode``: ``simulated`` and ``paired``:
    ``input``, ``target``; ``unaligned``: ``ldct``, ``ndct``); ``val`` gives whole slices of the
    validation patients with ``input``, ``target`` (the LDCT slice and its clean reference when
    ``<root>/truth/<patient_key>.npz`` exists; the LDCT and NDCT slices of aligned studies; otherwise
    the NDCT slice plus fixed-seed simulated noise, and the NDCT slice); ``test`` gives whole slices of
    the test patients in ``eval`` form: ``input`` (LDCT), ``ndct`` (NDCT slice nearest in z), and
    ``reference``, ``labels`` when every test patient has truth; all slice items carry ``patient_key`` and
    ``slice_index``. Images are float32 (B, 1, H, W) in [0, 1] (HU mapped by ``hu_min``/``hu_max``).

    Args:
        root: data folder: a DICOM tree, or a synthetic data set (then ``<root>/dicom`` is scanned).
        cache_dir: cache of int16 volumes (default ``<root>/.cache``).
        manifest: CSV/YAML naming each series' role (default ``<root>/manifest.csv`` or ``.yaml`` when it
            exists; else roles come from the dose tags).
        aligned: flag every study aligned unless the manifest says otherwise.
        split_file: the patient split, written once and reused (default ``<root>/split.yaml``).
        n_val: validation patients (count, or fraction when a float).
        n_test: test patients (count, or fraction when a float).
        split_seed: seed of the split.
        train_mode: ``simulated`` | ``unaligned`` | ``paired``.
        crop_size: square training crop size in pixels.
        batch_size: training batch size.
        val_batch_size: validation and test batch size.
        num_workers: loader worker processes.
        samples_per_epoch: training crops per epoch (default: one per training slice).
        noise: simulated noise, ``{"kind": "gaussian", "sigma_hu": 25.0 | "auto"}`` or ``{"kind":
            "projection", "sigma_hu": ..., "photons_per_ray": None | float, "electronic_noise_sd": 0.0,
            "n_views": None | int}``. ``auto`` is ``sqrt(sd_ldct^2 - sd_ndct^2)`` of the training series
            (:func:`ldct_lightning.data.noise.estimate_noise_sd_hu`); projection noise without
            ``photons_per_ray`` is calibrated to add ``sigma_hu`` on training crops. Validation always
            simulates Gaussian noise of the resolved SD (projection noise on whole slices is too slow on CPU).
        augment: random flips and 90-degree rotations of training crops.
        hu_min: HU mapped to 0.
        hu_max: HU mapped to 1.
        seed: seed of the training crops and the validation noise.
        val_max_slices: at most this many validation slices, evenly spaced per patient (None: all).
        min_foreground: smallest fraction of non-air pixels in a training crop (0: no check).
        edge_crop_fraction: fraction of training crops that need only 5 % body instead of ``min_foreground``
            (crops of the air / skin edge, which whole slices have); 0: none.
        z_tolerance_mm: unaligned mode: largest z distance between the LDCT and NDCT slice of a pair.
        xy_jitter: unaligned mode: largest shift (pixels) of the NDCT crop against the LDCT crop.
        progress: show progress bars while scanning and caching.
        train_ldct: low-dose images of the training patients: ``series`` (the LDCT DICOM series) or
            ``truth`` (synthetic data only: the truth file's low-dose scan in the NDCT pose, ``lowdose_nd``,
            pixel-aligned with the NDCT, for the aligned-data oracle; validation and test keep the series).
        write_split: write the split file when there is none (False: use the split it would write, for
            tools that only look at the data).
        strict: stop at the first bad file or series. Default: skip each with one warning naming it (files
            that are no CT image or are broken; a patient whose series cannot be decoded leaves the data set).
        registration: ``{"mode": "auto" | "always" | "off", <RegistrationConfig fields>}``. ``auto``
            registers (once, cached) the NDCT onto the LDCT of every non-aligned study whose two series do
            not share a FrameOfReferenceUID, when a correspondence is needed (``unaligned`` and
            ``registered`` training, test slices); ``always`` registers every non-aligned study; ``off``
            compares z positions (valid only within one frame of reference). A study that fails to register
            is left out with a warning.
        unaligned_registered: unaligned mode: also give the NDCT registered onto each LDCT crop and its
            well-registered mask (batch keys ``registered``, ``registered_mask``; stage 2's ``registered_weight``).
        registered_input_weight: ``registered`` mode: outside the well-registered mask the target is the LDCT
            input with this loss weight (0: no supervision there; see :class:`RegisteredDataset`).

    Raises:
        DataConfigError: a config value is invalid (raised at construction, or at setup when it depends on
            the data, e.g. a crop larger than the images or an empty training split).
    """

    def __init__(
        self,
        root: str | Path,
        cache_dir: str | Path | None = None,
        manifest: str | Path | None = None,
        aligned: bool = False,
        split_file: str | Path | None = None,
        n_val: int | float = 0.1,
        n_test: int | float = 0.28,
        split_seed: int = 0,
        train_mode: str = "simulated",
        crop_size: int = 128,
        batch_size: int = 16,
        val_batch_size: int = 4,
        num_workers: int = 2,
        samples_per_epoch: int | None = None,
        noise: Mapping[str, Any] | None = None,
        augment: bool = True,
        hu_min: float = HU_MIN,
        hu_max: float = HU_MAX,
        seed: int = 0,
        val_max_slices: int | None = 16,
        min_foreground: float = 0.0,
        edge_crop_fraction: float = 0.0,
        z_tolerance_mm: float = 5.0,
        xy_jitter: int = 16,
        progress: bool = False,
        train_ldct: str = "series",
        write_split: bool = True,
        strict: bool = False,
        registration: Mapping[str, Any] | None = None,
        unaligned_registered: bool = False,
        registered_input_weight: float = 0.1,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if root in (None, "") or str(root) == "???":
            raise DataConfigError(
                "data.root is not set: point it to the DICOM folder (data.root=/path/to/dicom)"
            )
        self.root = Path(root)
        self.cache_dir = Path(cache_dir) if cache_dir else self.root / ".cache"
        self.manifest = manifest
        self.aligned = bool(aligned)
        self.split_file = Path(split_file) if split_file else self.root / "split.yaml"
        self.n_val, self.n_test, self.split_seed = n_val, n_test, split_seed
        self.train_mode = train_mode
        self.crop_size = crop_size
        self.batch_size, self.val_batch_size, self.num_workers = batch_size, val_batch_size, num_workers
        self.samples_per_epoch = samples_per_epoch
        self.noise_cfg = self._check_noise(noise)
        self.augment = bool(augment)
        self.hu_min, self.hu_max = float(hu_min), float(hu_max)
        self.seed = int(seed)
        self.val_max_slices = val_max_slices
        self.min_foreground = min_foreground
        self.edge_crop_fraction = edge_crop_fraction
        self.z_tolerance_mm, self.xy_jitter = z_tolerance_mm, xy_jitter
        self.progress = progress
        self.train_ldct = train_ldct
        self.strict = bool(strict)
        self.write_split = bool(write_split)
        self.unaligned_registered = bool(unaligned_registered)
        if not 0 <= registered_input_weight <= 1:
            raise DataConfigError(
                f"data.registered_input_weight={registered_input_weight!r}: must be in [0, 1]"
            )
        self.registered_input_weight = float(registered_input_weight)
        self.registration_mode, self.registration_cfg = self._check_registration(registration)
        self.registration_info: dict[str, dict] = {}
        self._registered_parts: set[str] = set()
        self._left_out: set[str] = set()  # patients whose registration failed
        self._check_config()

        self.skipped: list[SkippedFile] = []  # files and series left out (lenient mode)
        self.series: list[SeriesInfo] | None = None
        self.studies: list[Study] | None = None
        self.split: Split | None = None
        self.cache: SeriesCache | None = None
        self.noise_info: dict[str, Any] = {}
        self.train_dataset: Any = None
        self.val_dataset: SliceDataset | None = None
        self.test_dataset: SliceDataset | None = None
        self._patients: dict[str, PatientVolumes] = {}
        self._noise_model: Any = None
        self._val_noise: GaussianNoise | None = None

    # ------------------------------------------------------------------------------------ validation

    def _check_config(self) -> None:
        def fail(key: str, problem: str) -> None:
            raise DataConfigError(f"data.{key}={getattr(self, key)!r}: {problem}")

        if self.train_mode not in TRAIN_MODES:
            fail("train_mode", f"unknown mode; choose one of {', '.join(TRAIN_MODES)}")
        if self.train_ldct not in TRAIN_LDCT_SOURCES:
            fail("train_ldct", f"unknown source; choose one of {', '.join(TRAIN_LDCT_SOURCES)}")
        for key in ("crop_size", "batch_size", "val_batch_size"):
            if not _is_int(getattr(self, key)) or getattr(self, key) < 1:
                fail(key, "must be a positive integer")
        if not _is_int(self.num_workers) or self.num_workers < 0:
            fail("num_workers", "must be an integer >= 0")
        if self.samples_per_epoch is not None and (
            not _is_int(self.samples_per_epoch) or self.samples_per_epoch < self.batch_size
        ):
            fail("samples_per_epoch", f"must be null or an integer >= batch_size ({self.batch_size})")
        if self.val_max_slices is not None and (not _is_int(self.val_max_slices) or self.val_max_slices < 1):
            fail("val_max_slices", "must be null (all slices) or a positive integer")
        if self.hu_max <= self.hu_min:
            fail("hu_max", f"must be greater than hu_min ({self.hu_min:g})")
        if not _is_number(self.min_foreground) or not 0 <= self.min_foreground <= 1:
            fail("min_foreground", "must be a fraction in [0, 1]")
        if not _is_number(self.edge_crop_fraction) or not 0 <= self.edge_crop_fraction <= 1:
            fail("edge_crop_fraction", "must be a fraction in [0, 1]")
        if not _is_number(self.z_tolerance_mm) or self.z_tolerance_mm < 0:
            fail("z_tolerance_mm", "must be a number >= 0 (mm)")
        if not _is_int(self.xy_jitter) or self.xy_jitter < 0:
            fail("xy_jitter", "must be an integer >= 0 (pixels)")
        if self.manifest not in (None, "") and not Path(self.manifest).is_file():
            fail("manifest", "no such file. Give the path of the CSV/YAML manifest, or null")

    @staticmethod
    def _check_registration(registration: Mapping[str, Any] | None) -> tuple[str, RegistrationConfig]:
        cfg = dict(registration or {})
        mode = cfg.pop("mode", "auto")
        if mode not in REGISTRATION_MODES:
            raise DataConfigError(
                f"data.registration.mode={mode!r}: unknown mode; choose one of {', '.join(REGISTRATION_MODES)}"
            )
        known = set(RegistrationConfig.__dataclass_fields__)
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise DataConfigError(
                f"data.registration.{unknown[0]}: not a registration setting; allowed: mode, {', '.join(sorted(known))}"
            )
        try:
            return mode, RegistrationConfig(**cfg)
        except ValueError as e:
            raise DataConfigError(f"data.{e}") from e

    @staticmethod
    def _check_noise(noise: Mapping[str, Any] | None) -> dict[str, Any]:
        cfg = {"kind": "gaussian", "sigma_hu": "auto"}
        if noise is not None:
            if not isinstance(noise, Mapping):
                raise DataConfigError(
                    f"data.noise={noise!r}: must be a mapping such as {{kind: gaussian, sigma_hu: auto}}"
                )
            cfg.update(dict(noise))
        kind = cfg["kind"]
        if kind not in NOISE_KINDS:
            raise DataConfigError(
                f"data.noise.kind={kind!r}: unknown noise; choose one of {', '.join(NOISE_KINDS)}"
            )
        unknown = sorted(set(cfg) - _NOISE_KEYS[kind])
        if unknown:
            raise DataConfigError(
                f"data.noise.{unknown[0]}: not a setting of {kind} noise; allowed: {', '.join(sorted(_NOISE_KEYS[kind]))}"
            )
        sigma = cfg["sigma_hu"]
        if sigma != "auto" and (not _is_number(sigma) or sigma < 0):
            raise DataConfigError(f"data.noise.sigma_hu={sigma!r}: must be a number >= 0 (HU) or 'auto'")
        if kind == "gaussian":
            scale = cfg.setdefault("sigma_scale", [1.0, 1.0])
            if not (
                isinstance(scale, list | tuple)
                and len(scale) == 2
                and all(_is_number(v) for v in scale)
                and 0 < scale[0] <= scale[1]
            ):
                raise DataConfigError(
                    f"data.noise.sigma_scale={scale!r}: must be [low, high] factors with 0 < low <= high "
                    "(e.g. [0.5, 2.0]; [1, 1] = sigma_hu only)"
                )
        if kind == "projection":
            cfg.setdefault("photons_per_ray", None)
            cfg.setdefault("electronic_noise_sd", 0.0)
            cfg.setdefault("n_views", None)
            photons = cfg["photons_per_ray"]
            if photons not in (None, "auto") and (not _is_number(photons) or photons <= 0):
                raise DataConfigError(
                    f"data.noise.photons_per_ray={photons!r}: must be > 0, or null to calibrate"
                )
            if not _is_number(cfg["electronic_noise_sd"]) or cfg["electronic_noise_sd"] < 0:
                raise DataConfigError(
                    f"data.noise.electronic_noise_sd={cfg['electronic_noise_sd']!r}: must be >= 0"
                )
            if cfg["n_views"] is not None and (not _is_int(cfg["n_views"]) or cfg["n_views"] < 1):
                raise DataConfigError(
                    f"data.noise.n_views={cfg['n_views']!r}: must be a positive integer or null"
                )
        return cfg

    # ------------------------------------------------------------------------------ data discovery

    def _dicom_dir(self) -> Path:
        return self.root / "dicom" if (self.root / "dicom").is_dir() else self.root

    def _manifest_path(self) -> Path | None:
        if self.manifest not in (None, ""):
            return Path(self.manifest)
        for name in ("manifest.csv", "manifest.yaml", "manifest.yml"):
            if (self.root / name).is_file():
                return self.root / name
        return None

    def _scan(self) -> list[SeriesInfo]:
        own = [str(self.cache_dir), str(self.split_file)]
        manifest = self._manifest_path()
        if manifest is not None:
            own.append(str(manifest))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            scan = scan_dicom(
                [self._dicom_dir()], progress=self.progress, strict=self.strict, key_root=self.root
            )
        # the cache, split and manifest may live inside the scanned tree: their files are not DICOM
        for w in caught:
            if not any(str(w.message).startswith(prefix) for prefix in own):
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        for item in scan.skipped:
            if not any(str(item.path).startswith(prefix) for prefix in own):
                self.skipped.append(item)
                warnings.warn(f"{item.message} (data.strict=true stops here)", stacklevel=2)
        return scan.series

    def _readable_studies(self, studies: list[Study]) -> list[Study]:
        """Cache each study's volumes; lenient mode drops (with a warning) a study whose pixels fail."""
        assert self.cache is not None
        kept = []
        for study in studies:
            try:
                self._patients[study.patient_key] = self._load_patient(study)
            except DicomError as e:
                if self.strict:
                    raise
                self.skipped.append(SkippedFile(e.path or study.ldct.files[0], str(e)))
                warnings.warn(
                    f"{e} Patient {study.patient_key} is left out (data.strict=true stops here)", stacklevel=2
                )
                continue
            kept.append(study)
        return kept

    def _prepare(self) -> None:
        """Scan, pair, split and cache (once per instance)."""
        if self.split is not None:
            return
        if not self.root.is_dir():
            raise DataConfigError(
                f"data.root={str(self.root)!r}: not a folder. Point it to the DICOM folder, or generate the "
                "synthetic set first (ldct-simulate <folder> --preset demo)"
            )
        self.series = self._scan()
        self.cache = SeriesCache(self.cache_dir)
        self.studies = self._readable_studies(build_studies(self.series, self._manifest_path(), self.aligned))
        self.split = load_or_create_split(
            self.split_file, self.studies, self.n_val, self.n_test, self.split_seed, write=self.write_split
        )
        by_key = {s.patient_key: s for s in self.studies}
        self._studies_by_key = by_key
        keys = [k for part in (self.split.train, self.split.val, self.split.test) for k in part]
        missing = [k for k in keys if k not in by_key]
        if missing:
            raise DataConfigError(
                f"data.split_file={str(self.split_file)!r}: patient {missing[0]} of the split has no study. "
                "Delete the split file to make a new one"
            )
        self._check_truth_names()
        if self.train_ldct == "truth":
            for key in self.split.train:
                self._patients[key] = self._truth_lowdose_patient(self._patients[key])

    def _check_truth_names(self) -> None:
        """Truth files that match no patient were named under another key (an older data set): say so."""
        truth = self.root / "truth"
        names = {p.stem for p in truth.glob("*.npz")} if truth.is_dir() else set()
        if names and not names & {s.patient_key for s in self.studies}:
            raise DataConfigError(
                f"data.root={str(self.root)!r}: no file in {truth} matches a patient key, so they were named "
                "under another pseudonym key (a data set made before keyed pseudonyms, or a lost "
                f"{self.root / KEY_FILE_NAME}). Regenerate it: ldct-simulate ROOT --preset ... --overwrite"
            )

    def _load_patient(self, study: Study) -> PatientVolumes:
        assert self.cache is not None
        ldct = self.cache.get(study.ldct, progress=self.progress)
        ndct = self.cache.get(study.ndct, progress=self.progress)
        reference = labels = None
        truth = self.root / "truth" / f"{study.patient_key}.npz"
        if truth.is_file():
            arrays = self.cache.get_npz(truth)
            reference, labels = arrays.get("clean_ld"), arrays.get("labels_ld")
            z_ld = arrays.get("z_ld")
            if (
                reference is None
                or reference.shape != ldct.shape
                or (z_ld is not None and not np.allclose(z_ld, study.ldct.positions_mm, atol=0.01))
            ):
                got = None if reference is None else reference.shape
                raise ValueError(
                    f"{truth}: clean_ld {got} (and z_ld) does not match the LDCT series {ldct.shape} of patient "
                    f"{study.patient_key}. Regenerate the data set, or remove the truth file"
                )
            if labels is not None and labels.shape != ldct.shape:
                labels = None
        return PatientVolumes(
            study.patient_key,
            ldct=ldct,
            ndct=ndct,
            z_ldct=np.asarray(study.ldct.positions_mm),
            z_ndct=np.asarray(study.ndct.positions_mm),
            aligned=study.aligned,
            reference=reference,
            labels=labels,
        )

    def _truth_lowdose_patient(self, patient: PatientVolumes) -> PatientVolumes:
        """``patient`` with its LDCT replaced by the truth's low-dose scan in the NDCT pose (aligned)."""
        assert self.cache is not None
        truth = self.root / "truth" / f"{patient.patient_key}.npz"
        arrays = self.cache.get_npz(truth) if truth.is_file() else {}
        lowdose = arrays.get("lowdose_nd")
        if lowdose is None or patient.ndct is None or lowdose.shape != patient.ndct.shape:
            got = "no such file" if not truth.is_file() else f"lowdose_nd {getattr(lowdose, 'shape', None)}"
            raise DataConfigError(
                f"data.train_ldct='truth': {truth}: {got}, expected lowdose_nd of the NDCT's shape. "
                "It needs a synthetic set from ldct-simulate; use data.train_ldct=series for other data"
            )
        return PatientVolumes(
            patient.patient_key,
            ldct=lowdose,
            ndct=patient.ndct,
            z_ldct=patient.z_ndct,
            z_ndct=patient.z_ndct,
            aligned=True,
            reference=arrays.get("clean_nd"),
            labels=arrays.get("labels_nd"),
        )

    # ------------------------------------------------------------------------------------ registration

    def needs_registration(self, study: Study) -> bool:
        """True when the study's correspondence must come from a registration (see ``registration``)."""
        if study.aligned or self.registration_mode == "off":
            return False
        if self.registration_mode == "always":
            return True
        a, b = study.ldct.frame_of_reference_key, study.ndct.frame_of_reference_key
        return a is None or b is None or a != b

    def _register(self, part: str) -> None:
        """Register the studies of a split part that need it (cached); leave out those that fail."""
        if part in self._registered_parts or self.registration_mode == "off":
            return
        self._registered_parts.add(part)
        assert self.cache is not None and self.split is not None
        reg_cache = RegistrationCache(self.cache_dir, self.registration_cfg)
        keys = list(getattr(self.split, part))
        failed = []
        todo = [k for k in keys if self.needs_registration(self._studies_by_key[k])]
        for key in tqdm(todo, desc=f"register {part} studies", unit="study", disable=not self.progress):
            study, p = self._studies_by_key[key], self._patients[key]
            if p.correspondence is not None:
                continue
            geom_ld = VolumeGeometry(
                tuple(p.ldct.shape), tuple(study.ldct.positions_mm), tuple(study.ldct.pixel_spacing_mm)
            )
            geom_nd = VolumeGeometry(
                tuple(p.ndct.shape), tuple(study.ndct.positions_mm), tuple(study.ndct.pixel_spacing_mm)
            )
            try:
                check_registrable(geom_ld, geom_nd, key, study.ldct.orientation, study.ndct.orientation)
                reg = reg_cache.get(
                    p.ldct,
                    geom_ld,
                    p.ndct,
                    geom_nd,
                    self.cache.key(study.ldct),
                    self.cache.key(study.ndct),
                    key,
                )
            except RegistrationError as e:
                warnings.warn(f"{e}; the study is left out of {part}", stacklevel=2)
                failed.append(key)
                continue
            self._patients[key] = dataclasses.replace(
                p,
                correspondence=reg.correspondence,
                ndct_registered=reg.warped,
                registered_mask=reg.mask,
                usable_slices=reg.usable,
            )
            self.registration_info[key] = reg.info
        if failed:
            self._left_out.update(failed)
            if len(failed) == len(keys):
                raise DataConfigError(
                    f"data.registration: no {part} study registered ({len(failed)} failed, see the warnings). "
                    "Check the LDCT/NDCT pairing, or lower data.registration.min_ncc"
                )

    def register_studies(self, parts: tuple[str, ...] = ("train", "val", "test")) -> dict[str, dict]:
        """Register (or read from the cache) the studies of ``parts`` that need it; return their info.

        Returns:
            patient key -> registration summary (z offset found, NCC, residual, usable share, time).
        """
        self._prepare()
        for part in parts:
            self._register(part)
        return {
            k: v for k, v in self.registration_info.items() if any(k in getattr(self.split, p) for p in parts)
        }

    @property
    def left_out(self) -> set[str]:
        """Patients left out because their registration failed."""
        return set(self._left_out)

    def patients(self, part: str) -> list[PatientVolumes]:
        """The volumes of the ``train``, ``val`` or ``test`` patients (after :meth:`setup`)."""
        if self.split is None:
            raise RuntimeError("call setup() first")
        return [self._patients[k] for k in getattr(self.split, part) if k not in self._left_out]

    # ----------------------------------------------------------------------------------------- noise

    def _resolve_noise(self) -> None:
        """Resolve ``sigma_hu: auto`` and projection photons from the training series (once)."""
        self._require_train()
        if self._noise_model is not None:
            return
        cfg = dict(self.noise_cfg)
        train = self.patients("train")
        info: dict[str, Any] = {"kind": cfg["kind"]}
        if cfg["sigma_hu"] == "auto":
            ld = estimate_noise_sd_hu(p.ldct for p in train)
            nd = estimate_noise_sd_hu(p.ndct for p in train)
            sigma = simulation_sigma(ld, nd)
            info.update(ldct_sd_hu=ld, ndct_sd_hu=nd)
            if sigma <= 0:
                raise DataConfigError(
                    f"data.noise.sigma_hu='auto': the LDCT noise estimate ({ld:.1f} HU) is not above the NDCT one "
                    f"({nd:.1f} HU), so there is no noise to simulate. Set data.noise.sigma_hu to a number"
                )
            log.info("noise sigma_hu=auto: LDCT %.1f HU, NDCT %.1f HU -> simulate %.1f HU", ld, nd, sigma)
        else:
            sigma = float(cfg["sigma_hu"])
        info["sigma_hu"] = sigma
        self._val_noise = GaussianNoise(sigma)
        if cfg["kind"] == "gaussian":
            self._noise_model = GaussianNoise(sigma, tuple(cfg["sigma_scale"]))
            info["sigma_scale"] = list(cfg["sigma_scale"])
        else:
            n_views = cfg["n_views"] or self.crop_size
            pixel_mm = float(
                np.mean(
                    [s.ndct.pixel_spacing_mm[0] for s in self.studies if s.patient_key in self.split.train]
                )
            )
            photons = cfg["photons_per_ray"]
            if photons in (None, "auto"):
                if sigma <= 0:
                    raise DataConfigError(
                        "data.noise.sigma_hu=0: projection noise needs a positive target SD"
                    )
                photons = calibrate_photons(
                    self._calibration_crops(train),
                    sigma,
                    cfg["electronic_noise_sd"],
                    n_views,
                    pixel_mm,
                    seed=self.seed,
                )
                log.info(
                    "projection noise: %.4g photons/ray add %.1f HU on %d px crops",
                    photons,
                    sigma,
                    self.crop_size,
                )
            self._noise_model = ProjectionNoise(photons, cfg["electronic_noise_sd"], n_views, pixel_mm)
            info.update(photons_per_ray=photons, n_views=n_views, pixel_mm=pixel_mm)
        self.noise_info = info

    def _calibration_crops(self, train: list[PatientVolumes], n: int = 8) -> list[np.ndarray]:
        """Central crops of evenly spaced NDCT training slices (the body is centred in CT images)."""
        crops = []
        s = min([self.crop_size] + [min(p.ndct.shape[1:]) for p in train])
        for i in range(n):
            p = train[i % len(train)]
            k = int(round((i // len(train) + 0.5) / math.ceil(n / len(train)) * (len(p.ndct) - 1)))
            y, x = (p.ndct.shape[1] - s) // 2, (p.ndct.shape[2] - s) // 2
            crops.append(np.asarray(p.ndct[k, y : y + s, x : x + s], dtype=np.float32))
        return crops

    @property
    def noise_model(self) -> Any:
        """The training noise model (after :meth:`setup`)."""
        self._resolve_noise()
        return self._noise_model

    # ----------------------------------------------------------------------------------------- setup

    def prepare_data(self) -> None:
        """Scan, pair, split and build the cache (Lightning calls this on one process per node)."""
        self._prepare()

    def setup(self, stage: str | None = None) -> None:
        """Build the datasets the stage needs (``fit``/``validate``: train and val; ``test``/``predict``: test)."""
        self._prepare()
        if stage in (None, "fit") and self.train_mode in ("unaligned", "registered"):
            self._register("train")
        if stage in (None, "test", "predict"):
            self._register("test")
        if stage in (None, "fit") and self.train_dataset is None:
            self.train_dataset = self._train_dataset()
        if stage in (None, "fit", "validate") and self.val_dataset is None:
            val = self.patients("val")
            needs_noise = any(p.reference is None and not p.aligned for p in val)
            if needs_noise:
                self._resolve_noise()
            self.val_dataset = SliceDataset(
                val, "val", self._val_noise, self.val_max_slices, self.seed, self.hu_min, self.hu_max
            )
        if stage in (None, "test", "predict") and self.test_dataset is None:
            self.test_dataset = SliceDataset(
                self.patients("test"), "eval", None, None, self.seed, self.hu_min, self.hu_max
            )

    def _require_train(self) -> None:
        """Training (and the noise level it estimates) needs training patients; testing alone does not."""
        if not self.split.train:
            raise DataConfigError(
                f"data.n_val={self.n_val!r}, data.n_test={self.n_test!r}: no training patient is left of "
                f"{len(self.studies)}. Lower n_val/n_test or add patients"
            )

    def _train_dataset(self) -> Any:
        self._require_train()
        train = self.patients("train")
        smallest = min((v.shape[1:] for p in train for v in (p.ldct, p.ndct)), key=min)
        if self.crop_size > min(smallest):
            raise DataConfigError(
                f"data.crop_size={self.crop_size}: larger than the smallest training image "
                f"({smallest[0]}x{smallest[1]}). Lower crop_size"
            )
        common = {
            "crop_size": self.crop_size,
            "samples_per_epoch": self.samples_per_epoch or 1,
            "seed": self.seed,
            "augment": self.augment,
            "hu_min": self.hu_min,
            "hu_max": self.hu_max,
            "min_foreground": self.min_foreground,
        }
        try:
            if self.train_mode == "simulated":
                self._resolve_noise()
                dataset = SimulatedDataset(train, self._noise_model, **common)
                default_n = sum(len(p.ndct) for p in train)
            elif self.train_mode == "unaligned":
                dataset = UnalignedDataset(
                    train,
                    z_tolerance_mm=self.z_tolerance_mm,
                    xy_jitter=self.xy_jitter,
                    with_registered=self.unaligned_registered,
                    **common,
                )
                default_n = len(dataset.pairs)
            elif self.train_mode == "registered":
                dataset = RegisteredDataset(train, input_weight=self.registered_input_weight, **common)
                default_n = len(dataset.pairs)
            else:
                dataset = PairedDataset(train, **common)
                default_n = len(dataset.pairs)
        except ValueError as e:
            key = "crop_size" if "crop_size" in str(e) else "train_mode"
            raise DataConfigError(f"data.{key}={getattr(self, key)!r}: {e}") from e
        dataset.samples_per_epoch = self.samples_per_epoch or max(default_n, self.batch_size)
        dataset.edge_fraction = float(self.edge_crop_fraction)
        return dataset

    # ----------------------------------------------------------------------------------- dataloaders

    def _loader_kwargs(self) -> dict[str, Any]:
        return {
            "num_workers": self.num_workers,
            "persistent_workers": self.num_workers > 0,
            "pin_memory": torch.cuda.is_available(),
        }

    def train_dataloader(self) -> DataLoader:
        """Random crops; each epoch draws new ones (see :class:`EpochSampler`)."""
        if self.train_dataset is None:
            self.setup("fit")
        return DataLoader(
            self.train_dataset,
            batch_size=self.batch_size,
            sampler=EpochSampler(len(self.train_dataset)),
            drop_last=True,
            **self._loader_kwargs(),
        )

    def _slice_loader(self, dataset: SliceDataset) -> DataLoader:
        shapes = {tuple(dataset.patients[i].ldct.shape[1:]) for i in set(dataset.patient_of_item)}
        shapes |= {tuple(dataset.patients[i].ndct.shape[1:]) for i in set(dataset.patient_of_item)}
        kwargs = self._loader_kwargs()
        kwargs["persistent_workers"] = False
        if len(shapes) <= 1:
            return DataLoader(dataset, batch_size=self.val_batch_size, shuffle=False, **kwargs)
        # matrices differ between patients: batches never mix patients
        return DataLoader(
            dataset, batch_sampler=PatientBatchSampler(dataset.patient_of_item, self.val_batch_size), **kwargs
        )

    def val_dataloader(self) -> DataLoader | list:
        """Whole slices of the validation patients (an empty list when there are none)."""
        if self.val_dataset is None:
            self.setup("validate")
        return self._slice_loader(self.val_dataset) if len(self.val_dataset) else []

    def test_dataloader(self) -> DataLoader:
        """Whole slices of the test patients in ``eval`` form."""
        if self.test_dataset is None:
            self.setup("test")
        if not len(self.test_dataset):
            raise DataConfigError(
                f"data.n_test={self.n_test!r}: the split has no test patient. Set n_test > 0"
            )
        return self._slice_loader(self.test_dataset)

    # --------------------------------------------------------------------------------------- summary

    def summary_rows(self) -> list[dict[str, Any]]:
        """One row per series of the split's studies: split, patient, role, series, dose, slices."""
        self._prepare()
        part_of = {k: part for part in ("train", "val", "test") for k in getattr(self.split, part)}
        rows = []
        for study in self.studies:
            for role, s in (("ldct", study.ldct), ("ndct", study.ndct)):
                rows.append(
                    {
                        "split": part_of.get(study.patient_key, "-"),
                        "patient_key": study.patient_key,
                        "role": role,
                        "series_key": s.series_key,
                        "description": s.series_description,
                        "ctdi_vol": s.ctdi_vol,
                        "tube_current_ma": s.tube_current_ma,
                        "slices": s.n_slices,
                        "matrix": f"{s.rows}x{s.cols}",
                        "aligned": study.aligned,
                        "truth": (self.root / "truth" / f"{study.patient_key}.npz").is_file(),
                    }
                )
        return rows

    def summary(self) -> str:
        """A text table of :meth:`summary_rows` for command-line tools."""

        def fmt(value: Any) -> str:
            if value is None:
                return "-"
            if isinstance(value, float):
                return f"{value:.3g}"
            return str(value)

        rows = self.summary_rows()
        header = [
            "split",
            "patient_key",
            "role",
            "series_key",
            "ctdi_vol",
            "tube_current_ma",
            "slices",
            "matrix",
            "aligned",
            "truth",
        ]
        table = [header] + [[fmt(r[h]) for h in header] for r in rows]
        widths = [max(len(row[i]) for row in table) for i in range(len(header))]
        lines = [
            "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in table
        ]
        counts = {part: len(getattr(self.split, part)) for part in ("train", "val", "test")}
        lines.append(
            f"{len(self.studies)} patients: {counts['train']} train, {counts['val']} val, {counts['test']} test "
            f"(split {self.split_file}, inputs hash {self.split.inputs_hash[:12]})"
        )
        return "\n".join(lines)

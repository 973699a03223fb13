"""Torch datasets over cached HU volumes: random training crops and whole validation/test slices.

Every image comes out as a float32 tensor (1, h, w) in [0, 1] (:func:`ldct_lightning.data.normalize.hu_to_unit`).

Randomness: a training sample is a pure function of ``(seed, index)``; the index is the global sample
number ``epoch * samples_per_epoch + i`` that :class:`EpochSampler` yields. Samples are therefore the
same for any number of workers, differ between epochs and workers, and repeat for a seed. (With a
plain sampler the indices, and so the crops, repeat every epoch.)
"""

from __future__ import annotations

import mmap
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, fields
from typing import Any, TypedDict, Unpack

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from ldct_lightning.data.normalize import HU_MAX, HU_MIN, hu_to_unit

NoiseModel = Callable[..., Any]  # (hu, generator) -> noisy hu, see ldct_lightning.data.noise


# ------------------------------------------------------------------------------------------- volumes


def _memmap_state(array: np.ndarray | None) -> Any:
    """Pickle a whole-file memmap as its location (reopened on load), anything else as itself.

    np.memmap pickles as an in-memory copy of all its data; workers started by spawn would each get a
    full copy of every volume.
    """
    if isinstance(array, np.memmap) and isinstance(array.base, mmap.mmap) and array.filename:
        return ("__memmap__", array.filename, array.dtype.str, array.offset, array.shape)
    return array


def _memmap_load(state: Any) -> Any:
    if isinstance(state, tuple) and len(state) == 5 and state[0] == "__memmap__":
        _, filename, dtype, offset, shape = state
        return np.memmap(filename, dtype=np.dtype(dtype), mode="r", offset=offset, shape=shape)
    return state


@dataclass
class PatientVolumes:
    """One patient's HU volumes (numpy arrays or cache memory maps), slices sorted by z.

    Attributes:
        patient_key: hashed PatientID.
        ldct: low-dose volume (n_ld, h, w) in HU.
        ndct: normal-dose volume (n_nd, h', w') in HU.
        z_ldct: LDCT slice positions (mm), ascending; default: slice indices.
        z_ndct: NDCT slice positions (mm), ascending; default: slice indices.
        aligned: True when slice i of LDCT and NDCT show the same anatomy pixel for pixel.
        reference: clean image aligned with the LDCT slices (synthetic truth), or None.
        labels: ROI label map aligned with the LDCT slices, or None.
        correspondence: LDCT -> NDCT point map from the study's registration
            (:class:`ldct_lightning.registration.Correspondence`), or None (then z positions are compared,
            which is only valid when both series share a frame of reference).
        ndct_registered: the NDCT resampled onto the LDCT grid by the registration (HU), or None.
        registered_mask: well-registered LDCT pixels (bool, LDCT shape), or None.
        usable_slices: LDCT slices that registered well enough to use (bool per slice), or None.
    """

    patient_key: str
    ldct: np.ndarray | None = None
    ndct: np.ndarray | None = None
    z_ldct: np.ndarray | None = None
    z_ndct: np.ndarray | None = None
    aligned: bool = False
    reference: np.ndarray | None = None
    labels: np.ndarray | None = None
    correspondence: Any = None
    ndct_registered: np.ndarray | None = None
    registered_mask: np.ndarray | None = None
    usable_slices: np.ndarray | None = None

    def __post_init__(self) -> None:
        for name, z_name in (("ldct", "z_ldct"), ("ndct", "z_ndct")):
            volume, z = getattr(self, name), getattr(self, z_name)
            if volume is None:
                continue
            if volume.ndim != 3:
                raise ValueError(
                    f"patient {self.patient_key}: {name} must be (n, h, w), got shape {volume.shape}"
                )
            z = np.arange(len(volume), dtype=np.float64) if z is None else np.asarray(z, dtype=np.float64)
            if z.shape != (len(volume),):
                raise ValueError(
                    f"patient {self.patient_key}: {z_name} has {z.size} values for {len(volume)} slices"
                )
            if np.any(np.diff(z) < 0):
                raise ValueError(f"patient {self.patient_key}: {z_name} must be ascending")
            setattr(self, z_name, z)
        for name in ("reference", "labels", "ndct_registered", "registered_mask"):
            extra = getattr(self, name)
            if extra is not None and (self.ldct is None or extra.shape != self.ldct.shape):
                ldct_shape = None if self.ldct is None else self.ldct.shape
                raise ValueError(
                    f"patient {self.patient_key}: {name} {extra.shape} must match the LDCT volume {ldct_shape}"
                )

    def __getstate__(self) -> dict:
        return {f.name: _memmap_state(getattr(self, f.name)) for f in fields(self)}

    def __setstate__(self, state: dict) -> None:
        for name, value in state.items():
            setattr(self, name, _memmap_load(value))


def nearest_slices(z_from: np.ndarray, z_to: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each position in ``z_from``, the index of the nearest position in ascending ``z_to``.

    Args:
        z_from: positions (mm).
        z_to: ascending positions (mm).

    Returns:
        (indices into ``z_to``, absolute distances in mm).
    """
    right = (
        np.clip(np.searchsorted(z_to, z_from), 1, len(z_to) - 1)
        if len(z_to) > 1
        else np.zeros(len(z_from), int)
    )
    left = np.maximum(right - 1, 0)
    take_left = np.abs(z_from - z_to[left]) <= np.abs(z_to[right] - z_from)
    idx = np.where(take_left, left, right)
    return idx, np.abs(z_to[idx] - z_from)


def _check_crop(crop_size: int, volume: np.ndarray, what: str) -> None:
    if crop_size > volume.shape[1] or crop_size > volume.shape[2]:
        raise ValueError(
            f"crop_size={crop_size} is larger than the {what} image ({volume.shape[1]}x{volume.shape[2]}). "
            "Lower crop_size"
        )


# ------------------------------------------------------------------------------------------ sampling


class EpochSampler(Sampler[int]):
    """Yields the global sample numbers ``epoch * n + i`` (i < n) so each epoch draws new crops.

    Lightning calls :meth:`set_epoch` before every epoch (also after a resume); without it the epoch
    advances by one at every iteration.

    Args:
        n: samples per epoch.
    """

    def __init__(self, n: int) -> None:
        self.n = n
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        start = self.epoch * self.n
        self.epoch += 1
        return iter(range(start, start + self.n))

    def __len__(self) -> int:
        return self.n


class PatientBatchSampler(Sampler[list[int]]):
    """Batches of consecutive items of the same patient (slices of one patient share a matrix size).

    Args:
        patients: the patient index of each item, grouped (items of a patient are consecutive).
        batch_size: largest batch.
    """

    def __init__(self, patients: Sequence[int], batch_size: int) -> None:
        self.batches: list[list[int]] = []
        for i, p in enumerate(patients):
            if self.batches and len(self.batches[-1]) < batch_size and patients[self.batches[-1][0]] == p:
                self.batches[-1].append(i)
            else:
                self.batches.append([i])

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


EDGE_MIN_FOREGROUND = 0.05  # an edge crop: at least this fraction of body pixels


class CropArgs(TypedDict, total=False):
    """The crop settings every training dataset takes as keywords (see :class:`_CropDataset`)."""

    crop_size: int
    samples_per_epoch: int
    seed: int
    augment: bool
    hu_min: float
    hu_max: float
    min_foreground: float
    foreground_hu: float
    max_tries: int


class _CropDataset(Dataset):
    """Shared machinery: per-sample RNG, crop positions, foreground check, dihedral augmentation.

    Args (keyword-only, the same for every training dataset: :class:`CropArgs`):
        crop_size: square crop size in pixels.
        samples_per_epoch: dataset length.
        seed: random seed.
        augment: random flips and 90-degree rotations (the same for every crop of a sample).
        hu_min: HU mapped to 0.
        hu_max: HU mapped to 1.
        min_foreground: smallest fraction of (input) crop pixels above ``foreground_hu`` (0 = no check).
        foreground_hu: HU threshold between air and body.
        max_tries: crop positions tried before accepting a mostly-air crop.
    """

    _stream = 0  # separates the random streams of the dataset classes for one seed
    # fraction of crops held only to EDGE_MIN_FOREGROUND instead of min_foreground: crops of the air / skin edge,
    # which whole slices have and >= 50 %-body crops rarely show (set by the DataModule, data.edge_crop_fraction)
    edge_fraction: float = 0.0

    def __init__(
        self,
        *,
        crop_size: int = 128,
        samples_per_epoch: int = 1000,
        seed: int = 0,
        augment: bool = True,
        hu_min: float = HU_MIN,
        hu_max: float = HU_MAX,
        min_foreground: float = 0.0,
        foreground_hu: float = -500.0,
        max_tries: int = 10,
    ) -> None:
        if crop_size < 1:
            raise ValueError(f"crop_size must be >= 1, got {crop_size}")
        if samples_per_epoch < 1:
            raise ValueError(f"samples_per_epoch must be >= 1, got {samples_per_epoch}")
        if not 0.0 <= min_foreground <= 1.0:
            raise ValueError(f"min_foreground must lie in [0, 1], got {min_foreground}")
        if hu_max <= hu_min:
            raise ValueError(f"hu_max ({hu_max}) must be greater than hu_min ({hu_min})")
        self.crop_size = int(crop_size)
        self.samples_per_epoch = int(samples_per_epoch)
        self.seed = int(seed)
        self.augment = augment
        self.hu_min, self.hu_max = float(hu_min), float(hu_max)
        self.min_foreground = float(min_foreground)
        self.foreground_hu = float(foreground_hu)
        self.max_tries = max(1, int(max_tries))

    def __len__(self) -> int:
        return self.samples_per_epoch

    def rng(self, index: int) -> np.random.Generator:
        """The random generator of sample ``index`` (a global sample number, see :class:`EpochSampler`)."""
        return np.random.default_rng((self.seed % 2**63, self._stream, int(index)))

    def _position(self, rng: np.random.Generator, volume: np.ndarray, k: int) -> tuple[int, int]:
        """A crop corner in slice ``k``; while the crop is mostly air, up to ``max_tries`` are drawn and
        the one with the most foreground is kept."""
        s = self.crop_size
        h, w = volume.shape[1:]
        best, best_count = (0, 0), -1
        min_foreground = self.min_foreground
        # drawn only when used, so that edge_fraction = 0 keeps every crop position of a seed
        if self.edge_fraction > 0 and min_foreground > 0 and rng.random() < self.edge_fraction:
            min_foreground = min(min_foreground, EDGE_MIN_FOREGROUND)
        for _ in range(self.max_tries):
            y, x = int(rng.integers(0, h - s + 1)), int(rng.integers(0, w - s + 1))
            if min_foreground <= 0:
                return y, x
            count = np.count_nonzero(volume[k, y : y + s, x : x + s] > self.foreground_hu)
            if count >= min_foreground * s * s:
                return y, x
            if count > best_count:
                best, best_count = (y, x), count
        return best

    def _crop(self, volume: np.ndarray, k: int, y: int, x: int, transform: int) -> np.ndarray:
        """A float32 HU crop with one of the 8 flips/rotations by 90 degrees applied (0 = identity)."""
        s = self.crop_size
        crop = volume[k, y : y + s, x : x + s]
        if transform % 4:
            crop = np.rot90(crop, transform % 4)
        if transform >= 4:
            crop = crop[:, ::-1]
        # the flips and rotations above are views: this one copy makes the crop contiguous
        return np.array(crop, dtype=np.float32)

    def _transform(self, rng: np.random.Generator) -> int:
        """The flip/rotation of a sample (0 = identity)."""
        return int(rng.integers(8)) if self.augment else 0

    def _finish(self, hu: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Scale to [0, 1] and add the channel axis."""
        hu = hu if isinstance(hu, torch.Tensor) else torch.from_numpy(hu)
        return hu_to_unit(hu, self.hu_min, self.hu_max)[None]

    @staticmethod
    def _plain(volume: np.ndarray) -> np.ndarray:
        # np.memmap's own indexing costs several microseconds per call; a plain view shares the mapping
        return volume.view(np.ndarray) if isinstance(volume, np.memmap) else volume


# ------------------------------------------------------------------------------------------ datasets


class SimulatedDataset(_CropDataset):
    """Stage 1: an NDCT crop plus simulated noise (``input``) and the identical clean crop (``target``).

    Args:
        patients: volumes with ``ndct`` set.
        noise: noise model ``(hu, generator) -> noisy hu`` (see :mod:`ldct_lightning.data.noise`).
        **crop: crop settings (:class:`CropArgs`, see :class:`_CropDataset`).
    """

    _stream = 1

    def __init__(
        self,
        patients: Sequence[PatientVolumes],
        noise: NoiseModel,
        **crop: Unpack[CropArgs],
    ) -> None:
        super().__init__(**crop)
        if not patients:
            raise ValueError("SimulatedDataset needs at least one patient")
        for p in patients:
            if p.ndct is None:
                raise ValueError(f"patient {p.patient_key}: SimulatedDataset needs the NDCT volume")
            _check_crop(self.crop_size, p.ndct, f"NDCT of patient {p.patient_key}")
        self.patients = list(patients)
        self.noise = noise
        self._ends = np.cumsum([len(p.ndct) for p in self.patients])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rng = self.rng(index)
        g = int(rng.integers(self._ends[-1]))
        p = int(np.searchsorted(self._ends, g, side="right"))
        k = g - (int(self._ends[p - 1]) if p else 0)
        volume = self._plain(self.patients[p].ndct)
        y, x = self._position(rng, volume, k)
        clean = self._crop(volume, k, y, x, self._transform(rng))
        noisy = torch.as_tensor(self.noise(clean, rng), dtype=torch.float32)
        # one normalisation for both images (each tensor op has a fixed cost comparable to the crop itself)
        both = self._finish(torch.stack((noisy, torch.from_numpy(clean))))[0]
        return {"input": both[:1], "target": both[1:]}


class UnalignedDataset(_CropDataset):
    """Stage 2: an LDCT crop (``ldct``) and an NDCT crop (``ndct``) of the same patient and similar anatomy.

    With a registration (``patient.correspondence``) the centre of the LDCT crop is mapped into the NDCT
    volume: the NDCT crop comes from the nearest NDCT slice, centred on the mapped point (the small
    in-plane rotation is not applied: the NDCT pixels stay as acquired); only usable LDCT slices that map
    inside the NDCT stack are drawn. Without one (series sharing a frame of reference) the NDCT slice is
    the one nearest in position (LDCT slices with no NDCT slice within ``z_tolerance_mm`` are never
    drawn) at the LDCT crop's pixel position. Either way the NDCT crop is shifted by up to ``xy_jitter``
    pixels, so the two crops show similar anatomy, not the same pixels.

    Args:
        patients: volumes with ``ldct`` and ``ndct`` set.
        z_tolerance_mm: largest LDCT-to-NDCT slice distance.
        xy_jitter: largest shift (pixels) of the NDCT crop against the LDCT crop.
        with_registered: also return ``registered`` (the NDCT registered onto the LDCT, same pixels as
            the LDCT crop) and ``registered_mask`` (its well-registered pixels), for stage 2's optional
            registered term; patients without a registration give an all-zero mask.
        **crop: crop settings (:class:`CropArgs`, see :class:`_CropDataset`).
    """

    _stream = 2
    keys = ("ldct", "ndct")

    def __init__(
        self,
        patients: Sequence[PatientVolumes],
        z_tolerance_mm: float = 5.0,
        xy_jitter: int = 16,
        with_registered: bool = False,
        **crop: Unpack[CropArgs],
    ) -> None:
        super().__init__(**crop)
        self.with_registered = bool(with_registered)
        if not patients:
            raise ValueError(f"{type(self).__name__} needs at least one patient")
        if z_tolerance_mm < 0 or xy_jitter < 0:
            raise ValueError(f"z_tolerance_mm and xy_jitter must be >= 0, got {z_tolerance_mm}, {xy_jitter}")
        self.patients = list(patients)
        self.z_tolerance_mm = float(z_tolerance_mm)
        self.xy_jitter = int(xy_jitter)
        pairs = []
        for i, p in enumerate(self.patients):
            self._check_patient(p)
            ldct_idx, ndct_idx = self._slice_pairs(p)
            pairs.append(np.stack((np.full(len(ldct_idx), i), ldct_idx, ndct_idx), axis=1))
        # (patient index, LDCT slice, NDCT slice) of every drawable slice pair
        self.pairs = np.concatenate(pairs)

    def _slice_pairs(self, p: PatientVolumes) -> tuple[np.ndarray, np.ndarray]:
        """LDCT slices with an NDCT slice within the z tolerance (or through the registration), and that NDCT slice."""
        if p.correspondence is not None:
            ok = p.correspondence.ldct_slices_inside()
            if p.usable_slices is not None:
                ok = ok[np.asarray(p.usable_slices, dtype=bool)[ok]]
            if not len(ok):
                raise ValueError(
                    f"patient {p.patient_key}: no usable LDCT slice maps inside the NDCT stack through the "
                    "registration. Check the study (ldct-data-summary shows its registration)"
                )
            rows, cols = p.ldct.shape[1:]
            nd = p.correspondence.ndct_index(ok, (rows - 1) / 2, (cols - 1) / 2)[:, 0]
            return ok, np.clip(np.rint(nd), 0, len(p.ndct) - 1).astype(int)
        ndct_idx, dz = nearest_slices(p.z_ldct, p.z_ndct)
        ok = np.flatnonzero(dz <= self.z_tolerance_mm)
        if not len(ok):
            raise ValueError(
                f"patient {p.patient_key}: no LDCT slice has an NDCT slice within z_tolerance_mm="
                f"{self.z_tolerance_mm:g} (LDCT z {p.z_ldct[0]:.1f}..{p.z_ldct[-1]:.1f} mm, NDCT z "
                f"{p.z_ndct[0]:.1f}..{p.z_ndct[-1]:.1f} mm). Raise z_tolerance_mm or check the series"
            )
        return ok, ndct_idx[ok]

    def _check_patient(self, p: PatientVolumes) -> None:
        if p.ldct is None or p.ndct is None:
            raise ValueError(
                f"patient {p.patient_key}: {type(self).__name__} needs the LDCT and NDCT volumes"
            )
        _check_crop(self.crop_size, p.ldct, f"LDCT of patient {p.patient_key}")
        _check_crop(self.crop_size, p.ndct, f"NDCT of patient {p.patient_key}")

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rng = self.rng(index)
        i, k_ld, k_nd = (int(v) for v in self.pairs[rng.integers(len(self.pairs))])
        patient = self.patients[i]
        ldct, ndct = self._plain(patient.ldct), self._plain(patient.ndct)
        y, x = self._position(rng, ldct, k_ld)
        s, j = self.crop_size, self.xy_jitter
        dy, dx = (int(v) for v in rng.integers(-j, j + 1, size=2)) if j else (0, 0)
        y_nd, x_nd = y, x
        if patient.correspondence is not None:
            kf, rf, cf = patient.correspondence.ndct_index(k_ld, y + (s - 1) / 2, x + (s - 1) / 2)
            k_nd = int(np.clip(np.rint(kf), 0, len(ndct) - 1))
            y_nd, x_nd = int(np.rint(rf - (s - 1) / 2)), int(np.rint(cf - (s - 1) / 2))
        y_nd = min(max(y_nd + dy, 0), ndct.shape[1] - s)
        x_nd = min(max(x_nd + dx, 0), ndct.shape[2] - s)
        t = self._transform(rng)
        first, second = self.keys
        out = {
            first: self._finish(self._crop(ldct, k_ld, y, x, t)),
            second: self._finish(self._crop(ndct, k_nd, y_nd, x_nd, t)),
        }
        if self.with_registered:
            if patient.ndct_registered is None:
                out["registered"] = torch.zeros_like(out[first])
                out["registered_mask"] = torch.zeros_like(out[first])
            else:
                out["registered"] = self._finish(
                    self._crop(self._plain(patient.ndct_registered), k_ld, y, x, t)
                )
                mask = self._crop(np.asarray(patient.registered_mask[k_ld : k_ld + 1]), 0, y, x, t)
                out["registered_mask"] = torch.from_numpy(mask)[None]
        return out


class PairedDataset(UnalignedDataset):
    """Aligned data only: an LDCT crop (``input``) and the NDCT crop of the same pixels (``target``).

    Aligned studies pair slice i of the LDCT series with slice i of the NDCT series.

    Args:
        patients: volumes with ``ldct`` and ``ndct`` set and ``aligned=True``.
        **crop: crop settings (:class:`CropArgs`, see :class:`_CropDataset`).

    Raises:
        ValueError: a patient is not flagged aligned, or its LDCT and NDCT differ in matrix size.
    """

    _stream = 3
    keys = ("input", "target")

    def __init__(
        self,
        patients: Sequence[PatientVolumes],
        **crop: Unpack[CropArgs],
    ) -> None:
        # aligned: slice i with slice i, the same pixels (no z search, no jitter)
        super().__init__(patients, z_tolerance_mm=0.0, xy_jitter=0, **crop)

    def _check_patient(self, p: PatientVolumes) -> None:
        if not p.aligned:
            raise ValueError(
                f"patient {p.patient_key}: paired training needs aligned LDCT/NDCT studies, and this one is not "
                "flagged aligned. Use train_mode=unaligned, or flag the study aligned (manifest column "
                "'aligned' or aligned=true) if slice i of both series shows the same anatomy"
            )
        super()._check_patient(p)
        if p.ldct.shape != p.ndct.shape:
            raise ValueError(
                f"patient {p.patient_key}: aligned LDCT {p.ldct.shape} and NDCT {p.ndct.shape} volumes differ "
                "in slices or matrix size. Aligned studies need one NDCT slice per LDCT slice"
            )

    def _slice_pairs(self, p: PatientVolumes) -> tuple[np.ndarray, np.ndarray]:
        index = np.arange(len(p.ldct))
        return index, index


class RegisteredDataset(_CropDataset):
    """An LDCT crop (``input``), the same pixels of the NDCT registered onto the LDCT (``target``) and a
    per-pixel loss weight (``mask``), for supervised training on clinical pairs.

    Inside the well-registered mask the target is the registered NDCT with weight 1. Outside it the
    registered NDCT is a wrong target (structure a few mm off, slices mixed by the z interpolation), and
    no target at all lets the network output anything there; so the target is the input itself with
    weight ``input_weight``: where the NDCT cannot tell, keep the LDCT (0: no supervision there).
    Only usable LDCT slices (see :class:`PatientVolumes`) are drawn.

    Args:
        patients: volumes with ``ldct``, ``ndct_registered`` and ``registered_mask`` set.
        input_weight: loss weight of the LDCT-as-target pixels outside the mask, in [0, 1].
        **crop: crop settings (:class:`CropArgs`, see :class:`_CropDataset`).
    """

    _stream = 4

    def __init__(
        self,
        patients: Sequence[PatientVolumes],
        input_weight: float = 0.0,
        **crop: Unpack[CropArgs],
    ) -> None:
        super().__init__(**crop)
        if not patients:
            raise ValueError("RegisteredDataset needs at least one patient")
        if not 0 <= input_weight <= 1:
            raise ValueError(f"RegisteredDataset: input_weight={input_weight!r} must be in [0, 1]")
        self.input_weight = float(input_weight)
        pairs = []
        for i, p in enumerate(patients):
            if p.ldct is None or p.ndct_registered is None or p.registered_mask is None:
                raise ValueError(
                    f"patient {p.patient_key}: registered training needs the LDCT and the NDCT registered onto "
                    "it; this study has no registration (data.registration.mode=off, or its series share a "
                    "frame of reference: set data.registration.mode=always)"
                )
            _check_crop(self.crop_size, p.ldct, f"LDCT of patient {p.patient_key}")
            usable = (
                np.ones(len(p.ldct), bool) if p.usable_slices is None else np.asarray(p.usable_slices, bool)
            )
            ok = np.flatnonzero(usable)
            pairs.append(np.stack((np.full(len(ok), i), ok), axis=1))
        self.patients = list(patients)
        self.pairs = np.concatenate(pairs)
        if not len(self.pairs):
            raise ValueError("RegisteredDataset: no usable registered LDCT slice in any training patient")

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rng = self.rng(index)
        i, k = (int(v) for v in self.pairs[rng.integers(len(self.pairs))])
        p = self.patients[i]
        ldct = self._plain(p.ldct)
        y, x = self._position(rng, ldct, k)
        t = self._transform(rng)
        images = self._finish(
            torch.stack(
                (
                    torch.from_numpy(self._crop(ldct, k, y, x, t)),
                    torch.from_numpy(self._crop(self._plain(p.ndct_registered), k, y, x, t)),
                )
            )
        )[0]
        crop = self._crop(np.asarray(p.registered_mask[k : k + 1]), 0, y, x, t)
        mask = torch.from_numpy(np.asarray(crop, dtype=bool))[None]
        target = torch.where(mask, images[1:], images[:1])
        weight = torch.where(mask, 1.0, self.input_weight).to(images.dtype)
        return {"input": images[:1], "target": target, "mask": weight}


class SliceDataset(Dataset):
    """Whole slices for validation (``kind="val"``) or evaluation (``kind="eval"``).

    ``val`` items have ``input`` and ``target``: the LDCT slice and its aligned clean ``reference`` when
    the patient has one; else, for aligned studies, LDCT slice i and NDCT slice i; else the NDCT slice plus noise from ``noise`` (seeded by the item, so identical in every
    epoch) and the NDCT slice. ``eval`` items have ``input`` (LDCT), ``ndct`` (the NDCT registered onto the LDCT slice when the study has
    a registration, else the NDCT slice nearest in
    z; slice i for aligned studies), and ``reference`` and ``labels`` (int64) when every patient has them. Both kinds add
    ``patient_key`` and ``slice_index`` (of the LDCT slice, or of the NDCT slice for simulated items).

    Args:
        patients: volumes (``ldct`` and/or ``ndct`` as the kind needs).
        kind: ``val`` or ``eval``.
        noise: noise model for simulated validation items.
        max_slices: at most this many slices in all, evenly spaced in z within each patient (None: all).
        seed: random seed of the simulated noise.
        hu_min: HU mapped to 0.
        hu_max: HU mapped to 1.
    """

    def __init__(
        self,
        patients: Sequence[PatientVolumes],
        kind: str = "val",
        noise: NoiseModel | None = None,
        max_slices: int | None = None,
        seed: int = 0,
        hu_min: float = HU_MIN,
        hu_max: float = HU_MAX,
    ) -> None:
        if kind not in ("val", "eval"):
            raise ValueError(f"kind must be 'val' or 'eval', got {kind!r}")
        if max_slices is not None and max_slices < 1:
            raise ValueError(f"max_slices must be >= 1 or None, got {max_slices}")
        if hu_max <= hu_min:
            raise ValueError(f"hu_max ({hu_max}) must be greater than hu_min ({hu_min})")
        self.patients = list(patients)
        self.kind = kind
        self.noise = noise
        self.seed = int(seed)
        self.hu_min, self.hu_max = float(hu_min), float(hu_max)
        per_patient = None if max_slices is None else max(1, max_slices // max(1, len(self.patients)))
        # items: (patient index, source, slice index, other slice index)
        self.items: list[tuple[int, str, int, int]] = []
        for i, p in enumerate(self.patients):
            source = self._source(p)
            volume = p.ndct if source == "simulated" else p.ldct
            if volume is None:
                raise ValueError(
                    f"patient {p.patient_key}: {kind} slices need the {'NDCT' if source == 'simulated' else 'LDCT'} volume"
                )
            n = len(volume)
            chosen = (
                np.arange(n)
                if per_patient is None or per_patient >= n
                else np.linspace(0, n - 1, per_patient)
            )
            chosen = np.unique(np.round(chosen).astype(int))
            other = np.full(n, -1)
            if source in ("paired", "eval"):
                if p.ndct is None:
                    raise ValueError(f"patient {p.patient_key}: {kind} slices need the NDCT volume")
                if p.aligned and p.ldct.shape == p.ndct.shape:
                    other = np.arange(n)  # aligned studies: slice i of both series
                else:
                    other, _ = nearest_slices(p.z_ldct, p.z_ndct)
            self.items += [(i, source, int(k), int(other[k])) for k in chosen]
        self.with_truth = (
            kind == "eval" and bool(self.patients) and all(p.reference is not None for p in self.patients)
        )
        self.with_labels = (
            kind == "eval" and bool(self.patients) and all(p.labels is not None for p in self.patients)
        )

    def _source(self, p: PatientVolumes) -> str:
        if self.kind == "eval":
            return "eval"
        if p.reference is not None:
            return "reference"
        if p.aligned and p.ldct is not None and p.ndct is not None and p.ldct.shape == p.ndct.shape:
            return "paired"
        if self.noise is None:
            raise ValueError(
                f"patient {p.patient_key}: no reference and not aligned, so validation needs a noise model to "
                "simulate the input from the NDCT slice"
            )
        return "simulated"

    @property
    def patient_of_item(self) -> list[int]:
        """Patient index of each item (for :class:`PatientBatchSampler`)."""
        return [item[0] for item in self.items]

    def __len__(self) -> int:
        return len(self.items)

    def _unit(self, hu: np.ndarray | torch.Tensor) -> torch.Tensor:
        t = hu if isinstance(hu, torch.Tensor) else torch.from_numpy(np.array(hu, dtype=np.float32))
        return hu_to_unit(t.float(), self.hu_min, self.hu_max)[None]

    def __getitem__(self, index: int) -> dict[str, Any]:
        i, source, k, other = self.items[index]
        p = self.patients[i]
        out: dict[str, Any] = {}
        if source == "simulated":
            clean = torch.from_numpy(np.array(p.ndct[k], dtype=np.float32))
            rng = np.random.default_rng((self.seed % 2**63, 7, index))
            out["input"], out["target"] = self._unit(self.noise(clean, rng)), self._unit(clean)
        elif source == "reference":
            out["input"], out["target"] = self._unit(p.ldct[k]), self._unit(p.reference[k])
        elif source == "paired":
            out["input"], out["target"] = self._unit(p.ldct[k]), self._unit(p.ndct[other])
        else:
            # the paper protocol's NDCT: the registered one when the study has a registration
            ndct = p.ndct[other] if p.ndct_registered is None else p.ndct_registered[k]
            out["input"], out["ndct"] = self._unit(p.ldct[k]), self._unit(ndct)
            if self.with_truth:
                out["reference"] = self._unit(p.reference[k])
            if self.with_labels:
                out["labels"] = torch.from_numpy(np.array(p.labels[k], dtype=np.int64))[None]
        out["patient_key"] = p.patient_key
        out["slice_index"] = k
        return out

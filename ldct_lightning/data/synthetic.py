"""The built-in synthetic LDCT/NDCT data set (SPEC section 2).

For every patient a procedural phantom (:mod:`.phantom`) is scanned twice, as on two different days: a
normal-dose (NDCT) series in a reference pose and a low-dose (LDCT) series in a slightly different pose
(rigid shift/rotation, breathing, smooth warp, table offset), so the pairs are *not* pixel aligned. Dose is
simulated in the projection domain (:mod:`.projector`: Poisson photon noise plus electronic noise, then
FBP), which gives CT-like correlated noise and streaks. Both series are written as real DICOM; the
noiseless reconstructions, ROI labels and an extra low-dose scan in the NDCT pose are kept as ground truth.

Output layout (see ``generate_dataset``)::

    dicom/<hex>/<hex>/<hex>.dcm     both series of every patient, randomly named and mixed
    truth/<patient_key>.npz         clean_ld, labels_ld, z_ld | clean_nd, labels_nd, lowdose_nd, z_nd |
                                    ld_to_nd_matrix, ld_to_nd_offset (rigid truth, DICOM mm), table_offset_mm
    labels.json  manifest.csv  summary.json  overview.png
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import datetime as dt
import json
import math
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from pydicom.uid import generate_uid
from tqdm.auto import tqdm

from ldct_lightning.data import realism
from ldct_lightning.data.dicom_write import CTSeriesSpec, write_ct_series
from ldct_lightning.data.normalize import apply_window
from ldct_lightning.data.phantom import (
    LABEL_NAMES,
    LIVER,
    Anatomy,
    random_anatomy,
    random_pose,
    random_trabecular,
    render_slices,
    with_habitus,
)
from ldct_lightning.data.projector import add_poisson_noise, fbp, forward_project, hu_to_mu, mu_to_hu
from ldct_lightning.privacy import hash_identifier, set_synthetic_key

LABELS: dict[int, str] = dict(LABEL_NAMES)
# FBP filter -> the ConvolutionKernel written to DICOM (smooth to sharp)
KERNELS: dict[str, str] = {"hann": "STANDARD", "cosine": "SOFT", "shepp-logan": "DETAIL", "ramp": "BONE"}

# Reference tube current and CTDIvol of the NDCT protocol; photons per ray scale with the tube current.
REFERENCE_MA = 300.0
REFERENCE_CTDI_MGY = 12.0
ROTATION_TIME_MS = 500.0
# log of the mean transmission loss through the central 10 cm of a typical phantom (gets REFERENCE_MA)
AEC_REFERENCE_INDEX = 5.1
ABDOMEN_WINDOW = (40.0, 400.0)


@dataclass(frozen=True)
class SyntheticConfig:
    """How to build the synthetic data set.

    Attributes:
        n_patients: number of patients (each gets one LDCT and one NDCT series).
        n_slices: slices per series.
        image_size: N of the N x N slices.
        pixel_mm: pixel size; ``image_size * pixel_mm`` is the field of view (~360 mm fits an adult trunk).
        slice_thickness_mm: SliceThickness written to the DICOM headers.
        slice_spacing_mm: distance between simulated slices (a stack covers ``n_slices * spacing`` mm
            around the diaphragm, from upper abdomen to lower chest).
        n_views: projection angles over 180 degrees (a multiple of 4).
        photons_ndct: unattenuated photons per detector bin per view at the NDCT reference tube current
            (calibrated per resolution so that the NDCT noise in the liver is ~8-15 HU).
        dose_ratio: LDCT / NDCT dose (the paper's ~1.5 / 12 mGy is 1/8).
        dose_ratio_max: when set, each patient's dose ratio is drawn uniformly from
            ``[dose_ratio, dose_ratio_max]`` (protocols differ between patients).
        electronic_noise_sd: electronic noise SD, in photon counts per detector reading.
        kernels: FBP filters, one drawn per patient (both of its series use it); see :data:`KERNELS`
            (``hann`` gives the mid-frequency noise texture of a soft-tissue kernel, ``ramp`` the fine,
            stronger noise and the sharper edges of a bone/sharp kernel).
        habitus: range of the body-size factor drawn per patient: the subcutaneous fat grows or shrinks
            with it (1 = the anatomy as drawn; 0.9-1.1 spans slim to large within the field of view).
        trabecular: the bone model with cancellous bone: vertebral body, lamina, spinous process and ribs
            get a trabecular network (a band-pass random field's zero-level sheets, 3-6 mm wavelengths)
            inside a thin cortex, instead of solid posterior elements and smooth marrow texture.
        bowtie: a bowtie filter (fewer photons towards the edge of the fan) and angular tube-current
            modulation (more photons through the wide, lateral views), so the noise varies across the
            field as on scanners.
        dicom_variety: each series is written with one of several real-world storage conventions
            (signed or unsigned pixels, RescaleIntercept -1024 or 0, explicit or implicit VR).
        misalignment: scales the LDCT pose change (0 = same pose, same frame, same slices; 1 = a few mm,
            a few degrees, a few mm of breathing and of slice sampling).
        table_offset_mm: largest |table offset| of the LDCT study: its own frame of reference puts the
            same anatomy at z + offset, offset drawn per patient with a random sign and a size in
            [min(20, max), max] mm (0: both series in one physical frame).
        scan_range_slices: the LDCT covers up to this many slices more or fewer than the NDCT (at each
            end independently, at least 2 slices in all).
        seed: random seed; the same seed gives identical arrays.
    """

    n_patients: int = 10
    n_slices: int = 10
    image_size: int = 256
    pixel_mm: float = 1.4
    slice_thickness_mm: float = 1.25
    slice_spacing_mm: float = 12.0
    n_views: int = 360
    photons_ndct: float = 2.6e5
    dose_ratio: float = 0.125
    dose_ratio_max: float | None = None
    electronic_noise_sd: float = 5.0
    kernels: tuple[str, ...] = ("hann",)
    habitus: tuple[float, float] = (1.0, 1.0)
    trabecular: bool = False
    bowtie: bool = False
    dicom_variety: bool = False
    misalignment: float = 1.0
    table_offset_mm: float = 150.0
    scan_range_slices: int = 1
    seed: int = 0

    def resized(self, image_size: int) -> SyntheticConfig:
        """The same field of view and noise level at another matrix size.

        The views scale with the size; the photons per ray follow the calibrated presets' rule
        ``photons * n_views * pixel_mm**2 ~ constant`` (noise variance ~ 1 / (photons * views * pixel^2)).
        """
        n_views = max(4, 4 * round(self.n_views * image_size / self.image_size / 4))
        pixel_mm = self.pixel_mm * self.image_size / image_size
        photons = self.photons_ndct * (self.n_views / n_views) * (self.pixel_mm / pixel_mm) ** 2
        return dataclasses.replace(
            self, image_size=image_size, pixel_mm=pixel_mm, n_views=n_views, photons_ndct=photons
        )

    def validate(self) -> None:
        """Raise ``ValueError`` naming the key of an impossible value."""
        positive = "use a positive value"
        checks = {  # key -> (valid, what to use instead)
            "n_patients": (self.n_patients >= 1, positive),
            "n_slices": (self.n_slices >= 1, positive),
            "image_size": (self.image_size >= 16, "use 16 or more"),
            "pixel_mm": (self.pixel_mm > 0, positive),
            "slice_spacing_mm": (self.slice_spacing_mm > 0, positive),
            "n_views": (self.n_views >= 4 and self.n_views % 4 == 0, f"{positive} that is a multiple of 4"),
            "photons_ndct": (self.photons_ndct > 0, positive),
            "dose_ratio": (0 < self.dose_ratio <= 1, f"{positive} in (0, 1]"),
            "dose_ratio_max": (
                self.dose_ratio_max is None or self.dose_ratio <= self.dose_ratio_max <= 1,
                "use null or a value in [dose_ratio, 1]",
            ),
            "electronic_noise_sd": (self.electronic_noise_sd >= 0, "use 0 or more"),
            "kernels": (
                len(self.kernels) >= 1 and all(k in KERNELS for k in self.kernels),
                f"use a non-empty list of {sorted(KERNELS)}",
            ),
            "habitus": (
                len(self.habitus) == 2 and 0.7 <= self.habitus[0] <= self.habitus[1] <= 1.3,
                "use (low, high) with 0.7 <= low <= high <= 1.3",
            ),
            "misalignment": (self.misalignment >= 0, "use 0 or more"),
            "table_offset_mm": (self.table_offset_mm >= 0, "use 0 or more"),
            "scan_range_slices": (self.scan_range_slices >= 0, "use 0 or more"),
        }
        for key, (ok, hint) in checks.items():
            if not ok:
                raise ValueError(f"SyntheticConfig.{key}={getattr(self, key)!r} is invalid: {hint}")


# Photons are calibrated per resolution (noise grows as the pixels shrink); the field of view stays ~358 mm.
PRESETS: dict[str, SyntheticConfig] = {
    "tiny": SyntheticConfig(
        n_patients=3,
        n_slices=4,
        image_size=64,
        pixel_mm=5.6,
        slice_spacing_mm=30.0,
        n_views=96,
        photons_ndct=6.0e4,
        electronic_noise_sd=1.0,
    ),
    # 11 patients: 6 train, 2 val, 3 test (conf/data/synthetic.yaml), so that per-patient statistics exist
    "demo": SyntheticConfig(n_patients=11),
    "bench": SyntheticConfig(
        n_patients=16,
        n_slices=24,
        image_size=512,
        pixel_mm=0.7,
        slice_spacing_mm=5.0,
        n_views=720,
        photons_ndct=5.0e5,
        electronic_noise_sd=5.0,
    ),
}
# The generalisation benchmark (make bench-generalize): train on one site's style, test on another's.
# Both have the bench preset's geometry and photons, trabecular bone and a bowtie with tube-current modulation.
PRESETS["site_a"] = dataclasses.replace(
    PRESETS["bench"], n_patients=12, n_slices=16, trabecular=True, bowtie=True, habitus=(0.95, 1.05)
)
# another hospital: other patients (seed), a sharper kernel, slimmer and larger patients, doses from 1/12 to
# 1/5 of the NDCT's, other DICOM storage conventions
PRESETS["site_b"] = dataclasses.replace(
    PRESETS["site_a"],
    n_patients=6,
    n_slices=12,
    kernels=("shepp-logan",),
    habitus=(0.85, 1.1),
    dose_ratio=1 / 12,
    dose_ratio_max=0.2,
    dicom_variety=True,
    seed=1000,
)


def _aec_ma(sino: torch.Tensor, pixel_mm: float) -> float:
    """Tube current of a simple automatic exposure control: proportional to the mean transmission loss
    of the rays through the central 10 cm, so that the noise variance in the trunk stays about constant.
    """
    centre, half = sino.shape[-1] // 2, max(1, round(50.0 / pixel_mm))
    index = float(torch.log(torch.exp(sino[..., centre - half : centre + half + 1].double()).mean()))
    return float(np.clip(REFERENCE_MA * math.exp(index - AEC_REFERENCE_INDEX), 150.0, 500.0))


@contextlib.contextmanager
def torch_threads(num_threads: int | None = None) -> Iterator[int]:
    """Run torch with ``num_threads`` threads (default 1), restoring the previous setting afterwards.

    One thread is the default because the simulation is many medium-sized operations: on a machine
    shared with other jobs, OpenMP threads that wait for each other made the demo preset 8x slower with 2
    threads than with 1 (293 s vs 34 s on 2 busy cores). Pass more on an idle machine.
    """
    before = torch.get_num_threads()
    n = num_threads or 1
    torch.set_num_threads(n)
    try:
        yield n
    finally:
        torch.set_num_threads(before)


def _uid(*parts: object) -> str:
    """A deterministic UID from the seed and the series' identity (same seed, same UIDs)."""
    return generate_uid(entropy_srcs=[str(p) for p in parts])


def liver_noise_sd(noisy: np.ndarray, clean: np.ndarray, labels: np.ndarray, pixel_mm: float) -> float:
    """Noise SD in HU: SD of ``noisy - clean`` inside the liver mask eroded by ~5 mm (lesions and vessels
    are other labels, so they are excluded).

    Args:
        noisy: (S, H, W) noisy reconstruction in HU.
        clean: (S, H, W) noiseless reconstruction in HU.
        labels: (S, H, W) label map.
        pixel_mm: pixel size, to convert the erosion to pixels.

    Returns:
        The SD, or NaN when no liver pixel survives the erosion.
    """
    mask = realism.eroded_label(labels, LIVER, max(1, round(5.0 / pixel_mm)))
    if mask.sum() < 10:
        return float("nan")
    return float(np.std((noisy - clean)[mask]))


def windowed_psnr(
    image: np.ndarray, reference: np.ndarray, window: tuple[float, float] = ABDOMEN_WINDOW
) -> float:
    """PSNR in dB of two HU images after a display window (data range = the window width)."""
    a = apply_window(np.asarray(image, dtype=np.float64), *window)
    b = apply_window(np.asarray(reference, dtype=np.float64), *window)
    mse = float(np.mean((a - b) ** 2))
    return float("inf") if mse == 0 else 10.0 * math.log10(1.0 / mse)


@dataclass(frozen=True)
class Storage:
    """How a series' pixels are stored in DICOM (real exports differ)."""

    signed: bool = False
    intercept: float = -1024.0
    implicit_vr: bool = False


# unsigned pixels need intercept -1024 (air is -1000 HU); signed ones work with either
STORAGES = (
    Storage(),
    Storage(signed=True),
    Storage(signed=True, intercept=0.0),
    Storage(signed=True, intercept=0.0, implicit_vr=True),
    Storage(implicit_vr=True),
)


@dataclass(frozen=True)
class Protocol:
    """One patient's scan protocol, drawn from the preset's ranges (:func:`draw_protocol`)."""

    kernel: str = "hann"
    dose_ratio: float = 0.125
    habitus: float = 1.0
    storage_ldct: Storage = Storage()
    storage_ndct: Storage = Storage()


def draw_protocol(cfg: SyntheticConfig, index: int) -> Protocol:
    """The protocol of patient ``index``: kernel, dose ratio, body size and DICOM storage.

    Drawn from a random stream of its own, so that a preset without variety gives the same data as before
    these options existed.

    Args:
        cfg: the data set configuration.
        index: patient number (0-based).

    Returns:
        The protocol.
    """
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, index, 2]))
    kernel = cfg.kernels[int(rng.integers(len(cfg.kernels)))]
    high = cfg.dose_ratio if cfg.dose_ratio_max is None else cfg.dose_ratio_max
    storages = [STORAGES[int(i)] for i in rng.integers(len(STORAGES), size=2)]
    return Protocol(
        kernel=kernel,
        dose_ratio=float(rng.uniform(cfg.dose_ratio, high)),
        habitus=float(rng.uniform(*cfg.habitus)),
        storage_ldct=storages[0] if cfg.dicom_variety else Storage(),
        storage_ndct=storages[1] if cfg.dicom_variety else Storage(),
    )


def exposure_profile(sino: torch.Tensor, pixel_mm: float) -> torch.Tensor:
    """Relative photons per ray of a bowtie filter and angular tube-current modulation, (views, bins).

    The bowtie passes fewer photons away from the centre of the fan (``exp(-2 (t / 250 mm)^2)``: 73 % at
    100 mm, 35 % at 180 mm); the tube current follows the square root of each view's attenuation through
    the central 10 cm (the wide lateral views get more), with a mean of 1 over the views, so the dose set
    by the exposure control stays the same.

    Args:
        sino: (S, views, bins) noiseless line integrals of the series (modulation follows their mean).
        pixel_mm: detector bin size in mm.

    Returns:
        float64 (views, bins) factors.
    """
    n_det = sino.shape[-1]
    t = (torch.arange(n_det, dtype=torch.float64) - (n_det - 1) / 2) * pixel_mm
    bowtie = torch.exp(-2.0 * (t / 250.0) ** 2)
    centre, half = n_det // 2, max(1, round(50.0 / pixel_mm))
    loss = torch.exp(sino[..., centre - half : centre + half + 1].double()).mean(dim=(0, 2))  # per view
    modulation = loss.sqrt()
    return (modulation / modulation.mean())[:, None] * bowtie[None, :]


@dataclass
class _Scan:
    """One simulated patient: both series, their truth and their DICOM tags."""

    patient_id: str
    anatomy: Anatomy
    z_nd: np.ndarray
    z_ld: np.ndarray
    clean_nd: np.ndarray
    clean_ld: np.ndarray
    labels_nd: np.ndarray
    labels_ld: np.ndarray
    ndct: np.ndarray
    ldct: np.ndarray
    lowdose_nd: np.ndarray
    table_offset: float
    protocol: Protocol
    pose: object
    ma_nd: float
    ma_ld: float
    dates: tuple[str, str]
    birth_date: str
    sex: str


def simulate_patient(cfg: SyntheticConfig, index: int, num_threads: int | None = None) -> _Scan:
    """Simulate one patient's NDCT and LDCT scans (deterministic in ``cfg.seed`` and ``index``).

    Args:
        cfg: the data set configuration.
        index: patient number (0-based).
        num_threads: torch threads (see :func:`torch_threads`).

    Returns:
        The scans and their ground truth.
    """
    with torch_threads(num_threads):
        return _simulate_patient(cfg, index)


def _simulate_patient(cfg: SyntheticConfig, index: int) -> _Scan:
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, index]))
    gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
    n, spacing = cfg.n_slices, cfg.slice_spacing_mm
    # the stack straddles the diaphragm: lower chest (heart, lung bases) down to the upper abdomen
    centre = -25.0 + rng.uniform(-0.5, 0.5) * spacing
    z_nd = np.round(centre + (np.arange(n) - (n - 1) / 2) * spacing, 2)
    anatomy = random_anatomy(rng, lesion_z=list(z_nd))
    protocol = draw_protocol(cfg, index)
    anatomy = with_habitus(anatomy, protocol.habitus) if protocol.habitus != 1.0 else anatomy
    if cfg.trabecular:
        trabecular_rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, index, 3]))
        anatomy.trabecular_k, anatomy.trabecular_phase = random_trabecular(trabecular_rng)
    pose = random_pose(rng, cfg.misalignment)
    z_offset = rng.choice([-1.0, 1.0]) * rng.uniform(1.0, 3.0) * cfg.misalignment  # slice sampling (z) offset
    # a second study (misalignment > 0): its own table position and scan range (own random stream, so
    # that every other draw of a seed is as before)
    study_rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, index, 1]))
    table = cfg.table_offset_mm if cfg.misalignment > 0 else 0.0
    table_offset = (
        round(float(study_rng.choice([-1.0, 1.0]) * study_rng.uniform(min(20.0, table), table)), 2)
        if table
        else 0.0
    )
    # another scan range: up to scan_range_slices more or fewer slices at each end
    extra = cfg.scan_range_slices if cfg.misalignment > 0 else 0
    lo, hi = (int(v) for v in study_rng.integers(-extra, extra + 1, size=2))
    if n + lo + hi < 2:
        lo = hi = 0
    k = np.arange(-lo, n + hi)
    z_ld = np.round(centre + (k - (n - 1) / 2) * spacing + z_offset, 2)

    hu_nd, labels_nd = render_slices(anatomy, z_nd, cfg.image_size, cfg.pixel_mm)
    hu_ld, labels_ld = render_slices(anatomy, z_ld, cfg.image_size, cfg.pixel_mm, pose)
    sino = forward_project(hu_to_mu(torch.cat((hu_nd, hu_ld))), cfg.n_views, cfg.pixel_mm)
    m = len(z_ld)
    sino_nd, sino_ld = sino[:n], sino[n:]

    # automatic exposure control on two different days: the tube current (and with it the photons per
    # ray) follows the patient's attenuation, so the noise is similar across patient sizes
    ma_nd = _aec_ma(sino_nd, cfg.pixel_mm) * rng.uniform(0.95, 1.05)
    # (the LDCT's exposure follows the same patient's attenuation, so another scan range keeps the dose ratio)
    ma_ld = (
        _aec_ma(sino_ld if m == n else sino_nd, cfg.pixel_mm) * rng.uniform(0.95, 1.05) * protocol.dose_ratio
    )
    photons_nd = photons_ld = torch.tensor(cfg.photons_ndct / REFERENCE_MA, dtype=torch.float64)
    if cfg.bowtie:
        photons_nd = photons_nd * exposure_profile(sino_nd, cfg.pixel_mm)
        photons_ld = photons_ld * exposure_profile(sino_ld, cfg.pixel_mm)
    e_sd = cfg.electronic_noise_sd
    noisy_nd = add_poisson_noise(sino_nd, photons_nd * ma_nd, e_sd, gen)
    noisy_ld = add_poisson_noise(sino_ld, photons_ld * ma_ld, e_sd, gen)
    noisy_lownd = add_poisson_noise(sino_nd, photons_nd * ma_nd * protocol.dose_ratio, e_sd, gen)
    recon = fbp(
        torch.cat((sino, noisy_nd, noisy_ld, noisy_lownd)), cfg.image_size, cfg.pixel_mm, protocol.kernel
    )
    recon = mu_to_hu(recon).numpy()
    clean_nd, clean_ld, ndct, ldct, lowdose_nd = np.split(recon, np.cumsum([n, m, n, m]))

    day = dt.date(2023, 1, 1) + dt.timedelta(days=int(rng.integers(0, 300)))
    later = day + dt.timedelta(days=int(rng.integers(7, 60)))
    birth = dt.date(int(rng.integers(1940, 1995)), int(rng.integers(1, 13)), int(rng.integers(1, 29)))
    return _Scan(
        patient_id=f"SYN-{index + 1:04d}",
        anatomy=anatomy,
        z_nd=z_nd,
        z_ld=z_ld,
        clean_nd=clean_nd,
        clean_ld=clean_ld,
        labels_nd=labels_nd.numpy().astype(np.uint8),
        labels_ld=labels_ld.numpy().astype(np.uint8),
        ndct=ndct,
        ldct=ldct,
        lowdose_nd=lowdose_nd,
        table_offset=table_offset,
        protocol=protocol,
        pose=pose,
        ma_nd=ma_nd,
        ma_ld=ma_ld,
        dates=(day.strftime("%Y%m%d"), later.strftime("%Y%m%d")),
        birth_date=birth.strftime("%Y%m%d"),
        sex=str(rng.choice(["F", "M"])),
    )


def _series_spec(cfg: SyntheticConfig, scan: _Scan, role: str) -> CTSeriesSpec:
    low = role == "ldct"
    ma = scan.ma_ld if low else scan.ma_nd
    storage = scan.protocol.storage_ldct if low else scan.protocol.storage_ndct
    return CTSeriesSpec(
        patient_id=scan.patient_id,
        patient_name=f"SYNTHETIC^PATIENT{scan.patient_id[-4:]}",
        patient_birth_date=scan.birth_date,
        study_uid=_uid(cfg.seed, scan.patient_id, role, "study"),
        series_uid=_uid(cfg.seed, scan.patient_id, role, "series"),
        series_number=3 if low else 2,
        series_description="LOW DOSE ABDOMEN 120kV" if low else "ROUTINE ABDOMEN 120kV",
        study_date=scan.dates[1] if low else scan.dates[0],
        pixel_spacing=(cfg.pixel_mm, cfg.pixel_mm),
        slice_thickness=cfg.slice_thickness_mm,
        kvp=120.0,
        tube_current_ma=ma,
        exposure_time_ms=ROTATION_TIME_MS,
        ctdi_vol=round(REFERENCE_CTDI_MGY * ma / REFERENCE_MA, 2),
        convolution_kernel=KERNELS[scan.protocol.kernel],
        rescale_intercept=storage.intercept,
        pixel_representation=int(storage.signed),
        implicit_vr=storage.implicit_vr,
        extra={
            "PatientSex": scan.sex,
            "ReconstructionDiameter": float(cfg.image_size * cfg.pixel_mm),
            "DataCollectionDiameter": 500.0,
            "RevolutionTime": ROTATION_TIME_MS / 1000.0,
            "StudyDescription": "CT ABDOMEN",
        },
    )


def rigid_truth(scan: _Scan) -> tuple[np.ndarray, np.ndarray]:
    """The exact rigid part of the LDCT -> NDCT map in DICOM physical coordinates: ``nd = A @ ld + b``.

    The LDCT pose undoes an in-plane shift, then rotates about the scanner axis; the LDCT frame of
    reference puts the anatomy ``table_offset`` mm higher in z. (Breathing and the smooth warp of the
    pose are not rigid and not part of it.)
    """
    c, s = math.cos(math.radians(scan.pose.rotation_deg)), math.sin(math.radians(scan.pose.rotation_deg))
    matrix = np.array([[c, s, 0.0], [-s, c, 0.0], [0.0, 0.0, 1.0]])
    shift = np.array([scan.pose.shift_mm[0], scan.pose.shift_mm[1], 0.0])
    return matrix, -matrix @ shift + np.array([0.0, 0.0, -scan.table_offset])


def _write_patient(
    out: Path, cfg: SyntheticConfig, scan: _Scan, folders: list[str], rng: np.random.Generator
):
    """Write both DICOM series (random names, mixed folders) and the truth file; return manifest rows."""
    rows = []
    z_ld = scan.z_ld + scan.table_offset  # the LDCT study's own frame of reference
    for role, volume, z in (("ldct", scan.ldct, z_ld), ("ndct", scan.ndct, scan.z_nd)):
        spec = _series_spec(cfg, scan, role)
        names = [f"{folders[int(rng.integers(len(folders)))]}/{rng.bytes(8).hex()}.dcm" for _ in z]
        write_ct_series(volume, spec, list(z + _TABLE_Z0), out / "dicom", names)
        rows.append({"series_uid": spec.series_uid, "role": role, "aligned": "false"})
    key = hash_identifier(scan.patient_id, out)
    matrix, offset = rigid_truth(scan)
    np.savez(
        out / "truth" / f"{key}.npz",
        clean_ld=scan.clean_ld.astype(np.float32),
        labels_ld=scan.labels_ld,
        z_ld=z_ld + _TABLE_Z0,
        ld_to_nd_matrix=matrix,
        ld_to_nd_offset=offset,
        table_offset_mm=np.float64(scan.table_offset),
        clean_nd=scan.clean_nd.astype(np.float32),
        labels_nd=scan.labels_nd,
        lowdose_nd=scan.lowdose_nd.astype(np.float32),
        z_nd=scan.z_nd + _TABLE_Z0,
    )
    return rows


# DICOM z of the phantom's z = 0 (the diaphragm): scanner table coordinates are arbitrary.
_TABLE_Z0 = -150.0


def generate_dataset(
    out_dir: str | Path,
    cfg: SyntheticConfig,
    progress: bool = True,
    overwrite: bool = False,
    num_threads: int | None = None,
) -> dict:
    """Generate the synthetic data set into ``out_dir``, atomically.

    Everything is written to a hidden sibling folder first and renamed at the end, so an interrupted run
    leaves no half-written data set.

    Args:
        out_dir: destination folder; must not exist or be empty unless ``overwrite``.
        cfg: the configuration (e.g. ``PRESETS["demo"]``).
        progress: show a progress bar and print the noise table.
        overwrite: replace a non-empty ``out_dir``.
        num_threads: torch threads (see :func:`torch_threads`; under heavy CPU contention 1 can be faster).

    Returns:
        The summary (also written to ``summary.json``).
    """
    cfg.validate()
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"{out_dir}: exists and is not a folder. Choose another output path.")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(
            f"{out_dir}: folder is not empty. Pass overwrite=True (--overwrite) or choose another."
        )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with torch_threads(num_threads) as threads:
            summary = _generate(tmp, cfg, progress, threads)
        if out_dir.exists():
            old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return summary


def _generate(out: Path, cfg: SyntheticConfig, progress: bool, threads: int) -> dict:
    start = time.perf_counter()
    (out / "dicom").mkdir(parents=True)
    (out / "truth").mkdir()
    set_synthetic_key(out, cfg.seed)
    names_rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, 2**31]))
    folders = [f"{names_rng.bytes(1).hex()}/{names_rng.bytes(1).hex()}" for _ in range(6)]
    manifest, patients, realism_records = [], [], []
    first = None
    bar = tqdm(range(cfg.n_patients), desc="simulating patients", unit="patient", disable=not progress)
    for i in bar:
        t0 = time.perf_counter()
        scan = _simulate_patient(cfg, i)
        t1 = time.perf_counter()
        manifest += _write_patient(out, cfg, scan, folders, names_rng)
        stats = {
            "patient_key": hash_identifier(scan.patient_id, out),
            "noise_sd_ldct": liver_noise_sd(scan.ldct, scan.clean_ld, scan.labels_ld, cfg.pixel_mm),
            "noise_sd_ndct": liver_noise_sd(scan.ndct, scan.clean_nd, scan.labels_nd, cfg.pixel_mm),
            "noise_sd_lowdose_nd": liver_noise_sd(
                scan.lowdose_nd, scan.clean_nd, scan.labels_nd, cfg.pixel_mm
            ),
            "psnr_ldct_abdomen": windowed_psnr(scan.ldct, scan.clean_ld),
            "psnr_ndct_abdomen": windowed_psnr(scan.ndct, scan.clean_nd),
            "ctdi_vol_ldct": round(REFERENCE_CTDI_MGY * scan.ma_ld / REFERENCE_MA, 2),
            "ctdi_vol_ndct": round(REFERENCE_CTDI_MGY * scan.ma_nd / REFERENCE_MA, 2),
            "n_lesions": len(scan.anatomy.lesions),
            "kernel": scan.protocol.kernel,
            "dose_ratio": round(scan.protocol.dose_ratio, 4),
            "habitus": round(scan.protocol.habitus, 3),
            "seconds_simulate": round(t1 - t0, 2),
            "seconds_write": round(time.perf_counter() - t1, 2),
        }
        patients.append(stats)
        realism_records.append(
            realism.patient_record(
                scan.ldct,
                scan.clean_ld,
                scan.labels_ld,
                scan.ndct,
                scan.clean_nd,
                scan.labels_nd,
                cfg.pixel_mm,
            )
        )
        bar.set_postfix(ld=f"{stats['noise_sd_ldct']:.1f}HU", nd=f"{stats['noise_sd_ndct']:.1f}HU")
        if first is None:
            first = scan
    with open(out / "manifest.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["series_uid", "role", "aligned"])
        writer.writeheader()
        writer.writerows(manifest)
    (out / "labels.json").write_text(json.dumps({str(k): v for k, v in LABELS.items()}, indent=2) + "\n")

    def mean(key: str) -> float:
        values = [p[key] for p in patients if np.isfinite(p[key])]
        return float(np.mean(values)) if values else float("nan")

    summary = {
        "config": dataclasses.asdict(cfg),
        "n_series": len(manifest),
        "noise_sd_ldct_mean": mean("noise_sd_ldct"),
        "noise_sd_ndct_mean": mean("noise_sd_ndct"),
        "noise_sd_lowdose_nd_mean": mean("noise_sd_lowdose_nd"),
        "psnr_ldct_abdomen_mean": mean("psnr_ldct_abdomen"),
        "psnr_ndct_abdomen_mean": mean("psnr_ndct_abdomen"),
        "noise_measure": "SD of (noisy - noiseless FBP) in the liver eroded by ~5 mm, HU",
        "psnr_measure": "abdomen window C40/W400 on the whole slice, data range 400 HU, vs the noiseless FBP",
        "patients": patients,
        "torch_threads": threads,
    }
    summary["realism"] = realism.summarize(realism_records, cfg.pixel_mm, summary["psnr_ldct_abdomen_mean"])
    overview_path = out / "overview.png"
    save_overview(first, overview_path, hash_identifier(first.patient_id, out), summary["realism"])
    summary["seconds_total"] = round(time.perf_counter() - start, 2)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if progress:
        print(format_summary(summary))
    return summary


def format_summary(summary: dict) -> str:
    """A plain-text table of the per-patient noise and PSNR."""
    lines = [
        f"{'patient_key':<14}{'SD LDCT':>9}{'SD NDCT':>9}{'SD LD@ND':>10}{'PSNR LD':>9}{'PSNR ND':>9}{'CTDI LD/ND':>13}",
    ]
    for p in summary["patients"]:
        lines.append(
            f"{p['patient_key']:<14}{p['noise_sd_ldct']:>9.1f}{p['noise_sd_ndct']:>9.1f}"
            f"{p['noise_sd_lowdose_nd']:>10.1f}{p['psnr_ldct_abdomen']:>9.2f}{p['psnr_ndct_abdomen']:>9.2f}"
            f"{p['ctdi_vol_ldct']:>7.2f}/{p['ctdi_vol_ndct']:<5.2f}"
        )
    lines.append(
        f"{'mean':<14}{summary['noise_sd_ldct_mean']:>9.1f}{summary['noise_sd_ndct_mean']:>9.1f}"
        f"{summary['noise_sd_lowdose_nd_mean']:>10.1f}{summary['psnr_ldct_abdomen_mean']:>9.2f}"
        f"{summary['psnr_ndct_abdomen_mean']:>9.2f}"
    )
    lines.append("noise SD in HU (liver, vs noiseless FBP); PSNR in dB (abdomen window C40/W400)")
    lines.append(
        f"total time {summary.get('seconds_total', float('nan')):.1f} s with {summary['torch_threads']} torch thread(s)"
    )
    if "realism" in summary:
        lines += ["", *realism.realism_lines(summary["realism"])]
    return "\n".join(lines)


def save_overview(scan: _Scan, path: Path, patient_key: str, realism_report: dict | None = None) -> None:
    """Figure of one patient: clean / NDCT / LDCT / LDCT - clean, on a chest and an abdomen slice.

    With ``realism_report`` (:func:`ldct_lightning.data.realism.summarize`) a last row shows the data set's
    noise power spectra, tissue HU against published ranges and noise SD per tissue.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    liver_area = (scan.labels_ld == LIVER).sum(axis=(1, 2))
    rows = sorted({int(np.argmax(liver_area)), len(scan.z_ld) - 1})
    center, width = ABDOMEN_WINDOW
    lo, hi = center - width / 2, center + width / 2
    n_rows = len(rows) + (realism_report is not None)
    fig, axes = plt.subplots(n_rows, 4, figsize=(16, 4.4 * n_rows + 0.6), squeeze=False)
    colors = plt.cm.tab10(np.linspace(0, 1, 10))
    for r, j in enumerate(rows):
        k = int(np.argmin(np.abs(scan.z_nd - scan.z_ld[j])))  # the NDCT slice nearest in z
        panels = [
            (scan.clean_ld[j], "clean (LDCT pose)", (lo, hi)),
            (scan.ndct[k], f"NDCT  z={scan.z_nd[k] + _TABLE_Z0:.1f} mm", (lo, hi)),
            (scan.ldct[j], f"LDCT  z={scan.z_ld[j] + _TABLE_Z0:.1f} mm", (lo, hi)),
            (scan.ldct[j] - scan.clean_ld[j], "LDCT - clean (+-150 HU)", (-150, 150)),
        ]
        for c, (image, title, (vmin, vmax)) in enumerate(panels):
            ax = axes[r, c]
            ax.imshow(image, cmap="gray", vmin=vmin, vmax=vmax, interpolation="nearest")
            ax.set_title(title, fontsize=10)
            ax.axis("off")
        for label in (1, 2, 3, 4, 9):  # heart, liver, spleen, muscle, lesion
            mask = scan.labels_ld[j] == label
            if mask.any():
                axes[r, 0].contour(mask, levels=[0.5], colors=[colors[label]], linewidths=0.8)
                axes[r, 3].contour(mask, levels=[0.5], colors=[colors[label]], linewidths=0.6)
    if realism_report is not None:
        _plot_realism(axes[-1], realism_report)
    handles = [plt.Line2D([], [], color=colors[i], label=LABELS[i]) for i in (1, 2, 3, 4, 9)]
    fig.legend(handles=handles, loc="lower center", ncol=5, frameon=False)
    fig.suptitle(f"synthetic patient {patient_key}: abdomen window C40/W400", fontsize=12)
    fig.tight_layout(rect=(0, 0.03, 1, 0.97))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_realism(axes: np.ndarray, report: dict) -> None:
    """Four panels: NPS of both series, tissue HU vs published ranges, noise SD per tissue, the targets."""
    nps_ax, hu_ax, sd_ax, text_ax = axes
    for role, curve in report["nps"].items():
        nps_ax.plot(curve["frequency_cycles_per_mm"], curve["nps_hu2_mm2"], label=role.upper())
    nps_ax.set(xlabel="cycles/mm", ylabel="NPS (HU² mm²)", title="noise power spectrum (data set mean)")
    nps_ax.legend(frameon=False)
    names = list(report["tissue_hu"])
    for i, name in enumerate(names):
        hu = report["tissue_hu"][name]
        low, high = hu["published"]
        hu_ax.plot([i, i], [low, high], color="0.7", linewidth=8, solid_capstyle="butt")
        hu_ax.plot(i, hu["measured"], "o", color="C0" if hu["within"] else "C3")
    hu_ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
    hu_ax.set_yscale("symlog", linthresh=100)
    hu_ax.set(ylabel="HU", title="tissue HU (dot) vs published range (bar)")
    tissues = list(report["noise_sd_hu"])
    x = np.arange(len(tissues))
    for offset, role in ((-0.2, "ldct"), (0.2, "ndct")):
        sd_ax.bar(x + offset, [report["noise_sd_hu"][t][role] for t in tissues], 0.4, label=role.upper())
    sd_ax.set_xticks(x, tissues, rotation=45, ha="right", fontsize=8)
    sd_ax.set(ylabel="noise SD (HU)", title="noise per tissue")
    sd_ax.legend(frameon=False)
    text_ax.axis("off")
    lines = ["targets (SPEC section 2,", "512² at 0.7 mm, dose 1/8):", ""]
    for key, check in report["targets"].items():
        low, high = check["target"]
        lines.append(f"{key}: {check['measured']:.2f}")
        lines.append(f"   target {low:g}-{high:g}: {'within' if check['within'] else 'OUTSIDE'}")
    text_ax.text(0.0, 1.0, "\n".join(lines), va="top", family="monospace", fontsize=9)

"""How CT-like a simulated set is: tissue HU, noise per tissue and the noise power spectrum, with targets.

Measured on the synthetic set's own truth (the noiseless reconstruction and the ROI labels), so it needs
no assumption about the images: ``noise = series - noiseless``. The published ranges are those of
unenhanced adult CT at 120 kVp; SPEC section 2 states the noise and PSNR targets (at 512 x 512, ~0.7 mm).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from scipy import ndimage

from ldct_lightning.data.phantom import BONE, FAT, LIVER, LUNG, MUSCLE, SPLEEN, TABLE, VESSEL

# Unenhanced adult CT, HU: liver 50-70 and spleen 40-55 (the spleen ~10 HU below the liver), skeletal
# muscle 40-60, subcutaneous/visceral fat -120 to -80, blood 30-50 (haematocrit-dependent), aerated lung
# -900 to -800 (partial volume with small vessels raises it).
PUBLISHED_HU: dict[str, tuple[float, float]] = {
    "liver": (50.0, 70.0),
    "spleen": (40.0, 55.0),
    "muscle": (40.0, 60.0),
    "fat": (-120.0, -80.0),
    "vessel": (30.0, 50.0),
    "lung": (-900.0, -800.0),
}
# The bone label holds cortex and marrow: its median is cancellous bone (100-400 HU, mineral-density
# dependent, lower in the elderly) and its 95th percentile cortex (700-1900 HU at CT resolution).
PUBLISHED_BONE_HU: dict[str, tuple[float, float]] = {
    "bone_median": (100.0, 400.0),
    "bone_p95": (700.0, 1900.0),
}
TISSUES: dict[str, int] = {
    "liver": LIVER,
    "spleen": SPLEEN,
    "muscle": MUSCLE,
    "fat": FAT,
    "vessel": VESSEL,
    "lung": LUNG,
}
# SPEC section 2 (at 512 x 512, ~0.7 mm pixels, dose ratio 1/8)
TARGETS: dict[str, tuple[float, float]] = {
    "noise_sd_liver_ldct_hu": (30.0, 60.0),
    "noise_sd_liver_ndct_hu": (8.0, 15.0),
    "psnr_ldct_abdomen_db": (26.0, 30.0),
    # "a noise power spectrum that peaks at mid frequencies": 20-70 % of the Nyquist frequency (white noise
    # is flat; a sharp kernel's spectrum rises towards Nyquist)
    "nps_peak_fraction_of_nyquist": (0.2, 0.7),
}


def eroded_label(labels: np.ndarray, label: int, iterations: int) -> np.ndarray:
    """The mask of ``label`` in (S, H, W) ``labels``, eroded ``iterations`` pixels within each slice."""
    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1] = ndimage.generate_binary_structure(2, 1)  # within each slice
    return ndimage.binary_erosion(labels == label, structure, iterations=iterations)


def tissue_stats(
    noisy: np.ndarray, clean: np.ndarray, labels: np.ndarray, erode_px: int = 2
) -> dict[str, dict[str, float]]:
    """Per tissue the mean HU of the noiseless image and the noise SD, inside the label eroded in-plane.

    Args:
        noisy: (S, H, W) reconstruction in HU.
        clean: (S, H, W) noiseless reconstruction in HU.
        labels: (S, H, W) ROI labels (:mod:`ldct_lightning.data.phantom` ids).
        erode_px: in-plane erosion in pixels (keeps partial-volume edges out).

    Returns:
        Tissue -> ``{"hu": mean, "noise_sd": SD, "pixels": n}``; tissues with under 20 pixels left out;
        ``bone_median`` and ``bone_p95`` (HU of the whole bone label) when there is bone.
    """
    out: dict[str, dict[str, float]] = {}
    for name, label in TISSUES.items():
        mask = eroded_label(labels, label, erode_px)
        if mask.sum() >= 20:
            noise = (noisy - clean)[mask]
            out[name] = {
                "hu": float(clean[mask].mean()),
                "noise_sd": float(noise.std()),
                "pixels": int(mask.sum()),
            }
    bone = labels == BONE
    if bone.sum() >= 20:
        values = clean[bone]
        out["bone_median"] = {"hu": float(np.median(values)), "pixels": int(bone.sum())}
        out["bone_p95"] = {"hu": float(np.percentile(values, 95)), "pixels": int(bone.sum())}
    return out


def noise_power_spectrum(
    noise: np.ndarray, region: np.ndarray, pixel_mm: float, patch_mm: float = 40.0
) -> tuple[np.ndarray, np.ndarray]:
    """Radially averaged 2-D noise power spectrum from square patches that lie inside ``region``.

    The classical estimate (ICRU Report 87): each patch minus its mean, |FFT|^2 times the pixel area over
    the patch's pixel count, averaged over patches, then over rings of equal frequency.

    Args:
        noise: (S, H, W) noise images in HU (a series minus its noiseless reconstruction).
        region: (S, H, W) bool, where patches may lie (e.g. the body).
        pixel_mm: pixel size in mm.
        patch_mm: patch side in mm (at least 16 pixels).

    Returns:
        ``(frequency, nps)``: ring centres in cycles/mm (0 excluded, up to Nyquist) and NPS in HU^2 mm^2;
        empty arrays when no patch fits.
    """
    n = max(16, int(round(patch_mm / pixel_mm)) // 2 * 2)
    spectra = []
    for image, inside in zip(noise, region, strict=True):
        h, w = image.shape
        for r in range(0, h - n + 1, n):
            for c in range(0, w - n + 1, n):
                if inside[r : r + n, c : c + n].all():
                    patch = image[r : r + n, c : c + n].astype(np.float64)
                    spectra.append(np.abs(np.fft.fft2(patch - patch.mean())) ** 2)
    if not spectra:
        return np.zeros(0), np.zeros(0)
    nps2d = np.fft.fftshift(np.mean(spectra, axis=0)) * pixel_mm**2 / (n * n)
    f = np.fft.fftshift(np.fft.fftfreq(n, d=pixel_mm))
    radius = np.hypot(*np.meshgrid(f, f, indexing="ij"))
    step = 1.0 / (n * pixel_mm)
    rings = np.round(radius / step).astype(int)
    k = np.arange(1, n // 2 + 1)
    nps = np.array([nps2d[rings == i].mean() for i in k])
    return k * step, nps


def nps_peak(frequency: np.ndarray, nps: np.ndarray, pixel_mm: float) -> dict[str, float]:
    """The frequency where the NPS peaks, in cycles/mm and as a fraction of Nyquist (``0.5 / pixel_mm``)."""
    if len(nps) == 0:
        return {"peak_cycles_per_mm": float("nan"), "peak_fraction_of_nyquist": float("nan")}
    peak = float(frequency[int(np.argmax(nps))])
    return {"peak_cycles_per_mm": peak, "peak_fraction_of_nyquist": peak * 2.0 * pixel_mm}


def summarize(patients: Sequence[Mapping[str, dict]], pixel_mm: float, psnr_ldct_db: float) -> dict:
    """Merge per-patient realism records into the data set's report, each value with its target.

    Args:
        patients: :func:`patient_record` per patient.
        pixel_mm: pixel size in mm.
        psnr_ldct_db: the set's mean LDCT PSNR (abdomen window) against the noiseless reconstruction.

    Returns:
        ``tissue_hu`` (tissue -> measured, published range, within), ``noise_sd_hu`` (tissue -> LDCT, NDCT,
        ratio), ``nps`` (per series role: curve and peak) and ``targets`` (SPEC section 2: measured, target,
        within); means over patients, JSON-ready.
    """

    def mean(values: list[float]) -> float:
        finite = [v for v in values if np.isfinite(v)]
        return float(np.mean(finite)) if finite else float("nan")

    tissue_hu, noise = {}, {}
    for name, published in {**PUBLISHED_HU, **PUBLISHED_BONE_HU}.items():
        values = [p["ndct"][name]["hu"] for p in patients if name in p["ndct"]]
        if values:
            measured = mean(values)
            low, high = published
            tissue_hu[name] = {
                "measured": round(measured, 1),
                "published": [low, high],
                "within": low <= measured <= high,
            }
    for name in TISSUES:
        ld = [p["ldct"][name]["noise_sd"] for p in patients if name in p["ldct"]]
        nd = [p["ndct"][name]["noise_sd"] for p in patients if name in p["ndct"]]
        if ld and nd:
            noise[name] = {
                "ldct": round(mean(ld), 1),
                "ndct": round(mean(nd), 1),
                "ratio": round(mean(ld) / mean(nd), 2),
            }
    nps = {}
    for role in ("ldct", "ndct"):
        curves = [p[f"nps_{role}"] for p in patients if len(p[f"nps_{role}"][1])]
        if curves:
            frequency = curves[0][0]
            curve = np.mean([c[1] for c in curves], axis=0)
            nps[role] = {
                "frequency_cycles_per_mm": [round(float(f), 4) for f in frequency],
                "nps_hu2_mm2": [round(float(v), 3) for v in curve],
                **nps_peak(frequency, curve, pixel_mm),
            }
    measured_targets = {
        "noise_sd_liver_ldct_hu": noise.get("liver", {}).get("ldct", float("nan")),
        "noise_sd_liver_ndct_hu": noise.get("liver", {}).get("ndct", float("nan")),
        "psnr_ldct_abdomen_db": round(psnr_ldct_db, 2),
        "nps_peak_fraction_of_nyquist": nps.get("ldct", {}).get("peak_fraction_of_nyquist", float("nan")),
    }
    targets = {
        key: {
            "measured": value,
            "target": list(TARGETS[key]),
            "within": TARGETS[key][0] <= value <= TARGETS[key][1],
        }
        for key, value in measured_targets.items()
    }
    return {
        "measure": "means over patients; HU of the noiseless NDCT reconstruction and noise SD (series minus "
        "noiseless) inside each label eroded by 2 px; NPS from 40 mm patches inside the body (ICRU 87)",
        "pixel_mm": pixel_mm,
        "tissue_hu": tissue_hu,
        "noise_sd_hu": noise,
        "nps": nps,
        "targets": targets,
    }


def patient_record(
    scan_ld: np.ndarray,
    clean_ld: np.ndarray,
    labels_ld: np.ndarray,
    scan_nd: np.ndarray,
    clean_nd: np.ndarray,
    labels_nd: np.ndarray,
    pixel_mm: float,
) -> dict:
    """One patient's realism measurements (see :func:`summarize`).

    Args:
        scan_ld, clean_ld, labels_ld: the LDCT series, its noiseless reconstruction and labels (S, H, W).
        scan_nd, clean_nd, labels_nd: the same for the NDCT.
        pixel_mm: pixel size in mm.

    Returns:
        The record :func:`summarize` merges.
    """
    record: dict = {
        "ldct": tissue_stats(scan_ld, clean_ld, labels_ld),
        "ndct": tissue_stats(scan_nd, clean_nd, labels_nd),
    }
    for role, noisy, clean, labels in (
        ("ldct", scan_ld, clean_ld, labels_ld),
        ("ndct", scan_nd, clean_nd, labels_nd),
    ):
        # the trunk (lungs included: holes filled per slice), not the table
        body = np.stack([ndimage.binary_fill_holes(s > -500) for s in clean]) & (labels != TABLE)
        record[f"nps_{role}"] = noise_power_spectrum(noisy - clean, body, pixel_mm)
    return record


def realism_lines(realism: Mapping) -> list[str]:
    """The realism report as plain-text lines (``ldct-simulate`` and ``ldct-data-summary`` print them)."""
    lines = [f"realism ({realism['measure']}):"]
    lines.append(f"  {'tissue':<13}{'HU':>8}  {'published':<13}{'SD LDCT':>9}{'SD NDCT':>9}{'ratio':>7}")
    for name, hu in realism["tissue_hu"].items():
        noise = realism["noise_sd_hu"].get(name, {})
        low, high = hu["published"]
        mark = "" if hu["within"] else "  outside"
        sd = (
            f"{noise['ldct']:>9.1f}{noise['ndct']:>9.1f}{noise['ratio']:>7.2f}"
            if noise
            else f"{'-':>9}{'-':>9}{'-':>7}"
        )
        lines.append(f"  {name:<13}{hu['measured']:>8.1f}  {f'{low:g} to {high:g}':<13}{sd}{mark}")
    for role, curve in realism["nps"].items():
        lines.append(
            f"  NPS {role}: peak at {curve['peak_cycles_per_mm']:.3f} cycles/mm "
            f"({curve['peak_fraction_of_nyquist']:.0%} of Nyquist)"
        )
    lines.append("  targets (SPEC section 2, stated for 512 x 512 at ~0.7 mm and dose ratio 1/8):")
    for key, check in realism["targets"].items():
        low, high = check["target"]
        mark = "within" if check["within"] else "OUTSIDE"
        lines.append(f"    {key:<30}{check['measured']:>8.2f}  target {low:g}-{high:g}: {mark}")
    return lines

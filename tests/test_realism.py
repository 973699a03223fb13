"""The realism report of the synthetic set: NPS against hand-computed spectra, tissue HU and noise ratio of
the tiny preset against the published ranges and the physics of dose."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from ldct_lightning.data import realism


def test_white_noise_nps_is_flat_at_variance_times_pixel_area() -> None:
    """ICRU 87 normalisation: white noise of SD s on pixels of a mm has NPS = s^2 a^2 at every frequency."""
    rng = np.random.default_rng(0)
    pixel, sd = 0.8, 12.0
    noise = rng.normal(0, sd, (6, 128, 128))
    freq, nps = realism.noise_power_spectrum(noise, np.ones_like(noise, bool), pixel, patch_mm=32 * pixel)
    assert freq[0] == pytest.approx(1 / (32 * pixel)) and freq[-1] == pytest.approx(0.5 / pixel)
    np.testing.assert_allclose(nps[:-1], sd**2 * pixel**2, rtol=0.15)  # the Nyquist ring has few samples


def test_nps_peaks_where_band_pass_noise_has_its_power() -> None:
    """Noise filtered to a ring at f0 = 0.25 cycles/mm: the radial NPS peaks there (Nyquist 0.5/mm)."""
    rng = np.random.default_rng(1)
    n, pixel, f0 = 128, 1.0, 0.25
    f = np.fft.fftfreq(n, d=pixel)
    ring = np.exp(-((np.hypot(*np.meshgrid(f, f, indexing="ij")) - f0) ** 2) / (2 * 0.03**2))
    noise = np.real(np.fft.ifft2(np.fft.fft2(rng.normal(size=(4, n, n))) * ring))
    freq, nps = realism.noise_power_spectrum(noise, np.ones_like(noise, bool), pixel)
    peak = realism.nps_peak(freq, nps, pixel)
    assert peak["peak_cycles_per_mm"] == pytest.approx(f0, abs=1 / 40)
    assert peak["peak_fraction_of_nyquist"] == pytest.approx(f0 / 0.5, abs=0.05)
    # a region with no room for a patch: no spectrum
    freq, nps = realism.noise_power_spectrum(noise, np.zeros_like(noise, bool), pixel)
    assert len(freq) == len(nps) == 0


def test_tissue_stats_by_hand() -> None:
    labels = np.zeros((1, 20, 20), np.uint8)
    labels[0, 2:18, 2:18] = realism.LIVER
    clean = np.where(labels == realism.LIVER, 60.0, -1000.0)
    noisy = clean + np.random.default_rng(2).normal(0, 10.0, clean.shape)
    stats = realism.tissue_stats(noisy, clean, labels, erode_px=2)
    inner = (slice(None), slice(4, 16), slice(4, 16))  # eroded by 2 px
    assert stats["liver"]["pixels"] == 144
    assert stats["liver"]["hu"] == pytest.approx(60.0)
    assert stats["liver"]["noise_sd"] == pytest.approx(float(np.std(noisy[inner] - clean[inner])))
    assert "spleen" not in stats


def test_tiny_set_tissues_and_noise_ratio_meet_the_targets(tiny_dataset: Path) -> None:
    """Soft-tissue HU within the published ranges; LDCT/NDCT noise SD ratio near sqrt(1 / dose ratio)
    (quantum noise variance ~ 1 / dose; electronic noise adds a little at the lower dose)."""
    summary = json.loads((tiny_dataset / "summary.json").read_text())
    report = summary["realism"]
    for tissue in ("liver", "spleen", "muscle", "fat"):
        row = report["tissue_hu"][tissue]
        low, high = realism.PUBLISHED_HU[tissue]
        assert row["published"] == [low, high] and low <= row["measured"] <= high and row["within"]
    expected = math.sqrt(1 / summary["config"]["dose_ratio"])
    for tissue in ("liver", "spleen"):  # large organs (at 5.6 mm pixels the muscle wall is a few pixels)
        assert report["noise_sd_hu"][tissue]["ratio"] == pytest.approx(expected, rel=0.15)
    assert report["targets"]["noise_sd_liver_ndct_hu"]["within"]
    assert 0 < report["nps"]["ldct"]["peak_fraction_of_nyquist"] <= 1

"""Figures: files are written in both formats, ROI boxes are drawn in red, the KDE is a density."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from scipy import integrate, stats

from ldct_lightning.eval import figures
from ldct_lightning.eval.rois import Box


@pytest.fixture
def images() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    clean = np.full((40, 40), -1000.0)
    clean[5:35, 5:35] = 50.0
    clean[10:20, 10:20] = 30.0
    return {
        "LDCT": clean + rng.normal(0, 40, clean.shape),
        "proposed": clean + rng.normal(0, 8, clean.shape),
        "NDCT": clean + rng.normal(0, 12, clean.shape),
    }


def test_kde_integrates_to_one_and_matches_scipy():
    values = np.random.default_rng(1).normal(40, 15, 500)
    grid, density = figures.kde_curve(values)
    assert integrate.trapezoid(density, grid) == pytest.approx(1.0, abs=1e-3)
    assert density == pytest.approx(stats.gaussian_kde(values)(grid))
    with pytest.raises(ValueError, match="distinct"):
        figures.kde_curve(np.ones(5))


def test_comparison_panel_draws_red_boxes(tmp_path, images):
    paths = figures.comparison_panel(images, tmp_path / "fig4", window="abdomen", boxes=[Box(8, 8, 22, 22)])
    assert [p.suffix for p in paths] == [".png", ".pdf"] and all(p.stat().st_size > 0 for p in paths)
    assert paths[1].read_bytes().startswith(b"%PDF")
    rgb = np.asarray(Image.open(paths[0]).convert("RGB")).astype(int)
    red = (rgb[..., 0] > 200) & (rgb[..., 1] < 60) & (rgb[..., 2] < 60)
    assert red.sum() > 50  # box outlines and zoom frames
    plain = figures.comparison_panel(images, tmp_path / "nobox", window="lung")
    rgb = np.asarray(Image.open(plain[0]).convert("RGB")).astype(int)
    assert not ((rgb[..., 0] > 200) & (rgb[..., 1] < 60) & (rgb[..., 2] < 60)).any()


@pytest.fixture
def drawn(monkeypatch) -> list:
    """The figures the module saves (its files are still written)."""
    figs = []
    real_save = figures.save_figure

    def keep(fig, out_path, *args, **kwargs):
        figs.append(fig)
        return real_save(fig, out_path, *args, **kwargs)

    monkeypatch.setattr(figures, "save_figure", keep)
    return figs


def test_histograms_and_difference_maps(tmp_path, images, drawn):
    liver = np.zeros((40, 40), dtype=bool)
    liver[22:34, 22:34] = True
    heart = Box(10, 5, 20, 30)  # rows 10-19, columns 5-29: a transposed box would select other pixels
    paths = figures.hu_histograms(images, {"liver": liver, "heart": heart}, tmp_path / "fig5")
    assert [p.suffix for p in paths] == [".png", ".pdf"] and all(p.stat().st_size > 0 for p in paths)
    axes = drawn[-1].axes
    assert [ax.get_title() for ax in axes] == ["liver", "heart"]
    for ax, pixels in zip(axes, (liver, (slice(10, 20), slice(5, 30))), strict=True):
        values = {name: img[pixels].ravel() for name, img in images.items()}
        lo, hi = np.percentile(np.concatenate(list(values.values())), [0.5, 99.5])
        assert ax.get_xlim() == pytest.approx((lo, hi))
        curves = {line.get_label(): line for line in ax.get_lines()}
        assert list(curves) == list(images)
        for name, line in curves.items():  # each curve is the KDE of that image's ROI pixels
            x, y = line.get_data()
            assert y == pytest.approx(stats.gaussian_kde(values[name])(x), rel=1e-9), name
        assert curves["NDCT"].get_color() == "black" and curves["NDCT"].get_linewidth() > 2
        assert len(ax.patches) == len(images)  # one histogram per image
    ref = images["NDCT"]
    methods = {k: v for k, v in images.items() if k != "NDCT"}
    paths = figures.difference_maps(methods, ref, tmp_path / "diff", limit_hu=80.0)
    assert all(p.exists() for p in paths)
    maps = [ax for ax in drawn[-1].axes if ax.get_images()]
    assert [ax.get_title() for ax in maps] == ["LDCT - reference", "proposed - reference"]
    for ax, img in zip(maps, methods.values(), strict=True):
        (shown,) = ax.get_images()
        np.testing.assert_allclose(np.asarray(shown.get_array()), img - ref)  # image minus reference, in HU
        assert shown.get_clim() == (-80.0, 80.0) and shown.get_cmap().name == "RdBu_r"
    with pytest.raises(ValueError, match="shape"):
        figures.difference_maps({"x": np.zeros((3, 3))}, ref, tmp_path / "bad")

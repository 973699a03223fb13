"""Figures in the paper's style: comparison panels with ROI zooms (Fig. 4/6), HU histograms with KDE
(Fig. 5), and difference maps against an aligned reference.

Uses ``matplotlib.figure.Figure`` directly (Agg canvas, no pyplot state), so it works headless and never
changes the caller's backend. Every function writes PNG and PDF and returns the paths.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from scipy.stats import gaussian_kde

from ldct_lightning.data.normalize import WINDOWS, apply_window
from ldct_lightning.eval.rois import Box

ROI_COLOR = "#ff0000"
FORMATS: tuple[str, ...] = ("png", "pdf")
REFERENCE_NAMES: tuple[str, ...] = ("NDCT", "reference", "Reference", "Label")


def save_figure(
    fig: Figure, out_path: str | Path, formats: Sequence[str] = FORMATS, dpi: int = 150
) -> list[Path]:
    """Save a figure once per format next to ``out_path`` (its suffix is replaced).

    Returns:
        The written paths.
    """
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    for fmt in formats:
        path = out_path.with_suffix(f".{fmt}")
        fig.savefig(path, dpi=dpi, bbox_inches="tight", metadata={"Software": None} if fmt == "png" else None)
        paths.append(path)
    return paths


def _window(window: str | tuple[float, float]) -> tuple[float, float]:
    if isinstance(window, str):
        if window not in WINDOWS:
            raise KeyError(f"unknown window {window!r}; known: {', '.join(WINDOWS)}")
        return WINDOWS[window]
    return window


def comparison_panel(
    images: Mapping[str, np.ndarray],
    out_path: str | Path,
    window: str | tuple[float, float] = "abdomen",
    boxes: Sequence[Box] = (),
    title: str | None = None,
    panel_size: float = 2.6,
) -> list[Path]:
    """Input / methods / NDCT side by side in one window, ROI boxes in red, one row of zooms per box.

    Args:
        images: name -> slice in HU, in column order (e.g. LDCT, methods..., NDCT).
        out_path: output path; ``.png`` and ``.pdf`` are written.
        window: name in ``normalize.WINDOWS`` or ``(center, width)``.
        boxes: ROIs to outline and zoom.
        title: figure title (the window is always named).
        panel_size: inches per panel.

    Returns:
        The written paths.
    """
    if not images:
        raise ValueError("comparison_panel needs at least one image")
    center, width = _window(window)
    names = list(images)
    nrows, ncols = 1 + len(boxes), len(names)
    fig = Figure(figsize=(panel_size * ncols, panel_size * nrows))
    axes = np.asarray(fig.subplots(nrows, ncols, squeeze=False))
    for j, name in enumerate(names):
        shown = apply_window(np.asarray(images[name], dtype=np.float64), center, width)
        ax = axes[0, j]
        ax.imshow(shown, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.set_title(name, fontsize=9)
        for k, b in enumerate(boxes):
            ax.add_patch(
                Rectangle(
                    (b.x0 - 0.5, b.y0 - 0.5),
                    b.x1 - b.x0,
                    b.y1 - b.y0,
                    fill=False,
                    edgecolor=ROI_COLOR,
                    linewidth=1.2,
                )
            )
            ax.text(b.x0, b.y0 - 2, str(k + 1), color=ROI_COLOR, fontsize=7, va="bottom")
            zoom = axes[1 + k, j]
            zoom.imshow(shown[b.slices], cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
            for spine in zoom.spines.values():
                spine.set_edgecolor(ROI_COLOR)
                spine.set_linewidth(1.5)
            zoom.set_xticks([])
            zoom.set_yticks([])
            if j == 0:
                zoom.set_ylabel(f"ROI {k + 1}", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    label = f"window C{center:g}/W{width:g}" + (f" ({window})" if isinstance(window, str) else "")
    fig.suptitle(f"{title} - {label}" if title else label, fontsize=10)
    return save_figure(fig, out_path)


def kde_curve(
    values: np.ndarray, grid: np.ndarray | None = None, n: int = 512
) -> tuple[np.ndarray, np.ndarray]:
    """Kernel density estimate of values (``scipy.stats.gaussian_kde``, Scott's bandwidth).

    Args:
        values: samples (e.g. HU in an ROI).
        grid: where to evaluate; default ``n`` points spanning the data plus 4 bandwidths on each side.
        n: grid size for the default grid.

    Returns:
        ``(grid, density)``; the density integrates to ~1 over the default grid.
    """
    values = np.asarray(values, dtype=np.float64).ravel()
    if values.size < 2 or np.ptp(values) == 0:
        raise ValueError("KDE needs at least two distinct values")
    kde = gaussian_kde(values)
    if grid is None:
        bw = float(np.sqrt(kde.covariance[0, 0]))
        grid = np.linspace(values.min() - 4 * bw, values.max() + 4 * bw, n)
    return grid, kde(grid)


def _roi_values(image: np.ndarray, roi: Box | np.ndarray) -> np.ndarray:
    image = np.asarray(image, dtype=np.float64)
    return image[roi.slices].ravel() if isinstance(roi, Box) else image[np.asarray(roi, dtype=bool)]


def hu_histograms(
    images: Mapping[str, np.ndarray],
    rois: Mapping[str, Box | np.ndarray],
    out_path: str | Path,
    bins: int = 60,
    hu_range: tuple[float, float] | None = None,
    reference: str | None = None,
) -> list[Path]:
    """HU histograms with KDE curves per ROI (Fig. 5): one subplot per ROI, one curve per image.

    Args:
        images: name -> slice in HU (methods, input and the reference / NDCT).
        rois: ROI name -> box or mask (e.g. ``{"liver": ..., "heart": ...}``).
        out_path: output path; ``.png`` and ``.pdf`` are written.
        bins: histogram bins.
        hu_range: common x range; default the 0.5-99.5 percentile of all values per ROI.
        reference: name drawn as a thick black line; default the first of ``REFERENCE_NAMES`` present.

    Returns:
        The written paths.
    """
    if reference is None:
        reference = next((n for n in REFERENCE_NAMES if n in images), None)
    fig = Figure(figsize=(4.2 * len(rois), 3.4), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(rois), squeeze=False)[0])
    for ax, (roi_name, roi) in zip(axes, rois.items(), strict=True):
        per_image = {name: _roi_values(img, roi) for name, img in images.items()}
        everything = np.concatenate(list(per_image.values()))
        lo, hi = hu_range if hu_range else tuple(np.percentile(everything, [0.5, 99.5]))
        grid = np.linspace(lo, hi, 400)
        for name, vals in per_image.items():
            is_ref = name == reference
            color = "black" if is_ref else None
            (line,) = ax.plot(
                grid, kde_curve(vals, grid)[1], color=color, linewidth=2.2 if is_ref else 1.2, label=name
            )
            ax.hist(
                vals,
                bins=bins,
                range=(lo, hi),
                density=True,
                histtype="stepfilled",
                alpha=0.12,
                color=line.get_color(),
            )
        ax.set_title(roi_name)
        ax.set_xlabel("HU")
        ax.set_ylabel("probability density")
        ax.set_xlim(lo, hi)
    axes[-1].legend(fontsize=7)
    return save_figure(fig, out_path)


def difference_maps(
    images: Mapping[str, np.ndarray],
    reference_hu: np.ndarray,
    out_path: str | Path,
    limit_hu: float = 100.0,
    reference_name: str = "reference",
) -> list[Path]:
    """Maps of ``image - reference`` in HU on a symmetric diverging scale (needs an aligned reference).

    Args:
        images: name -> slice in HU (input and methods).
        reference_hu: aligned ground truth in HU.
        out_path: output path; ``.png`` and ``.pdf`` are written.
        limit_hu: colour scale ``[-limit_hu, limit_hu]``.
        reference_name: name used in the title.

    Returns:
        The written paths.
    """
    reference_hu = np.asarray(reference_hu, dtype=np.float64)
    fig = Figure(figsize=(2.8 * len(images) + 0.6, 3.0), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(images), squeeze=False)[0])
    im = None
    for ax, (name, img) in zip(axes, images.items(), strict=True):
        img = np.asarray(img, dtype=np.float64)
        if img.shape != reference_hu.shape:
            raise ValueError(f"{name}: shape {img.shape} != reference shape {reference_hu.shape}")
        im = ax.imshow(
            img - reference_hu, cmap="RdBu_r", vmin=-limit_hu, vmax=limit_hu, interpolation="nearest"
        )
        ax.set_title(f"{name} - {reference_name}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(im, ax=list(axes), label="HU", shrink=0.8)
    return save_figure(fig, out_path)

"""One figure per registered study: LDCT, registered NDCT and their checkerboard on the middle usable slice."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ldct_lightning.data.normalize import apply_window

WINDOW = (40.0, 400.0)  # abdomen C40/W400


def checkerboard(a: np.ndarray, b: np.ndarray, tiles: int = 8) -> np.ndarray:
    """Alternate square tiles of ``a`` and ``b`` (same shape)."""
    rows, cols = a.shape
    yy, xx = np.mgrid[:rows, :cols]
    odd = ((yy * tiles // rows) + (xx * tiles // cols)) % 2 == 1
    return np.where(odd, b, a)


def save_registration_figure(
    ldct: np.ndarray, registered: np.ndarray, mask: np.ndarray, usable: np.ndarray, title: str, path: Path
) -> int:
    """Write LDCT / registered NDCT / checkerboard / well-registered mask of one slice to ``path``.

    Returns:
        The slice shown (the middle usable one, else the middle one).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    good = np.flatnonzero(np.asarray(usable, bool))
    k = int(good[len(good) // 2]) if len(good) else len(ldct) // 2
    ld = apply_window(np.asarray(ldct[k], np.float64), *WINDOW)
    nd = apply_window(np.asarray(registered[k], np.float64), *WINDOW)
    panels = [
        (ld, "LDCT"),
        (nd, "NDCT registered"),
        (checkerboard(ld, nd), "checkerboard"),
        (np.asarray(mask[k], float), "well-registered mask"),
    ]
    fig, axes = plt.subplots(1, 4, figsize=(16, 4.4))
    for ax, (image, name) in zip(axes, panels, strict=True):
        ax.imshow(image, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(name, fontsize=10)
        ax.axis("off")
    fig.suptitle(f"{title} (slice {k}, abdomen window C40/W400)", fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return k

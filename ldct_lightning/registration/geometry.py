"""Geometry of a cached CT volume and the LDCT -> NDCT correspondence in physical coordinates.

A volume is (n_slices, rows, cols) with slices at ``z_mm`` (ascending, its own frame of reference) and
pixels of ``pixel_mm = (row, col)`` spacing; the image centre sits on the scanner axis (x = y = 0), as
in CT exports. Physical points are (x, y, z) in mm with x along the columns and y along the rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk


@dataclass(frozen=True)
class VolumeGeometry:
    """Where the voxels of a volume lie.

    Attributes:
        shape: (n_slices, rows, cols).
        z_mm: slice positions, ascending (mm).
        pixel_mm: (row spacing, column spacing) in mm.
    """

    shape: tuple[int, int, int]
    z_mm: tuple[float, ...]
    pixel_mm: tuple[float, float]

    @property
    def slice_mm(self) -> float:
        """Median distance between slices (1 mm for a one-slice volume)."""
        return float(np.median(np.diff(self.z_mm))) if len(self.z_mm) > 1 else 1.0

    def origin_xy(self) -> tuple[float, float]:
        """Physical (x, y) of pixel (0, 0)."""
        rows, cols = self.shape[1:]
        return -self.pixel_mm[1] * (cols - 1) / 2, -self.pixel_mm[0] * (rows - 1) / 2

    def to_physical(self, k: np.ndarray, row: np.ndarray, col: np.ndarray) -> np.ndarray:
        """Physical (..., 3) points of (fractional) slice, row, column indices."""
        x0, y0 = self.origin_xy()
        z = np.interp(k, np.arange(len(self.z_mm)), self.z_mm, left=np.nan, right=np.nan)
        k = np.asarray(k, dtype=np.float64)
        # slice indices outside the stack extrapolate with the median spacing
        z = np.where(np.isnan(z), self.z_mm[0] + k * self.slice_mm, z)
        return np.stack(
            np.broadcast_arrays(
                x0 + np.asarray(col) * self.pixel_mm[1], y0 + np.asarray(row) * self.pixel_mm[0], z
            ),
            axis=-1,
        )

    def to_index(self, points: np.ndarray) -> np.ndarray:
        """Fractional (slice, row, column) indices (..., 3) of physical points (..., 3)."""
        points = np.asarray(points, dtype=np.float64)
        x0, y0 = self.origin_xy()
        z = np.asarray(self.z_mm)
        if len(z) > 1:
            k = np.interp(points[..., 2], z, np.arange(len(z)), left=np.nan, right=np.nan)
            k = np.where(np.isnan(k), (points[..., 2] - z[0]) / self.slice_mm, k)
        else:
            k = points[..., 2] - z[0]
        return np.stack(
            (k, (points[..., 1] - y0) / self.pixel_mm[0], (points[..., 0] - x0) / self.pixel_mm[1]), axis=-1
        )

    def image(self, volume: np.ndarray) -> sitk.Image:
        """The volume as a float32 SimpleITK image on a uniform z grid (median slice spacing)."""
        image = sitk.GetImageFromArray(np.asarray(volume, dtype=np.float32))
        x0, y0 = self.origin_xy()
        image.SetOrigin((x0, y0, float(self.z_mm[0])))
        image.SetSpacing((float(self.pixel_mm[1]), float(self.pixel_mm[0]), self.slice_mm))
        return image


@dataclass(frozen=True)
class Correspondence:
    """Maps LDCT physical points to NDCT physical points: ``nd = matrix @ ld + offset``.

    Attributes:
        matrix: 3 x 3 linear part (row-major, acting on (x, y, z)).
        offset: translation (mm).
        ldct: geometry of the LDCT volume.
        ndct: geometry of the NDCT volume.
    """

    matrix: tuple[tuple[float, ...], ...]
    offset: tuple[float, float, float]
    ldct: VolumeGeometry
    ndct: VolumeGeometry

    def map_points(self, points: np.ndarray) -> np.ndarray:
        """NDCT physical points (..., 3) of LDCT physical points (..., 3)."""
        return np.asarray(points, dtype=np.float64) @ np.asarray(self.matrix).T + np.asarray(self.offset)

    def ndct_index(self, k: float, row: float, col: float) -> np.ndarray:
        """Fractional NDCT (slice, row, column) of LDCT voxel (k, row, col)."""
        return self.ndct.to_index(self.map_points(self.ldct.to_physical(np.asarray(k), row, col)))

    def ldct_slices_inside(self, margin_slices: float = 0.5) -> np.ndarray:
        """LDCT slices whose centre maps inside the NDCT stack (within ``margin_slices`` of an end)."""
        rows, cols = self.ldct.shape[1:]
        k = np.arange(self.ldct.shape[0])
        nd = self.ndct_index(k, (rows - 1) / 2, (cols - 1) / 2)[:, 0]
        return np.flatnonzero((nd >= -margin_slices) & (nd <= self.ndct.shape[0] - 1 + margin_slices))


def transform_matrix(transform: sitk.Transform) -> tuple[np.ndarray, np.ndarray]:
    """The linear part and offset of a SimpleITK (composite) affine-like transform: y = A x + b."""
    points = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=np.float64) * 100.0
    mapped = np.array([transform.TransformPoint(tuple(p)) for p in points])
    offset = mapped[0]
    matrix = (mapped[1:] - offset).T / 100.0
    return matrix, offset

"""A disk cache of study registrations, keyed by both series' content keys and the settings.

Layout of ``<cache_dir>/registration/<key>/`` (written to a temporary folder and renamed into place, so
an interrupted or failed registration leaves nothing behind)::

    result.json     correspondence (matrix, offset, geometries), per-slice NCC, usable slices, info
    warped.npy      int16 HU: the NDCT resampled onto the LDCT grid (final transform)
    mask.npy        bool: well-registered LDCT pixels
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ldct_lightning.data.cache import building_folder, hu_to_int16
from ldct_lightning.registration.geometry import Correspondence, VolumeGeometry
from ldct_lightning.registration.register import RegistrationConfig, RegistrationResult, register_study

REGISTRATION_FORMAT_VERSION = 2


@dataclass
class CachedRegistration:
    """A registration read back from the cache (arrays are read-only memory maps)."""

    correspondence: Correspondence
    warped: np.ndarray
    mask: np.ndarray
    slice_ncc: np.ndarray
    usable: np.ndarray
    info: dict


def registration_key(ldct_key: str, ndct_key: str, cfg: RegistrationConfig) -> str:
    """Cache key of a study's registration (blake2b-128 of both content keys and the settings)."""
    text = json.dumps(
        {"v": REGISTRATION_FORMAT_VERSION, "ldct": ldct_key, "ndct": ndct_key, "cfg": cfg.as_dict()},
        sort_keys=True,
    )
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def _geometry_json(g: VolumeGeometry) -> dict:
    return {"shape": list(g.shape), "z_mm": list(g.z_mm), "pixel_mm": list(g.pixel_mm)}


def _geometry(d: dict) -> VolumeGeometry:
    return VolumeGeometry(tuple(d["shape"]), tuple(d["z_mm"]), tuple(d["pixel_mm"]))


class RegistrationCache:
    """Registers each study once and serves the result from disk afterwards.

    Args:
        cache_dir: the series cache folder; entries go to ``<cache_dir>/registration``.
        cfg: registration settings (part of the key).
    """

    def __init__(self, cache_dir: str | Path, cfg: RegistrationConfig | None = None) -> None:
        self.folder = Path(cache_dir) / "registration"
        self.cfg = cfg or RegistrationConfig()
        self.builds = 0  # registrations computed (not reused) by this instance

    def get(
        self,
        ldct: np.ndarray,
        ldct_geom: VolumeGeometry,
        ndct: np.ndarray,
        ndct_geom: VolumeGeometry,
        ldct_key: str,
        ndct_key: str,
        patient: str,
    ) -> CachedRegistration:
        """The study's registration, computed on first use.

        Raises:
            RegistrationError: the study does not register (nothing is written then).
        """
        key = registration_key(ldct_key, ndct_key, self.cfg)
        entry = self.folder / key
        if not (entry / "result.json").is_file():
            result = register_study(ldct, ldct_geom, ndct, ndct_geom, self.cfg, patient)
            self._write(entry, result, patient)
            self.builds += 1
        return self._read(entry)

    def _write(self, entry: Path, result: RegistrationResult, patient: str) -> None:
        with building_folder(entry, "result.json") as tmp:
            warped = np.empty(result.warped.shape, np.int16)
            hu_to_int16(result.warped.astype(np.float32), warped)
            np.save(tmp / "warped.npy", warped)
            np.save(tmp / "mask.npy", result.mask.astype(bool))
            c = result.correspondence
            (tmp / "result.json").write_text(
                json.dumps(
                    {
                        "format_version": REGISTRATION_FORMAT_VERSION,
                        "patient_key": patient,
                        "matrix": [list(r) for r in c.matrix],
                        "offset": list(c.offset),
                        "ldct": _geometry_json(c.ldct),
                        "ndct": _geometry_json(c.ndct),
                        "slice_ncc": [None if not np.isfinite(v) else float(v) for v in result.slice_ncc],
                        "usable": [bool(v) for v in result.usable],
                        "info": result.info,
                        "config": self.cfg.as_dict(),
                    },
                    indent=1,
                )
            )

    @staticmethod
    def _read(entry: Path) -> CachedRegistration:
        data = json.loads((entry / "result.json").read_text())
        correspondence = Correspondence(
            tuple(tuple(r) for r in data["matrix"]),
            tuple(data["offset"]),
            _geometry(data["ldct"]),
            _geometry(data["ndct"]),
        )
        return CachedRegistration(
            correspondence,
            np.load(entry / "warped.npy", mmap_mode="r"),
            np.load(entry / "mask.npy", mmap_mode="r"),
            np.array([np.nan if v is None else v for v in data["slice_ncc"]]),
            np.asarray(data["usable"], dtype=bool),
            data["info"],
        )

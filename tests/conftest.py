"""Shared pytest fixtures (keep them generic: several test modules use them)."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from ldct_lightning.data.dicom_write import CTSeriesSpec, write_ct_series


@dataclass
class WrittenSeries:
    """What ``write_series`` wrote: the files in slice order, the volume in HU, its tags and z positions."""

    paths: list[Path]
    hu: np.ndarray
    spec: CTSeriesSpec
    z_mm: list[float]


@pytest.fixture
def write_series(tmp_path: Path) -> Callable[..., WrittenSeries]:
    """Factory that writes a small CT series as real DICOM files.

    Call ``write_series(folder="series", n_slices=4, shape=(8, 8), hu=None, z_mm=None,
    random_names=True, seed=0, **spec_fields)``: ``folder`` is relative to ``tmp_path`` (or absolute),
    ``hu`` defaults to random integers in [-1000, 2000] HU, ``z_mm`` to 1.25 mm steps from 0, and
    ``spec_fields`` go to :class:`CTSeriesSpec` (``patient_id`` defaults to ``"PAT-001"``). With
    ``random_names`` the files get random names without extension, as some exports do.
    """

    def _write(
        folder: str | Path = "series",
        n_slices: int = 4,
        shape: tuple[int, int] = (8, 8),
        hu: np.ndarray | None = None,
        z_mm: Sequence[float] | None = None,
        random_names: bool = True,
        seed: int = 0,
        **spec_fields: object,
    ) -> WrittenSeries:
        rng = np.random.default_rng(seed)
        if hu is None:
            hu = rng.integers(-1000, 2000, size=(n_slices, *shape)).astype(np.float64)
        z = [1.25 * i for i in range(len(hu))] if z_mm is None else [float(v) for v in z_mm]
        spec_fields.setdefault("patient_id", "PAT-001")
        spec = CTSeriesSpec(**spec_fields)
        names = [uuid.uuid4().hex for _ in range(len(hu))] if random_names else None
        out_dir = Path(folder) if Path(folder).is_absolute() else tmp_path / folder
        paths = write_ct_series(hu, spec, z, out_dir, file_names=names)
        return WrittenSeries(paths=paths, hu=hu, spec=spec, z_mm=z)

    return _write


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The ``tiny`` synthetic data set (DICOM + truth), generated once per test session."""
    from ldct_lightning.data.synthetic import PRESETS, generate_dataset

    root = tmp_path_factory.mktemp("tiny") / "data"
    generate_dataset(root, PRESETS["tiny"], progress=False)
    return root


@pytest.fixture(autouse=True)
def _offline_torch_hub(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Tests never download: an empty torch hub folder (TORCH_HOME) and a download that fails as offline."""
    import urllib.error

    import torch

    home = tmp_path_factory.mktemp("torch-home")
    monkeypatch.setenv("TORCH_HOME", str(home))

    def offline(url: str, *args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("tests run offline")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    return home

"""Shared pytest fixtures (keep them generic: several test modules use them)."""

from __future__ import annotations

import uuid
import warnings
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


@dataclass
class TrainedRun:
    """What ``lightning_run`` wrote: the checkpoint, and the generator whose weights it holds (eval mode)."""

    checkpoint: Path
    generator: object


def _fit_and_save(stage: str, generator_kwargs: dict, seed: int, identity: bool, path: Path):
    """Fit a real Lightning module (one batch of random 32x32 pairs) around a tiny generator and save
    ``trainer.save_checkpoint`` to ``path``. An identity network is 'trained' with lr 0 so it stays one."""
    import functools

    import lightning as L
    import torch
    import torch.nn.functional as F
    from torch import nn
    from torch.utils.data import DataLoader

    from ldct_lightning.models.critic import WGANCritic
    from ldct_lightning.models.generator import AttentionResUNet
    from ldct_lightning.modules.stage1 import Stage1Module
    from ldct_lightning.modules.stage2 import Stage2Module

    class L1WithTerms(nn.Module):
        def forward(self, pred: torch.Tensor, target: torch.Tensor):
            loss = F.l1_loss(pred, target)
            return loss, {"l1": loss}

    torch.manual_seed(seed)
    generator = AttentionResUNet(**generator_kwargs, zero_init_output=identity)
    adam = functools.partial(torch.optim.Adam, lr=0.0 if identity else 1e-3, betas=(0.5, 0.999))
    g = torch.Generator().manual_seed(seed)
    if stage == "first":
        module = Stage1Module(generator, L1WithTerms(), adam, panel_every_n_epochs=0)
        keys = ("input", "target")
    else:
        critic = WGANCritic(patch_size=32, channels=(8, 8, 16, 16, 32, 32), hidden=64)
        module = Stage2Module(generator, critic, adam, adam, n_critic=1, panel_every_n_epochs=0)
        keys = ("ldct", "ndct")
    items = [{k: torch.rand(1, 32, 32, generator=g) for k in keys} for _ in range(2)]
    before = {k: v.clone() for k, v in generator.state_dict().items()}
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*no `val_dataloader`")
        trainer.fit(module, train_dataloaders=DataLoader(items, batch_size=2))
    path.parent.mkdir(parents=True, exist_ok=True)
    trainer.save_checkpoint(path)
    changed = any(not torch.equal(v, before[k]) for k, v in generator.state_dict().items() if "weight" in k)
    assert changed != identity, "the tiny fit should train the weights (and leave an identity network one)"
    return generator.eval()


@pytest.fixture(scope="session")
def _lightning_cache(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return {"root": tmp_path_factory.mktemp("lightning_runs")}


@pytest.fixture
def lightning_run(tmp_path: Path, _lightning_cache: dict) -> Callable[..., TrainedRun]:
    """Factory: a real Lightning checkpoint of a tiny fit, inside a run folder with a ``run_info.yaml``.

    Call ``lightning_run(run="runs/run-0", stage="first", seed=0, identity=False, info=None,
    **generator_kwargs)``; ``run`` is relative to ``tmp_path``. The module (stage 1 or 2) is fitted once per
    (stage, seed, identity, generator kwargs) and test session and the files copied, since fits take seconds.
    ``run_info.yaml`` is written by ``pipeline.write_run_info`` with ``model.generator`` naming the
    architecture (plus ``info``, merged into the config).
    """
    import shutil

    from omegaconf import OmegaConf

    from ldct_lightning.pipeline import write_run_info

    def _make(
        run: str | Path = "runs/run-0",
        stage: str = "first",
        seed: int = 0,
        identity: bool = False,
        info: dict | None = None,
        **generator_kwargs: object,
    ) -> TrainedRun:
        kwargs = {"base_channels": 8, **generator_kwargs}
        key = (stage, seed, identity, tuple(sorted(kwargs.items())))
        if key not in _lightning_cache:
            path = _lightning_cache["root"] / f"fit{len(_lightning_cache)}" / "last.ckpt"
            _lightning_cache[key] = (path, _fit_and_save(stage, kwargs, seed, identity, path))
        source, generator = _lightning_cache[key]
        run_dir = tmp_path / run
        ckpt = run_dir / stage / "checkpoints" / "last.ckpt"
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, ckpt)
        target = {"_target_": "ldct_lightning.models.generator.AttentionResUNet", **kwargs}
        config = OmegaConf.merge({"model": {"generator": target}}, info or {})
        write_run_info(run_dir, config, split_hash=None)
        return TrainedRun(ckpt, generator)

    return _make


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

"""Faults during training and bad input: SIGTERM / Ctrl-C resume, non-finite losses, atomic checkpoints, and
one-line errors from the DataModule and ``train.py`` for broken DICOM, empty folders and existing run folders."""

from __future__ import annotations

import csv
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import lightning as L
import numpy as np
import pydicom
import pytest
import torch
from hydra.utils import instantiate
from pydicom.uid import RLELossless
from test_datamodule import make_dm, write_dataset
from test_pipeline import tiny_cfg
from torch import nn
from torch.utils.data import DataLoader

from ldct_lightning import checkpoint_io
from ldct_lightning.callbacks import NonFiniteGuard, NonFiniteLossError
from ldct_lightning.checkpoint_io import AtomicCheckpointIO
from ldct_lightning.data.datamodule import DataConfigError
from ldct_lightning.data.dicom import DicomError
from ldct_lightning.losses import Stage1Loss
from ldct_lightning.pipeline import ConfigError, run

REPO = Path(__file__).resolve().parents[1]
STEPS_PER_EPOCH = 8 // 4  # samples_per_epoch / batch_size of experiment=tiny
# stage 1 without image panels and without the VGG term, which costs 80 % of a tiny CPU step
FAST = ["stages.first.module.panel_every_n_epochs=0", "stages.first.module.loss.perceptual_weight=0"]


def load_ckpt(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def all_finite(state: dict[str, torch.Tensor]) -> bool:
    return all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


# ----------------------------------------------------------------------------------- atomic checkpoints


def test_atomic_save_keeps_the_old_checkpoint_when_a_save_fails(tmp_path: Path, monkeypatch) -> None:
    io = AtomicCheckpointIO()
    path = tmp_path / "ckpts" / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "epoch": 1}, path)
    before = path.read_bytes()

    def failing_save(obj, f) -> None:
        f.write(b"half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint_io.torch, "save", failing_save)
    with pytest.raises(OSError, match="No space left"):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}, "epoch": 2}, path)

    def interrupted_save(obj, f) -> None:
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint_io.torch, "save", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}, "epoch": 3}, path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert load_ckpt(path)["epoch"] == 1
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]  # no temporary file left


def test_atomic_save_writes_a_loadable_file_with_the_usual_permissions(tmp_path: Path) -> None:
    io = AtomicCheckpointIO()
    path = tmp_path / "new" / "a.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.arange(4.0)}}, path)
    assert torch.equal(io.load_checkpoint(path)["state_dict"]["w"], torch.arange(4.0))
    plain = tmp_path / "plain"
    plain.write_bytes(b"")
    assert path.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777  # the umask, not mkstemp's 0600


@pytest.mark.parametrize("trainer", ["cpu", "gpu", "ddp"])
def test_every_trainer_config_uses_the_atomic_checkpoint_io(
    trainer: str, tiny_dataset: Path, tmp_path: Path
) -> None:
    cfg = tiny_cfg(tiny_dataset, tmp_path / "run", [f"trainer={trainer}"])
    targets = [p["_target_"] for p in cfg.trainer.plugins]
    assert targets == ["ldct_lightning.checkpoint_io.AtomicCheckpointIO"]
    if trainer == "cpu":
        t = instantiate(cfg.trainer, logger=False, enable_progress_bar=False, enable_model_summary=False)
        assert isinstance(t.strategy.checkpoint_io, AtomicCheckpointIO)


# ------------------------------------------------------------------------------------- non-finite guard


class _Auto(L.LightningModule):
    """One linear layer; the loss becomes NaN (or has NaN gradients) at the given global steps."""

    def __init__(self, bad_steps: set[int], kind: str = "loss") -> None:
        super().__init__()
        self.net = nn.Linear(2, 1)
        self.bad_steps, self.kind = bad_steps, kind
        self.weights: list[torch.Tensor] = []  # before every step

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        self.weights.append(self.net.weight.detach().clone())
        loss = self.net(batch).pow(2).mean()
        if self.global_step in self.bad_steps:
            # "grad": a finite loss (0) whose gradient is NaN (d sqrt(x)/dx at 0 is inf, times 0)
            loss = loss * math.nan if self.kind == "loss" else loss + torch.sqrt(self.net.weight.sum() * 0)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(torch.randn(8, 2, generator=torch.Generator().manual_seed(0)), batch_size=2)


class _Manual(L.LightningModule):
    """A generator / critic pair under manual optimization (like stage 2); NaN critic loss at the batches ``bad_steps``."""

    def __init__(self, bad_steps: set[int]) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.generator, self.critic = nn.Linear(2, 2), nn.Linear(2, 1)
        self.bad_steps = bad_steps
        self.history: list[
            tuple[torch.Tensor, torch.Tensor]
        ] = []  # (generator, critic) weights after each batch

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        opt_g, opt_c = self.optimizers()
        loss_c = self.critic(self.generator(batch).detach()).mean()
        if batch_idx in self.bad_steps:
            loss_c = loss_c * math.nan
        opt_c.zero_grad()
        self.manual_backward(loss_c)
        opt_c.step()
        loss_g = -self.critic(self.generator(batch)).mean()
        opt_g.zero_grad()
        self.manual_backward(loss_g)
        opt_g.step()
        self.history.append((self.generator.weight.detach().clone(), self.critic.weight.detach().clone()))

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        return [
            torch.optim.Adam(self.generator.parameters(), 1e-2),
            torch.optim.Adam(self.critic.parameters(), 1e-2),
        ]

    def train_dataloader(self) -> DataLoader:
        return DataLoader(torch.randn(8, 2, generator=torch.Generator().manual_seed(0)), batch_size=2)


def _fit(module: L.LightningModule, guard: NonFiniteGuard, root: Path, max_epochs: int = 1) -> L.Trainer:
    trainer = L.Trainer(
        max_epochs=max_epochs,
        default_root_dir=str(root / "first"),
        callbacks=[guard],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module)
    return trainer


@pytest.mark.parametrize("kind", ["loss", "grad"])
def test_nonfinite_stop_raises_before_the_step(kind: str, tmp_path: Path) -> None:
    module = _Auto({2}, kind)
    with pytest.raises(NonFiniteLossError) as info:
        _fit(module, NonFiniteGuard("stop"), tmp_path)
    message = str(info.value)
    what = "non-finite loss (nan)" if kind == "loss" else "non-finite gradient"
    assert f"{what} of the net in stage first, epoch 0, global step 2 (batch 2)" in message
    assert "callbacks.nonfinite.mode=skip" in message and "\n" not in message
    # the weights never took the bad update
    assert torch.equal(module.net.weight, module.weights[2]) and torch.isfinite(module.net.weight).all()


def test_nonfinite_skip_drops_the_step_and_goes_on(tmp_path: Path) -> None:
    module, guard = _Auto({1, 5}), NonFiniteGuard("skip")
    trainer = _fit(module, guard, tmp_path, max_epochs=2)
    assert guard.skipped == 2 and trainer.global_step == 8
    w = module.weights + [module.net.weight.detach()]
    assert torch.equal(w[1], w[2]) and torch.equal(w[5], w[6])  # no update at the NaN steps
    assert not torch.equal(w[2], w[3]) and not torch.equal(w[0], w[1])  # normal updates elsewhere
    assert torch.isfinite(w[-1]).all()


def test_nonfinite_skip_gives_up_after_too_many_in_a_row(tmp_path: Path) -> None:
    with pytest.raises(NonFiniteLossError, match="3 non-finite steps in a row"):
        _fit(_Auto(set(range(100))), NonFiniteGuard("skip", max_consecutive_skips=2), tmp_path)


def test_nonfinite_manual_optimization_names_the_network(tmp_path: Path) -> None:
    with pytest.raises(
        NonFiniteLossError, match=r"loss \(nan\) of the critic in stage first, epoch 0, global step 2"
    ):
        _fit(_Manual({1}), NonFiniteGuard("stop"), tmp_path)
    module, guard = _Manual({1}), NonFiniteGuard("skip")
    _fit(module, guard, tmp_path)
    (g0, c0), (g1, c1) = module.history[0], module.history[1]
    assert guard.skipped == 1
    assert torch.equal(c0, c1)  # the critic skipped its step
    assert not torch.equal(g0, g1)  # the generator still trained
    assert all(torch.isfinite(t).all() for pair in module.history for t in pair)


def test_nonfinite_guard_rejects_an_unknown_mode() -> None:
    with pytest.raises(ValueError, match="callbacks.nonfinite.mode"):
        NonFiniteGuard("ignore")


def _nan_from_call(monkeypatch, n: int) -> None:
    """Make Stage1Loss return a NaN total from its ``n``-th call on (1-based)."""
    original = Stage1Loss.forward
    calls = {"n": 0}

    def forward(self, pred, target):
        calls["n"] += 1
        total, terms = original(self, pred, target)
        return (total * math.nan if calls["n"] >= n else total), terms

    monkeypatch.setattr(Stage1Loss, "forward", forward)


def test_stage1_nan_stops_the_run_and_keeps_the_last_good_checkpoint(
    tiny_dataset: Path, tmp_path: Path, monkeypatch
) -> None:
    out = tmp_path / "run"
    _nan_from_call(monkeypatch, STEPS_PER_EPOCH + 1)  # the first batch of epoch 1
    cfg = tiny_cfg(tiny_dataset, out, ["ablation=firstStep", "stages.first.max_epochs=3", *FAST])
    with pytest.raises(NonFiniteLossError) as info:
        run(cfg)
    assert f"stage first, epoch 1, global step {STEPS_PER_EPOCH} (batch 0)" in str(info.value)
    assert f"the last good checkpoint is {out / 'first' / 'checkpoints' / 'last.ckpt'}" in str(info.value)
    last = load_ckpt(out / "first" / "checkpoints" / "last.ckpt")
    assert (last["epoch"], last["global_step"]) == (0, STEPS_PER_EPOCH)
    assert all_finite(last["state_dict"])


def test_stage2_nan_skip_mode_finishes_with_finite_weights(
    tiny_dataset: Path, tmp_path: Path, monkeypatch
) -> None:
    from ldct_lightning.modules import stage2

    calls = {"n": 0}
    original = stage2.gradient_penalty

    def gp(*args, **kwargs):
        calls["n"] += 1
        value = original(*args, **kwargs)
        return value * math.nan if calls["n"] == 2 else value  # the second critic update of the first batch

    monkeypatch.setattr(stage2, "gradient_penalty", gp)
    out = tmp_path / "run"
    cfg = tiny_cfg(
        tiny_dataset,
        out,
        [
            "ablation=oneStep",
            "stages.second.max_epochs=1",
            "callbacks.nonfinite.mode=skip",
            "stages.second.module.critic_warmup_steps=0",  # generator steps from the first batch
        ],
    )
    run(cfg)
    last = load_ckpt(out / "second" / "checkpoints" / "last.ckpt")
    assert all_finite(last["state_dict"])
    assert last["global_step"] == STEPS_PER_EPOCH * (3 + 1)  # skipped steps still count (n_critic=3)


# ------------------------------------------------------------------------------------------ interruption


def test_ctrl_c_saves_a_resumable_checkpoint(tiny_dataset: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    out = tmp_path / "run"
    original = Stage1Loss.forward
    calls = {"n": 0}

    def forward(self, pred, target):
        calls["n"] += 1
        if calls["n"] == STEPS_PER_EPOCH + 2:  # the second batch of epoch 1
            raise KeyboardInterrupt
        return original(self, pred, target)

    monkeypatch.setattr(Stage1Loss, "forward", forward)
    sigint = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit) as info:  # Lightning turns Ctrl-C into sys.exit(1)
            run(tiny_cfg(tiny_dataset, out, ["ablation=firstStep", "stages.first.max_epochs=2", *FAST]))
    finally:
        signal.signal(signal.SIGINT, sigint)  # Lightning ignores further Ctrl-C after the first
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert f"interrupted by Ctrl-C in stage first, epoch 1, global step {STEPS_PER_EPOCH + 1}" in err
    assert f"ckpt_path=last hydra.run.dir={out}" in err
    last = load_ckpt(out / "first" / "checkpoints" / "last.ckpt")
    assert (last["epoch"], last["global_step"]) == (1, STEPS_PER_EPOCH + 1)

    monkeypatch.setattr(Stage1Loss, "forward", original)
    run(
        tiny_cfg(
            tiny_dataset,
            out,
            ["ablation=firstStep", "stages.first.max_epochs=2", *FAST, "ckpt_path=last"],
        )
    )
    last = load_ckpt(out / "first" / "checkpoints" / "last.ckpt")
    assert (last["epoch"], last["global_step"]) == (1, 2 * STEPS_PER_EPOCH)


def _train_py(args: list[str], cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "WANDB_MODE": "offline"}
    return subprocess.Popen(
        [sys.executable, str(REPO / "train.py"), *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.is_file():
        if proc.poll() is not None:
            raise AssertionError(f"train.py ended early ({proc.returncode}): {proc.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"{path} did not appear within {timeout} s")
        time.sleep(0.2)


def test_sigterm_saves_last_ckpt_and_ckpt_path_last_continues(tiny_dataset: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    args = [
        "experiment=tiny",
        f"data.root={tiny_dataset}",
        f"hydra.run.dir={run_dir}",
        "ablation=firstStep",
        *FAST,
    ]
    last_path = run_dir / "first" / "checkpoints" / "last.ckpt"
    proc = _train_py([*args, "stages.first.max_epochs=200"], tmp_path)
    _wait_for(last_path, proc, timeout=180)  # the end of epoch 0
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    assert "Traceback" not in err
    assert f"ckpt_path=last hydra.run.dir={run_dir}" in err
    assert "train.py: stopped by SIGTERM" in err
    # saved at the interruption (not just the epoch-end checkpoint), where the message says
    said = re.search(
        r"interrupted by SIGTERM in stage first, epoch (\d+), global step (\d+); saved (\S+);", err
    )
    assert said and Path(said.group(3)) == last_path, err[-3000:]
    stopped = load_ckpt(last_path)
    epoch, step = stopped["epoch"], stopped["global_step"]
    assert (epoch, step) == (int(said.group(1)), int(said.group(2))) and step >= STEPS_PER_EPOCH

    resume = _train_py([*args, f"stages.first.max_epochs={epoch + 2}", "ckpt_path=last"], tmp_path)
    out, err = resume.communicate(timeout=300)
    assert resume.returncode == 0, err[-3000:]
    assert "Restored all states from the checkpoint" in out + err
    final = load_ckpt(last_path)
    assert (final["epoch"], final["global_step"]) == (epoch + 1, (epoch + 2) * STEPS_PER_EPOCH)
    with (run_dir / "first" / "resume-1" / "metrics.csv").open() as f:
        steps = [int(r["step"]) for r in csv.DictReader(f) if r.get("train/loss")]
    assert steps and min(steps) >= step  # the resumed run logged only the steps it had left
    with (run_dir / "first" / "metrics.csv").open() as f:  # the interrupted run's history is kept
        before = [int(r["step"]) for r in csv.DictReader(f) if r.get("train/loss")]
    assert before and min(before) < step


# ------------------------------------------------------------------------------------------- bad input


def _files(root: Path) -> list[Path]:
    return sorted(p for p in (root / "dicom").rglob("*") if p.is_file())


def _edit(path: Path, change: Callable[[pydicom.Dataset], None]) -> None:
    ds = pydicom.dcmread(path)
    change(ds)
    ds.save_as(path)


def _truncate_pixels(root: Path) -> Path:
    path = _files(root)[3]
    path.write_bytes(path.read_bytes()[:-500])
    return path


def _truncate_header(root: Path) -> Path:
    path = _files(root)[3]
    path.write_bytes(path.read_bytes()[:300])
    return path


def _non_ct(root: Path) -> Path:
    path = _files(root)[0]
    _edit(path, lambda ds: setattr(ds, "Modality", "MR"))
    return path


def _mixed_sizes(root: Path) -> Path:
    path = _files(root)[1]

    def crop(ds: pydicom.Dataset) -> None:
        small = ds.pixel_array[:32, :32].copy()
        ds.Rows, ds.Columns, ds.PixelData = 32, 32, small.tobytes()

    _edit(path, crop)
    return path


def _no_pixels(root: Path) -> Path:
    path = _files(root)[2]
    _edit(path, lambda ds: delattr(ds, "PixelData"))
    return path


@pytest.mark.parametrize(
    ("damage", "problem"),
    [
        (_truncate_pixels, "cannot decode the pixel data"),
        (_no_pixels, "no pixel data found"),
        (_truncate_header, "the DICOM header lacks"),
        (_non_ct, "modality is MR, not CT"),
        (_mixed_sizes, "mixes matrix sizes"),
    ],
)
def test_datamodule_strict_names_the_broken_file(damage, problem: str, tmp_path: Path) -> None:
    root = tmp_path / "data"
    write_dataset(root)
    broken = damage(root)
    dm = make_dm(root, tmp_path, strict=True)
    with pytest.raises(DicomError) as info:
        dm.setup("fit")
    message = str(info.value)
    assert message.startswith(f"{broken}:") and problem in message and "\n" not in message
    # nothing half-written: the cache holds no temporary or partial volume
    assert not [p for p in (tmp_path / "cache").rglob("*.tmp")]


@pytest.mark.parametrize(
    ("damage", "patients_left"),
    [(_truncate_pixels, 3), (_no_pixels, 3), (_truncate_header, 4), (_non_ct, 4), (_mixed_sizes, 3)],
)
def test_datamodule_skips_the_broken_file_with_one_warning(
    damage, patients_left: int, tmp_path: Path
) -> None:
    root = tmp_path / "data"
    write_dataset(root)
    broken = damage(root)
    dm = make_dm(root, tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dm.setup("fit")
    naming = [str(w.message) for w in caught if str(broken) in str(w.message)]
    assert len(naming) == 1 and "data.strict=true" in naming[0], [str(w.message) for w in caught]
    assert len(dm.studies) == patients_left
    assert all(broken not in s.ldct.files + s.ndct.files for s in dm.studies)
    assert next(iter(dm.train_dataloader()))["input"].shape[0] == 4


def test_datamodule_skips_a_non_dicom_file_named_dcm(tmp_path: Path) -> None:
    root = tmp_path / "data"
    write_dataset(root)
    junk = root / "dicom" / "notes.dcm"
    junk.write_text("not a DICOM file")
    dm = make_dm(root, tmp_path)
    with pytest.warns(UserWarning, match=f"{junk}: not a DICOM file"):
        dm.setup("fit")
    assert len(dm.studies) == 4 and all(junk not in s.ldct.files + s.ndct.files for s in dm.studies)


def test_datamodule_missing_rescale_tags_warn_and_read_stored_values(tmp_path: Path) -> None:
    root = tmp_path / "data"
    write_dataset(root)
    files = _files(root)
    expected = pydicom.dcmread(files[0]).pixel_array.astype(np.float32)  # HU = stored value
    for path in files:
        _edit(path, lambda ds: (delattr(ds, "RescaleSlope"), delattr(ds, "RescaleIntercept")))
    dm = make_dm(root, tmp_path, noise={"kind": "gaussian", "sigma_hu": 20.0})
    with pytest.warns(UserWarning, match="RescaleSlope/RescaleIntercept missing"):
        dm.setup("fit")
    series = next(
        s.ldct if files[0] in s.ldct.files else s.ndct
        for s in dm.studies
        if files[0] in s.ldct.files + s.ndct.files
    )
    volume = dm.cache.get(series)
    np.testing.assert_array_equal(volume[list(series.files).index(files[0])], expected)


def test_datamodule_reads_compressed_series_like_uncompressed_ones(tmp_path: Path) -> None:
    plain, packed = tmp_path / "plain", tmp_path / "packed"
    write_dataset(plain)
    shutil.copytree(plain, packed)
    for path in _files(packed):
        _edit(path, lambda ds: ds.compress(RLELossless))
    assert pydicom.dcmread(_files(packed)[0]).file_meta.TransferSyntaxUID == RLELossless
    volumes = []
    for root in (plain, packed):
        dm = make_dm(root, tmp_path / root.name, noise={"kind": "gaussian", "sigma_hu": 20.0})
        dm.setup("fit")
        volumes.append({p.patient_key: np.asarray(p.ldct) for p in dm.patients("train")})
    assert volumes[0].keys() == volumes[1].keys()
    for key in volumes[0]:
        np.testing.assert_array_equal(volumes[0][key], volumes[1][key])


def test_datamodule_constant_images(tmp_path: Path) -> None:
    from ldct_lightning.data.dicom_write import CTSeriesSpec, write_ct_series

    root = tmp_path / "data"
    for i in range(4):
        for role, ctdi in (("ndct", 12.0), ("ldct", 1.5)):
            spec = CTSeriesSpec(patient_id=f"P{i}", ctdi_vol=ctdi)
            write_ct_series(np.full((5, 48, 48), 40.0), spec, np.arange(5) * 1.25, root / f"P{i}" / role)
    # sigma_hu=auto cannot estimate noise on noise-free images: a clear error naming the key
    with pytest.raises(DataConfigError, match=r"data\.noise\.sigma_hu='auto'.*Set data\.noise\.sigma_hu"):
        make_dm(root, tmp_path).setup("fit")
    # with a given noise level the constant images give finite batches
    dm = make_dm(root, tmp_path, noise={"kind": "gaussian", "sigma_hu": 20.0})
    batch = next(iter(dm.train_dataloader()))
    target = batch["target"]
    assert torch.isfinite(batch["input"]).all() and torch.allclose(
        target, target.flatten()[0].expand_as(target)
    )


def test_an_existing_run_folder_is_not_overwritten(tiny_dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    (out / "first" / "checkpoints").mkdir(parents=True)
    (out / "first" / "checkpoints" / "last.ckpt").write_bytes(b"an earlier run")
    with pytest.raises(ConfigError, match="already holds checkpoints of stage first.*ckpt_path=last"):
        run(tiny_cfg(tiny_dataset, out, ["ablation=firstStep"]))
    assert (out / "first" / "checkpoints" / "last.ckpt").read_bytes() == b"an earlier run"


def test_train_py_reports_bad_input_in_one_line(tiny_dataset: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    broken = tmp_path / "broken"
    write_dataset(broken)
    bad_file = _truncate_header(broken)
    existing = tmp_path / "existing"
    (existing / "first" / "checkpoints").mkdir(parents=True)
    (existing / "first" / "checkpoints" / "last.ckpt").write_bytes(b"x")
    cases = {
        "empty": ([f"data.root={empty}"], f"{empty}: no DICOM CT image found"),
        "broken": (
            [f"data.root={broken}", "data.n_val=1", "data.n_test=1", "data.strict=true"],
            f"{bad_file}: the DICOM header lacks",
        ),
        "existing": ([f"data.root={tiny_dataset}", f"hydra.run.dir={existing}"], "already holds checkpoints"),
    }
    procs = {}
    for name, (args, _) in cases.items():
        run_dir = [] if name == "existing" else [f"hydra.run.dir={tmp_path / ('run-' + name)}"]
        procs[name] = _train_py(["experiment=tiny", "ablation=firstStep", *args, *run_dir], tmp_path)
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 2, (name, err[-3000:])
        assert "Traceback" not in err, err[-3000:]
        errors = [line for line in err.splitlines() if line.startswith("train.py: error: ")]
        assert len(errors) == 1 and cases[name][1] in errors[0], err[-3000:]

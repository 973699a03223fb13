"""Run denoising methods over the test split and score every slice under the paper and reference protocols.

:func:`evaluate` walks the DataModule's test loader once (whole slices, batched, patients never mixed in a
batch), runs every method on each batch in HU, and scores every slice of every method with
:func:`ldct_lightning.eval.metrics.score_slice`. The LDCT input is always the first method row (``LDCT``, the
identity). What it writes under ``out_dir``:

```
records.csv            one row per slice, method, protocol, ROI and metric (metrics.Record)
patient_records.csv    per-patient means (stats.per_patient): the unit of every statistical test
registration.csv       NDCT -> input rigid registration per slice and its residual (with register=True)
evaluation.json        methods (name, description, exact config), protocols, patients, timings
volumes/<method>/<patient_key>.npy   denoised slices, float32 HU (N, H, W); volumes/index.json: slice indices
stack.npz              evenly spaced slices of every method, NDCT and reference (reader_study.save_stack)
figure_slices.npz      one representative slice per patient (up to n_figures) for the report's figures
```

A :class:`Method` is a named callable HU (N, H, W) -> HU (N, H, W) with a description and a config for the
report; :func:`checkpoint_method` wraps a trained generator, :func:`identity_method` the input, and baselines
(BM3D etc.) are plain callables wrapped in :class:`Method`. Patients appear only by their hashed key.
"""

from __future__ import annotations

import csv
import datetime as _dt
import hashlib
import json
import logging
import math
import re
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from ldct_lightning.data.normalize import HU_MAX, HU_MIN, WINDOWS, unit_to_hu
from ldct_lightning.errors import LDCTError
from ldct_lightning.eval.metrics import PAPER, REFERENCE, Record, score_slice
from ldct_lightning.eval.reader_study import save_stack
from ldct_lightning.eval.rois import LABEL_IDS, Box, BoxTable, read_boxes, register_rigid
from ldct_lightning.eval.stats import PatientRecord, per_patient
from ldct_lightning.runs import Run

log = logging.getLogger(__name__)

INPUT = "LDCT"  # the input's row in every table
NDCT_NAME = "NDCT"
REFERENCE_NAME = "reference"
RESERVED_NAMES: tuple[str, ...] = (INPUT, NDCT_NAME, REFERENCE_NAME)
PROTOCOLS: tuple[str, ...] = (PAPER, REFERENCE)
METHOD_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")  # used in file names: no paths, no spaces

RECORD_FIELDS: tuple[str, ...] = (
    "method",
    "patient_key",
    "slice_index",
    "protocol",
    "roi",
    "metric",
    "value",
)
PATIENT_FIELDS: tuple[str, ...] = ("method", "patient_key", "protocol", "roi", "metric", "value", "n_slices")
REGISTRATION_FIELDS: tuple[str, ...] = (
    "patient_key",
    "slice_index",
    "shift_y_px",
    "shift_x_px",
    "angle_deg",
    "rmse_before_hu",
    "rmse_after_hu",
    "valid_fraction",
)
FIGURE_ROIS: tuple[str, ...] = ("liver", "heart")  # the ROIs of the paper's Fig. 5 and the zooms


class EvaluationError(LDCTError):
    """Bad evaluation input; ``str(e)`` names the argument or file, the problem and what to do."""


# --------------------------------------------------------------------------------------------- methods


@dataclass
class Method:
    """A denoising method: a callable HU (N, H, W) -> HU (N, H, W), with what the report says about it.

    Attributes:
        name: row name in tables and file names (letters, digits, ``._+-``).
        fn: the denoiser; takes and returns float32 numpy arrays in HU.
        description: one line for the report.
        config: the exact configuration (plain YAML-able values) shown in the report.
    """

    name: str
    fn: Callable[[np.ndarray], np.ndarray]
    description: str = ""
    config: dict[str, Any] = field(default_factory=dict)

    def __call__(self, hu: np.ndarray) -> np.ndarray:
        return self.fn(hu)


def identity_method(name: str = INPUT) -> Method:
    """The input itself (the LDCT row, or a sanity check whose metrics must equal the LDCT row)."""
    return Method(
        name,
        lambda hu: np.array(hu, dtype=np.float32, copy=True),
        "identity: the LDCT input unchanged",
        {"kind": "identity"},
    )


def file_sha256(path: str | Path) -> str:
    """Full hex sha256 of a file (read in 1 MiB blocks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def checkpoint_method(
    path: str | Path,
    name: str | None = None,
    device: str = "cpu",
    batch_size: int = 4,
    half: bool | str = False,
    tile: int | None = None,
    overlap: int = 32,
    generator_kwargs: Mapping[str, Any] | None = None,
) -> Method:
    """Wrap a trained generator checkpoint (:meth:`ldct_lightning.inference.Denoiser.from_checkpoint`).

    The config recorded for the report is the run's ``run_info.yaml`` (resolved config, git commit, split
    hash) when the checkpoint lies in a run folder (``<run>/<stage>/checkpoints/x.ckpt``), always with the
    checkpoint path and its sha256.

    Args:
        path: a Lightning ``.ckpt`` with ``generator.*`` weights.
        name: method name (default: the run's ablation name, else the file stem).
        device: ``cpu``, ``cuda`` or ``cuda:N``.
        batch_size: slices per forward pass.
        half: autocast precision (see :class:`~ldct_lightning.inference.Denoiser`).
        tile: tile size for large matrices (None: whole slices).
        overlap: tile overlap in pixels.
        generator_kwargs: generator architecture (default: the checkpoint's own config, else the run's
            run_info.yaml, else the defaults).

    Returns:
        The :class:`Method`.

    Raises:
        CheckpointError: the checkpoint is missing or does not fit the generator.
        InferenceError: a bad generator config or device.
    """
    from ldct_lightning.inference import Denoiser  # torch model code only when needed

    path = Path(path)
    denoiser = Denoiser.from_checkpoint(
        path,
        device=device,
        half=half,
        generator_kwargs=generator_kwargs,
        tile=tile,
        overlap=overlap,
        batch_size=batch_size,
    )
    run = Run.of_checkpoint(path)
    run_info = run.info() if run is not None else None
    ablation = run.ablation if run is not None else None
    stage = path.parent.parent.name if run is not None else None
    if name is None:
        name = ablation or path.stem
    n_params = sum(p.numel() for p in denoiser.generator.parameters())
    config: dict[str, Any] = {
        "kind": "checkpoint",
        "checkpoint": str(path.resolve()),
        "sha256": file_sha256(path),
        "stage_folder": stage,
        "generator_class": type(denoiser.generator).__name__,
        "generator_parameters": int(n_params),
        "generator_config_source": denoiser.generator_source,
        "inference": {"device": str(device), "batch_size": batch_size, "half": half, "tile": tile},
        "run_info_path": str(run.info_path) if run_info is not None else None,
        "run_info": run_info,
    }
    where = f"run ablation {ablation}, stage {stage}" if ablation else f"checkpoint {path.name}"
    description = f"{type(denoiser.generator).__name__} ({n_params / 1e6:.2f} M parameters), {where}"
    return Method(name, denoiser.denoise, description, config)


def bm3d_method(name: str = "BM3D", sigma_hu: float | str = "auto", workers: int | None = None) -> Method:
    """The BM3D baseline (:func:`ldct_lightning.baselines.bm3d.bm3d_denoise`, optional extra ``bm3d``).

    Raises:
        ImportError: the optional ``bm3d`` package is not installed (the message says how to install it).
    """
    from ldct_lightning.baselines.bm3d import MISSING_MESSAGE, bm3d_available, bm3d_denoise

    if not bm3d_available():
        raise ImportError(MISSING_MESSAGE)

    def run(hu: np.ndarray) -> np.ndarray:
        return bm3d_denoise(hu, sigma_hu=sigma_hu, workers=workers, progress=False)

    config = {"kind": "bm3d", "sigma_hu": sigma_hu, "domain": "hu_to_unit", "profile": "np"}
    return Method(name, run, f"BM3D (Dabov et al. 2007), sigma {sigma_hu} HU, slice by slice", config)


def nlm_method(name: str = "NLM", sigma_hu: float | str = "auto") -> Method:
    """The non-local means baseline (:func:`ldct_lightning.baselines.nlm.nlm_denoise`, scikit-image)."""
    from ldct_lightning.baselines.nlm import H_OVER_SIGMA, nlm_denoise

    def run(hu: np.ndarray) -> np.ndarray:
        return nlm_denoise(hu, sigma_hu=sigma_hu, progress=False)

    config = {"kind": "nlm", "sigma_hu": sigma_hu, "h_over_sigma": H_OVER_SIGMA, "domain": "hu_to_unit"}
    description = f"non-local means (scikit-image, fast mode, h = {H_OVER_SIGMA} sigma), sigma {sigma_hu} HU"
    return Method(name, run, description, config)


def _as_method(name: str, method: Method | Callable[[np.ndarray], np.ndarray]) -> Method:
    if isinstance(method, Method):
        if method.name != name:
            method = Method(name, method.fn, method.description, dict(method.config))
        return method
    if not callable(method):
        raise EvaluationError(f"method {name!r}: not callable. Give a Method or a function HU -> HU")
    return Method(name, method, getattr(method, "__doc__", None) or name, {"kind": "callable"})


def check_method_name(name: str) -> None:
    """Raise :class:`EvaluationError` for a name that is reserved or unsafe in file names."""
    if name in RESERVED_NAMES:
        raise EvaluationError(
            f"method name {name!r} is reserved for the {'input' if name == INPUT else 'references'}. "
            "Choose another name"
        )
    if not METHOD_NAME.match(name):
        raise EvaluationError(
            f"method name {name!r}: use letters, digits and . _ + - only (it names files). Rename it"
        )


# ---------------------------------------------------------------------------------------------- result


@dataclass
class EvaluationResult:
    """What :func:`evaluate` computed and wrote.

    Attributes:
        out_dir: the output folder.
        methods: method rows in order, the input (``LDCT``) first.
        proposed: the method every other one is tested against.
        records: slice-level records.
        patient_records: per-patient means.
        info: the content of ``evaluation.json`` (methods with configs, protocols, patients, timings).
        registration: per-slice registration rows (empty without registration).
    """

    out_dir: Path
    methods: list[str]
    proposed: str
    records: list[Record]
    patient_records: list[PatientRecord]
    info: dict[str, Any]
    registration: list[dict[str, Any]] = field(default_factory=list)

    @property
    def protocols(self) -> list[str]:
        """The protocols that produced records."""
        return [p for p in PROTOCOLS if any(r["protocol"] == p for r in self.records)]

    @property
    def n_patients(self) -> int:
        return len({r["patient_key"] for r in self.records}) or len(self.info.get("patients", []))

    @classmethod
    def load(cls, out_dir: str | Path) -> EvaluationResult:
        """Read an evaluation folder written by :func:`evaluate` (for re-rendering the report).

        Raises:
            EvaluationError: the folder lacks ``evaluation.json`` or ``records.csv``.
        """
        out_dir = Path(out_dir)
        info_path, records_path = out_dir / "evaluation.json", out_dir / "records.csv"
        for p in (info_path, records_path):
            if not p.is_file():
                raise EvaluationError(f"{p}: missing. Run ldct-evaluate into {out_dir} first")
        info = json.loads(info_path.read_text())
        records = read_records(records_path)
        patient_path = out_dir / "patient_records.csv"
        patients = _read_patient_records(patient_path) if patient_path.is_file() else per_patient(records)
        registration = []
        reg_path = out_dir / "registration.csv"
        if reg_path.is_file():
            with reg_path.open(newline="") as fh:
                registration = [
                    {k: (v if k == "patient_key" else float(v)) for k, v in row.items()}
                    for row in csv.DictReader(fh)
                ]
        return cls(
            out_dir, list(info["methods_order"]), info["proposed"], records, patients, info, registration
        )


def _write_csv(path: Path, fields: Sequence[str], rows: Iterable[Mapping[str, Any]]) -> Path:
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(fields), lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row[k] for k in fields})
    return path


def write_records(path: str | Path, records: Iterable[Record]) -> Path:
    """Write slice records as CSV (``value`` with full float precision; NaN/inf as ``nan``/``inf``)."""
    return _write_csv(Path(path), RECORD_FIELDS, ({**r, "value": repr(float(r["value"]))} for r in records))


def read_records(path: str | Path) -> list[Record]:
    """Read a ``records.csv`` written by :func:`write_records`."""
    with Path(path).open(newline="") as fh:
        return [
            Record(
                method=row["method"],
                patient_key=row["patient_key"],
                slice_index=int(row["slice_index"]),
                protocol=row["protocol"],
                roi=row["roi"],
                metric=row["metric"],
                value=float(row["value"]),
            )
            for row in csv.DictReader(fh)
        ]


def _read_patient_records(path: Path) -> list[PatientRecord]:
    with path.open(newline="") as fh:
        return [
            PatientRecord(
                method=row["method"],
                patient_key=row["patient_key"],
                protocol=row["protocol"],
                roi=row["roi"],
                metric=row["metric"],
                value=float(row["value"]),
                n_slices=int(row["n_slices"]),
            )
            for row in csv.DictReader(fh)
        ]


# ----------------------------------------------------------------------------------------------- loader


def _left_out_test_patients(datamodule: Any) -> list[str]:
    """Hashed keys of the test patients the DataModule left out because their registration failed."""
    split = getattr(datamodule, "split", None)
    test = set(getattr(split, "test", None) or [])
    return sorted(set(getattr(datamodule, "left_out", set())) & test)


def _test_loader(datamodule: Any, max_slices: int | None, batch_size: int | None) -> DataLoader:
    """The DataModule's test loader, or a subset of at most ``max_slices`` evenly spaced slices per patient."""
    loader = datamodule.test_dataloader()
    if max_slices is None and batch_size is None:
        return loader
    from ldct_lightning.data.datasets import PatientBatchSampler

    dataset = loader.dataset
    owners = list(getattr(dataset, "patient_of_item", [0] * len(dataset)))
    indices: list[int] = []
    for p in dict.fromkeys(owners):
        items = [i for i, o in enumerate(owners) if o == p]
        if max_slices is not None and len(items) > max_slices:
            picks = np.unique(np.round(np.linspace(0, len(items) - 1, max_slices)).astype(int))
            items = [items[k] for k in picks]
        indices += items
    size = batch_size or loader.batch_size or getattr(loader.batch_sampler, "batch_size", None) or 4
    return DataLoader(
        Subset(dataset, indices),
        batch_sampler=PatientBatchSampler([owners[i] for i in indices], size),
        num_workers=loader.num_workers,
    )


def _hu(batch: Mapping[str, Any], key: str, hu_min: float, hu_max: float) -> np.ndarray | None:
    value = batch.get(key)
    if value is None:
        return None
    t = value if isinstance(value, torch.Tensor) else torch.as_tensor(value)
    return unit_to_hu(t.float(), hu_min, hu_max).squeeze(1).cpu().numpy()


# -------------------------------------------------------------------------------------------- figures


def figure_box(mask: np.ndarray, side: int) -> Box:
    """A square zoom box of ``side`` pixels inside a mask, centred on its deepest point (distance transform).

    Args:
        mask: boolean (H, W), non-empty.
        side: box side in pixels (shrunk to the image).

    Returns:
        The :class:`Box`, clipped to the image.
    """
    h, w = mask.shape
    side = max(4, min(side, h, w))
    depth = ndimage.distance_transform_edt(mask)
    cy, cx = np.unravel_index(int(np.argmax(depth)), mask.shape)
    y0 = int(np.clip(cy - side // 2, 0, h - side))
    x0 = int(np.clip(cx - side // 2, 0, w - side))
    return Box(y0, x0, y0 + side, x0 + side)


def _figure_score(ldct_hu: np.ndarray, labels: np.ndarray | None, boxes: Mapping[str, Box] | None) -> tuple:
    """Rank slices for the figures: both figure ROIs visible and large, then more boxes, then more body."""
    roi_score = 0.0
    if labels is not None:
        areas = [float((labels == LABEL_IDS[r]).sum()) for r in FIGURE_ROIS]
        roi_score = min(areas) if all(areas) else max(areas) * 1e-3
    n_boxes = len(boxes) if boxes else 0
    return (roi_score, n_boxes, float((ldct_hu > -500).sum()))


# ------------------------------------------------------------------------------------------- evaluate


def _describe_rois(labels_seen: bool, boxes: BoxTable | None) -> str:
    if boxes is not None and labels_seen:
        return "boxes file (paper protocol); label masks (reference protocol)"
    if boxes is not None:
        return "boxes file"
    if labels_seen:
        return "label masks (paper protocol: their bounding boxes)"
    return "none"


def evaluate(
    methods: Mapping[str, Method | Callable[[np.ndarray], np.ndarray]],
    datamodule: Any,
    out_dir: str | Path,
    proposed: str,
    protocols: Sequence[str] = PROTOCOLS,
    boxes_file: str | Path | None = None,
    register: bool = False,
    register_rotation: bool = False,
    progress: bool = True,
    max_slices: int | None = None,
    batch_size: int | None = None,
    save_volumes: bool = True,
    stack_max_slices: int = 64,
    n_figures: int = 2,
    data_description: str | None = None,
) -> EvaluationResult:
    """Run every method over the test split, score every slice, and write the results under ``out_dir``.

    Args:
        methods: name -> :class:`Method` (or a plain callable HU -> HU); the input row ``LDCT`` is added first.
        datamodule: an ``LDCTDataModule`` (anything whose ``test_dataloader()`` yields ``eval`` items:
            ``input``, ``ndct``, optional ``reference`` and ``labels``, ``patient_key``, ``slice_index``).
        out_dir: output folder (created; existing files of the same names are replaced).
        proposed: the method every other one is tested against; must be one of ``methods``.
        protocols: ``paper`` and/or ``reference``.
        boxes_file: ROI boxes per slice (``rois.read_boxes``); used by the paper protocol before masks.
        register: rigidly register each NDCT slice to the input before the paper protocol (translation);
            on top of the data module's 3-D registration of studies in two frames of reference (their
            ``ndct`` is already the NDCT registered onto the LDCT; its residual goes to
            ``evaluation.json`` as ``ndct_registration_3d``).
        register_rotation: also search a rotation of up to 5 degrees (implies ``register``).
        progress: show a tqdm bar.
        max_slices: at most this many evenly spaced slices per patient (None: all).
        batch_size: slices per batch (None: the DataModule's).
        save_volumes: keep the denoised volumes under ``out_dir/volumes``.
        stack_max_slices: slices (evenly spaced over the split) in ``stack.npz`` for the reader study.
        n_figures: patients with a representative slice in ``figure_slices.npz``.
        data_description: a line about the data for the report (no patient identifiers).

    Returns:
        The :class:`EvaluationResult`.

    Raises:
        EvaluationError: unknown proposed method or protocol, a bad method name, a method that returns a
            wrong shape, or an empty test split.
    """
    protocols = tuple(protocols)
    unknown = [p for p in protocols if p not in PROTOCOLS]
    if unknown or not protocols:
        raise EvaluationError(f"protocols={list(protocols)}: choose from {list(PROTOCOLS)}")
    rows: dict[str, Method] = {INPUT: identity_method(INPUT)}
    for name, m in methods.items():
        check_method_name(name)
        rows[name] = _as_method(name, m)
    if proposed not in methods:
        raise EvaluationError(
            f"proposed method {proposed!r} is not among the methods {list(methods)}. Name one of them"
        )
    if max_slices is not None and max_slices < 1:
        raise EvaluationError(f"max_slices={max_slices}: must be >= 1")
    register = register or register_rotation
    boxes: BoxTable | None = read_boxes(boxes_file) if boxes_file is not None else None
    hu_min = float(getattr(datamodule, "hu_min", HU_MIN))
    hu_max = float(getattr(datamodule, "hu_max", HU_MAX))

    loader = _test_loader(datamodule, max_slices, batch_size)
    n_total = len(loader.dataset)
    if n_total == 0:
        raise EvaluationError("the test split has no slice. Set n_test > 0 or check the data folder")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stack_pick = {
        int(i) for i in np.round(np.linspace(0, n_total - 1, max(1, min(stack_max_slices, n_total))))
    }

    records: list[Record] = []
    registration: list[dict[str, Any]] = []
    seconds = dict.fromkeys(rows, 0.0)
    buffers: dict[str, dict[str, list[tuple[int, np.ndarray]]]] = {m: {} for m in rows if m != INPUT}
    flushed: set[str] = set()
    slice_index_of: dict[str, list[int]] = {}
    stack: dict[str, list[np.ndarray]] = {}
    stack_keys: list[str] = []
    stack_idx: list[int] = []
    figures: dict[str, tuple[tuple, dict[str, Any]]] = {}
    shape_mismatch = 0
    labels_seen = has_reference = False
    item = 0

    def flush(key: str) -> None:
        if not save_volumes:
            return
        for m, per_patient_slices in buffers.items():
            entries = per_patient_slices.pop(key, [])
            if not entries:
                continue
            folder = out_dir / "volumes" / m
            folder.mkdir(parents=True, exist_ok=True)
            volume = np.stack([a for _, a in sorted(entries, key=lambda e: e[0])]).astype(np.float32)
            target = folder / f"{key}.npy"
            if key in flushed and target.is_file():  # a patient split over non-consecutive batches
                volume = np.concatenate([np.load(target), volume])
            np.save(target, volume)
        flushed.add(key)

    bar = tqdm(total=n_total, desc="evaluate", unit="slice", disable=not progress or None)
    try:
        for batch in loader:
            ldct = _hu(batch, "input", hu_min, hu_max)
            ndct = _hu(batch, "ndct", hu_min, hu_max)
            reference = _hu(batch, "reference", hu_min, hu_max) if REFERENCE in protocols else None
            labels = batch.get("labels")
            labels = labels.squeeze(1).cpu().numpy() if labels is not None else None
            keys = [str(k) for k in batch["patient_key"]]
            indices = [int(i) for i in torch.as_tensor(batch["slice_index"]).tolist()]
            labels_seen |= labels is not None
            has_reference |= reference is not None
            for key in {k for m in buffers.values() for k in m} - set(keys):
                flush(key)

            outputs: dict[str, np.ndarray] = {}
            for name, method in rows.items():
                start = time.perf_counter()
                out = method(ldct.copy())
                seconds[name] += time.perf_counter() - start
                out = np.asarray(out, dtype=np.float32)
                if out.shape != ldct.shape:
                    raise EvaluationError(
                        f"method {name!r} returned shape {out.shape} for input {ldct.shape}. "
                        "A method must return one denoised slice per input slice, same size"
                    )
                if not np.isfinite(out).all():
                    warnings.warn(f"method {name!r} returned non-finite values", stacklevel=2)
                outputs[name] = out

            for b, (key, idx) in enumerate(zip(keys, indices, strict=True)):
                slice_index_of.setdefault(key, []).append(idx)
                slice_boxes = boxes.get((key, idx)) if boxes is not None else None
                slice_labels = labels[b] if labels is not None else None
                nd = None
                if PAPER in protocols and ndct is not None:
                    nd = ndct[b]
                    if nd.shape != ldct[b].shape:
                        shape_mismatch += 1
                        nd = None
                    elif register:
                        reg = register_rigid(nd, ldct[b], rotation=register_rotation)
                        registration.append(
                            {
                                "patient_key": key,
                                "slice_index": idx,
                                "shift_y_px": reg.shift[0],
                                "shift_x_px": reg.shift[1],
                                "angle_deg": reg.angle_deg,
                                "rmse_before_hu": reg.rmse_before,
                                "rmse_after_hu": reg.rmse_after,
                                "valid_fraction": float(reg.valid.mean()),
                            }
                        )
                        nd = reg.image.astype(np.float32)
                ref = reference[b] if reference is not None else None
                for name in rows:
                    records += score_slice(
                        outputs[name][b],
                        method=name,
                        patient_key=key,
                        slice_index=idx,
                        ndct_hu=nd,
                        reference_hu=ref,
                        labels=slice_labels,
                        boxes=slice_boxes,
                    )
                    if name in buffers:
                        buffers[name].setdefault(key, []).append((idx, outputs[name][b]))
                extras = {}
                if ndct is not None and ndct[b].shape == ldct[b].shape:
                    extras[NDCT_NAME] = nd if nd is not None else ndct[b]
                if ref is not None:
                    extras[REFERENCE_NAME] = ref
                if item in stack_pick:
                    for name, image in {**{n: outputs[n][b] for n in rows}, **extras}.items():
                        stack.setdefault(name, []).append(image)
                    stack_keys.append(key)
                    stack_idx.append(idx)
                score = _figure_score(ldct[b], slice_labels, slice_boxes)
                if key not in figures or score > figures[key][0]:
                    figures[key] = (
                        score,
                        {
                            "slice_index": idx,
                            "images": {n: outputs[n][b].copy() for n in rows},
                            "extras": {n: np.asarray(v).copy() for n, v in extras.items()},
                            "labels": None if slice_labels is None else slice_labels.copy(),
                            "boxes": dict(slice_boxes or {}),
                        },
                    )
                item += 1
                bar.update(1)
    finally:
        bar.close()
    for key in list({k for m in buffers.values() for k in m}):
        flush(key)
    if item == 0:
        raise EvaluationError("the test loader gave no slice. Set n_test > 0 or check the data folder")
    if shape_mismatch:
        warnings.warn(
            f"{shape_mismatch} slices: the NDCT matrix differs from the input's, so the paper protocol "
            "skipped them (resample the NDCT series to the LDCT grid first)",
            stacklevel=2,
        )

    patient_records = per_patient(records)
    write_records(out_dir / "records.csv", records)
    _write_csv(out_dir / "patient_records.csv", PATIENT_FIELDS, patient_records)
    if registration:
        _write_csv(out_dir / "registration.csv", REGISTRATION_FIELDS, registration)
    if save_volumes:
        (out_dir / "volumes").mkdir(exist_ok=True)
        index = {k: sorted(v) for k, v in slice_index_of.items()}
        (out_dir / "volumes" / "index.json").write_text(json.dumps(index, indent=1) + "\n")
    stack_names = [*rows, *[n for n in (NDCT_NAME, REFERENCE_NAME) if n in stack]]
    # the NDCT only where every stacked slice has one (save_stack needs one shape for all)
    stack_names = [n for n in stack_names if len(stack.get(n, [])) == len(stack_keys)]
    save_stack(out_dir / "stack.npz", {n: np.stack(stack[n]) for n in stack_names}, stack_keys, stack_idx)
    _save_figure_slices(out_dir / "figure_slices.npz", figures, n_figures)

    patients = sorted(slice_index_of)
    info: dict[str, Any] = {
        "format": 1,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "proposed": proposed,
        "input_method": INPUT,
        "methods_order": list(rows),
        "methods": {n: {"description": m.description, "config": _plain(m.config)} for n, m in rows.items()},
        "protocols_requested": list(protocols),
        "protocols": [p for p in PROTOCOLS if any(r["protocol"] == p for r in records)],
        "patients": patients,
        "n_patients": len(patients),
        "n_slices": item,
        "slices_per_patient": {k: len(v) for k, v in slice_index_of.items()},
        "max_slices_per_patient": max_slices,
        "has_reference": has_reference,
        "has_labels": labels_seen,
        "roi_source": _describe_rois(labels_seen, boxes),
        "boxes_file": str(boxes_file) if boxes_file is not None else None,
        "register": register,
        "register_rotation": register_rotation,
        # the paper protocol's NDCT of studies in two frames of reference is the 3-D registered one
        "ndct_registration_3d": {
            k: {
                f: v.get(f) for f in ("z_offset_mm", "ncc_median", "residual_hu", "usable_fraction", "stages")
            }
            for k, v in getattr(datamodule, "registration_info", {}).items()
            if k in slice_index_of
        },
        # test studies whose registration failed: not scored, but named (hashed) and counted in the report
        "registration_left_out": _left_out_test_patients(datamodule),
        "ndct_shape_mismatch_slices": shape_mismatch,
        "hu_range": [hu_min, hu_max],
        "windows": {k: list(v) for k, v in WINDOWS.items()},
        "seconds_per_slice": {n: s / item for n, s in seconds.items()},
        "stack_methods": stack_names,
        "data": data_description,
    }
    (out_dir / "evaluation.json").write_text(json.dumps(_plain(info), indent=1) + "\n")
    return EvaluationResult(out_dir, list(rows), proposed, records, patient_records, info, registration)


def _save_figure_slices(path: Path, figures: Mapping[str, tuple[tuple, dict[str, Any]]], n: int) -> None:
    """Save the best slice of the first ``n`` patients (sorted keys) for the report's figures."""
    arrays: dict[str, np.ndarray] = {}
    chosen = sorted(figures)[: max(n, 0)]
    for i, key in enumerate(chosen):
        data = figures[key][1]
        arrays[f"{i}/patient_key"] = np.asarray(key)
        arrays[f"{i}/slice_index"] = np.asarray(data["slice_index"])
        for name, image in data["images"].items():
            arrays[f"{i}/image/{name}"] = image.astype(np.float32)
        for name, image in data["extras"].items():
            arrays[f"{i}/extra/{name}"] = image.astype(np.float32)
        if data["labels"] is not None:
            arrays[f"{i}/labels"] = data["labels"].astype(np.int16)
        for roi, b in data["boxes"].items():
            arrays[f"{i}/box/{roi}"] = np.asarray(b, dtype=np.int64)
    np.savez_compressed(path, n=np.asarray(len(chosen)), **arrays)


@dataclass
class FigureSlice:
    """One slice of every method (and the NDCT / reference) for the report's figures."""

    patient_key: str
    slice_index: int
    images: dict[str, np.ndarray]  # LDCT and methods, in row order
    extras: dict[str, np.ndarray]  # NDCT (registered when register=True) and/or reference
    labels: np.ndarray | None
    boxes: dict[str, Box]


def load_figure_slices(path: str | Path) -> list[FigureSlice]:
    """Read ``figure_slices.npz`` written by :func:`evaluate`."""
    path = Path(path)
    if not path.is_file():
        return []
    out = []
    with np.load(path) as data:
        for i in range(int(data["n"])):
            prefix = f"{i}/"
            images, extras, boxes = {}, {}, {}
            for k in data.files:
                if not k.startswith(prefix):
                    continue
                rest = k[len(prefix) :]
                if rest.startswith("image/"):
                    images[rest[6:]] = data[k]
                elif rest.startswith("extra/"):
                    extras[rest[6:]] = data[k]
                elif rest.startswith("box/"):
                    boxes[rest[4:]] = Box(*(int(v) for v in data[k]))
            labels = data[f"{prefix}labels"] if f"{prefix}labels" in data.files else None
            out.append(
                FigureSlice(
                    str(data[f"{prefix}patient_key"]),
                    int(data[f"{prefix}slice_index"]),
                    images,
                    extras,
                    labels,
                    boxes,
                )
            )
    return out


def _plain(value: Any) -> Any:
    """JSON-safe copy: numpy scalars to Python, NaN/inf to strings, tuples to lists, paths to str."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, Path):
        return str(value)
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)

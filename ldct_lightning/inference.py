"""Denoising slices and series in HU with a trained generator (whole slices or overlapping tiles).

The generator works in the normalised domain of :mod:`ldct_lightning.data.normalize` (HU clipped to
[-1024, 3071] and scaled to [0, 1]); :class:`Denoiser` maps HU in and out, batches slices, and for large
matrices runs overlapping tiles blended with linear ramps.

:meth:`Denoiser.from_checkpoint` takes the generator's architecture explicitly, or from the checkpoint's own
record (``DenoisingModule.on_save_checkpoint``), or, for checkpoints from before that record, from the run the
checkpoint lies in (:class:`ldct_lightning.runs.Run`, ``config.model.generator``), or falls back to the default
:class:`~ldct_lightning.models.generator.AttentionResUNet`. Weights load with ``weights_only=True``; no config
object is ever unpickled.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import nullcontext
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import yaml
from torch import nn

from ldct_lightning.data.dicom import SeriesInfo, iter_series_hu, scan_dicom_folder
from ldct_lightning.data.normalize import HU_MAX, HU_MIN, hu_to_unit, unit_to_hu
from ldct_lightning.errors import LDCTError
from ldct_lightning.inference_backends import (
    BACKENDS,
    BackendError,
    TorchNetwork,
    onnx_network,
    optimized_generator,
)
from ldct_lightning.models.generator import AttentionResUNet
from ldct_lightning.modules.handoff import CHECKPOINT_META, load_generator_weights, read_checkpoint
from ldct_lightning.runs import Run

log = logging.getLogger(__name__)

Array = TypeVar("Array", np.ndarray, torch.Tensor)
Item = TypeVar("Item")

# Only generators of this package may be built from a config file: a `_target_` is an import path, and a
# config file from elsewhere must not be able to call arbitrary functions.
_ALLOWED_TARGET_PREFIX = "ldct_lightning."

_HALF_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


class InferenceError(LDCTError):
    """A setting or input that inference cannot use; ``str(e)`` names it, the problem and what to do."""


def load_generator_config(path: str | Path) -> dict[str, Any]:
    """Read a generator config from YAML: a run's ``run_info.yaml`` or a file of generator kwargs.

    Accepted layouts: ``{config: {model: {generator: {...}}}}`` (run_info.yaml), ``{model: {generator: ...}}``,
    ``{generator: {...}}`` or the kwargs themselves (with or without a Hydra ``_target_``).

    Args:
        path: the YAML file.

    Returns:
        The generator config as a plain dict.

    Raises:
        InferenceError: the file is missing, not YAML, or holds no mapping.
    """
    path = Path(path)
    if not path.is_file():
        raise InferenceError(
            f"{path}: no such generator config file. Give a run_info.yaml or a YAML of kwargs"
        )
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise InferenceError(f"{path}: not valid YAML ({type(e).__name__}). Fix or replace the file") from e
    for key in ("config", "model", "generator"):
        if isinstance(data, Mapping) and isinstance(data.get(key), Mapping):
            data = data[key]
    if not isinstance(data, Mapping):
        raise InferenceError(
            f"{path}: holds no generator config (expected config.model.generator or a mapping of kwargs)"
        )
    return dict(data)


def build_generator(config: Mapping[str, Any] | None = None, source: str = "generator config") -> nn.Module:
    """Build a generator from kwargs or a Hydra ``_target_`` dict (default: the paper's AttentionResUNet).

    Args:
        config: kwargs of :class:`AttentionResUNet`, or a dict with ``_target_`` naming a class of this package.
        source: where the config came from, for error messages.

    Returns:
        The (randomly initialised) generator.

    Raises:
        InferenceError: a ``_target_`` outside ``ldct_lightning`` or kwargs the class does not accept.
    """
    config = dict(config or {})
    target = config.get("_target_")
    try:
        if target is None:
            return AttentionResUNet(**config)
        if not str(target).startswith(_ALLOWED_TARGET_PREFIX):
            raise InferenceError(
                f"{source}: _target_ {target!r} is not a class of ldct_lightning; "
                "only this package's generators can be built from a config"
            )
        from hydra.utils import instantiate  # hydra is heavy to import; only needed here

        return instantiate(config, _convert_="all")
    except InferenceError:
        raise
    except Exception as e:  # TypeError on bad kwargs, hydra's InstantiationException, ValueError from checks
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InferenceError(
            f"{source}: cannot build the generator ({first_line}). Fix the generator config (model.generator)"
        ) from e


def _resolve_device(device: str | torch.device) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InferenceError(f"device {device!r}: no CUDA device is available. Use device 'cpu'")
    return dev


def _resolve_half(half: bool | str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype: True means float16 on GPU; 'fp16'/'bf16' name it; False means float32."""
    if half is False or half is None:
        return None
    name = "fp16" if half is True else str(half)
    if name not in _HALF_DTYPES:
        raise InferenceError(f"half={half!r}: use False, True, 'fp16' or 'bf16'")
    if device.type == "cpu" and name == "fp16":
        warnings.warn(
            "half precision (fp16) is for GPUs; running in float32 on the CPU (use half='bf16' for CPU autocast)",
            stacklevel=3,
        )
        return None
    return _HALF_DTYPES[name]


def ramp_window(height: int, width: int, overlap: int) -> torch.Tensor:
    """Blending weights of one tile: linear ramps over ``overlap`` pixels at each edge, 1 inside.

    The weights never reach 0, so pixels covered by a single tile (at the image border) keep their value
    after normalisation by the summed weights.

    Args:
        height: tile height.
        width: tile width.
        overlap: ramp length in pixels.

    Returns:
        float32 tensor (height, width) in (0, 1].
    """

    def ramp(n: int) -> torch.Tensor:
        i = torch.arange(n, dtype=torch.float32)
        return torch.minimum(i + 1, n - i).clamp(max=overlap + 1) / (overlap + 1)

    return ramp(height)[:, None] * ramp(width)[None, :]


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of length ``tile`` covering ``size`` with at least ``overlap`` overlap.

    Args:
        size: image length along one axis.
        tile: tile length.
        overlap: minimal overlap between neighbouring tiles.

    Returns:
        Sorted starts; the last tile ends at the image border.
    """
    if size <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, size - tile, stride))
    return [*starts, size - tile]


class Denoiser:
    """Applies a generator to CT slices in HU.

    Args:
        generator: network mapping normalised images (B, 1, H, W) to denoised ones.
        device: ``cpu``, ``cuda`` or ``cuda:N``.
        half: autocast precision on top of float32 weights: False, True (fp16), ``"fp16"`` or ``"bf16"``.
        tile: tile size for large matrices (None: whole slices).
        overlap: overlap of neighbouring tiles in pixels, blended with linear ramps.
        batch_size: slices (or tiles) per forward pass.
        hu_min: HU mapped to 0 by the normalisation the generator was trained with.
        hu_max: HU mapped to 1.
        backend: ``torch`` or ``onnxruntime`` (CPU, float32; see
            :mod:`~ldct_lightning.inference_backends`).
        fold_bn: (torch) fold batch norm into the convolutions of a copy of the generator.
        channels_last: (torch) run a channels-last copy of the generator.
        onnx_path: (onnxruntime) an ``.onnx`` file of this generator; None: exported once into a cache.

    ``generator`` stays the plain module (for export); ``network`` is what runs.
    """

    def __init__(
        self,
        generator: nn.Module,
        device: str | torch.device = "cpu",
        half: bool | str = False,
        tile: int | None = None,
        overlap: int = 32,
        batch_size: int = 4,
        hu_min: float = HU_MIN,
        hu_max: float = HU_MAX,
        backend: str = "torch",
        fold_bn: bool = False,
        channels_last: bool = False,
        onnx_path: str | Path | None = None,
    ) -> None:
        if batch_size < 1:
            raise InferenceError(f"batch_size={batch_size}: must be >= 1")
        if overlap < 0:
            raise InferenceError(f"overlap={overlap}: must be >= 0")
        if tile is not None and tile <= overlap:
            raise InferenceError(f"tile={tile}: must be larger than the overlap ({overlap}) to make progress")
        if backend not in BACKENDS:
            raise InferenceError(f"backend={backend!r}: use one of {', '.join(BACKENDS)}")
        self.device = _resolve_device(device)
        self.autocast_dtype = _resolve_half(half, self.device)
        self.generator = generator.to(self.device).eval()
        self.backend = backend
        self.network = self._make_network(backend, fold_bn, channels_last, onnx_path)
        self.tile = tile
        self.overlap = overlap
        self.batch_size = batch_size
        self.hu_min = hu_min
        self.hu_max = hu_max
        self.generator_source = "given"  # where the architecture came from (from_checkpoint sets it)

    def _make_network(
        self, backend: str, fold_bn: bool, channels_last: bool, onnx_path: str | Path | None
    ) -> Callable[[torch.Tensor], torch.Tensor]:
        """The callable that runs the network: the (prepared) torch module or an ONNX Runtime session."""
        if backend == "torch":
            if onnx_path is not None:
                raise InferenceError(
                    "onnx_path is for backend onnxruntime; drop it or use backend onnxruntime"
                )
            module = optimized_generator(self.generator, fold_bn, channels_last)
            return TorchNetwork(module, channels_last)
        if self.device.type != "cpu":
            raise InferenceError(
                f"backend onnxruntime runs on the CPU only (device {self.device}). Use backend torch"
            )
        if self.autocast_dtype is not None:
            raise InferenceError(
                "reduced precision (bf16/fp16) is for backend torch; use float32 with onnxruntime"
            )
        try:
            return onnx_network(self.generator, onnx_path)
        except BackendError as e:
            raise InferenceError(str(e)) from e

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        device: str | torch.device = "cpu",
        half: bool | str = False,
        generator_kwargs: Mapping[str, Any] | None = None,
        tile: int | None = None,
        overlap: int = 32,
        batch_size: int = 4,
        **fast: Any,
    ) -> Denoiser:
        """Build the generator and load its weights from a Lightning checkpoint (``generator.*`` keys).

        The architecture comes from ``generator_kwargs`` when given, else from the checkpoint itself (written
        by this package since 2026-12-02), else from the run's ``run_info.yaml`` (``config.model.generator``)
        when it exists, else the defaults of :class:`AttentionResUNet`. The HU range of the normalisation
        comes from the checkpoint (its own record, else the module's hyperparameters), else the defaults.

        Args:
            path: a ``.ckpt`` file (a dict with a ``state_dict`` whose generator keys start with ``generator.``).
            device: where to run.
            half: autocast precision (see :class:`Denoiser`).
            generator_kwargs: generator kwargs or a Hydra ``_target_`` dict.
            tile: tile size (None: whole slices).
            overlap: tile overlap in pixels.
            batch_size: slices or tiles per forward pass.
            **fast: ``backend``, ``fold_bn``, ``channels_last``, ``onnx_path`` (see :class:`Denoiser`).

        Returns:
            The denoiser, in eval mode.

        Raises:
            CheckpointError: the checkpoint is missing, unreadable or does not fit the generator.
            InferenceError: a bad generator config or device.
        """
        path = Path(path)
        checkpoint = read_checkpoint(path)
        meta = checkpoint.get(CHECKPOINT_META) or {}
        hparams = checkpoint.get("hyper_parameters") or {}
        run = Run.of_checkpoint(path)
        run_generator = run.generator_config() if run is not None else None
        if generator_kwargs is not None:
            config, source = dict(generator_kwargs), "generator_kwargs"
        elif isinstance(meta.get("generator"), Mapping):
            config, source = dict(meta["generator"]), f"{path.name} (the checkpoint's own config)"
        elif run is not None and run_generator is not None:
            config, source = run_generator, str(run.info_path)
        else:
            config, source = {}, "defaults"
        log.info("generator architecture from %s", source)
        generator = build_generator(config, source=source)
        load_generator_weights(generator, path, prefix="generator.", checkpoint=checkpoint)
        hu_min = float(meta.get("hu_min", hparams.get("hu_min", HU_MIN)))
        hu_max = float(meta.get("hu_max", hparams.get("hu_max", HU_MAX)))
        denoiser = cls(generator, device, half, tile, overlap, batch_size, hu_min, hu_max, **fast)
        denoiser.generator_source = source
        return denoiser

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        """Run the generator on (B, 1, h, w) normalised images in mini-batches; float32 result on the device."""
        outs = []
        for chunk in x.split(self.batch_size):
            amp = (
                torch.autocast(self.device.type, dtype=self.autocast_dtype)
                if self.autocast_dtype is not None
                else nullcontext()
            )
            with amp:
                outs.append(self.network(chunk).float().to(x.device))
        return torch.cat(outs)

    def _forward_tiled(self, x: torch.Tensor) -> torch.Tensor:
        """Overlapping tiles blended with linear ramps.

        Hand-written (about 20 lines) rather than MONAI's ``sliding_window_inference``: MONAI would be a large
        dependency for this alone and blends with constant or Gaussian weights, not the linear ramps we use.
        """
        n, c, h, w = x.shape
        th, tw = min(self.tile, h), min(self.tile, w)
        window = ramp_window(th, tw, self.overlap).to(x.device)
        boxes = [(i, j) for i in tile_starts(h, th, self.overlap) for j in tile_starts(w, tw, self.overlap)]
        tiles = torch.stack([x[..., i : i + th, j : j + tw] for i, j in boxes], dim=1)  # (n, T, c, th, tw)
        out_tiles = self._forward(tiles.flatten(0, 1)).view(n, len(boxes), c, th, tw)
        acc = torch.zeros_like(x, dtype=torch.float32)
        weight = torch.zeros((h, w), dtype=torch.float32, device=x.device)
        for k, (i, j) in enumerate(boxes):
            acc[..., i : i + th, j : j + tw] += out_tiles[:, k] * window
            weight[i : i + th, j : j + tw] += window
        return acc / weight

    def denoise(self, hu_slices: Array) -> Array:
        """Denoise slices given in HU.

        Args:
            hu_slices: (H, W) or (N, H, W) numpy array or torch tensor in HU.

        Returns:
            Denoised slices in HU, same shape and type (float32; a tensor stays on its device).
        """
        is_numpy = isinstance(hu_slices, np.ndarray)
        if not is_numpy and not isinstance(hu_slices, torch.Tensor):
            raise InferenceError(f"expected a numpy array or torch tensor, got {type(hu_slices).__name__}")
        if hu_slices.ndim not in (2, 3):
            raise InferenceError(
                f"expected slices of shape (H, W) or (N, H, W), got {tuple(hu_slices.shape)}"
            )
        hu = torch.from_numpy(np.asarray(hu_slices, dtype=np.float32)) if is_numpy else hu_slices
        with torch.inference_mode():
            volume = hu.reshape(-1, 1, *hu.shape[-2:]).to(self.device, torch.float32)
            outs = []
            # one group of `batch_size` slices at a time bounds the memory of the tiled path
            for chunk in volume.split(self.batch_size):
                x = hu_to_unit(chunk, self.hu_min, self.hu_max)
                y = self._forward_tiled(x) if self.tile is not None else self._forward(x)
                # the network domain is [0, 1] (HU_MIN..HU_MAX), as the targets and the validation metrics
                # are: a residual network's output below 0 in air (-1500 HU and lower) is no CT value
                y = y.clamp(0.0, 1.0)
                outs.append(unit_to_hu(y, self.hu_min, self.hu_max).to(hu.device))
            result = torch.cat(outs).reshape(hu.shape)
        if is_numpy:
            return result.numpy()
        return result.clone()  # a normal tensor: inference tensors refuse in-place ops outside inference mode

    def denoise_stream(
        self, items: Iterable[Item], image: Callable[[Item], np.ndarray] | None = None
    ) -> Iterator[tuple[Item, np.ndarray]]:
        """Denoise a stream of slices ``batch_size`` at a time (through :meth:`denoise`), in order.

        Only one batch is held here, so memory stays bounded for any series length when ``items`` is lazy.

        Args:
            items: slices (H, W) in HU, or objects holding one (see ``image``).
            image: gets the HU slice out of an item (default: the item is the slice).

        Returns:
            An iterator of ``(item, denoised slice (H, W) float32 in HU)``.
        """
        batch: list[Item] = []
        get = image if image is not None else (lambda item: item)

        def run() -> Iterator[tuple[Item, np.ndarray]]:
            out = self.denoise(np.stack([np.asarray(get(item), dtype=np.float32) for item in batch]))
            return zip(batch, out, strict=True)

        for item in items:
            batch.append(item)
            if len(batch) == self.batch_size:
                yield from run()
                batch = []
        if batch:
            yield from run()

    def denoise_series(
        self, folder: str | Path, progress: bool = False, read_workers: int = 2
    ) -> list[tuple[SeriesInfo, np.ndarray]]:
        """Denoise every CT series found under a folder (each whole volume is returned in memory).

        Args:
            folder: a DICOM folder tree (see :func:`~ldct_lightning.data.dicom.scan_dicom_folder`).
            progress: show tqdm progress bars while reading.
            read_workers: threads reading slices while the network runs.

        Returns:
            One ``(series, denoised HU volume (n, rows, cols) float32)`` per series, slices in ``series.files``
            order.

        Raises:
            DicomError: no CT series, or a file that cannot be read.
        """
        results = []
        for series in scan_dicom_folder(folder, progress=progress, allow_non_ct=True):
            volume = np.empty((series.n_slices, series.rows, series.cols), dtype=np.float32)
            slices = iter_series_hu(series, progress, read_workers, ahead=2 * self.batch_size)
            for i, (_, out) in enumerate(self.denoise_stream(slices)):
                volume[i] = out
            results.append((series, volume))
        return results

    def __call__(self, hu_slices: Array) -> Array:
        """Same as :meth:`denoise`."""
        return self.denoise(hu_slices)

"""Exporting a generator as a standalone model file (TorchScript or ONNX), used by ``ldct-export`` and by the
ONNX Runtime backend of :mod:`ldct_lightning.inference_backends`.

The exported model works in the normalised domain: input and output are (B, 1, H, W) float32 images with HU
mapped by ``(clip(HU, -1024, 3071) + 1024) / 4095`` (:func:`ldct_lightning.data.normalize.hu_to_unit`); batch,
height and width are dynamic. Both formats carry that convention as metadata (ONNX ``metadata_props``,
TorchScript extra file ``ldct_meta.json``).
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ldct_lightning import __version__
from ldct_lightning.data.normalize import HU_MAX, HU_MIN
from ldct_lightning.errors import LDCTError

FORMATS = ("torchscript", "onnx")
MIN_OPSET = 17
META_FILE = "ldct_meta.json"


class ExportError(LDCTError):
    """An export that cannot be done; ``str(e)`` says why and what to do."""


class PaddedGenerator(nn.Module):
    """Pads the input to a multiple of ``multiple`` and crops the output back, with traceable size arithmetic.

    The generator pads by itself too, but through a Python ``if`` that tracing freezes at the example size; here
    the pad amounts are computed from the traced shape with no branch (a zero pad when none is needed), so the
    exported graph is right for any height and width, and the generator always sees a multiple of its
    ``2**depth`` (its own padding branch is then never taken).

    Args:
        generator: the network (B, 1, H, W) -> (B, 1, H, W).
        multiple: pad height and width to a multiple of this (``2**depth`` of a U-Net).
        pad_mode: ``reflect``, ``replicate`` or ``zeros``.
        margin: extra padding on every side first (the generator's ``eval_margin``, taken out of it).
    """

    def __init__(
        self, generator: nn.Module, multiple: int, pad_mode: str = "reflect", margin: int = 0
    ) -> None:
        super().__init__()
        self.generator = generator
        self.multiple = multiple
        self.mode = "constant" if pad_mode == "zeros" else pad_mode
        self.margin = margin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2], x.shape[-1]
        m = self.margin
        ph = (self.multiple - (h + 2 * m) % self.multiple) % self.multiple
        pw = (self.multiple - (w + 2 * m) % self.multiple) % self.multiple
        top, left = m + ph // 2, m + pw // 2
        xp = F.pad(x, (left, m + pw - pw // 2, top, m + ph - ph // 2), mode=self.mode)
        return self.generator(xp)[..., top : top + h, left : left + w]


def exportable(generator: nn.Module) -> nn.Module:
    """Wrap a generator for tracing with dynamic height and width (see :class:`PaddedGenerator`)."""
    depth = getattr(generator, "depth", None)
    if not isinstance(depth, int):
        return generator.eval()  # not a U-Net with a known depth: any size works as is
    # the generator's eval-mode border margin goes into the traceable wrapper too (on a copy without it)
    margin = int(getattr(generator, "eval_margin", 0))
    if margin:
        generator = copy.deepcopy(generator)
        generator.eval_margin = 0
    return PaddedGenerator(generator, 2**depth, getattr(generator, "pad_mode", "reflect"), margin).eval()


def export_metadata(checkpoint: Path, fmt: str, generator_source: str) -> dict[str, str]:
    """The metadata stored with an exported file: producer, source file names, the HU normalisation."""
    return {
        "producer": f"ldct-lightning {__version__}",
        "checkpoint": checkpoint.name,
        "generator_config": Path(generator_source).name
        if generator_source not in ("defaults", "given")
        else "",
        "format": fmt,
        "input": "float32 (batch, 1, height, width), normalised: (clip(HU, hu_min, hu_max) - hu_min) / (hu_max - hu_min)",
        "output": "float32 (batch, 1, height, width), same normalisation; HU = y * (hu_max - hu_min) + hu_min",
        "hu_min": str(HU_MIN),
        "hu_max": str(HU_MAX),
    }


def verify_shape(size: int) -> tuple[int, int, int, int]:
    """A check input unlike the example: batch 2, other height and width (not multiples of 16)."""
    half = max(16, size // 2)
    return (2, 1, half + 4, half + 8)


def export_torchscript(model: nn.Module, example: torch.Tensor, out: Path, meta: dict[str, str]) -> nn.Module:
    """Trace ``model`` and save it with the metadata as an extra file.

    Args:
        model: the (wrapped) generator, in eval mode.
        example: example input for tracing.
        out: the ``.pt`` file to write.
        meta: metadata stored as ``ldct_meta.json``.

    Returns:
        The model loaded back from ``out``.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), torch.no_grad():
        # TracerWarnings concern the generator's own padding branch, which PaddedGenerator makes unused
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        # TorchScript is deprecated in recent PyTorch but still works; the user asked for it by name
        warnings.simplefilter("ignore", DeprecationWarning)
        traced = torch.jit.trace(model, example)
        torch.jit.save(traced, str(out), _extra_files={META_FILE: json.dumps(meta)})
        return torch.jit.load(str(out), map_location="cpu")


def require_onnx() -> tuple[Any, Any]:
    """Import onnx and onnxruntime, or fail with the pip command that installs them."""
    try:
        import onnx
        import onnxruntime
    except ImportError as e:
        raise ExportError(
            f"ONNX export needs the optional packages onnx and onnxruntime ({e.name} is missing): "
            "pip install 'ldct-lightning[export]'"
        ) from e
    return onnx, onnxruntime


def export_onnx(
    model: nn.Module, example: torch.Tensor, out: Path, meta: dict[str, str], opset: int = MIN_OPSET
) -> Any:
    """Export ``model`` to ONNX with dynamic batch, height and width, and check the file.

    Uses the TorchScript-based exporter (``dynamo=False``), which records the traced size arithmetic of
    :class:`PaddedGenerator` as graph operations and needs no ``onnxscript``.

    Args:
        model: the (wrapped) generator, in eval mode.
        example: example input for tracing.
        out: the ``.onnx`` file to write.
        meta: metadata stored in ``metadata_props``.
        opset: ONNX opset (>= 17).

    Returns:
        An ``onnxruntime.InferenceSession`` on the written file (CPU).
    """
    onnx, onnxruntime = require_onnx()
    if opset < MIN_OPSET:
        raise ExportError(f"--opset {opset}: use {MIN_OPSET} or newer")
    out.parent.mkdir(parents=True, exist_ok=True)
    axes = {0: "batch", 2: "height", 3: "width"}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)  # the legacy exporter is deprecated, not removed
        torch.onnx.export(
            model,
            (example,),
            str(out),
            dynamo=False,
            opset_version=opset,
            input_names=["input"],
            output_names=["output"],
            dynamic_axes={"input": axes, "output": axes},
        )
    proto = onnx.load(str(out))
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto)
    onnx.save(proto, str(out))
    return onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])


def export_generator(
    generator: nn.Module,
    out: Path,
    fmt: str,
    size: int = 512,
    opset: int = MIN_OPSET,
    meta: dict[str, str] | None = None,
) -> float:
    """Export a generator and check the file against PyTorch.

    Args:
        generator: the network (on the CPU).
        out: the file to write.
        fmt: ``torchscript`` or ``onnx``.
        size: height and width of the tracing example.
        opset: ONNX opset.
        meta: metadata to store.

    Returns:
        The largest absolute difference between the exported model and PyTorch on a check input of another
        size (normalised units).
    """
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt!r}: use one of {', '.join(FORMATS)}")
    if size < 16:
        raise ExportError(f"--size {size}: use at least 16")
    model = exportable(generator.cpu().eval())
    example = torch.rand(1, 1, size, size, generator=torch.Generator().manual_seed(0))
    check = torch.rand(*verify_shape(size), generator=torch.Generator().manual_seed(1))
    meta = meta or {}
    with torch.no_grad():
        expected = generator(check)
    if fmt == "torchscript":
        loaded = export_torchscript(model, example, out, meta)
        with torch.no_grad():
            got = loaded(check)
    else:
        session = export_onnx(model, example, out, meta, opset)
        got = torch.from_numpy(session.run(None, {"input": check.numpy()})[0])
    return float((got - expected).abs().max())

"""Fast inference paths for a generator: batch-norm folding, channels-last, ONNX Runtime.

Each path computes the same function as the plain float32 network up to float rounding (the tests assert the
largest difference in HU): folding rewrites ``bn(conv(x))`` as one convolution with scaled weights and a bias,
channels-last only changes the memory layout oneDNN sees, and ONNX Runtime runs the exported graph.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from ldct_lightning.atomic import atomic_path
from ldct_lightning.errors import LDCTError
from ldct_lightning.models.blocks import ResidualBlock

log = logging.getLogger(__name__)

BACKENDS = ("torch", "onnxruntime")
# largest |ONNX Runtime - torch| accepted when an ONNX file is loaded (normalised units; 1e-3 = 4 HU)
ONNX_CHECK_ATOL = 1e-3

Network = Callable[[torch.Tensor], torch.Tensor]


class BackendError(LDCTError):
    """A backend that cannot run; ``str(e)`` names it and what to do."""


def _fold_pair(parent: nn.Module, conv_name: str, bn_name: str) -> bool:
    conv, bn = getattr(parent, conv_name), getattr(parent, bn_name)
    if not (isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and bn.track_running_stats):
        return False
    setattr(parent, conv_name, fuse_conv_bn_eval(conv, bn))
    setattr(parent, bn_name, nn.Identity())
    return True


def fold_batch_norm(model: nn.Module) -> int:
    """Fold every eval-mode ``BatchNorm2d`` that directly follows a ``Conv2d`` into it, in place.

    Uses torch's ``fuse_conv_bn_eval`` on pairs whose data flow is known: ``conv1 -> norm1`` and
    ``conv2 -> norm2`` of :class:`~ldct_lightning.models.blocks.ResidualBlock` and adjacent ``Conv2d,
    BatchNorm2d`` in an ``nn.Sequential``. (``torch.ao.quantization.fuse_modules`` would need the same list of
    names per block, and ``torch.fx`` fusion cannot trace the generator's shape-dependent padding.) Other
    batch norms are left as they are.

    Args:
        model: the network, in eval mode (folding uses the running statistics).

    Returns:
        The number of batch-norm layers folded.
    """
    if model.training:
        raise BackendError("fold_batch_norm: the model is in training mode; call model.eval() first")
    folded = 0
    for module in list(model.modules()):
        if isinstance(module, ResidualBlock):
            folded += _fold_pair(module, "conv1", "norm1") + _fold_pair(module, "conv2", "norm2")
        elif isinstance(module, nn.Sequential):
            names = [name for name, _ in module.named_children()]
            for a, b in zip(names, names[1:], strict=False):
                folded += _fold_pair(module, a, b)
    return folded


def optimized_generator(generator: nn.Module, fold_bn: bool, channels_last: bool) -> nn.Module:
    """A copy of the generator prepared for inference (the original is untouched).

    Args:
        generator: the network.
        fold_bn: fold batch norm into the convolutions (:func:`fold_batch_norm`).
        channels_last: store 4-D weights channels-last (inputs are converted by :class:`TorchNetwork`).

    Returns:
        The prepared copy in eval mode, or ``generator`` itself (in eval mode) when nothing is asked.
    """
    if not (fold_bn or channels_last):
        return generator.eval()
    model = copy.deepcopy(generator).eval()
    if fold_bn:
        log.info("folded %d batch-norm layers into convolutions", fold_batch_norm(model))
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


class TorchNetwork:
    """Calls a torch module, converting inputs to channels-last when the module was prepared that way.

    Args:
        module: the network.
        channels_last: feed channels-last inputs.
    """

    def __init__(self, module: nn.Module, channels_last: bool = False) -> None:
        self.module = module
        self.channels_last = channels_last

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.module(x).contiguous()


def generator_digest(generator: nn.Module, extra: str = "") -> str:
    """A short hash of a generator's architecture and weights (names the ONNX cache file).

    Args:
        generator: the network.
        extra: anything else the cached file depends on.

    Returns:
        16 hex digits.
    """
    digest = hashlib.sha256(f"{type(generator).__qualname__}|{generator!r}|{extra}".encode())
    for name, tensor in generator.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def default_onnx_cache() -> Path:
    """``$LDCT_CACHE_DIR/onnx`` or ``~/.cache/ldct-lightning/onnx``."""
    root = os.environ.get("LDCT_CACHE_DIR") or Path.home() / ".cache" / "ldct-lightning"
    return Path(root) / "onnx"


def _require_onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError as e:
        raise BackendError(
            "backend onnxruntime needs the optional package onnxruntime: pip install 'ldct-lightning[export]'"
        ) from e
    return onnxruntime


class OnnxRuntimeNetwork:
    """Runs an exported generator (``ldct-export --format onnx``) with ONNX Runtime on the CPU.

    On loading, the session is checked against ``reference`` (the torch generator the file should hold) on a
    small random input: a file from another checkpoint fails with a clear message instead of silently giving
    other images.

    Args:
        path: the ``.onnx`` file (normalised input ``input``, output ``output``, dynamic batch/height/width).
        reference: the torch generator the file must reproduce.
        threads: intra-op threads (0: ONNX Runtime's default, one per physical core).
    """

    def __init__(self, path: str | Path, reference: nn.Module, threads: int = 0) -> None:
        ort = _require_onnxruntime()
        self.path = Path(path)
        if not self.path.is_file():
            raise BackendError(f"{self.path}: no such ONNX file. Make one with ldct-export --format onnx")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(
                str(self.path), sess_options=options, providers=["CPUExecutionProvider"]
            )
        except Exception as e:  # onnxruntime raises its own exception types for bad files
            raise BackendError(
                f"{self.path}: ONNX Runtime cannot load the file ({type(e).__name__}). Export it again with "
                "ldct-export --format onnx"
            ) from e
        self.max_check_difference = self._check(reference)

    def _check(self, reference: nn.Module) -> float:
        x = torch.rand(1, 1, 40, 48, generator=torch.Generator().manual_seed(0))
        with torch.inference_mode():
            expected = reference.cpu().eval()(x)
        try:
            got = self(x)
        except Exception as e:
            raise BackendError(
                f"{self.path}: does not run on a (1, 1, H, W) image ({type(e).__name__}). Export it again "
                "with ldct-export --format onnx"
            ) from e
        diff = float((got - expected).abs().max()) if got.shape == expected.shape else float("inf")
        if diff > ONNX_CHECK_ATOL:
            raise BackendError(
                f"{self.path}: its output differs from the checkpoint's generator by {diff:.3g} (normalised). "
                "It was exported from another checkpoint: export this one with ldct-export --format onnx"
            )
        return diff

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        array = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
        return torch.from_numpy(self.session.run(None, {"input": array})[0])


def onnx_network(
    generator: nn.Module, path: str | Path | None = None, cache_dir: str | Path | None = None
) -> OnnxRuntimeNetwork:
    """An ONNX Runtime network for ``generator``: from ``path``, or exported once into a cache.

    Args:
        generator: the torch generator (the reference the file is checked against).
        path: an existing ``.onnx`` file (from ``ldct-export --format onnx``); None: use the cache.
        cache_dir: cache folder (default :func:`default_onnx_cache`); the file is named by
            :func:`generator_digest`, so another checkpoint never reuses it.

    Returns:
        The checked network.
    """
    if path is None:
        from ldct_lightning.export import export_onnx, exportable  # onnx export is only needed here

        _require_onnxruntime()
        cache = Path(cache_dir) if cache_dir is not None else default_onnx_cache()
        generator = generator.cpu().eval()
        path = cache / f"generator-{generator_digest(generator)}.onnx"
        if not path.is_file():
            log.info("exporting the generator to %s (once per checkpoint)", path)
            with atomic_path(path) as tmp:
                export_onnx(
                    exportable(generator), torch.rand(1, 1, 64, 64), tmp, {"producer": "ldct-denoise"}
                )
    return OnnxRuntimeNetwork(path, generator)

"""Atomic checkpoint writes: a checkpoint file is either the old one or the complete new one, never half-written.

Lightning's :class:`~lightning.fabric.plugins.io.torch_io.TorchCheckpointIO` stages a local checkpoint in the
system temporary folder and then moves it (fsspec's transaction), which is a copy when that folder is on another
file system (a tmpfs ``/tmp``, a container's overlay): a crash during the copy leaves a truncated ``last.ckpt``,
and a killed process leaves the staged file in ``/tmp``. Here the bytes go to a hidden temporary file in the
checkpoint's own folder, are flushed to disk, and replace the target with one ``os.replace`` (atomic on POSIX and
Windows). Remote paths (``s3://``, ...) keep Lightning's behaviour.

Wired for every trainer by ``conf/trainer/cpu.yaml`` (``gpu`` and ``ddp`` inherit it)::

    plugins:
      - _target_: ldct_lightning.checkpoint_io.AtomicCheckpointIO
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO

from ldct_lightning.atomic import atomic_path


def _is_local(path: _PATH) -> bool:
    protocol = get_filesystem(path).protocol
    return "file" in (protocol if isinstance(protocol, tuple | list) else (protocol,))


def save_atomic(obj: Any, path: str | Path) -> None:
    """``torch.save(obj, path)`` through a temporary file in the same folder and ``os.replace``.

    Args:
        obj: anything :func:`torch.save` accepts.
        path: the target file; its folder is created when missing.

    Raises:
        Whatever ``torch.save`` or the file system raises; the target is then unchanged and the temporary file
        removed.
    """
    with atomic_path(path, fsync=True) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)


class AtomicCheckpointIO(TorchCheckpointIO):
    """:class:`TorchCheckpointIO` whose local saves are atomic (see the module docstring)."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None
    ) -> None:
        """Save ``checkpoint`` to ``path`` atomically (local paths) or as Lightning does (remote paths).

        Args:
            checkpoint: the state Lightning dumps.
            path: target file.
            storage_options: not supported (as in :class:`TorchCheckpointIO`).
        """
        if storage_options is not None or not _is_local(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        save_atomic(checkpoint, Path(path))

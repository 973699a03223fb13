"""Stage-1 -> stage-2 hand-off: load only the generator's weights from a Lightning checkpoint.

The checkpoint is read with ``weights_only=True``: tensors and plain containers only, no unpickling of config
objects, so a checkpoint from another version of the code (or someone else's machine) cannot run code on load.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ldct_lightning.runs import CheckpointError

# the checkpoint key of what a checkpoint says about itself: the generator's config and the HU range
# (written by DenoisingModule.on_save_checkpoint, read by Denoiser.from_checkpoint)
CHECKPOINT_META = "ldct_lightning"


def read_checkpoint(checkpoint_path: str | Path) -> dict[str, Any]:
    """Load a Lightning checkpoint onto the CPU with ``weights_only=True``.

    Args:
        checkpoint_path: a ``.ckpt`` file written by Lightning.

    Returns:
        The checkpoint dict (it has a ``state_dict``).

    Raises:
        CheckpointError: missing file, not loadable with ``weights_only=True``, or no ``state_dict``.
    """
    path = Path(checkpoint_path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file. Give the path of a stage-1 .ckpt file")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
        # torch's own message is long; keep the name of the refused object, if any
        refused = re.findall(r"Unsupported global: GLOBAL (\S+)", str(e))
        raise CheckpointError(
            f"{path}: cannot be loaded with weights_only=True (not a torch checkpoint, truncated, or holding "
            f"pickled objects other than tensors and plain values{', here ' + refused[0] if refused else ''}). "
            "Give a Lightning checkpoint whose hyperparameters are plain values"
        ) from e
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointError(f"{path}: has no 'state_dict'. Give a Lightning checkpoint (.ckpt)")
    return checkpoint


def load_generator_weights(
    generator: nn.Module,
    checkpoint_path: str | Path,
    prefix: str = "generator.",
    checkpoint: dict[str, Any] | None = None,
) -> None:
    """Copy the ``prefix``-ed ``state_dict`` entries of a Lightning checkpoint into ``generator`` (strictly).

    Args:
        generator: the network to initialise (changed in place).
        checkpoint_path: a ``.ckpt`` file written by Lightning (e.g. stage 1's ``last.ckpt``).
        prefix: key prefix of the generator's parameters in the checkpoint's ``state_dict``.
        checkpoint: the file's content when already read (:func:`read_checkpoint`); None: read it here.

    Raises:
        CheckpointError: missing file, no ``state_dict``, no key with ``prefix``, missing/unexpected keys or
            a shape mismatch (the first mismatching key is named with both shapes).
    """
    path = Path(checkpoint_path)
    if checkpoint is None:
        checkpoint = read_checkpoint(path)
    state = {k[len(prefix) :]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
    if not state:
        raise CheckpointError(
            f"{path}: no state_dict key starts with {prefix!r}. Give a checkpoint of a module that holds "
            "the generator under that name (stage 1, stage 2)"
        )
    own = generator.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: the generator's keys differ from the checkpoint's ({len(missing)} missing, e.g. "
            f"{missing[:3]}; {len(unexpected)} unexpected, e.g. {unexpected[:3]}). "
            "Build the generator with the same model config (model.generator.*) as the checkpoint's stage"
        )
    for key, value in own.items():
        if value.shape != state[key].shape:
            raise CheckpointError(
                f"{path}: shape mismatch for {prefix}{key}: checkpoint {tuple(state[key].shape)}, "
                f"generator {tuple(value.shape)}. Build the generator with the same model config "
                "(model.generator.*) as the checkpoint's stage"
            )
    generator.load_state_dict(state, strict=True)

"""``ldct-export CHECKPOINT OUT --format torchscript|onnx``: the generator as a standalone model file.

The exported model works in the normalised domain: input and output are (B, 1, H, W) float32 images with HU
mapped by ``(clip(HU, -1024, 3071) + 1024) / 4095`` (:func:`ldct_lightning.data.normalize.hu_to_unit`); batch,
height and width are dynamic. Both formats carry that convention as metadata (ONNX ``metadata_props``,
TorchScript extra file ``ldct_meta.json``). After writing, the file is loaded back and compared with PyTorch on
an input of another size; the largest difference is printed.

TorchScript is deprecated in recent PyTorch releases (it still loads with ``torch.jit.load`` and from C++);
ONNX is the format to prefer for deployment. ONNX needs the optional packages ``onnx`` and ``onnxruntime`` (``pip install 'ldct-lightning[export]'``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from ldct_lightning.cli.arguments import add_generator_config_argument
from ldct_lightning.errors import LDCTError
from ldct_lightning.export import (
    FORMATS,
    META_FILE,
    MIN_OPSET,
    export_generator,
    export_metadata,
    require_onnx,
    verify_shape,
)
from ldct_lightning.inference import Denoiser, load_generator_config

PROG = "ldct-export"
__all__ = ["FORMATS", "META_FILE", "PROG", "build_parser", "main", "run"]


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Export a checkpoint's generator (normalised domain, dynamic batch/height/width) to "
        "TorchScript or ONNX.",
    )
    p.add_argument("checkpoint", type=Path, metavar="CHECKPOINT", help="Lightning checkpoint (.ckpt)")
    p.add_argument("out", type=Path, metavar="OUT", help="file to write (.pt or .onnx)")
    p.add_argument("--format", choices=FORMATS, required=True, help="torchscript or onnx")
    p.add_argument("--size", type=int, default=512, help="height/width of the tracing example (default: 512)")
    p.add_argument("--opset", type=int, default=MIN_OPSET, help=f"ONNX opset (default: {MIN_OPSET})")
    add_generator_config_argument(p)
    return p


def run(args: argparse.Namespace) -> int:
    """Run the command; raises the errors that :func:`main` turns into one line and exit code 2."""
    if args.format == "onnx":
        require_onnx()  # fail before loading the checkpoint
    generator_kwargs = load_generator_config(args.generator_config) if args.generator_config else None
    denoiser = Denoiser.from_checkpoint(args.checkpoint, generator_kwargs=generator_kwargs)
    meta = export_metadata(args.checkpoint, args.format, denoiser.generator_source)
    diff = export_generator(denoiser.generator, args.out, args.format, args.size, args.opset, meta)
    print(
        f"{PROG}: wrote {args.out} ({args.format}); max |exported - PyTorch| = {diff:.2e} "
        f"on a {verify_shape(args.size)} check input"
    )
    if diff > 1e-3:
        print(f"{PROG}: warning: the exported model differs from PyTorch by {diff:.2e}", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``ldct-export``.

    Args:
        argv: arguments (default: ``sys.argv[1:]``).

    Returns:
        The exit code: 0 success, 2 bad input.
    """
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except LDCTError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"{PROG}: error: {e}. Check the output folder's permissions and free space", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

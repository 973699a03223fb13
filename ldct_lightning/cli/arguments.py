"""Command-line arguments that more than one CLI takes (one definition, one help text)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_generator_config_argument(parser: argparse.ArgumentParser) -> None:
    """Add ``--generator-config`` (the generator's architecture, when the checkpoint's own is not wanted).

    Args:
        parser: the CLI's parser (changed in place).
    """
    parser.add_argument(
        "--generator-config",
        type=Path,
        default=None,
        help="YAML with the generator's config (a run_info.yaml or generator kwargs); default: the config the "
        "checkpoint carries, else its run's run_info.yaml (checkpoints from before 2026-12-02), else the "
        "default generator",
    )

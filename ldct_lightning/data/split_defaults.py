"""The patient-split parameters every tool uses: one set of defaults, the Hydra data configs'.

``train.py`` reads ``conf/data/<name>.yaml``; the command-line tools (``ldct-data-summary``,
``ldct-evaluate``) read the same files here, so that no tool makes or expects a split that training
would refuse.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import yaml

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def data_config_kind(root: Path) -> str:
    """``synthetic`` for an ldct-simulate output (it has ``<root>/dicom``), else ``dicom``."""
    return "synthetic" if (Path(root) / "dicom").is_dir() else "dicom"


def data_split_defaults(kind: str) -> dict[str, Any]:
    """``n_val``, ``n_test`` and ``split_seed`` of ``conf/data/<kind>.yaml`` (with its defaults list).

    Args:
        kind: ``dicom`` or ``synthetic``.

    Returns:
        The three values, as training composes them without overrides.
    """
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"data={kind}"])
    return {key: cfg.data[key] for key in ("n_val", "n_test", "split_seed")}


def split_size(text: str) -> float | str:
    """``argparse`` type of ``--n-val``/``--n-test``: a count, a fraction below 1, or ``all``."""
    if text.strip().lower() == "all":
        return "all"
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give a count, a fraction below 1, or 'all'") from None


def split_params(
    split_file: Path,
    defaults: dict[str, Any],
    n_val: float | str | None = None,
    n_test: float | str | None = None,
    split_seed: int | None = None,
) -> dict[str, Any]:
    """Split parameters: the given ones, else those stored in an existing split file, else ``defaults``.

    Args:
        split_file: the split file (it may not exist).
        defaults: from :func:`data_split_defaults`.
        n_val: validation patients (count, or fraction when below 1), ``"all"``, or None.
        n_test: test patients, or None.
        split_seed: seed, or None.

    Returns:
        ``n_val``, ``n_test`` and ``split_seed`` for :class:`~ldct_lightning.data.datamodule.LDCTDataModule`.
    """
    stored: dict = {}
    if Path(split_file).is_file():
        try:
            stored = (yaml.safe_load(Path(split_file).read_text()) or {}).get("params", {}) or {}
        except (yaml.YAMLError, AttributeError):
            stored = {}

    def pick(value: float | str | None, key: str, count_key: str) -> Any:
        if value == "all":
            return 1.0  # a fraction: every patient
        if value is not None:
            return int(value) if float(value).is_integer() and value >= 1 else value
        return stored.get(key, stored.get(count_key, defaults[key]))

    return {
        "n_val": pick(n_val, "n_val", "n_val_count"),
        "n_test": pick(n_test, "n_test", "n_test_count"),
        "split_seed": split_seed if split_seed is not None else stored.get("seed", defaults["split_seed"]),
    }

"""Names of the rows of a multirun over several seeds: ``<method>_s<seed>`` and back (one place for both)."""

from __future__ import annotations

import re

SEED_SUFFIX = re.compile(r"^(?P<method>.+)_s(?P<seed>-?\d+)$")


def seeded_name(method: str, seed: int) -> str:
    """``("proposed", 3)`` -> ``proposed_s3``, the row name of one seed's job."""
    return f"{method}_s{seed}"


def split_seed(name: str) -> tuple[str, int | None]:
    """``proposed_s3`` -> (``proposed``, 3); a name without a seed suffix -> (name, None)."""
    match = SEED_SUFFIX.match(name)
    return (match["method"], int(match["seed"])) if match else (name, None)

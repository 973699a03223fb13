"""Hashing of patient identifiers: no PHI ever leaves the machine in clear text."""

from __future__ import annotations

import hashlib

# A fixed salt makes keys stable across runs and machines (splits and caches depend on it) while
# keeping them from matching a plain sha256 of a known ID.
_SALT = b"ldct-lightning/v1"


def hash_identifier(value: str, length: int = 12) -> str:
    """Return a short, stable, non-reversible key for an identifier (PatientID, a UID).

    Args:
        value: the identifier in clear text.
        length: number of hex characters kept.

    Returns:
        A lowercase hex string of ``length`` characters.
    """
    return hashlib.sha256(_SALT + value.encode("utf-8")).hexdigest()[:length]

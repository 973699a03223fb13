"""Pseudonyms of patient identifiers: no PHI leaves the machine in clear text.

Keys are HMAC-SHA256 of the identifier under a secret of the data root: 32 random bytes generated on first
use and kept in ``<root>/.ldct-pseudonym.key`` (owner-only permissions, beside the default cache
``<root>/.cache``), or, when the root is read-only, in a per-user folder
(``$XDG_DATA_HOME/ldct-lightning/pseudonym-keys``, keyed by the root's path). Without the secret, a key
cannot be traced back to a PatientID by trying candidate IDs; with it, it can, so the secret is never
logged, printed or copied into outputs. Keys stay stable for a data root as long as its key file stays
(copy it with the data; deleting it changes every key, and with them the split and the truth file names).
This is pseudonymisation, not anonymisation: the DICOM files themselves keep their identifiers.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
from pathlib import Path

from ldct_lightning.errors import LDCTError

log = logging.getLogger(__name__)

KEY_FILE_NAME = ".ldct-pseudonym.key"
_SECRET_BYTES = 32
_loaded: dict[tuple[str, int, int], bytes] = {}  # (key file, inode, mtime) -> secret


class PrivacyError(LDCTError):
    """A pseudonym key file that cannot be used; ``str(e)`` names it and what to do."""


class Pseudonymizer:
    """Short, stable keys for identifiers under one secret (HMAC-SHA256).

    Args:
        secret: the secret bytes (never logged; ``repr`` hides them).
    """

    def __init__(self, secret: bytes) -> None:
        if len(secret) < 16:
            raise ValueError("a pseudonym secret needs at least 16 bytes")
        self._secret = bytes(secret)

    def __repr__(self) -> str:
        return "Pseudonymizer(secret=<hidden>)"

    def key(self, value: str, length: int = 12) -> str:
        """The key of an identifier.

        Args:
            value: the identifier in clear text (PatientID, a UID).
            length: number of hex characters kept.

        Returns:
            A lowercase hex string of ``length`` characters.
        """
        return hmac.new(self._secret, value.encode("utf-8"), hashlib.sha256).hexdigest()[:length]


def _user_key_file(root: Path) -> Path:
    base = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    name = hashlib.sha256(str(root.resolve()).encode("utf-8")).hexdigest()[:16]
    return base / "ldct-lightning" / "pseudonym-keys" / f"{name}.key"


def _create(path: Path, secret: bytes | None = None) -> None:
    """Write ``secret`` (default: a new random one) to ``path`` unless another process was first (owner-only)."""
    if secret is not None and len(secret) != _SECRET_BYTES:
        raise ValueError(f"a pseudonym secret file holds {_SECRET_BYTES} bytes, got {len(secret)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write((secret.hex() if secret is not None else secrets.token_hex(_SECRET_BYTES)) + "\n")
        os.chmod(tmp, 0o600)  # whatever the umask
        try:
            os.link(tmp, path)  # atomic: fails when the file exists (another process made it)
        except FileExistsError:
            pass
    finally:
        tmp.unlink(missing_ok=True)


def _read(path: Path) -> bytes:
    st = path.stat()
    cached = _loaded.get((str(path.resolve()), st.st_ino, st.st_mtime_ns))
    if cached is not None:
        return cached
    text = path.read_text().strip()
    try:
        secret = bytes.fromhex(text)
    except ValueError:
        secret = b""
    if len(secret) != _SECRET_BYTES:
        raise PrivacyError(
            f"{path}: not a pseudonym key file (expected {2 * _SECRET_BYTES} hex characters). Restore it "
            "from the data's backup, or delete it to start new keys (the split and truth names change)"
        )
    _loaded[(str(path.resolve()), st.st_ino, st.st_mtime_ns)] = secret
    return secret


def find_key_root(path: str | Path) -> Path:
    """The data root a folder belongs to: the nearest of it and its parents with a key file, else itself.

    So ``<root>/dicom`` of a synthetic set, or one patient's folder of a DICOM tree trained on, is keyed as
    its data root is.
    """
    path = Path(path)
    for folder in [path, *path.resolve().parents]:
        if (folder / KEY_FILE_NAME).is_file():
            return folder
    return path


def key_file(root: str | Path) -> Path:
    """Where the secret of a data root is kept (created there on first use when the root is writable)."""
    root = Path(root)
    own = root / KEY_FILE_NAME
    if own.is_file() or (root.is_dir() and os.access(root, os.W_OK)):
        return own
    return _user_key_file(root)


def pseudonymizer(root: str | Path) -> Pseudonymizer:
    """The pseudonymizer of a data root, generating its secret on first use.

    Args:
        root: the data root (a DICOM tree, an ldct-simulate output, an ldct-denoise OUTPUT).

    Returns:
        The root's :class:`Pseudonymizer`.

    Raises:
        PrivacyError: the key file exists but is not one.
    """
    path = key_file(root)
    if not path.is_file():
        _create(path)
        log.info("pseudonym key of %s created: %s (keep it with the data)", root, path)
    return Pseudonymizer(_read(path))


def set_synthetic_key(root: str | Path, seed: int) -> None:
    """Give a synthetic data root a secret derived from its simulation seed (kept if it has one already).

    Synthetic patients have no real identity to protect, and a fixed secret makes their keys, and with them
    the patient split (ordered by key), the same each time the set is regenerated with that seed: benchmark
    numbers from two machines or two days are then on the same test patients. Never use it for real data.

    Args:
        root: the synthetic data root.
        seed: the simulation seed.
    """
    path = Path(root) / KEY_FILE_NAME
    if not path.is_file():
        _create(path, hashlib.sha256(f"ldct-lightning synthetic data, seed {seed}".encode()).digest())


def hash_identifier(value: str, root: str | Path, length: int = 12) -> str:
    """The pseudonym of an identifier under the secret of a data root (see :func:`pseudonymizer`).

    Args:
        value: the identifier in clear text (PatientID, a UID).
        root: the data root.
        length: number of hex characters kept.

    Returns:
        A lowercase hex string of ``length`` characters.
    """
    return pseudonymizer(root).key(value, length)

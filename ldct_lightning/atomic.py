"""Atomic file writes: a file is either the old one or the complete new one, never half-written.

Every writer in the package goes through :func:`atomic_path`: the bytes go to a hidden temporary file in the
target's own folder (same file system, so the final step is one ``os.replace``, atomic on POSIX and Windows),
whose name is unique per call (concurrent writers, e.g. DDP ranks, never share one); on any failure, an
interrupt included, the temporary file is removed and the target left as it was. This module imports nothing from
the package (every room may use it).
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

TMP_SUFFIX = ".tmp"


@contextlib.contextmanager
def atomic_path(path: str | Path, fsync: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block ends without error, move it onto ``path``.

    Args:
        path: the target file; its folder is created when missing.
        fsync: flush the temporary file to disk before the rename (checkpoints: survive a power cut).

    Yields:
        The temporary file to write (it does not exist yet).

    Raises:
        Whatever the block or the file system raises; the target is then unchanged and the temporary file gone.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}{TMP_SUFFIX}")
    try:
        yield tmp
        if fsync:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    finally:  # BaseException too (KeyboardInterrupt, SIGTERM): never leave the temporary file
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (see :func:`atomic_path`).

    Args:
        path: the target file.
        text: its new content.
    """
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")

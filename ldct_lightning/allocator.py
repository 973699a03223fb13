"""Keep freed memory in the process: glibc malloc without page-fault churn for large tensors.

PyTorch's CPU allocator is plain ``malloc``/``free``. glibc serves every block above its mmap threshold (at most
32 MB) with a fresh ``mmap`` and gives it back on ``free``, so each large activation of a 512x512 slice
(32 channels x 528 x 528 float32 is 36 MB) costs a page fault per 4 KB page and the kernel's zeroing of it,
again on every forward pass. Measured on 2 CPU cores (README "Inference speed"): more than half of the
generator's time was system time; with the settings below the network runs at the machine's matmul speed
(network only, default path 0.76 s/slice instead of 1.0-1.7; ``ldct-denoise`` end to end 1.46x faster). Only
``ldct-denoise`` (and the inference sections of ``make bench``) use it: ``make demo`` took the same time with it
(7 min 18 s) as without (7 min 13 s), so training keeps glibc's defaults.

PyTorch has no caching allocator for the CPU and transparent huge pages (``THP_MEM_ALLOC_ENABLE``) were slower
here, so this sets glibc's own knobs through ``mallopt`` (the documented API; ``MALLOC_MMAP_MAX_=0
MALLOC_TRIM_THRESHOLD_=...`` in the environment does the same but only at process start). The cost: the heap
is not trimmed by ``free``, and blocks of a size freed between others are not always reused (glibc's
``posix_memalign``, which PyTorch calls, leaves small remainders that split free space), so the resident size
creeps up in steps (300-slice series: +208 MB over the run); :func:`release_freed_memory` (glibc
``malloc_trim``) gives the free pages back, and ``ldct-denoise`` calls it every ``TRIM_EVERY_SLICES`` slices
and after each series (one round of page faults each time instead of one per batch).
``LDCT_KEEP_FREED_MEMORY=0`` turns all of it off.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

log = logging.getLogger(__name__)

ENV = "LDCT_KEEP_FREED_MEMORY"
# glibc's malloc.h
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
_NEVER_TRIM = 2**31 - 1  # an int for mallopt; heaps are trimmed only above this much free memory at the top

TRIM_EVERY_SLICES = 64

_applied = False
_libc: ctypes.CDLL | None = None


def keep_freed_memory() -> bool:
    """Make glibc malloc serve large blocks from its heap (no ``mmap``) and never trim the heap.

    Idempotent; does nothing on other C libraries (macOS, Windows, musl) or with ``LDCT_KEEP_FREED_MEMORY=0``.

    Returns:
        True when the settings are in effect.
    """
    global _applied, _libc
    if _applied:
        return True
    if os.environ.get(ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    if not hasattr(libc, "gnu_get_libc_version"):  # mallopt of another libc has other parameter numbers
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    _applied = bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, _NEVER_TRIM))
    _libc = libc
    if _applied:
        log.debug("glibc malloc: large blocks from the heap, heap not trimmed (%s=0 turns it off)", ENV)
    return _applied


def release_freed_memory() -> None:
    """Return the heap's free pages to the OS (glibc ``malloc_trim``) when :func:`keep_freed_memory` is on."""
    if _applied and _libc is not None:
        _libc.malloc_trim(0)

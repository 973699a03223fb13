"""keep_freed_memory: glibc serves large blocks from a heap it keeps, so a reused block costs no page faults."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from ldct_lightning.allocator import ENV

# malloc, touch and free a 64 MB block twice (glibc's malloc, as PyTorch's CPU allocator calls it); the second
# time's minor page faults (ru_minflt), and how much resident memory release_freed_memory gives back afterwards
PROBE = """
import ctypes, json, resource
from ldct_lightning.allocator import keep_freed_memory, release_freed_memory
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
n = 64 * 1024 * 1024
def rss_mb():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
def touch():
    p = libc.malloc(n)
    ctypes.memset(p, 1, n)
    libc.free(p)
applied = keep_freed_memory()
touch()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
touch()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
kept = rss_mb()
release_freed_memory()
print(json.dumps({"applied": applied, "faults": faults, "released_mb": kept - rss_mb()}))
"""

PAGES_64MB = 64 * 1024 * 1024 // 4096


def _probe(env_value: str | None) -> dict[str, object]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    if env_value is not None:
        env[ENV] = env_value
    else:
        env.pop(ENV, None)
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt: Linux only")
def test_freed_large_block_is_reused_without_page_faults() -> None:
    on, off = _probe(None), _probe("0")
    assert on["applied"] is True and off["applied"] is False
    # glibc default: the 64 MB block is a fresh mmap each time, one fault per 4 KB page it touches
    assert off["faults"] > PAGES_64MB // 2
    # kept in the heap: the second allocation reuses the touched pages
    assert on["faults"] < PAGES_64MB // 20
    # release_freed_memory (malloc_trim) gives the freed 64 MB back; with glibc's defaults it was never kept
    assert on["released_mb"] > 48
    assert abs(off["released_mb"]) < 16

"""glibc's allocator and large tensors on CPU.

glibc raises its mmap threshold each time a large block is freed (up to 32 MB), so later tensors of that
size come from the heap, where freed memory fragments and is not returned: a CPU search's RSS then grows
with every stage although nothing is kept (measured: +252 MB after three forwards of a 16 x 255-token
chunk, against +138 MB with a fixed threshold). A fixed threshold keeps tensors of 256 KiB and more
mmapped, so they return to the OS when freed: the search's state memo frees states in any order, and
states of a few hundred KB (8 prompts x 37 tokens x 576 channels: 680 KB) left on the heap fragment it
(MiniLM search, 32 prompts: RSS +604 MB with 1 MiB, +490 MB with 256 KiB, same time). Process-wide, so
applied only by a CPU search, once; SKRR_MALLOC_TUNE=0 leaves the allocator alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
_applied: list[bool] = []


def keep_large_tensors_mmapped(threshold: int = 1 << 18) -> bool:
    """Fix glibc's mmap threshold (Linux only); True if it is in effect."""
    if _applied:
        return _applied[0]
    ok = False
    if os.environ.get("SKRR_MALLOC_TUNE", "1") != "0":
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            ok = bool(libc.mallopt(M_MMAP_THRESHOLD, threshold)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 4 * threshold))
        except (OSError, AttributeError):
            ok = False
    _applied.append(ok)
    return ok

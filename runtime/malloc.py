"""Keep freed memory in the process on Linux (glibc), so MLX's CPU arrays reuse it.

MLX's CPU backend allocates every intermediate array with malloc, and glibc hands large blocks
straight back to the kernel when they are freed (blocks above the mmap threshold are unmapped,
the heap top is trimmed). The next array of that size then faults its pages in again, and in a
VM a fault is dear: 0.25 us a page at best on the development machine, 3-10 us when the host has
to supply the page (2.4 s for a fresh GB). A fused elementwise kernel over a 16 MB map took 47 ms
with 16,000 faults a call, 9 ms without.

`tune_malloc` (called by `vidport.runtime.configure_cpu()`, best before MLX starts its threads)
makes glibc serve every block from the one main heap and never trim it: M_MMAP_MAX = 0,
M_TRIM_THRESHOLD = 2^31 - 1 (trim only past 2 GB free), M_ARENA_MAX = 1. Peak RSS is unchanged (the high-water mark was reached anyway); what changes
is that RSS stays at it until the process exits, as with MLX's Metal buffer cache or torch's
CUDA caching allocator. Set VIDPORT_MALLOC=default to leave glibc's defaults alone.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -3, -4, -8

state: dict[str, str] = {"malloc": "system default"}


def tune_malloc() -> str:
    """Apply the settings above (Linux + glibc only); returns what was done."""
    if sys.platform != "linux" or os.environ.get("VIDPORT_MALLOC") == "default":
        return state["malloc"]
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return state["malloc"]
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # M_TRIM_THRESHOLD takes an int here: the largest one means "never trim"
    done = all(mallopt(param, value) == 1 for param, value in
               ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 2**31 - 1)))
    if done:
        state["malloc"] = "glibc: one heap, no mmap, no trim (vidport.runtime.malloc)"
    return state["malloc"]

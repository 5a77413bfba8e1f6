"""Keeping freed host memory in the process during CPU training, so that steps stop page-faulting.

glibc's malloc serves large blocks with mmap and hands them back to the kernel
on free, and trims the top of its heap as soon as it shrinks. A training step
frees and re-allocates the same activations and gradients every step, so on
CPU the kernel maps and zeroes hundreds of MB of fresh pages per step: for
small.yaml's dimensions (4 layers, 4 experts, batch 4 x 128, 2 cores) about
200,000 minor page faults and 400 ms of system time in a 1.45 s model step.
Raising the mmap and trim thresholds keeps those blocks for reuse: no faults
once the heap has settled, and train.py runs 1.45x the tokens/s (benchmarks/
RESULTS.md). The price is resident memory: the heap keeps its high-water mark
and some fragmentation, about 15% more peak RSS in that run
(`hardware.keep_freed_host_memory: false` gives it back).
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD = -1  # glibc <malloc.h>
M_MMAP_THRESHOLD = -3
M_MMAP_MAX = -4
KEEP_BELOW = 1 << 30  # blocks under 1 GiB come from (and return to) the heap
NEVER_TRIM = 2**31 - 1


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process; False where nothing could be changed.

    glibc before about 2.35 refuses mmap thresholds above 32 MiB; there large
    blocks are kept on the heap by allowing no mmapped blocks at all (M_MMAP_MAX 0),
    which every glibc accepts. Without glibc's mallopt (musl, macOS) nothing changes.
    An allocator preloaded in its place (tcmalloc, jemalloc) ignores these settings.
    """
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):  # no C library found, or one without mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    large_on_heap = bool(mallopt(M_MMAP_THRESHOLD, KEEP_BELOW)) or bool(mallopt(M_MMAP_MAX, 0))
    return large_on_heap and bool(mallopt(M_TRIM_THRESHOLD, NEVER_TRIM))

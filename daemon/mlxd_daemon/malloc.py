"""Process memory: make freed tensor buffers go back to the system, and measure the peak honestly.

glibc raises its mmap threshold each time a large mmapped block is freed, so after the first few tensors every
later one is carved from the heap, and freeing it does not shrink the process: a streaming conversion then
looks as if it held the whole model. Pinning the threshold keeps large blocks mmapped (freed = returned).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_MMAP_THRESHOLD = -3  # from malloc.h
THRESHOLD = 1 << 20

_done = False


def pin_mmap_threshold() -> bool:
    """Pin glibc's mmap threshold at 1 MiB (once per process); False where there is no glibc."""
    global _done
    if _done or not sys.platform.startswith("linux"):
        return _done
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        _done = bool(libc.mallopt(M_MMAP_THRESHOLD, THRESHOLD))
    except (OSError, AttributeError):
        _done = False
    return _done


def peak_rss_bytes() -> int:
    """This process's peak resident memory: VmHWM, which (unlike ru_maxrss) starts afresh at exec and so does
    not report the RSS of the parent that spawned us."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)

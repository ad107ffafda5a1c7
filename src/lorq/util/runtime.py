"""Process-level memory settings: glibc's mmap threshold for CPU training (``lorq finetune
--low-memory``), and handing freed heap memory back to the OS between the CLI's stages.

glibc's malloc raises its mmap threshold each time a large block is freed, after which blocks up
to that size come from the heap and stay resident when freed. lorq decodes a dense weight per layer
and call (a few MB, freed at once), so a training step leaves the heap fragmented. Pinning the
threshold maps such blocks and returns them to the OS when freed: lower peak memory, paid for with
page faults on every mapping; ``python bench/malloc.py`` measures the trade-off (bench/README.md).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys

M_MMAP_THRESHOLD = -3  # mallopt parameter number (glibc malloc.h)
THRESHOLD_BYTES = 1 << 20
# lorq compress / eval: weights decoded per forward are a few MB; mapping those of 4 MiB and more
# keeps the job's peak RSS at 0.69 GB instead of 0.88 on the default job, at no measurable cost
# (a 1 MiB threshold costs 20 %: bench/README.md, "One pipeline")
JOB_THRESHOLD_BYTES = 4 << 20


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc on Linux (mallopt, malloc_trim), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def fixed_mmap_threshold(threshold: int = THRESHOLD_BYTES) -> bool:
    """Pin glibc's mmap threshold; True when set (False off Linux / glibc: nothing to do)."""
    libc = _glibc()
    return bool(libc and libc.mallopt(M_MMAP_THRESHOLD, threshold))


def release_free_memory() -> bool:
    """Return the free pages of glibc's heap to the OS (``malloc_trim(0)``): what a finished
    stage freed stops counting as resident. True when memory was released (False off glibc)."""
    libc = _glibc()
    return bool(libc and libc.malloc_trim(0))

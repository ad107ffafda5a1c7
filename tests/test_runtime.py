"""The malloc setting. Oracle: glibc's mallopt accepts it (in a child process: the setting is
process-wide and would slow the rest of the test session)."""

import subprocess
import sys

import pytest


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_fixed_mmap_threshold_is_accepted_by_glibc():
    code = "from lorq.util.runtime import fixed_mmap_threshold as f; print(f(), f(1 << 16))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "True"]


FRAGMENTED_HEAP = """
from lorq.util.runtime import release_free_memory

def rss_mb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024

blocks = [bytearray(b"x" * 100_000) for _ in range(2000)]  # heap chunks (below mmap's threshold)
kept = blocks[::10]  # every tenth stays: the freed ones are holes glibc keeps resident
del blocks
before = rss_mb()
print(release_free_memory(), before - rss_mb())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_release_free_memory_returns_heap_holes():
    """Oracle: the process's resident set (VmRSS) shrinks by most of the ~180 MB of holes."""
    out = subprocess.run(
        [sys.executable, "-c", FRAGMENTED_HEAP], capture_output=True, text=True, check=True
    )
    released, drop_mb = out.stdout.split()
    assert released == "True" and float(drop_mb) > 100

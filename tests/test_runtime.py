"""The malloc setting. Oracle: glibc's mallopt accepts it (in a child process: the setting is
process-wide and would slow the rest of the test session)."""

import subprocess
import sys

import pytest


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_fixed_mmap_threshold_is_accepted_by_glibc():
    code = "from lorq.runtime import fixed_mmap_threshold as f; print(f(), f(1 << 16))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "True"]

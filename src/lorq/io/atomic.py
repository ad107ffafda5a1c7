"""Atomic directory writes: build in a temporary sibling, then rename into place.

An interrupted write leaves at most a hidden ``.NAME.tmp-*`` folder, never a directory that looks
complete; an existing directory is only replaced when ``overwrite`` and ``is_ours(path)`` allow it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_directory(
    path: str | Path, overwrite: bool, is_ours: Callable[[Path], bool], kind: str
) -> Iterator[Path]:
    """Yield a temporary folder; on success it becomes ``path``."""
    path = Path(path)
    if path.exists():
        if not is_ours(path):
            raise ValueError(f"{path} exists and is not a {kind} directory; refusing to replace it")
        if not overwrite:
            raise ValueError(f"{path} exists; pass overwrite (--overwrite) to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    try:
        yield tmp
        if path.exists():
            old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.old-"))
            os.replace(path, old / "dir")
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

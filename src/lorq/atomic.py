"""Atomic writes of files and directories: build a temporary sibling, then rename it into place.

An interrupted write leaves at most a hidden ``.NAME.tmp-*`` file or folder, never an output that
looks complete; an existing output is only replaced when ``overwrite`` (and, for directories,
``is_ours(path)``) allow it. Every writer in lorq goes through these two.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path


def check_output(
    path: str | Path,
    overwrite: bool,
    is_ours: Callable[[Path], bool] | None = None,
    kind: str = "lorq",
) -> None:
    """An output location must be new, or (with ``overwrite``) what ``is_ours`` recognises as a
    ``kind`` output (a file when ``is_ours`` is None); ValueError saying what to do otherwise."""
    path = Path(path)
    if is_ours is None and path.is_dir():
        raise ValueError(f"{path} is a directory; pass the path of a file")
    if is_ours is not None and path.exists() and not is_ours(path):
        raise ValueError(f"{path} exists and is not a {kind} directory; choose another output")
    if path.exists() and not overwrite:
        raise ValueError(f"{path} exists; pass overwrite=True to replace it")


@contextlib.contextmanager
def atomic_directory(
    path: str | Path, overwrite: bool, is_ours: Callable[[Path], bool], kind: str
) -> Iterator[Path]:
    """Yield a temporary folder; on success it becomes ``path``."""
    path = Path(path)
    check_output(path, overwrite, is_ours, kind)
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


@contextlib.contextmanager
def atomic_file(path: str | Path, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary sibling file of ``path``; it replaces ``path`` when the block succeeds."""
    path = Path(path)
    check_output(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    os.close(handle)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)

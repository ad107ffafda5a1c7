"""Safe outputs: check a location before any work, then build a hidden sibling and swap it in.

    check_output   before work: the location is writable, new or (with ``overwrite``) ours,
                   not an input of the job, with room for the estimated bytes
    atomic_*       under a lock on ``.NAME.lock``: clean what killed runs left, write into
                   ``.NAME.tmp-*``, then exchange it with the old output in one rename

At every moment the path holds the old output or the new one, never a half-written one: a
directory is swapped by ``renameat2(RENAME_EXCHANGE)`` where the kernel has it, else by two
renames that the next run undoes if it was killed between them. A second writer to the same path
is refused while the first holds the lock. Outputs get the user's umask.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

IsOurs = Callable[[Path], bool]


def has_magic(magic: bytes) -> IsOurs:
    """An ``is_ours`` test for files that start with ``magic`` (GGUF, PNG, …)."""

    def starts_with(path: Path) -> bool:
        try:
            with open(path, "rb") as handle:
                return handle.read(len(magic)) == magic
        except OSError:
            return False

    return starts_with


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_not_input(path: Path, inputs: Iterable[str | Path]) -> None:
    """ValueError when ``path`` is, holds or lies inside one of the job's ``inputs``."""
    out = path.resolve()
    for given in inputs:
        source = Path(given).resolve()
        if _inside(out, source) or _inside(source, out):
            raise ValueError(
                f"{path} would replace or lie inside the input {given}; choose another output"
            )


def _existing_ancestor(path: Path) -> Path:
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    return parent


def check_location(path: Path, nbytes: int | None = None) -> None:
    """The nearest existing folder above ``path`` is a writable directory with ``nbytes`` free."""
    parent = _existing_ancestor(path)
    if not parent.is_dir():
        raise ValueError(f"cannot write {path}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write {path}: {parent} is not writable; choose another output")
    free = shutil.disk_usage(parent).free
    if nbytes is not None and nbytes > free:
        raise ValueError(
            f"cannot write {path}: it needs about {nbytes / 1e6:.0f} MB and {parent} has "
            f"{free / 1e6:.0f} MB free; free some space or choose another output"
        )


def check_output(
    path: str | Path,
    overwrite: bool,
    is_ours: IsOurs | None = None,
    kind: str = "lorq",
    *,
    inputs: Iterable[str | Path] = (),
    nbytes: int | None = None,
    directory: bool | None = None,
) -> None:
    """An output location must be writable, new, or (with ``overwrite``) what ``is_ours``
    recognises as a ``kind`` output, and never one of ``inputs``; ValueError saying what to do.

    ``directory``: whether the output is a directory (default: when ``is_ours`` is given and the
    output is not a file kind); a file output refuses an existing directory and vice versa.
    """
    path = Path(path)
    directory = is_ours is not None if directory is None else directory
    check_not_input(path, inputs)
    if directory is False and path.is_dir():
        raise ValueError(f"{path} is a directory; pass the path of a file")
    if directory and path.exists() and not path.is_dir():
        raise ValueError(f"{path} exists and is a file, not a {kind} directory; choose another")
    if is_ours is not None and path.exists() and not is_ours(path):
        noun = "directory" if directory else "file"
        raise ValueError(f"{path} exists and is not a {kind} {noun}; choose another output")
    if path.exists() and not overwrite:
        raise ValueError(f"{path} exists; pass overwrite=True to replace it")
    check_location(path, nbytes)


def _hidden(path: Path, tag: str) -> str:
    return f".{path.name}.{tag}-"


def _recover(path: Path) -> None:
    """Undo a swap killed between its two renames: put the old output back at ``path``."""
    if path.exists():
        return
    for old in sorted(path.parent.glob(_hidden(path, "old") + "*")):
        if (old / "dir").exists():
            os.replace(old / "dir", path)
            return


def _clean_leftovers(path: Path) -> None:
    """Remove the hidden folders and files that killed writes of ``path`` left behind."""
    for tag in ("tmp", "old"):
        for left in path.parent.glob(_hidden(path, tag) + "*"):
            if left.is_dir() and not left.is_symlink():
                shutil.rmtree(left, ignore_errors=True)
            else:
                left.unlink(missing_ok=True)


def _try_lock(lock: Path) -> int | None:
    """An exclusive flock on ``lock`` (a file that still is ``lock``), or None when held."""
    fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    if not lock.exists() or os.stat(lock).st_ino != os.fstat(fd).st_ino:  # unlinked meanwhile
        os.close(fd)
        return _try_lock(lock)
    return fd


_HELD: set[tuple[str, int]] = set()  # (lock, thread) pairs this process holds: re-entered freely


@contextlib.contextmanager
def output_lock(path: Path) -> Iterator[None]:
    """Hold ``.NAME.lock`` beside ``path`` (ValueError when another process or thread writes
    ``path``); leftovers of killed writes are recovered or removed first. Re-entrant: a job
    holding its output's lock (fine-tuning) saves under it."""
    lock = path.parent / (_hidden(path, "lock")[:-1])
    key = (str(lock.absolute()), threading.get_ident())
    if key in _HELD:
        yield
        return
    fd = _try_lock(lock)
    if fd is None:
        raise ValueError(
            f"{path} is being written by another lorq process; wait for it or choose another output"
        )
    _HELD.add(key)
    try:
        _recover(path)
        _clean_leftovers(path)
        yield
    finally:
        _HELD.discard(key)
        lock.unlink(missing_ok=True)
        os.close(fd)


def _make_parents(path: Path) -> list[Path]:
    """Create the missing folders above ``path``; returns them, deepest first."""
    missing = []
    parent = path.absolute().parent
    while not parent.exists():
        missing.append(parent)
        parent = parent.parent
    for folder in reversed(missing):
        folder.mkdir()
    return missing


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:
        with contextlib.suppress(OSError):
            folder.rmdir()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _apply_umask(folder: Path) -> None:
    """Folders and files under ``folder`` get the modes the user's umask gives (temporary folders
    and some writers, e.g. safetensors, create them private)."""
    mask = _umask()
    folder.chmod(0o777 & ~mask)
    for path in folder.rglob("*"):
        if not path.is_symlink():
            path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def _exchange(a: Path, b: Path) -> bool:
    """Swap ``a`` and ``b`` atomically (Linux renameat2); False where the system cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    path_arg = [ctypes.c_int, ctypes.c_char_p]
    renameat2.argtypes = [*path_arg, *path_arg, ctypes.c_uint]
    at_cwd, rename_exchange = -100, 2
    if renameat2(at_cwd, os.fsencode(a), at_cwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _swap_in(tmp: Path, path: Path) -> None:
    """Put the finished ``tmp`` at ``path``; the old output (if any) ends in a hidden folder."""
    if not path.exists():
        os.replace(tmp, path)
    elif _exchange(tmp, path):
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        old = Path(tempfile.mkdtemp(dir=path.parent, prefix=_hidden(path, "old")))
        os.replace(path, old / "dir")
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def exclusive(path: str | Path, check: Callable[[], None] = lambda: None) -> Iterator[None]:
    """``check()``, the missing parents and the lock around a job writing ``path``; the new
    parents are removed again when it fails."""
    path = Path(path)
    check()
    created = _make_parents(path)
    try:
        with output_lock(path):
            check()  # again under the lock: another writer may have finished meanwhile
            yield
    except BaseException:
        _remove_empty(created)
        raise


@contextlib.contextmanager
def atomic_directory(
    path: str | Path,
    overwrite: bool,
    is_ours: IsOurs,
    kind: str,
    inputs: Iterable[str | Path] = (),
) -> Iterator[Path]:
    """Yield a temporary folder; on success it becomes ``path`` (see the module docstring)."""
    path, inputs = Path(path), tuple(inputs)
    with exclusive(path, lambda: check_output(path, overwrite, is_ours, kind, inputs=inputs)):
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=_hidden(path, "tmp")))
        try:
            yield tmp
            _apply_umask(tmp)
            _swap_in(tmp, path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(
    path: str | Path, overwrite: bool = True, is_ours: IsOurs | None = None, kind: str = "lorq"
) -> Iterator[Path]:
    """Yield a temporary sibling file of ``path``; it replaces ``path`` when the block succeeds
    (an existing file only when ``is_ours`` recognises it, if given)."""
    path = Path(path)
    check = lambda: check_output(path, overwrite, is_ours, kind, directory=False)  # noqa: E731
    with exclusive(path, check):
        handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=_hidden(path, "tmp"))
        os.close(handle)
        try:
            yield Path(tmp)
            os.chmod(tmp, 0o666 & ~_umask())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

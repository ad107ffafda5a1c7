"""lorq.util.atomic: outputs checked before work, swapped in whole, one writer at a time.

Oracles: the bytes at the path (old or new, never neither), the files left in the parent folder,
the permission bits the umask gives, and the errors raised.
"""

import os
import stat
import threading
from pathlib import Path

import pytest

from lorq.util.atomic import (
    _swap_in,
    atomic_directory,
    atomic_file,
    check_output,
    has_magic,
    output_lock,
)


def is_ours(path: Path) -> bool:
    return (path / "ours").exists()


def write(path: Path, text: str, overwrite: bool = True) -> None:
    with atomic_directory(path, overwrite, is_ours, "test") as tmp:
        (tmp / "ours").write_text(text)
        (tmp / "ours").chmod(0o600)  # as safetensors creates its files


def test_replacing_swaps_whole_directories_and_leaves_nothing_beside(tmp_path):
    out = tmp_path / "out"
    write(out, "old")
    write(out, "new")
    assert (out / "ours").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_failed_write_keeps_the_old_output_and_new_parents_go(tmp_path):
    out = tmp_path / "out"
    write(out, "old")
    with pytest.raises(RuntimeError), atomic_directory(out, True, is_ours, "test") as tmp:
        (tmp / "ours").write_text("half")
        raise RuntimeError("disk full")
    assert (out / "ours").read_text() == "old"
    deep = tmp_path / "a" / "b" / "out"
    with pytest.raises(RuntimeError), atomic_directory(deep, False, is_ours, "test"):
        raise RuntimeError("killed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_swap_killed_between_two_renames_is_undone_by_the_next_write(tmp_path, monkeypatch):
    out = tmp_path / "out"
    write(out, "old")
    # the two-rename fallback, cut after its first rename (what a kill there leaves)
    monkeypatch.setattr("lorq.util.atomic._exchange", lambda a, b: False)
    monkeypatch.setattr("lorq.util.atomic.os.replace", _first_rename_only(os.replace))
    with pytest.raises(KeyboardInterrupt), atomic_directory(out, True, is_ours, "test") as tmp:
        (tmp / "ours").write_text("new")
    monkeypatch.undo()
    assert not out.exists() and any(p.name.startswith(".out.old-") for p in tmp_path.iterdir())
    with pytest.raises(ValueError, match="exists; pass overwrite"):
        write(out, "newer", overwrite=False)  # the old output is back, so it is not replaced
    assert (out / "ours").read_text() == "old"
    write(out, "newer")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def _first_rename_only(replace):
    calls = []

    def cut(a, b):
        calls.append(a)
        if len(calls) == 2:
            raise KeyboardInterrupt  # stands for the kill
        replace(a, b)

    return cut


def test_leftovers_of_killed_writes_are_removed(tmp_path):
    out = tmp_path / "out"
    (tmp_path / ".out.tmp-abc").mkdir()
    (tmp_path / ".out.tmp-abc" / "model.safetensors").write_bytes(b"half")
    (tmp_path / ".out.tmp-xyz").write_bytes(b"half file")
    write(out, "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_second_writer_is_refused_while_the_first_writes(tmp_path):
    out = tmp_path / "out"
    started, release = threading.Event(), threading.Event()

    def first():
        with atomic_directory(out, False, is_ours, "test") as tmp:
            (tmp / "ours").write_text("first")
            started.set()
            release.wait(10)

    thread = threading.Thread(target=first)
    thread.start()
    started.wait(10)
    with pytest.raises(ValueError, match="being written by another lorq process"):
        write(out, "second")
    release.set()
    thread.join()
    assert (out / "ours").read_text() == "first"
    with output_lock(out):  # released: the next writer gets it
        pass


def test_outputs_get_the_umask(tmp_path):
    previous = os.umask(0o022)
    try:
        write(tmp_path / "out", "x")
        with atomic_file(tmp_path / "f.json") as tmp:
            tmp.write_text("{}")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "out" / "ours").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "f.json").stat().st_mode) == 0o644


def test_a_file_output_replaces_only_its_own_kind(tmp_path):
    is_gguf = has_magic(b"GGUF")
    notes = tmp_path / "notes.gguf"
    notes.write_text("my notes")
    with (
        pytest.raises(ValueError, match="not a GGUF file"),
        atomic_file(notes, True, is_gguf, "GGUF"),
    ):
        pass
    notes.write_bytes(b"GGUF old")
    with atomic_file(notes, True, is_gguf, "GGUF") as tmp:
        tmp.write_bytes(b"GGUF new")
    assert notes.read_bytes() == b"GGUF new"


@pytest.mark.parametrize("where", ["same", "inside", "holds"])
def test_an_output_never_replaces_an_input(where, tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    out = {"same": model, "inside": model / "sub", "holds": tmp_path}[where]
    with pytest.raises(ValueError, match="input"):
        check_output(out, True, lambda p: True, "test", inputs=[model])


def test_room_and_writability_are_checked_before_work(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file, not a directory"):
        check_output(tmp_path / "file" / "out", False, is_ours, "test")
    with pytest.raises(ValueError, match="MB free"):
        check_output(tmp_path / "out", False, is_ours, "test", nbytes=10**18)
    assert list(tmp_path.iterdir()) == [tmp_path / "file"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_folder_is_refused_before_work(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    with pytest.raises(ValueError, match="not writable"):
        check_output(folder / "out", False, is_ours, "test")


def test_the_exchange_keeps_both_sides(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "x").write_text("new")
    (b / "x").write_text("old")
    _swap_in(a, b)
    assert (b / "x").read_text() == "new" and not a.exists()


def test_an_output_beside_a_gguf_source_is_allowed_its_folder_is_not(tmp_path):
    from lorq.io.models import ModelSource, local_files

    (tmp_path / "x.gguf").write_bytes(b"GGUF")
    inputs = local_files(ModelSource("x.gguf", str(tmp_path), "x.gguf"))
    check_output(tmp_path / "x-lorq", False, is_ours, "test", inputs=inputs)
    with pytest.raises(ValueError, match="input"):
        check_output(tmp_path, True, lambda p: True, "test", inputs=inputs)

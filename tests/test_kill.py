"""kill -9 at many moments: nothing that looks finished, the old output kept, a re-run completes.

Each test runs the real CLI in a child process (``python -m lorq``) and SIGKILLs it at a moment
seen from outside: a time after start, or when its hidden temporary output or a checkpoint
folder appears. Oracles: the path holds the old output or nothing (never a partial one), a
re-run of the same command succeeds, leaves no hidden leftovers, and gives the same bytes as an
uninterrupted run.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_cli import tiny_dir  # noqa: F401  (the module-scoped fixture)

TIMEOUT = 300


def lorq(*args, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "lorq", *map(str, args)],
        cwd=cwd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )


def finish(*args, cwd: Path) -> None:
    process = lorq(*args, cwd=cwd)
    _, err = process.communicate(timeout=TIMEOUT)
    assert process.returncode == 0, err.decode()


def kill_when(process: subprocess.Popen, seen, delay: float | None = None) -> bool:
    """SIGKILL ``process`` when ``seen()`` (or after ``delay`` s); False if it ended first."""
    start = time.monotonic()
    while process.poll() is None and time.monotonic() - start < TIMEOUT:
        if (delay is not None and time.monotonic() - start >= delay) or (seen and seen()):
            process.send_signal(signal.SIGKILL)
            process.wait()
            return True
        time.sleep(0.001)
    process.wait()
    return False


def hidden(folder: Path, name: str) -> list[Path]:
    return [p for p in folder.iterdir() if p.name.startswith(f".{name}.")]


def writing(folder: Path, name: str):
    """True once a hidden temporary output of ``name`` holds a file: the write is under way."""

    def seen() -> bool:
        try:
            return any(
                p.name.startswith(f".{name}.tmp-") and any(p.iterdir()) for p in folder.iterdir()
            )
        except OSError:  # removed meanwhile
            return False

    return seen


def tree(path: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()
    }


def weights(path: Path) -> bytes:
    return (path / "model.safetensors").read_bytes()


COMPRESS = ("compress", "--rank", "2", "--eval-blocks", "1", "--no-baseline")


@pytest.fixture(scope="module")
def reference(tiny_dir, tmp_path_factory):  # noqa: F811
    """An uninterrupted compress (rank 2) and finetune of the tiny model."""
    root = tmp_path_factory.mktemp("reference")
    finish(*COMPRESS, "--model", tiny_dir, "--out", root / "m", cwd=root)
    finish("finetune", root / "m", *FINETUNE, "--out", root / "ft", cwd=root)
    return root


@pytest.mark.parametrize("moment", ["working", "writing"])
def test_compress_killed_then_rerun(moment, tiny_dir, reference, tmp_path):  # noqa: F811
    out = tmp_path / "m"
    args = (*COMPRESS, "--model", tiny_dir, "--out", out)
    process = lorq(*args, cwd=tmp_path)
    if moment == "working":  # compressing or evaluating: no output yet
        assert kill_when(process, None, delay=3.0)
    else:
        kill_when(process, writing(tmp_path, "m"))
    assert not out.exists() or (out / "lorq.json").exists()  # nothing that looks finished
    finish(*args, cwd=tmp_path)
    assert weights(out) == weights(reference / "m")
    assert hidden(tmp_path, "m") == []  # leftovers of the killed run are gone


def test_overwrite_killed_keeps_old_or_new(tiny_dir, reference, tmp_path):  # noqa: F811
    out = tmp_path / "m"
    finish(*COMPRESS, "--model", tiny_dir, "--out", out, "--rank", "3", cwd=tmp_path)
    old = tree(out)
    args = (*COMPRESS, "--model", tiny_dir, "--out", out, "--overwrite")
    process = lorq(*args, cwd=tmp_path)
    kill_when(process, writing(tmp_path, "m"))  # the new output is being written
    now = tree(out)  # the path always holds a whole output
    assert now == old or weights(out) == weights(reference / "m")
    finish(*args, cwd=tmp_path)
    assert weights(out) == weights(reference / "m") and hidden(tmp_path, "m") == []


FINETUNE = ("--steps", "6", "--save-every", "2", "--seq-len", "32", "--batch-size", "2")


def test_finetune_killed_then_same_command_gives_the_same_bytes(reference, tmp_path):
    out = tmp_path / "ft"
    args = ("finetune", reference / "m", *FINETUNE, "--out", out)
    process = lorq(*args, cwd=tmp_path)
    folder = tmp_path / "ft-checkpoints" / "checkpoint-4"  # after checkpoint-2 is whole
    assert kill_when(process, folder.exists)  # while the Trainer writes it: it is skipped
    assert not out.exists()
    finish(*args, cwd=tmp_path)
    assert weights(out) == weights(reference / "ft")
    assert not (tmp_path / "ft-checkpoints").exists()


@pytest.mark.parametrize("verb", ["merge", "export"])
def test_merge_and_export_killed_then_rerun(verb, reference, tmp_path):
    out = tmp_path / "o"
    args = (verb, reference / "m", "--out", out)
    process = lorq(*args, cwd=tmp_path)
    kill_when(process, writing(tmp_path, "o"))
    assert not out.exists() or (out / "config.json").exists() or (out / "base").exists()
    finish(*args, cwd=tmp_path)
    assert out.is_dir() and hidden(tmp_path, "o") == []


def _small_disk(limit: int):
    """In the child: files may not grow past ``limit`` bytes (a full disk, as write() sees it)."""

    def limit_files() -> None:
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a kill
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return limit_files


def test_a_full_disk_is_one_line_and_leaves_nothing(tiny_dir, reference, tmp_path):  # noqa: F811
    out = tmp_path / "m"
    args = [sys.executable, "-m", "lorq", *map(str, COMPRESS), "--model", tiny_dir, "--out", out]
    result = subprocess.run(
        args, cwd=tmp_path, capture_output=True, text=True, timeout=TIMEOUT,
        preexec_fn=_small_disk(1_000_000),
    )  # fmt: skip
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert lines[-1].startswith("error:") and "too large" in lines[-1].lower(), lines
    assert list(tmp_path.iterdir()) == []  # no output, no temporary folder, no lock
    finish(*COMPRESS, "--model", tiny_dir, "--out", out, cwd=tmp_path)  # room again: it completes
    assert weights(out) == weights(reference / "m")

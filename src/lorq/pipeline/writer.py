"""A lorq directory written shard by shard, resumable after a crash or ``kill -9``.

    OUT/model-0000k-of-0000n.safetensors   shard k: the tensors outside the blocks (k = 1) or
                                           block k − 2, each written to a hidden file and renamed
    OUT/lorq-manifest.json                 the run's settings and every finished shard (its
                                           tensors, layers, size, sha256); replaced atomically
                                           after each shard
    OUT/model.safetensors.index.json, config.json, tokenizer, and lorq.json last (finished)

A directory without lorq.json is partial, whatever else it holds. ``--resume`` keeps the shards
whose size and sha256 match the manifest and recomputes the others; a partial run of other
settings is refused with the difference named. Shard contents depend only on the model and the
settings (not on the world size or on interruptions), so a resumed directory is byte-identical
to an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from lorq.io.safetensors import checksums
from lorq.util.atomic import check_not_input, exclusive

MANIFEST_FILE = "lorq-manifest.json"
MANIFEST_FORMAT = "lorq-partial"
LORQ_FILE = "lorq.json"
NO_ROOM = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")  # how Rust's io::Error shows its errno


def shard_names(count: int) -> list[str]:
    """transformers' shard names: model-00001-of-0000n.safetensors …"""
    return [f"model-{k:05d}-of-{count:05d}.safetensors" for k in range(1, count + 1)]


def sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _flat(settings: dict[str, Any]) -> dict[str, Any]:
    """{"group.key": value} two levels deep (deeper values compare whole)."""
    out: dict[str, Any] = {}
    for key, value in settings.items():
        if isinstance(value, dict):
            out.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            out[key] = value
    return out


FIRST = ("source", "config", "plan")  # named first: the model before the settings


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """'key: old → new' of every setting that differs, the source's and config's first."""
    a, b = _flat(old), _flat(new)
    keys = [k for k in set(a) | set(b) if a.get(k) != b.get(k)]
    rank = {top: i for i, top in enumerate(FIRST)}
    keys.sort(key=lambda k: (rank.get(k.split(".")[0], len(FIRST)), k))
    return [f"{k}: {_short(a.get(k))} → {_short(b.get(k))}" for k in keys]


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _read_manifest(out: Path) -> dict[str, Any] | None:
    file = out / MANIFEST_FILE
    if not file.is_file():
        return None
    try:
        manifest = json.loads(file.read_text())
    except ValueError:
        return None  # a manifest is only ever replaced whole; unreadable: not ours to resume
    return (
        manifest
        if isinstance(manifest, dict) and manifest.get("format") == MANIFEST_FORMAT
        else None
    )


def _clear(out: Path) -> None:
    """Empty ``out``, lorq.json first (from then on it no longer looks finished)."""
    (out / LORQ_FILE).unlink(missing_ok=True)
    for child in out.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


class ShardWriter:
    """The shards of one run in ``out``; ``finished`` are those already written and verified.
    Only an ``active`` writer (rank 0 of a distributed run) touches the disk."""

    def __init__(
        self, out: Path, settings: dict[str, Any], finished: dict[str, dict], active: bool = True
    ):
        self.out = out
        self.settings = settings
        self.shards: dict[str, dict] = dict(finished)
        self.active = active

    @property
    def finished(self) -> set[str]:
        return set(self.shards)

    def write(self, shard: str, tensors: dict[str, torch.Tensor], record: dict[str, Any]) -> None:
        """Write ``shard`` (hidden file, then renamed) and record it in the manifest."""
        if not self.active:
            self.shards[shard] = record
            return
        final = self.out / shard
        tmp = self.out / f".{shard}.tmp"
        with _room(tmp, sum(t.numel() * t.element_size() for t in tensors.values())):
            save_file(tensors, tmp, metadata={"format": "pt"})
            _fsync(tmp)
            os.replace(tmp, final)
        whole, tensors = checksums(final)
        self.shards[shard] = {
            **record,
            "size": final.stat().st_size,
            "sha256": whole,
            "tensor_sha256": tensors,
        }
        self.save_manifest()

    def save_manifest(self) -> None:
        manifest = {"format": MANIFEST_FORMAT, "settings": self.settings, "shards": self.shards}
        write_json(self.out / MANIFEST_FILE, manifest)


def write_json(file: Path, value: Any) -> None:
    """``file`` replaced atomically by ``value`` as JSON (sorted keys: the same bytes each run)."""
    tmp = file.parent / f".{file.name}.tmp"
    with _room(tmp, 0):
        tmp.write_text(json.dumps(value, indent=1, sort_keys=True, default=str))
        _fsync(tmp)
        os.replace(tmp, file)


def _fsync(file: Path) -> None:
    fd = os.open(file, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _errno(err: Exception) -> int | None:
    """An OSError's errno, or the one safetensors' writer names ("... (os error 28)")."""
    if isinstance(err, OSError):
        return err.errno
    found = RUST_OS_ERROR.search(str(err))
    return int(found.group(1)) if found else None


@contextlib.contextmanager
def _room(tmp: Path, nbytes: int) -> Iterator[None]:
    """A write that fails removes its hidden file; one that runs out of disk (an OSError, or
    the SafetensorError safetensors raises for it) says so in one line."""
    try:
        yield
    except (OSError, SafetensorError) as err:
        tmp.unlink(missing_ok=True)
        number = _errno(err)
        if number in NO_ROOM:
            raise OSError(
                number,
                f"no room on the disk ({nbytes / 2**20:.1f} MiB to write); free space and re-run "
                "with --resume: the finished shards are kept",
                str(tmp.parent / tmp.name.strip(".").removesuffix(".tmp")),
            ) from None
        raise


def _verified(out: Path, shards: dict[str, dict]) -> dict[str, dict]:
    """The manifest's shards whose file has the recorded size and sha256."""
    good = {}
    for name, record in shards.items():
        file = out / name
        if (
            file.is_file()
            and file.stat().st_size == record.get("size")
            and sha256(file) == record.get("sha256")
        ):
            good[name] = record
    return good


def _hint(out: Path, manifest: dict, settings: dict) -> str:
    done = len(manifest.get("shards", {}))
    diff = differences(manifest.get("settings", {}), settings)
    if diff:
        return (
            f"{out} holds a partial run of other settings ({'; '.join(diff[:4])}); choose another "
            "output or pass overwrite=True (--overwrite) to start again"
        )
    return (
        f"{out} holds a partial run of the same model and settings ({done} shards finished); pass "
        "resume=True (--resume) to finish it, or overwrite=True (--overwrite) to start again"
    )


def _prepared(out: Path, settings: dict, resume: bool, overwrite: bool) -> dict[str, dict]:
    """Check ``out`` for this run and return its verified finished shards (see module doc)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} exists and is a file, not a lorq directory; choose another")
    if not out.exists() or not any(out.iterdir()):
        out.mkdir(parents=True, exist_ok=True)
        return {}
    manifest = _read_manifest(out)
    finished = (out / LORQ_FILE).is_file()
    if manifest is None and not finished:
        raise ValueError(f"{out} exists and is not a lorq directory; choose another output")
    if overwrite:
        _clear(out)
        return {}
    if manifest is None or not resume or differences(manifest.get("settings", {}), settings):
        if finished and manifest is None:
            raise ValueError(f"{out} exists; pass overwrite=True (--overwrite) to replace it")
        raise ValueError(_hint(out, manifest or {}, settings))
    return _verified(out, manifest.get("shards", {}))


@contextlib.contextmanager
def shard_writer(
    out: str | Path, settings: dict[str, Any], resume: bool, overwrite: bool, inputs=(), world=None
) -> Iterator[ShardWriter]:
    """The writer of a run into ``out``, under ``out``'s lock; hidden leftovers of killed writes
    are removed first. In a distributed run rank 0 prepares ``out`` and tells the others which
    shards are finished (or the error that stops them all)."""
    from lorq.util import dist

    out, world = Path(out), world or dist.World()
    if not world.is_writer:
        finished = dist.broadcast(None, 0, world)
        if isinstance(finished, str):
            raise ValueError(finished)
        yield ShardWriter(out, settings, finished, active=False)
        return
    check_not_input(out, inputs)
    with exclusive(out):
        try:
            finished = _prepared(out, settings, resume, overwrite)
        except (ValueError, OSError) as err:
            dist.broadcast(str(err), 0, world)
            raise
        dist.broadcast(finished, 0, world)
        for left in out.glob(".*.tmp"):
            left.unlink()
        writer = ShardWriter(out, settings, finished)
        if not finished:
            (out / LORQ_FILE).unlink(missing_ok=True)
        writer.save_manifest()
        yield writer

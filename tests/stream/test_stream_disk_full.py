"""A streaming run that runs out of disk: a real OS-level fault, no mock. The CLI runs in a child
process whose file size limit (RLIMIT_FSIZE, SIGXFSZ ignored) lets the first shards be written
and makes the write of a larger, later one fail with EFBIG, as a full disk fails a write.

Oracles: the error text and exit code (one line, 2, no traceback), the directory afterwards (no
lorq.json, no hidden leftovers, a manifest of the complete shards only) and an uninterrupted
run's files (``--resume`` without the limit gives the same sha256 for every file).
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

from conftest import tiny_causal
from test_cli import run

from lorq.pipeline.writer import MANIFEST_FILE
from lorq.quant.base import preset

ROOT = Path(__file__).resolve().parents[2]
LIMIT = 600_000  # bytes per file: shard 1 (~264 kB) and the nf2 blocks (~359 kB) fit, nf8 not
FLAGS = ["--stream", "--device", "cpu", "--eval-blocks", "0", "--no-baseline", "--method",
         "plain", "--weighting", "none"]  # fmt: skip


def checkpoint(folder: Path) -> Path:
    """A 4-block LLaMA (hidden 256) saved as safetensors."""
    model = tiny_causal("llama", 0, num_hidden_layers=4, hidden_size=256, intermediate_size=512,
                        num_attention_heads=4, num_key_value_heads=4)  # fmt: skip
    model.save_pretrained(folder)
    return folder


def growing_plan(src: Path, file: Path) -> Path:
    """A plan (``lorq plan``'s JSON) with NF2 in blocks 0–2 and NF8 in block 3: the last shard
    is the largest."""
    done = run("plan", "--model", src, "--budget", "2.5", "--method", "plain", "--weighting",
               "none", "--out", file)  # fmt: skip
    assert done.exit_code == 0, done.output
    plan = json.loads(file.read_text())
    for entry in plan["entries"]:
        entry["config"] = preset("nf8" if ".layers.3." in entry["name"] else "nf2").to_dict()
    file.write_text(json.dumps(plan))
    return file


def no_larger_files_than(limit: int):
    """preexec_fn: writes past ``limit`` bytes fail with EFBIG instead of killing the process."""

    def limited() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    return limited


def compress(src: Path, plan: Path, out: Path, *extra: str, limit: int | None = None):
    command = [sys.executable, "-m", "lorq", "compress", "--model", str(src), "--plan", str(plan),
               *FLAGS, *extra, "--out", str(out)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1",
           "PYTHONDONTWRITEBYTECODE": "1", "COLUMNS": "200"}  # fmt: skip
    preexec = no_larger_files_than(limit) if limit else None
    return subprocess.run(
        command, env=env, capture_output=True, text=True, cwd=ROOT, preexec_fn=preexec, timeout=300
    )


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_disk_full_is_one_line_then_resume_is_byte_identical(tmp_path):
    """EFBIG on the last shard: exit code 2, one error line naming the lack of room and
    --resume, nothing that looks finished, no hidden files, the manifest lists the written
    shards; --resume (no limit) then gives an uninterrupted run's bytes, every file."""
    src = checkpoint(tmp_path / "src")
    plan = growing_plan(src, tmp_path / "plan.json")
    whole = compress(src, plan, tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr
    sizes = {p.name: p.stat().st_size for p in (tmp_path / "whole").glob("model-*")}
    fits = sorted(name for name, size in sizes.items() if size <= LIMIT)
    assert fits == sorted(sizes)[:-1]  # the premise: only the last shard is too large

    full = compress(src, plan, tmp_path / "out", limit=LIMIT)
    assert full.returncode == 2, full.stderr
    text = full.stdout + full.stderr
    assert "Traceback" not in text
    errors = [line for line in text.splitlines() if "error" in line.lower()]
    assert len(errors) == 1, text
    assert "no room on the disk" in errors[0] and "--resume" in errors[0], errors[0]
    out = tmp_path / "out"
    assert not (out / "lorq.json").exists()
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    written = fits[1:]  # the blocks before the last; shard 1 (outside the blocks) comes last
    assert sorted(manifest["shards"]) == written
    assert sorted(p.name for p in out.glob("model-*")) == written

    resumed = compress(src, plan, out, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert f"{len(written)} finished shards kept, 2 computed" in resumed.stdout
    assert digests(out) == digests(tmp_path / "whole")

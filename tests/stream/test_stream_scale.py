"""Streaming compression of a checkpoint of realistic size stays below the checkpoint's size in
memory. Oracle: the kernel's peak resident set size of the compressing process
(``/usr/bin/time -v``'s "Maximum resident set size") against the checkpoint's bytes on disk, and
lorq.load's own header checks of what it wrote (io.verify against lorq.json).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lorq.io.native import INDEX_FILE, read_meta, weight_files
from lorq.io.verify import check_header, read_header

ROOT = Path(__file__).resolve().parents[2]
TIME = "/usr/bin/time"
sys.path.insert(0, str(ROOT / "bench"))
from synthetic import SHAPES, write_llama_checkpoint  # noqa: E402

FLAGS = ["--stream", "--device", "cpu", "--eval-blocks", "0", "--no-baseline", "--method",
         "plain", "--quant", "nf4", "--rank", "16", "--weighting", "none"]  # fmt: skip


def peak_rss(report: str) -> int:
    """Bytes of /usr/bin/time -v's "Maximum resident set size (kbytes)"."""
    found = re.search(r"Maximum resident set size \(kbytes\): (\d+)", report)
    assert found, report[-2000:]
    return int(found.group(1)) * 1024


@pytest.mark.scale
@pytest.mark.skipif(not os.access(TIME, os.X_OK), reason="needs GNU time (/usr/bin/time -v)")
def test_peak_rss_stays_below_the_checkpoint(tmp_path):
    """A 2.2 GB bf16 LLaMA-shaped checkpoint (TinyLlama-1.1B's shape: hidden 2048, intermediate
    5632, 22 layers, vocab 32000) compressed with --stream on the CPU: the process's peak RSS is
    below the checkpoint's bytes on disk, and the directory is finished and consistent."""
    src, out = tmp_path / "ckpt", tmp_path / "out"
    write_llama_checkpoint(src, SHAPES["1b"], shard_bytes=500 * 10**6)
    ckpt_bytes = sum(p.stat().st_size for p in src.glob("*.safetensors"))
    assert ckpt_bytes >= 2 * 2**30
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    command = [TIME, "-v", sys.executable, "-m", "lorq", "compress", "--model", str(src), *FLAGS,
               "--out", str(out)]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    rss = peak_rss(done.stderr)
    print(f"\npeak RSS {rss / 2**30:.2f} GiB, checkpoint {ckpt_bytes / 2**30:.2f} GiB")
    assert rss < ckpt_bytes
    meta = read_meta(out)  # lorq.json, written last: the run finished
    header = {}
    for file in weight_files(out):
        header.update(read_header(file))
    check_header(meta, header, out / INDEX_FILE)
    assert set(json.loads((out / INDEX_FILE).read_text())["weight_map"]) == set(header)
    shutil.rmtree(src)

"""What verifying a lorq directory's checksums costs when it is loaded.

For each directory: ``lorq.load`` timed whole, and its checksum step alone
(``lorq.io.verify.check_checksums``: each weight file's size, then its sha256, the files hashed
by as many threads as there are cores; the tensors' own digests are computed only for a file
that fails, to name the damaged tensor), each the median of ``--repeat`` runs after one warm-up (the
files in the page cache, as a second load finds them). Directories:

- ``smollm2``: the built-in model compressed by plain NF4 (``lorq compress --method plain
  --quant nf4 --weighting none --eval-blocks 0``), one model.safetensors;
- ``1b``: the synthetic TinyLlama-1.1B shape (bench/synthetic.py) compressed the same way,
  written block by block (``--stream``): 23 shards.

    python bench/integrity.py smollm2 1b

Results: bench/results/integrity.json and a table on stdout.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import synthetic

import lorq
from lorq.io.native import read_meta, weight_files
from lorq.io.verify import check_checksums

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "integrity.json"
FLAGS = ["--method", "plain", "--quant", "nf4", "--weighting", "none", "--eval-blocks", "0"]


def compressed(name: str, work: Path) -> Path:
    """The directory of ``name`` (made once)."""
    out = work / f"{name}-nf4"
    if (out / "lorq.json").exists():
        return out
    model = "smollm2"
    extra: list[str] = []
    if name == "1b":
        model = str(work / "ckpt-1b")
        if not (work / "ckpt-1b" / "config.json").exists():
            synthetic.write_llama_checkpoint(work / "ckpt-1b", "1b")
        extra = ["--stream", "--no-baseline"]
    command = [sys.executable, "-m", "lorq", "compress", "--model", model, *FLAGS, *extra,
               "--out", str(out), "--overwrite"]  # fmt: skip
    subprocess.run(command, check=True, capture_output=True)
    return out


def timed(call, repeat: int) -> float:
    call()  # warm-up: the files in the page cache
    seconds = []
    for _ in range(repeat):
        start = time.perf_counter()
        call()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def row(name: str, work: Path, repeat: int) -> dict:
    path = compressed(name, work)
    meta, files = read_meta(path), weight_files(path)
    verify = timed(lambda: check_checksums(meta, path, files), repeat)
    load = timed(lambda: lorq.load(path), repeat)
    size = sum(f.stat().st_size for f in files)
    result = {"model": name, "files": len(files), "bytes": size, "load_s": load}
    result.update(verify_s=verify, share=verify / load, gb_per_s=size / verify / 1e9)
    print(result, flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="*", default=["smollm2", "1b"])
    parser.add_argument("--work", type=Path, default=Path("/work/scale-out/integrity"))
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    rows = [row(name, args.work, args.repeat) for name in args.models]
    RESULTS.write_text(json.dumps({"rows": rows}, indent=1))
    print("| model | files | MB | load s | checksums s | share of the load | GB/s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        cells = [r["model"], r["files"], f"{r['bytes'] / 1e6:.0f}", f"{r['load_s']:.2f}"]
        cells += [f"{r['verify_s']:.2f}", f"{100 * r['share']:.0f} %", f"{r['gb_per_s']:.2f}"]
        print("| " + " | ".join(map(str, cells)) + " |")


if __name__ == "__main__":
    main()

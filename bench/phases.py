"""Peak memory of each phase of ``lorq compress``: loading, each evaluation, each compression,
saving (Linux: the process's VmHWM, reset through /proc/self/clear_refs when a phase starts).

The CLI runs in this process exactly as ``lorq compress ARGS`` would, with the library's loading,
compression, evaluation and save functions (what ``lorq.compress_model`` and ``lorq.save`` call)
wrapped to record RSS at their start, their peak and their end (anonymous and file-backed RSS at
the end, from /proc/self/status).

Its own ``peak_mb`` is the job's peak: ``/usr/bin/time -v`` around this script reports less,
since resetting VmHWM also resets the high-water mark the kernel reports at exit.

    python bench/phases.py                      # the default job, into /tmp/bench-phases
    python bench/phases.py -- --eval-blocks 4   # extra arguments go to lorq compress
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import sys
import time
from pathlib import Path

MB = 1024  # /proc/self/status counts kB
FIELDS = ("VmRSS", "VmHWM", "RssAnon", "RssFile")


def status() -> dict[str, float]:
    """RSS fields of this process in MB."""
    text = Path("/proc/self/status").read_text()
    values = dict(re.findall(r"(\w+):\s+(\d+) kB", text))
    return {key: int(values[key]) / MB for key in FIELDS}


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS


def recording(phases: list[dict], module, name: str) -> None:
    """Wrap ``module.name`` so that every call appends its phase's RSS to ``phases``."""
    function = getattr(module, name)

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        reset_peak()
        start, began = status(), time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            end = status()
            phases.append(
                {
                    "phase": name,
                    "seconds": time.perf_counter() - began,
                    "start_mb": start["VmRSS"],
                    "peak_mb": end["VmHWM"],
                    "end_mb": end["VmRSS"],
                    "end_anon_mb": end["RssAnon"],
                    "end_file_mb": end["RssFile"],
                }
            )

    setattr(module, name, wrapper)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results/phases.json"))
    parser.add_argument("compress_args", nargs="*", help="after --: arguments of lorq compress")
    args = parser.parse_args()
    if not Path("/proc/self/clear_refs").exists():
        sys.exit("bench/phases.py needs Linux (/proc/self/clear_refs)")

    import importlib

    from lorq.cli import app

    names = ("lorq.jobs.compress_run", "lorq.evaluation.measure", "lorq.io", "lorq.io.models")
    compress, evaluate, io, models = map(importlib.import_module, names)

    after_imports = status()
    phases: list[dict] = []
    for module, name in (
        (models, "load_model"),
        (compress, "run_pipeline"),
        (evaluate, "evaluate_model"),
        (io, "save"),
    ):
        recording(phases, module, name)
    command = ["compress", "--out", "/tmp/bench-phases", "--overwrite", *args.compress_args]
    app(command, standalone_mode=False)
    result = {"command": "lorq " + " ".join(command), "after_imports": after_imports}
    result |= {"phases": phases, "peak_mb": max(p["peak_mb"] for p in phases)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"after imports: {after_imports['VmRSS']:.1f} MB (anon {after_imports['RssAnon']:.1f})")
    print("| phase | seconds | start MB | peak MB | end MB | end anon MB | end file MB |")
    print("|---|---|---|---|---|---|---|")
    for p in phases:
        print(
            f"| {p['phase']} | {p['seconds']:.1f} | {p['start_mb']:.1f} | {p['peak_mb']:.1f} | "
            f"{p['end_mb']:.1f} | {p['end_anon_mb']:.1f} | {p['end_file_mb']:.1f} |"
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

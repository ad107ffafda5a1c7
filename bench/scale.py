"""Memory and time of streaming ``lorq compress`` on synthetic 1B–7B LLaMA checkpoints.

For each shape: the checkpoint (bench/synthetic.py, under /work/scale-ckpt by default) is written
when absent, then ``lorq compress --model CKPT --stream ...`` runs as a subprocess under
``/usr/bin/time -v`` (its "Maximum resident set size" and "Elapsed (wall clock) time": for
torchrun, the largest single process); the summed RSS of its whole process tree is also sampled
every 0.5 s from /proc (for torchrun: launcher and workers together). Optional rows:

- ``--resume-test``: a second run is SIGKILLed (its whole process tree) once the output's
  ``lorq-manifest.json`` lists half the shards the uninterrupted run wrote, then the same command
  with ``--resume`` instead of ``--overwrite`` finishes it. Overhead =
  (resumed wall − remaining work) / remaining work, remaining work = the uninterrupted run's wall
  × (shards left / shards); the uninterrupted run's time from k shards listed to its end is
  reported as a second estimate.
- ``--world-sizes 1 2``: ``torchrun --standalone --nproc-per-node 2 -m lorq compress ...`` with
  the same arguments and OMP_NUM_THREADS = --threads / 2 per process: its wall time against one
  process with --threads threads, and whether every output file (sha256) equals that of one
  process with as many threads as each worker (a run added for it) and of the first one.

    python bench/scale.py                            # 1b 3b 7b
    python bench/scale.py 1b --resume-test --world-sizes 1 2
    python bench/scale.py 7b --method lq --quant nf3 --rank 64 -- --some-extra-flag

Outputs go to /work/scale-out/SHAPE/w{processes}t{threads}; rows are merged into
bench/results/scale.json by (shape, kind, processes, threads).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import hashlib
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import synthetic

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results" / "scale.json"
MANIFEST = "lorq-manifest.json"
GB = 1e9
PAGE = os.sysconf("SC_PAGE_SIZE")
TRACE_S = 2.0
TICKS = os.sysconf("SC_CLK_TCK")


def parse_time_v(text: str) -> dict:
    """Peak RSS (bytes), wall and CPU (user + system) time (s) from GNU time's ``-v`` report."""
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    cpu = [float(t) for t in re.findall(r"(?:User|System) time \(seconds\): ([\d.]+)", text)]
    wall = re.search(r"Elapsed \(wall clock\) time \([^)]*\): ([\d:.]+)", text)
    status = re.search(r"Exit status: (\d+)", text)
    seconds = None
    if wall:
        seconds = 0.0
        for part in wall.group(1).split(":"):
            seconds = seconds * 60 + float(part)
    return {
        "max_rss_bytes": int(rss.group(1)) * 1024 if rss else None,
        "wall_s": seconds,
        "cpu_s": sum(cpu) if len(cpu) == 2 else None,
        "exit_status": int(status.group(1)) if status else None,
    }


def process_tree(root: int) -> list[int]:
    """``root`` and its live descendants (torchrun's workers run in sessions of their own, so a
    process group would miss them)."""
    children: dict[int, list[int]] = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(proc.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo += children.get(pid, [])
    return tree


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of process ``pid`` so far (None: gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime


def tree_rss(pids: list[int]) -> int:
    """Summed resident bytes of those of ``pids`` still alive."""
    total = 0
    for pid in pids:
        try:
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
        except (OSError, IndexError, ValueError):
            continue
    return total


def kill_tree(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            continue


def manifest_shards(out: Path) -> int | None:
    """How many shards the output's manifest lists (None: no readable manifest yet)."""
    try:
        return len(json.loads((out / MANIFEST).read_text())["shards"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


@dataclass
class Watch:
    """What :func:`run_timed` follows while a run is alive, and when it kills it."""

    out: Path | None = None  # the output folder whose manifest is read
    kill_at: int | None = None  # SIGKILL once the manifest lists this many shards
    max_rss: float | None = None  # SIGKILL once the process tree holds more bytes than this
    peak: int = 0
    timeline: dict = field(default_factory=dict)  # shards -> (seconds, tree RSS bytes)
    trace: list = field(default_factory=list)  # (seconds, tree RSS bytes) every TRACE_S
    killed: str | None = None  # why the run was killed
    on_shard: Any = None  # called with the Watch and the seconds when a new shard appears
    cpu: dict = field(default_factory=dict)  # pid -> CPU seconds when last seen

    @property
    def cpu_s(self) -> float:
        return sum(self.cpu.values())

    def poll(self, root: int, seconds: float) -> None:
        pids = process_tree(root)
        rss = tree_rss(pids)
        self.peak = max(self.peak, rss)
        for pid in pids:
            self.cpu[pid] = cpu_seconds(pid) or self.cpu.get(pid, 0.0)
        if not self.trace or seconds - self.trace[-1][0] >= TRACE_S:
            self.trace.append((round(seconds, 1), rss))
        shards = manifest_shards(self.out) if self.out else None
        if shards is not None and shards not in self.timeline:
            self.timeline[shards] = (round(seconds, 2), rss)
            if self.on_shard:
                self.on_shard(self, seconds)
        if self.killed is None:
            if self.kill_at is not None and (shards or 0) >= self.kill_at:
                self.killed = f"{shards} shards listed"
            elif self.max_rss is not None and rss > self.max_rss:
                self.killed = f"RSS {rss / GB:.2f} GB over the {self.max_rss / GB:.1f} GB cap"
            if self.killed:
                kill_tree(pids)

    def finish(self, seconds: float) -> None:
        shards = manifest_shards(self.out) if self.out else None
        if shards is not None and shards not in self.timeline:
            self.timeline[shards] = (round(seconds, 2), None)


def run_timed(cmd: list[str], log: Path, env: dict, watch: Watch | None = None) -> dict:
    """Run ``cmd`` under ``/usr/bin/time -v``, output to ``log``, polling ``watch`` every
    0.5 s (the summed RSS of the process tree, the manifest's shard count). Returns the run's
    measurements."""
    watch = watch or Watch()
    timefile = log.with_suffix(".time")
    timefile.unlink(missing_ok=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    load_before, began = os.getloadavg()[0], time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(
            ["/usr/bin/time", "-v", "-o", str(timefile), *cmd],
            stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO,
        )  # fmt: skip
        while proc.poll() is None:
            watch.poll(proc.pid, time.perf_counter() - began)
            time.sleep(0.5)
    seconds = time.perf_counter() - began
    watch.finish(seconds)
    timed = parse_time_v(timefile.read_text()) if timefile.exists() else {}
    return {
        "command": cmd,
        "returncode": proc.returncode,
        "killed": watch.killed,
        "wall_s": timed.get("wall_s") or seconds,
        "cpu_s": timed.get("cpu_s") or watch.cpu_s,  # sampled: to the last poll
        "max_rss_bytes": timed.get("max_rss_bytes"),
        "tree_peak_rss_bytes": watch.peak,
        "timeline": {str(k): list(v) for k, v in sorted(watch.timeline.items())},
        "rss_trace": [list(point) for point in watch.trace],
        "load_1min": [load_before, os.getloadavg()[0]],  # other work on the machine
        "log": str(log),
    }


def rss_per_shard(timeline: dict) -> float | None:
    """Least-squares slope of the tree's RSS (bytes) over the block shards (2, 3, …) listed."""
    points = [(int(k), v[1]) for k, v in timeline.items() if int(k) >= 2 and v[1] is not None]
    if len(points) < 3:
        return None
    mx = sum(x for x, _ in points) / len(points)
    my = sum(y for _, y in points) / len(points)
    var = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / var


def compress_args(ckpt: Path, out: Path, args, resume: bool = False) -> list[str]:
    """``lorq compress`` arguments after the module name (the benchmark's fixed settings)."""
    return [
        "compress", "--model", str(ckpt), "--out", str(out), "--stream", "--device", "cpu",
        "--eval-blocks", "0", "--no-baseline", "--method", args.method, "--quant", args.quant,
        "--rank", str(args.rank), "--weighting", "none", "--rounding", "nearest",
        "--resume" if resume else "--overwrite", *args.extra,
    ]  # fmt: skip


def launcher(world: int) -> list[str]:
    python = Path(sys.executable)
    if world == 1:
        return [str(python), "-m", "lorq"]
    torchrun = python.with_name("torchrun")
    return [str(torchrun), "--standalone", "--nproc-per-node", str(world), "-m", "lorq"]


def environment(threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env["PYTHONPATH"] = str(REPO / "src") + os.pathsep + env.get("PYTHONPATH", "")
    return env


def dir_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def digests(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder``, by relative path."""
    result = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                h.update(chunk)
        result[str(path.relative_to(folder))] = h.hexdigest()
    return result


def ensure_checkpoint(shape: str, root: Path, logs: Path) -> dict:
    """The shape's checkpoint folder, written by bench/synthetic.py when it has no index yet;
    the write's measurements are kept next to it in ``SHAPE.write.json``."""
    ckpt, record = root / shape, root / f"{shape}.write.json"
    if not (ckpt / "model.safetensors.index.json").exists():
        cmd = [sys.executable, str(HERE / "synthetic.py"), shape, "--out", str(ckpt)]
        run = run_timed(cmd, logs / f"write-{shape}.log", environment(os.cpu_count() or 1))
        if run["returncode"] != 0:
            raise RuntimeError(f"writing {shape} failed, see {run['log']}")
        record.write_text(json.dumps(run, indent=2) + "\n")
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())["metadata"]
    written = json.loads(record.read_text()) if record.exists() else {}
    layers = json.loads((ckpt / "config.json").read_text())["num_hidden_layers"]
    return {
        "path": ckpt,
        "expected_shards": layers + 1,  # embeddings, norm and head; then one per block
        "params": index["total_parameters"],
        "ckpt_bytes": index["total_size"],
        "write_s": written.get("wall_s"),
        "write_peak_rss_bytes": written.get("max_rss_bytes"),
    }


def compress_row(shape: str, ckpt: dict, args, world: int, threads: int) -> dict:
    """One full run of ``world`` processes with ``threads`` threads each, into
    OUT_ROOT/SHAPE/w{world}t{threads}."""
    out = run_dir(args, shape, world, threads)
    sidecar = out.with_name(f"{out.name}.segments.json")
    segments = _earlier_segments(out, sidecar) if args.continue_killed else []
    if not segments:
        shutil.rmtree(out, ignore_errors=True)  # an earlier run's manifest would read as progress
    source = source_state()
    log = args.logs / f"compress-{shape}-w{world}t{threads}.log"
    while True:
        resume = bool(segments)
        cmd = [*launcher(world), *compress_args(ckpt["path"], out, args, resume)]
        record = functools.partial(_record_segment, sidecar, list(segments), cmd)
        watch = Watch(out, max_rss=args.max_rss_gb * GB, on_shard=record)
        segments.append(
            run_timed(cmd, log.with_suffix(f".{len(segments)}.log"), environment(threads), watch)
        )
        if not _killed_from_outside(segments, args.continue_killed):
            break
    sidecar.unlink(missing_ok=True)
    row = _row(shape, "compress", world, threads, ckpt, _joined(segments))
    row["out_bytes"] = dir_bytes(out) if out.exists() else None
    row["shards"] = manifest_shards(out)
    row["source"] = source
    return row


def _earlier_segments(out: Path, sidecar: Path) -> list[dict]:
    """The segments of a run of this benchmark killed with this one (the sidecar written at each
    shard) when ``out`` holds its unfinished output; else none."""
    if sidecar.exists() and manifest_shards(out) and not (out / "lorq.json").exists():
        return json.loads(sidecar.read_text())
    sidecar.unlink(missing_ok=True)
    return []


def _record_segment(sidecar: Path, before: list[dict], cmd: list[str], watch, seconds) -> None:
    """Save the segments so far, the running one as if killed now, for a later --continue-killed
    (the benchmark itself may be killed with its run)."""
    running = {
        "command": cmd, "returncode": -9, "killed": None, "wall_s": seconds,
        "cpu_s": watch.cpu_s,
        "max_rss_bytes": None, "tree_peak_rss_bytes": watch.peak,
        "timeline": {str(k): list(v) for k, v in sorted(watch.timeline.items())},
        "rss_trace": [list(point) for point in watch.trace], "log": "(killed with the benchmark)",
    }  # fmt: skip
    sidecar.write_text(json.dumps([*before, running]))


def _killed_from_outside(segments: list[dict], allowed: int) -> bool:
    """Whether the last run died of a signal it was not sent by this benchmark, after adding
    shards, and may be finished with --resume (at most ``allowed`` times)."""
    last = segments[-1]
    shards = [max(map(int, s["timeline"]), default=0) for s in segments]
    grew = len(shards) == 1 or shards[-1] > shards[-2]
    signalled = last["returncode"] < 0 or last["returncode"] > 128  # time's or the job's death
    return signalled and not last["killed"] and grew and len(segments) <= allowed


def _joined(segments: list[dict]) -> dict:
    """One run's measurements from a run and the --resume runs that finished it: walls added,
    peaks the largest, each segment kept."""
    last = segments[-1]
    if len(segments) == 1:
        return last
    keys = ("wall_s", "cpu_s", "max_rss_bytes", "tree_peak_rss_bytes", "returncode", "killed")
    timeline, trace, offset = {}, [], 0.0
    for s in segments:
        for k, (t, rss) in s["timeline"].items():
            timeline.setdefault(k, [round(t + offset, 2), rss])
        trace += [[round(t + offset, 1), rss] for t, rss in s["rss_trace"]]
        offset += s["wall_s"]
    return last | {
        "timeline": timeline,
        "rss_trace": trace,
        "wall_s": offset,
        "cpu_s": sum(s.get("cpu_s") or 0 for s in segments),
        "max_rss_bytes": max(s["max_rss_bytes"] or 0 for s in segments),
        "tree_peak_rss_bytes": max(s["tree_peak_rss_bytes"] for s in segments),
        "segments": [
            {k: s.get(k) for k in keys} | {"shards": list(s["timeline"])[-1:]} for s in segments
        ],
    }


def source_state() -> dict:
    """The commit the run used and the files under src/ that differed from it (the working tree
    is shared: a run uses what src/ holds when it starts)."""
    git = ["git", "-C", str(REPO)]
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    status = subprocess.run(
        [*git, "status", "--porcelain", "--", "src"], capture_output=True, text=True
    )
    return {"head": head.stdout.strip(), "src_changes": status.stdout.splitlines()}


def run_dir(args, shape: str, world: int, threads: int) -> Path:
    return args.out_root / shape / f"w{world}t{threads}"


def _row(shape: str, kind: str, world: int, threads: int, ckpt: dict, run: dict) -> dict:
    params = ckpt["params"]
    return {
        "shape": shape,
        "kind": kind,
        "world_size": world,
        "threads": threads,
        "params": params,
        "ckpt_bytes": ckpt["ckpt_bytes"],
        "write_s": ckpt["write_s"],
        "peak_rss_bytes": run["max_rss_bytes"],
        "tree_peak_rss_bytes": run["tree_peak_rss_bytes"],
        "wall_s": run["wall_s"],
        "us_per_param": run["wall_s"] / params * 1e6,
        "cpu_s": run.get("cpu_s"),
        "cpu_us_per_param": (run.get("cpu_s") or 0) / params * 1e6,
        "ok": run["returncode"] == 0,
        "returncode": run["returncode"],
        "killed": run["killed"],
        "expected_shards": ckpt["expected_shards"],
        "rss_per_shard_bytes": rss_per_shard(run["timeline"]),
        "timeline": run["timeline"],
        "rss_trace": run["rss_trace"],
        "segments": run.get("segments"),
        "load_1min": run["load_1min"],
        "command": " ".join(run["command"]),
        "log": run["log"],
    }


def resume_row(shape: str, ckpt: dict, args, full: dict) -> dict:
    """Kill a run at half its shards, finish it with --resume; the overhead on the rest."""
    total = full["shards"]
    out = args.out_root / shape / f"resume-t{full['threads']}"
    shutil.rmtree(out, ignore_errors=True)
    env, base, source = environment(full["threads"]), launcher(1), source_state()
    cap = args.max_rss_gb * GB
    killed = run_timed(
        [*base, *compress_args(ckpt["path"], out, args)],
        args.logs / f"resume-{shape}-killed.log", env, Watch(out, max(1, total // 2), cap),
    )  # fmt: skip
    done = manifest_shards(out) or 0
    resumed = run_timed(
        [*base, *compress_args(ckpt["path"], out, args, resume=True)],
        args.logs / f"resume-{shape}-resumed.log", env, Watch(out, max_rss=cap),
    )  # fmt: skip
    rate_estimate = full["wall_s"] * (total - done) / total
    seen = full["timeline"].get(str(done))
    tail_estimate = full["wall_s"] - seen[0] if seen is not None else None
    first_new = resumed["timeline"].get(str(done + 1), [None])[0]
    first_block = full["timeline"].get("2", [None])[0]
    row = _row(shape, "resume", 1, full["threads"], ckpt, resumed)
    row |= {
        "shards": total,
        "shards_before_kill": done,
        "killed_run_wall_s": killed["wall_s"],
        "killed_run": killed["killed"],
        "remaining_estimate_s": rate_estimate,
        "overhead": (resumed["wall_s"] - rate_estimate) / rate_estimate,
        "remaining_tail_s": tail_estimate,
        "overhead_vs_tail": (resumed["wall_s"] - tail_estimate) / tail_estimate
        if tail_estimate
        else None,
        # start to the first block written: resumed (start, verification, one block) against
        # uninterrupted (start, embeddings' shard, one block): the fixed cost of resuming
        "resumed_first_block_s": first_new,
        "uninterrupted_first_block_s": first_block,
        "identical_to_uninterrupted": _compare(run_dir(args, shape, 1, full["threads"]), out),
        "source": source,
    }
    return row


def _compare(a: Path, b: Path) -> dict:
    """Whether every file under a and b is byte-identical; the differing paths when not."""
    da, db = digests(a), digests(b)
    differ = sorted(k for k in da.keys() | db.keys() if da.get(k) != db.get(k))
    return {"identical": not differ, "files": len(da), "differing": differ[:20]}


def world_rows(shape: str, ckpt: dict, args, world: int, single: dict) -> list[dict]:
    """``world`` processes sharing args.threads, against one process with all of them (wall
    time) and one process with as many threads as each worker has (bytes: a thread count can
    change float reductions, so only equal per-process threads are expected to agree)."""
    threads = max(1, args.threads // world)
    rows = [compress_row(shape, ckpt, args, world, threads)]
    if threads != single["threads"]:
        rows.insert(0, compress_row(shape, ckpt, args, 1, threads))
    same = run_dir(args, shape, 1, threads)
    rows[-1] |= {
        "speedup_vs_w1": single["wall_s"] / rows[-1]["wall_s"],
        "identical_to_w1_same_threads": _compare(same, run_dir(args, shape, world, threads)),
        "identical_to_w1": _compare(
            run_dir(args, shape, 1, single["threads"]), run_dir(args, shape, world, threads)
        ),
    }
    return rows


def bench_shape(shape: str, args) -> list[dict]:
    ckpt = ensure_checkpoint(shape, args.ckpt_root, args.logs)
    rows = [compress_row(shape, ckpt, args, 1, args.threads)]
    _report(rows[-1])
    if not rows[0]["ok"]:
        return rows
    for world in args.world_sizes:
        if world > 1:
            new = world_rows(shape, ckpt, args, world, rows[0])
            rows += new
            for row in new:
                _report(row)
    if args.resume_test:
        rows.append(resume_row(shape, ckpt, args, rows[0]))
        _report(rows[-1])
    for row in rows:
        row["settings"] = settings_of(args)
    return rows


def _report(row: dict) -> None:
    print(
        json.dumps({k: v for k, v in row.items() if k not in ("timeline", "command")}), flush=True
    )


def save(rows: list[dict], args) -> None:
    """Merge rows into the results file, replacing those of the same shape, kind, world size,
    threads and settings."""
    key = lambda r: (r["shape"], r["kind"], r["world_size"], r.get("threads"), _label(r))  # noqa: E731
    old = json.loads(args.results.read_text())["rows"] if args.results.exists() else []
    new = {key(r) for r in rows}
    merged = [r for r in old if key(r) not in new] + rows
    order = {s: i for i, s in enumerate(synthetic.SHAPES)}
    merged.sort(
        key=lambda r: (order.get(r["shape"], 99), r["kind"], r["world_size"], -r["threads"])
    )
    result = {
        "machine": {"cpu": _cpu(), "cores": os.cpu_count(), "ram_bytes": _ram(),
                    "python": platform.python_version()},
        "updated": datetime.datetime.now().isoformat(timespec="seconds"),
        "settings": {**settings_of(args), "threads": args.threads},  # the last run's
        "rows": merged,
    }  # fmt: skip
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(result, indent=2) + "\n")


def _cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def _ram() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def table(rows: list[dict]) -> str:
    """The markdown table of the README's Scale section."""
    lines = [
        "| shape | run | params | checkpoint GB | peak RSS GB | all processes' peak RSS GB "
        "| wall s | µs/param (wall) | CPU s | note |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        rss = r["peak_rss_bytes"] / GB if r["peak_rss_bytes"] else float("nan")
        cpu = f"{r['cpu_s']:.0f}" if r.get("cpu_s") else "–"
        lines.append(
            f"| {r['shape']} | {r['kind']} {r['world_size']}×{r['threads']} thr{_label(r)} "
            f"| {r['params'] / 1e9:.2f} B "
            f"| {r['ckpt_bytes'] / GB:.2f} | {rss:.2f} | {r['tree_peak_rss_bytes'] / GB:.2f} "
            f"| {r['wall_s']:.0f} | {r['us_per_param']:.3f} | {cpu} | {_note(r)} |"
        )
    return "\n".join(lines)


def settings_of(args) -> dict:
    return {"method": args.method, "quant": args.quant, "rank": args.rank, "extra": args.extra}


def _label(r: dict) -> str:
    """The row's settings where they differ from the defaults (loftq, nf4, rank 16)."""
    settings = r.get("settings") or {}
    default = {"method": "loftq", "quant": "nf4", "rank": 16}
    words = [f"--{k} {v}" for k, v in default.items() if settings.get(k, v) != v]
    return "".join(f" {w}" for w in [*words, *settings.get("extra", [])])


def _note(r: dict) -> str:
    slope = r.get("rss_per_shard_bytes")
    growth = f"; RSS +{slope / 1e6:.0f} MB per block" if slope and slope > 20e6 else ""
    if r["killed"] and r["kind"] != "resume":
        return f"killed, {r['killed']}, at {r['shards']}/{r['expected_shards']} shards{growth}"
    if not r["ok"]:
        return f"failed (exit {r['returncode']}), see {r['log']}"
    if r.get("segments"):
        growth += f"; killed from outside {len(r['segments']) - 1}×, finished with --resume"
    if r["kind"] == "resume":
        return (
            f"killed at {r['shards_before_kill']}/{r['shards']} shards; overhead "
            f"{r['overhead']:+.1%} of the remaining work; identical: "
            f"{r['identical_to_uninterrupted']['identical']}"
        )
    if "identical_to_w1" in r:
        return (
            f"speed-up {r['speedup_vs_w1']:.2f}× on 1 process; byte-identical to 1 process at "
            f"{r['threads']} thr: {r['identical_to_w1_same_threads']['identical']}, at all "
            f"threads: {r['identical_to_w1']['identical']}"
        )
    return f"{r['shards']} shards out, {(r['out_bytes'] or 0) / GB:.2f} GB{growth}"


def parse_args(argv: list[str] | None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("shapes", nargs="*", default=["1b", "3b", "7b"])
    parser.add_argument("--method", default="loftq")
    parser.add_argument("--quant", default="nf4")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--resume-test", action="store_true")
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[1])
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--ckpt-root", type=Path, default=synthetic.DEFAULT_ROOT)
    parser.add_argument("--out-root", type=Path, default=Path("/work/scale-out"))
    parser.add_argument("--logs", type=Path, default=Path("/work/scale-out/logs"))
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--report", action="store_true", help="only the table and plot")
    parser.add_argument(
        "--continue-killed",
        type=int,
        default=0,
        metavar="N",
        help="finish a run killed by a signal from outside with --resume, up to N times",
    )
    parser.add_argument(
        "--max-rss-gb", type=float, default=12.0, help="SIGKILL a run whose processes hold more"
    )
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:split])
    args.extra = argv[split + 1 :]  # more lorq compress flags, after --
    return args


def plot(rows: list[dict], path: Path) -> None:
    """RSS of the process tree over each one-process run (sampled every TRACE_S)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in rows:
        if r["kind"] != "compress" or r["world_size"] != 1:
            continue
        trace = r.get("rss_trace") or [[0, 0]]
        peak = (r["peak_rss_bytes"] or 0) / GB
        label = f"{r['shape']}, {r['threads']} thr (peak {peak:.2f} GB, {r['wall_s']:.0f} s)"
        ax.plot([t / r["wall_s"] for t, _ in trace], [b / GB for _, b in trace], label=label)
    ax.axhline(2.5, color="grey", linestyle="--", label="target: 2.5 GB")
    ax.set_xlabel("fraction of the run's wall time")
    ax.set_ylabel(f"RSS of the process tree (GB, every {TRACE_S:.0f} s)")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    rows = []
    for shape in [] if args.report else args.shapes:
        rows += bench_shape(shape, args)
        save(rows, args)
    merged = json.loads(args.results.read_text())["rows"]
    plot(merged, args.results.with_suffix(".png"))
    print(table(merged))


if __name__ == "__main__":
    main()

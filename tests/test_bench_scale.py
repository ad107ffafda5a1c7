"""bench/scale.py's harness on dummy commands: GNU time's report, the manifest watch and kill."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
pytestmark = pytest.mark.skipif(not Path("/usr/bin/time").exists(), reason="needs GNU time")

# Writes a manifest with one more shard every 0.5 s, up to 6, holding ~200 MB.
WRITER = """
import json, sys, time
from pathlib import Path
hold = bytearray(200 * 1024 * 1024)
out = Path(sys.argv[1])
out.mkdir(exist_ok=True)
for n in range(1, 7):
    (out / "lorq-manifest.json").write_text(json.dumps({"shards": {str(k): 0 for k in range(n)}}))
    time.sleep(0.5)
"""


@pytest.fixture(scope="module")
def scale():
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location("bench_scale", BENCH / "scale.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(BENCH))


def test_parses_gnu_time_reports(scale):
    text = (
        "\tElapsed (wall clock) time (h:mm:ss or m:ss): 1:02:03.5\n"
        "\tMaximum resident set size (kbytes): 2048\n\tExit status: 0\n"
    )
    assert scale.parse_time_v(text) == {
        "max_rss_bytes": 2048 * 1024,
        "wall_s": 3723.5,
        "cpu_s": None,
        "exit_status": 0,
    }
    assert scale.parse_time_v("\tElapsed (wall clock) time (h:mm:ss or m:ss): 0:04.13")[
        "wall_s"
    ] == pytest.approx(4.13)


def test_a_dummy_run_reports_its_peak_rss_and_shard_timeline(scale, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-c", WRITER, str(out)]
    run = scale.run_timed(cmd, tmp_path / "run.log", {}, scale.Watch(out))
    assert run["returncode"] == 0 and not run["killed"]
    assert 200e6 < run["max_rss_bytes"] < 400e6
    assert 200e6 < run["tree_peak_rss_bytes"] < 400e6
    assert 1.5 < run["wall_s"] < 10
    assert list(run["timeline"])[-1] == "6"
    assert max(rss for _, rss in run["rss_trace"]) > 200e6
    assert scale.manifest_shards(out) == 6


def test_the_watched_run_is_killed_at_the_shard_count(scale, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-c", WRITER, str(out)]
    run = scale.run_timed(cmd, tmp_path / "run.log", {}, scale.Watch(out, kill_at=3))
    assert run["killed"] and run["returncode"] != 0
    assert 3 <= scale.manifest_shards(out) < 6


def test_compare_names_the_differing_files(scale, tmp_path):
    for name, text in (("a", "x"), ("b", "x"), ("c", "y")):
        (tmp_path / name / "sub").mkdir(parents=True)
        (tmp_path / name / "sub" / "f.bin").write_text(text)
    assert scale._compare(tmp_path / "a", tmp_path / "b")["identical"]
    assert scale._compare(tmp_path / "a", tmp_path / "c")["differing"] == ["sub/f.bin"]


def test_compress_arguments_are_the_benchmarks(scale):
    args = scale.parse_args(["1b", "--rank", "8", "--", "--block-size", "64"])
    assert args.shapes == ["1b"] and args.extra == ["--block-size", "64"]
    line = scale.compress_args(Path("C"), Path("O"), args, resume=True)
    assert line[:5] == ["compress", "--model", "C", "--out", "O"]
    assert "--resume" in line and "--overwrite" not in line
    assert line[line.index("--rank") + 1] == "8" and line[-2:] == ["--block-size", "64"]
    assert json.dumps(line)


def test_a_run_over_the_rss_cap_is_killed(scale, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-c", WRITER, str(out)]
    run = scale.run_timed(cmd, tmp_path / "run.log", {}, scale.Watch(out, max_rss=100e6))
    assert "over the 0.1 GB cap" in run["killed"] and run["returncode"] != 0
    assert (scale.manifest_shards(out) or 0) < 6


def test_rss_growth_per_block_shard(scale):
    timeline = {"1": [1.0, 5e9], "2": [2.0, 1e9], "3": [3.0, 1.25e9], "4": [4.0, 1.5e9]}
    assert scale.rss_per_shard(timeline) == pytest.approx(0.25e9)
    assert scale.rss_per_shard({"1": [1.0, 1e9], "7": [9.0, None]}) is None


def test_a_run_killed_from_outside_is_finished_with_resume(scale):
    def run(code, shards, wall, peak, killed=None):
        timeline = {str(k): [wall * k / shards[-1], peak] for k in shards}
        trace = [[0.0, peak // 2], [wall, peak]]
        return {"returncode": code, "killed": killed, "timeline": timeline, "rss_trace": trace,
                "wall_s": wall, "max_rss_bytes": None if code < 0 else peak,
                "tree_peak_rss_bytes": peak, "log": "x"}  # fmt: skip

    first, second = run(-9, [1, 2, 3], 30.0, 2e9), run(0, [3, 4, 5], 20.0, 1e9)
    assert scale._killed_from_outside([first], allowed=1)
    assert not scale._killed_from_outside([first], allowed=0)
    assert not scale._killed_from_outside([run(-9, [1, 2], 5.0, 1e9, killed="RSS")], allowed=3)
    assert not scale._killed_from_outside([first, run(-9, [3], 5.0, 1e9)], allowed=3)
    joined = scale._joined([first, second])
    assert joined["wall_s"] == 50.0 and joined["tree_peak_rss_bytes"] == 2e9
    assert joined["timeline"]["5"] == [50.0, 1e9] and joined["timeline"]["3"] == [30.0, 2e9]
    assert joined["rss_trace"][-1] == [50.0, 1e9] and len(joined["segments"]) == 2


def test_cpu_seconds_of_gnu_time_and_of_proc(scale):
    text = "\tUser time (seconds): 1.25\n\tSystem time (seconds): 0.50\n"
    assert scale.parse_time_v(text)["cpu_s"] == pytest.approx(1.75)
    import os

    assert 0 < scale.cpu_seconds(os.getpid()) < 3600

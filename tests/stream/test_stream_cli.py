"""``lorq compress --stream`` and ``python -m lorq``: the library call behind flags, errors as one
line with exit code 2. Oracles: the in-memory CLI's saved tensors, the error text."""

from __future__ import annotations

import subprocess
import sys

import torch
from conftest import assert_same_bytes, saved_tensors
from safetensors.torch import load_file
from test_cli import one_line_error, run, tiny_dir  # noqa: F401  (fixture)

FLAGS = ["--method", "lq", "--quant", "nf3", "--rank", "4", "--calibration-tokens", "256",
         "--seq-len", "32", "--weighting", "activations", "--eval-blocks", "0"]  # fmt: skip


def test_stream_flag_writes_what_the_library_call_writes(tiny_dir, tmp_path):  # noqa: F811
    """--stream with --eval-blocks 0 gives a sharded directory; its tensors are those of
    compress_streaming with the same settings; with evaluation it prints the table."""
    from conftest import compress_to

    from lorq.calibrate.tokens import Calibration
    from lorq.config import CompressConfig

    result = run("compress", "--model", tiny_dir, *FLAGS, "--stream", "--device", "cpu",
                 "--out", tmp_path / "cli")  # fmt: skip
    assert result.exit_code == 0, result.output
    config = CompressConfig(method="lq", quant="nf3", rank=4, weighting="activations")
    compress_to(
        str(tiny_dir), tmp_path / "lib", config, calibration=Calibration("builtin", 32, 8),
        device="cpu",
    )  # fmt: skip
    assert_same_bytes(saved_tensors(tmp_path / "lib"), saved_tensors(tmp_path / "cli"))
    evaluated = run("compress", "--model", tiny_dir, *FLAGS[:-2], "--eval-blocks", "1",
                    "--stream", "--out", tmp_path / "cli", "--overwrite")  # fmt: skip
    assert evaluated.exit_code == 0, evaluated.output
    assert "perplexity" in evaluated.output.lower() or "ppl" in evaluated.output.lower()


def test_stream_errors_are_one_line(tiny_dir, tmp_path):  # noqa: F811
    if not torch.cuda.is_available():
        one_line_error(
            run(
                "compress",
                "--model",
                tiny_dir,
                *FLAGS,
                "--stream",
                "--device",
                "cuda",
                "--out",
                tmp_path / "a",
            ),
            "no CUDA GPU is visible",
        )
    assert not (tmp_path / "a").exists()
    one_line_error(
        run(
            "compress",
            "--model",
            tiny_dir,
            *FLAGS,
            "--stream",
            "--device",
            "tpu",
            "--out",
            tmp_path / "a",
        ),
        "device='tpu' is not supported",
    )
    done = run("compress", "--model", tiny_dir, *FLAGS, "--stream", "--out", tmp_path / "b")
    assert done.exit_code == 0, done.output
    (tmp_path / "b" / "lorq.json").unlink()  # a run killed before its end
    one_line_error(
        run("compress", "--model", tiny_dir, *FLAGS, "--stream", "--out", tmp_path / "b"),
        "pass resume=True (--resume)",
    )
    resumed = run("compress", "--model", tiny_dir, *FLAGS, "--resume", "--out", tmp_path / "b")
    assert resumed.exit_code == 0 and "3 finished shards kept, 0 computed" in resumed.output


def test_python_dash_m_lorq():
    """``python -m lorq`` is the command line (as ``torchrun -m lorq`` needs)."""
    done = subprocess.run([sys.executable, "-m", "lorq", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "compress" in done.stdout


def test_loaded_shards_match_the_manifest_tensors(tiny_dir, tmp_path):  # noqa: F811
    """Each shard holds exactly the tensors lorq.json lists for it (load checks the headers)."""
    import json

    done = run("compress", "--model", tiny_dir, *FLAGS, "--stream", "--out", tmp_path / "c")
    assert done.exit_code == 0, done.output
    meta = json.loads((tmp_path / "c" / "lorq.json").read_text())
    stored = {}
    for file in sorted((tmp_path / "c").glob("model-*.safetensors")):
        stored.update(load_file(file))
    assert sorted(stored) == sorted(meta["tensors"])


def test_plan_stream_flag(tiny_dir, tmp_path):  # noqa: F811
    """``lorq plan --stream`` writes the plan the in-memory ``lorq plan`` writes."""
    import json

    flags = ["--budget", "3", "--rank", "4", "--weighting", "none", "--model", tiny_dir]
    streamed = run("plan", *flags, "--stream", "--device", "cpu", "--out", tmp_path / "s.json")
    assert streamed.exit_code == 0, streamed.output
    memory = run("plan", *flags, "--out", tmp_path / "m.json")
    assert memory.exit_code == 0, memory.output
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("s.json", "m.json"))
    assert [e["config"] for e in a["entries"]] == [e["config"] for e in b["entries"]]


def test_a_model_larger_than_half_the_free_memory_streams(tiny_dir, tmp_path, monkeypatch):  # noqa: F811
    """Without --stream, a checkpoint whose fp32 weights exceed half the free memory streams
    (as it would on a small machine); here the free memory is said to be 1 kB."""
    import lorq.pipeline.devices as devices

    monkeypatch.setattr(devices, "available_memory", lambda: 1000)
    done = run("compress", "--model", tiny_dir, *FLAGS, "--device", "cpu", "--out", tmp_path / "o")
    assert done.exit_code == 0, done.output
    assert "writing one block at a time (its weights take" in done.output
    assert (tmp_path / "o" / "lorq-manifest.json").exists()
    builtin = run("compress", "--model", "smollm2", "--device", "cuda", "--out", tmp_path / "g")
    if not torch.cuda.is_available():
        one_line_error(builtin, "no CUDA GPU is visible")


def test_streamed_directory_evaluates_and_exports(tiny_dir, tmp_path):  # noqa: F811
    """The sharded directory is a lorq directory to the other verbs: lorq eval and lorq export
    --format peft read it (the PEFT adapter's factors are the streamed ones)."""
    from safetensors.torch import load_file as read

    done = run("compress", "--model", tiny_dir, *FLAGS, "--stream", "--out", tmp_path / "s")
    assert done.exit_code == 0, done.output
    evaluated = run("eval", tmp_path / "s", "--eval-blocks", "1", "--device", "cpu")
    assert evaluated.exit_code == 0, evaluated.output
    exported = run("export", tmp_path / "s", "--out", tmp_path / "p", "--format", "peft")
    assert exported.exit_code == 0, exported.output
    adapter = read(next((tmp_path / "p" / "adapter").glob("*.safetensors")))
    shards = saved_tensors(tmp_path / "s")
    name = "model.layers.0.self_attn.q_proj.lora_A"
    peft_name = next(k for k in adapter if "layers.0.self_attn.q_proj.lora_A" in k)
    torch.testing.assert_close(adapter[peft_name].float(), shards[name].float())


def test_activations_go_to_disk_by_size():
    """X stays in memory unless what is held at once exceeds a quarter of the free memory; the
    Fisher pass holds every block's input (N + 2 buffers)."""
    from pathlib import Path

    from lorq.calibrate.tokens import Calibration
    from lorq.pipeline.devices import activation_offload, available_memory

    calibration, out = Calibration("builtin", 128, 64), Path("/nonexistent")
    per_token = available_memory() // (4 * 4 * 128 * 64)  # values per token at a quarter
    assert activation_offload(None, out, calibration, 2 * 64) is None
    assert activation_offload(None, out, calibration, per_token + 1) == out / ".activations"
    assert activation_offload(False, out, calibration, per_token + 1) is None
    assert activation_offload(True, out, calibration, 8) == out / ".activations"
    assert activation_offload(True, out, None, 8) is None  # no calibration: no X at all

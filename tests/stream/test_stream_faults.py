"""Streaming runs that are killed, resumed, refused or spread over processes.

Oracles: an uninterrupted run's files (byte-identical after SIGKILL + resume, and with two
torchrun processes), the manifest (which shards a resumed run computed), and the error messages
(exit code 2, the file named, nothing that looks finished).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import compress_to, tiny_causal

from lorq.config import CompressConfig
from lorq.pipeline.writer import MANIFEST_FILE

CONFIG = CompressConfig(method="lq", quant="nf3", rank=4, weighting="activations", rounding="gptq")
ROOT = Path(__file__).resolve().parents[2]


def checkpoint(folder: Path, layers: int = 4) -> Path:
    tiny_causal("llama", 0, num_hidden_layers=layers).save_pretrained(folder, max_shard_size="80KB")
    return folder


def digests(folder: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.iterdir())
        if p.is_file() and not p.name.startswith(".")
    }


def tokens() -> torch.Tensor:
    return torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))


SCRIPT = """
import sys, torch
import lorq
from lorq.config import CompressConfig
config = CompressConfig(method="lq", quant="nf3", rank=4, weighting="activations",
                        rounding="gptq", iters=int(sys.argv[3]))
if sys.argv[5:] == ["budget"]:  # a budget: the cost table block by block, the Fisher for its costs
    config = CompressConfig(method="lq", budget=3.0, rank=4, weighting="activations",
                            plan_weighting="fisher", iters=int(sys.argv[3]))
if sys.argv[5:] == ["budget", "kl"]:  # a KL plan: the sensitivities' probes over the processes
    config = CompressConfig(method="lq", budget=3.0, rank=4, weighting="activations",
                            plan_weighting="kl", iters=int(sys.argv[3]))
if sys.argv[5:] == ["recover"]:  # block-wise recovery of the factors and the scales
    config = CompressConfig(method="lq", quant="nf3", rank=4, weighting="activations",
                            iters=int(sys.argv[3]), recover="block", recover_steps=5)
tokens = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
r = lorq.compress_model(sys.argv[1], config, sys.argv[2], calibration=tokens, device="cpu",
                        eval_blocks=0, baseline=False, resume=sys.argv[4] == "resume")
print("COMPUTED", ",".join(r.computed))
"""


def run_script(
    src: Path, out: Path, mode: str, iters: int = 2, launcher=(), budget: bool = False, job=None
) -> subprocess.Popen:
    """The job in a fresh Python process (or under ``launcher``, e.g. torchrun)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    script = out.parent / "job.py"
    script.write_text(SCRIPT)
    args = [
        str(src),
        str(out),
        str(iters),
        mode,
        *(["budget"] if budget else []),
        *([job] if job else []),
    ]
    command = [*(launcher or [sys.executable]), str(script), *args]
    return subprocess.Popen(
        command, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT
    )


def finished_shards(out: Path) -> list[str]:
    try:
        return list(json.loads((out / MANIFEST_FILE).read_text())["shards"])
    except (OSError, ValueError, KeyError):
        return []


@pytest.mark.slow  # a subprocess run (torchrun / kill -9): make test-slow
def test_sigkill_then_resume_is_byte_identical(tmp_path):
    """kill -9 after some shards; the resumed run computes only the others, and the directory
    is byte-identical to an uninterrupted run's."""
    src = checkpoint(tmp_path / "src", layers=6)
    whole = run_script(src, tmp_path / "whole", "new")
    assert whole.wait(300) == 0, whole.stderr.read()
    victim = run_script(src, tmp_path / "out", "new", iters=2)
    deadline = time.time() + 300
    while len(finished_shards(tmp_path / "out")) < 3 and time.time() < deadline:
        assert victim.poll() is None, "the run ended before it could be killed"
        time.sleep(0.005)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    before = finished_shards(tmp_path / "out")
    assert 3 <= len(before) < 7
    assert not (tmp_path / "out" / "lorq.json").exists()  # partial: never looks finished
    refused = run_script(src, tmp_path / "out", "new")
    assert refused.wait(120) != 0
    assert "partial run of the same model and settings" in refused.stderr.read()
    resumed = run_script(src, tmp_path / "out", "resume")
    assert resumed.wait(300) == 0, resumed.stderr.read()
    computed = resumed.stdout.read().split("COMPUTED ")[1].split()[0].split(",")
    assert not set(computed) & set(before)  # finished shards were not recomputed
    assert set(computed) | set(before) == set(finished_shards(tmp_path / "whole"))
    assert digests(tmp_path / "out") == digests(tmp_path / "whole")


def test_resume_with_other_settings_is_refused(tmp_path):
    src = checkpoint(tmp_path / "src", layers=2)
    compress_to(str(src), tmp_path / "out", CONFIG, calibration=tokens(), device="cpu")
    (tmp_path / "out" / "lorq.json").unlink()  # as if killed before the end
    other = CompressConfig(method="lq", quant="nf3", rank=8, weighting="activations")
    with pytest.raises(ValueError, match=r"partial run of other settings .*rank: 4 → 8"):
        compress_to(str(src), tmp_path / "out", other, calibration=tokens(), resume=True)
    tiny_causal("llama", 5, num_hidden_layers=2).save_pretrained(tmp_path / "src2")
    with pytest.raises(ValueError, match=r"other settings .*source.folder"):
        compress_to(
            str(tmp_path / "src2"), tmp_path / "out", CONFIG, calibration=tokens(), resume=True
        )


def test_a_corrupted_shard_is_recomputed_on_resume(tmp_path):
    src = checkpoint(tmp_path / "src", layers=2)
    compress_to(str(src), tmp_path / "whole", CONFIG, calibration=tokens(), device="cpu")
    compress_to(str(src), tmp_path / "out", CONFIG, calibration=tokens(), device="cpu")
    (tmp_path / "out" / "lorq.json").unlink()
    shard = tmp_path / "out" / "model-00002-of-00003.safetensors"
    shard.write_bytes(shard.read_bytes()[:-10])  # a shard cut short (sha256 no longer matches)
    result = compress_to(
        str(src), tmp_path / "out", CONFIG, calibration=tokens(), device="cpu", resume=True
    )
    assert result.computed == ("model-00002-of-00003.safetensors",)
    assert digests(tmp_path / "out") == digests(tmp_path / "whole")


def test_bad_checkpoints_are_named(tmp_path):
    src = checkpoint(tmp_path / "src", layers=2)
    shards = sorted(src.glob("model-*.safetensors"))
    whole = shards[1].read_bytes()
    for cut in (whole[:100], whole[:-10]):  # in the header, in the data
        shards[1].write_bytes(cut)
        with pytest.raises(ValueError, match=f"{shards[1]} is not a whole safetensors file"):
            compress_to(str(src), tmp_path / "out", CONFIG, device="cpu")
    shards[1].unlink()
    with pytest.raises(FileNotFoundError, match=f"shard {shards[1].name} .*is missing"):
        compress_to(str(src), tmp_path / "out", CONFIG, device="cpu")
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without a GPU")
def test_cuda_without_a_gpu_is_a_clear_error(tmp_path):
    src = checkpoint(tmp_path / "src", layers=2)
    with pytest.raises(ValueError, match="no CUDA GPU is visible"):
        compress_to(str(src), tmp_path / "out", CONFIG, device="cuda")


@pytest.mark.slow  # a subprocess run (torchrun / kill -9): make test-slow
def test_two_processes_write_the_bytes_of_one(tmp_path):
    """torchrun --nproc-per-node 2 (gloo): the same files as one process."""
    src = checkpoint(tmp_path / "src", layers=3)
    one = run_script(src, tmp_path / "one", "new")
    assert one.wait(300) == 0, one.stderr.read()
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                "--rdzv-backend", "c10d", "--rdzv-endpoint", "localhost:0"]  # fmt: skip
    two = run_script(src, tmp_path / "two", "new", launcher=torchrun)
    assert two.wait(300) == 0, two.stderr.read()
    assert digests(tmp_path / "two") == digests(tmp_path / "one")
    # a one-process run killed late, resumed with two processes (the manifest is per shard)
    (tmp_path / "one" / "lorq.json").unlink()
    for shard in ("model-00003-of-00004.safetensors", "model-00004-of-00004.safetensors"):
        (tmp_path / "one" / shard).unlink()
    resumed = run_script(src, tmp_path / "one", "resume", launcher=torchrun)
    assert resumed.wait(300) == 0, resumed.stderr.read()
    assert "COMPUTED model-00003-of-00004.safetensors,model-00004-of-00004" in resumed.stdout.read()
    assert digests(tmp_path / "one") == digests(tmp_path / "two")


@pytest.mark.slow  # a subprocess run (torchrun / kill -9): make test-slow
def test_two_processes_plan_a_budget_as_one(tmp_path):
    """A budget under torchrun: the Fisher pass on rank 0, each block's cost rows split over the
    ranks and gathered in order, the same plan and the same files as one process."""
    src = checkpoint(tmp_path / "src", layers=2)
    one = run_script(src, tmp_path / "one", "new", budget=True)
    assert one.wait(300) == 0, one.stderr.read()
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                "--rdzv-backend", "c10d", "--rdzv-endpoint", "localhost:0"]  # fmt: skip
    two = run_script(src, tmp_path / "two", "new", launcher=torchrun, budget=True)
    assert two.wait(300) == 0, two.stderr.read()
    assert "lorq-plan.json" in digests(tmp_path / "one")
    assert digests(tmp_path / "two") == digests(tmp_path / "one")


@pytest.mark.slow  # a subprocess run (torchrun): make test-slow
def test_two_processes_measure_kl_sensitivities_as_one(tmp_path):
    """A KL plan under torchrun: each rank carries the probes of its share of the targets, the
    α are gathered; the sensitivities, the plan and every file equal one process's."""
    src = checkpoint(tmp_path / "src", layers=2)
    one = run_script(src, tmp_path / "one", "new", budget=True, job="kl")
    assert one.wait(300) == 0, one.stderr.read()
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                "--rdzv-backend", "c10d", "--rdzv-endpoint", "localhost:0"]  # fmt: skip
    two = run_script(src, tmp_path / "two", "new", launcher=torchrun, budget=True, job="kl")
    assert two.wait(300) == 0, two.stderr.read()
    assert "lorq-sensitivity.json" in digests(tmp_path / "one")
    assert digests(tmp_path / "two") == digests(tmp_path / "one")


@pytest.mark.slow  # a subprocess run (torchrun / kill -9): make test-slow
def test_recovery_in_two_processes_and_resumed_writes_the_bytes_of_one(tmp_path):
    """Block-wise recovery (factors and scales) under torchrun, and a run killed after two of
    its four shards resumed: the files of one uninterrupted process."""
    src = checkpoint(tmp_path / "src", layers=3)
    one = run_script(src, tmp_path / "one", "new", job="recover")
    assert one.wait(300) == 0, one.stderr.read()
    assert json.loads((tmp_path / "one" / "lorq.json").read_text())["recovery"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                "--rdzv-backend", "c10d", "--rdzv-endpoint", "localhost:0"]  # fmt: skip
    two = run_script(src, tmp_path / "two", "new", launcher=torchrun, job="recover")
    assert two.wait(300) == 0, two.stderr.read()
    assert digests(tmp_path / "two") == digests(tmp_path / "one")
    (tmp_path / "two" / "lorq.json").unlink()  # as if killed after two shards
    for shard in ("model-00003-of-00004.safetensors", "model-00004-of-00004.safetensors"):
        (tmp_path / "two" / shard).unlink()
    resumed = run_script(src, tmp_path / "two", "resume", job="recover")
    assert resumed.wait(300) == 0, resumed.stderr.read()
    assert "COMPUTED model-00003-of-00004.safetensors,model-00004-of-00004" in resumed.stdout.read()
    assert digests(tmp_path / "two") == digests(tmp_path / "one")


def test_a_format_that_does_not_fit_is_refused_before_any_work(tmp_path):
    """The preflight (config.json alone) runs first: nothing is written."""
    src = checkpoint(tmp_path / "src", layers=2)
    with pytest.raises(ValueError, match="q4_k"):
        compress_to(str(src), tmp_path / "out", CompressConfig(quant="q4_k"), device="cpu")
    assert not (tmp_path / "out").exists()

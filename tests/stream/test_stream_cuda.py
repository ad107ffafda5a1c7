"""Streaming on a GPU (skipped without CUDA): blocks and decompositions on the device, the
original loaded in bf16, results within float tolerance of the CPU's (oracle: the CPU run)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import compress_to, tiny_causal

import lorq
from lorq.config import CompressConfig

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CONFIG = CompressConfig(method="lq", quant="nf4", rank=4, weighting="activations", rounding="gptq")


def tokens() -> torch.Tensor:
    return torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_gpu_matches_cpu_within_tolerance(tmp_path, dtype):
    tiny_causal("llama", 0, num_hidden_layers=2).save_pretrained(tmp_path / "src")
    cpu = compress_to(
        str(tmp_path / "src"), tmp_path / "cpu", CONFIG, calibration=tokens(), device="cpu"
    )
    seen = []
    gpu = compress_to(
        str(tmp_path / "src"), tmp_path / "gpu", CONFIG, calibration=tokens(), device="cuda",
        dtype=dtype, on_statistics=lambda block, h: seen.append(next(iter(h.values())).device),
    )  # fmt: skip
    assert seen  # statistics were gathered (H is handed back on the CPU)
    settings = json.loads((tmp_path / "gpu" / "lorq-manifest.json").read_text())["settings"]
    assert settings["device"] == "cuda" and settings["dtype"] == dtype
    tolerance = 0.02 if dtype == "fp32" else 0.15
    for name, error in cpu.errors.items():
        assert gpu.errors[name] == pytest.approx(error, rel=tolerance), name
    ids = tokens()[:1]
    with torch.no_grad():
        a = lorq.load(tmp_path / "cpu")(input_ids=ids)[0]
        b = lorq.load(tmp_path / "gpu")(input_ids=ids)[0]
    assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.99

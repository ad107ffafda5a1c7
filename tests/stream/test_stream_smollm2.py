"""The built-in SmolLM2-135M streamed (slow: ~2 min). Oracle: the in-memory job on the same
weights. The built-in ships as a GGUF file; transformers' GGUF loader gives its float weights,
saved here as a sharded safetensors checkpoint that the streaming job reads."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_same_bytes, compress_to, saved_tensors
from safetensors.torch import load_file

import lorq
from lorq.config import CompressConfig
from lorq.io.models import load_model
from lorq.jobs.compress import compress

pytestmark = pytest.mark.slow
CONFIG = CompressConfig(method="plain", quant="nf3", rank=8, rounding="gptq")


def test_smollm2_streamed_equals_in_memory(tmp_path):
    loaded = load_model("smollm2", packed=False)
    loaded.model.save_pretrained(tmp_path / "src", max_shard_size="100MB")
    loaded.tokenizer.save_pretrained(tmp_path / "src")
    tokens = torch.randint(0, 49152, (4, 64), generator=torch.Generator().manual_seed(0))
    streamed = compress_to(
        str(tmp_path / "src"), tmp_path / "out", CONFIG, calibration=tokens, device="cpu",
    )  # fmt: skip
    assert len(streamed.errors) == 210  # every linear of the 30 blocks
    lorq.save(compress(loaded.model, CONFIG, tokens), tmp_path / "mem")
    assert_same_bytes(
        load_file(tmp_path / "mem" / "model.safetensors"), saved_tensors(tmp_path / "out")
    )

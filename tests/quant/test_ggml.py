"""llama.cpp's block formats (Q8_0, Q4_0, Q5_0, Q5_1). Oracle: the ``gguf`` package, whose
quantize / dequantize are bit-exact ports of ggml's reference code (half-way values included)."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize
from gguf.quants import quantize as gguf_quantize

from lorq.quant import GGMLConfig, quantize


def awkward(seed: int = 0) -> torch.Tensor:
    """Gaussian rows plus blocks of zeros, exact halves and one huge value."""
    w = torch.randn(48, 256, generator=torch.Generator().manual_seed(seed)) * 3
    w[0, :32] = 0
    w[1, :32] = torch.arange(32) / 2 - 8
    w[2, 32:64] = 1e4
    return w


TYPES = ["q8_0", "q4_0", "q5_0", "q5_1"]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("name", TYPES)
def test_encodes_like_llama_cpp(name, seed):
    w = awkward(seed)
    q = quantize(w, name)
    reference = gguf_quantize(w.numpy(), GGMLQuantizationType[name.upper()])
    assert np.array_equal(q.buffers["blocks"].numpy().reshape(reference.shape), reference)


@pytest.mark.parametrize("name", TYPES)
def test_decodes_like_gguf(name):
    q = quantize(awkward(), name)
    raw = q.buffers["blocks"].numpy().reshape(q.shape[0], -1)
    kind = GGMLQuantizationType[name.upper()]
    assert np.array_equal(q.dequantize().numpy(), dequantize(raw, kind))
    assert q.bits_per_param == q.config.nominal_bits == 8 * raw.shape[1] / 256


def test_q8_0_rows_and_sizes():
    q = quantize(awkward(), "q8_0")
    rows = torch.tensor([[5, 0], [47, 5]])
    assert torch.equal(q.dequantize_rows(rows), q.dequantize()[rows])
    assert q.nbytes == 48 * 256 // 32 * 34 and q.bits_per_param == 8.5


def test_q8_0_refuses_rows_that_do_not_fill_blocks():
    with pytest.raises(ValueError, match=r"in_features=48 .* not a multiple"):
        quantize(torch.randn(4, 48), "q8_0")
    with pytest.raises(ValueError, match="ggml_type='q9_0'"):
        GGMLConfig(ggml_type="q9_0")

"""Data-aware rounding on llama.cpp's block types: GPTQ (``ggml.BlockGrid``) and the importance-
weighted scale search (``quantize_weighted``, llama.cpp's imatrix use). Oracles: the ``gguf``
package's decoder (the codes written into a head decode to that head's levels; re-writing a
block's own codes gives its bytes back; every result decodes as lorq decodes it), llama.cpp's
reference encoder (with a diagonal H GPTQ keeps its heads and rounds no weight worse; both
methods beat its output / importance-weighted error)."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize
from test_gptq import correlated_inputs, output_error, weight

from lorq import QuantConfig, quantize
from lorq.quant.ggml import TYPES
from lorq.quant.gptq import gptq_quantize

NAMES = list(TYPES)


def gguf_decode(raw: torch.Tensor, name: str) -> torch.Tensor:
    values = dequantize(raw.numpy(), GGMLQuantizationType[name.upper()])
    return torch.from_numpy(np.ascontiguousarray(values)).reshape(raw.shape[0], -1)


def head_levels(name: str, raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, b) per weight, float64: gguf's decoding of the head with every code 0, and the step
    to the top code, divided by the level span."""
    block = TYPES[name]
    levels = block.level_values(torch.device("cpu")).double()
    decoded = []
    for code in (0, levels.numel() - 1):
        codes = torch.full((raw.shape[0], block.block), code, dtype=torch.uint8)
        decoded.append(gguf_decode(block.put(raw, codes), name).double())
    scale = (decoded[1] - decoded[0]) / (levels[-1] - levels[0])
    return scale, decoded[0] - scale * levels[0]


def blocks(name: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random non-degenerate blocks of the type and their reference encoding."""
    block = TYPES[name]
    x = torch.randn(24, block.block, generator=torch.Generator().manual_seed(seed))
    return x, block.encode(x)


@pytest.mark.parametrize("name", NAMES)
def test_put_writes_codes_that_decode_to_the_heads_levels(name):
    """gguf's decoder of put(raw, C) is a·levels[C] + b, with a, b of the head (per weight)."""
    block = TYPES[name]
    _, raw = blocks(name)
    levels = block.level_values(torch.device("cpu")).double()
    codes = torch.randint(0, levels.numel(), (raw.shape[0], block.block), dtype=torch.uint8)
    scale, offset = head_levels(name, raw)
    expected = scale * levels[codes.long()] + offset
    got = gguf_decode(block.put(raw, codes), name).double()
    assert torch.allclose(got, expected, rtol=1e-6, atol=1e-6)
    assert (scale != 0).all()


@pytest.mark.parametrize("name", NAMES)
def test_put_of_a_blocks_own_codes_gives_its_bytes(name):
    """Codes read back from gguf's decoding (nearest level) and put into the block: same bytes."""
    block = TYPES[name]
    _, raw = blocks(name, seed=1)
    levels = block.level_values(torch.device("cpu")).double()
    scale, offset = head_levels(name, raw)
    position = (gguf_decode(raw, name).double() - offset) / scale
    codes = (position[..., None] - levels).abs().argmin(-1).to(torch.uint8)
    assert torch.equal(block.put(raw, codes), raw)


@pytest.mark.parametrize("name", NAMES)
def test_diagonal_hessian_keeps_the_reference_heads_and_rounds_no_weight_worse(name):
    w = weight(size=512)
    h = torch.diag(torch.rand(512, generator=torch.Generator().manual_seed(2)) + 0.1)
    q, reference = gptq_quantize(w, h, QuantConfig.preset(name)), quantize(w, name)
    block = TYPES[name]
    ours = q.buffers["blocks"].view(-1, block.nbytes)
    theirs = reference.buffers["blocks"].view(-1, block.nbytes)
    codes = torch.zeros(ours.shape[0], block.block, dtype=torch.uint8)
    assert torch.equal(block.put(ours, codes), block.put(theirs, codes))  # same heads
    error, reference_error = (w - q.dequantize()).abs(), (w - reference.dequantize()).abs()
    assert (error <= reference_error + 1e-6).all()  # float rounding at exact ties only
    rows = q.buffers["blocks"].view(w.shape[0], -1)
    assert torch.equal(q.dequantize(), gguf_decode(rows, name))


@pytest.mark.parametrize("name", NAMES)
def test_beats_llama_cpp_rounding_on_correlated_inputs(name):
    x, w = correlated_inputs(size=512), weight(size=512)
    q = gptq_quantize(w, 2 / x.shape[0] * x.T @ x, QuantConfig.preset(name))
    ratio = output_error(x, w, q) / output_error(x, w, quantize(w, name))
    assert ratio < 0.95, ratio


def importance(size=512, seed=3) -> torch.Tensor:
    """Per-column importance spread over two orders of magnitude, as diag H of real layers is."""
    return torch.exp(2.5 * torch.randn(size, generator=torch.Generator().manual_seed(seed)))


def weighted_error(w, q, imp) -> float:
    return float(((w - q.dequantize()) ** 2 * imp).sum())


@pytest.mark.parametrize("name", NAMES)
def test_importance_weighted_rounding_beats_the_reference_where_it_searches(name):
    w, imp = weight(size=512), importance()
    config = QuantConfig.preset(name)
    q = config.format.quantize_weighted(w, config, imp)
    reference = quantize(w, name)
    rows = q.buffers["blocks"].view(w.shape[0], -1)
    assert torch.equal(q.dequantize(), gguf_decode(rows, name))
    if not TYPES[name].weighted:  # Q8_0 and Q5_1 keep the reference
        assert torch.equal(q.buffers["blocks"], reference.buffers["blocks"])
        return
    ratio = weighted_error(w, q, imp) / weighted_error(w, reference, imp)
    assert ratio < 0.97, ratio
    uniform = config.format.quantize_weighted(w, config, torch.ones_like(imp))
    ratio = weighted_error(w, q, imp) / weighted_error(w, uniform, imp)
    assert ratio < 0.97, ratio  # the importance itself is what lowers it


def test_weighted_rounding_without_importance_is_the_reference_and_bad_input_is_named():
    w = weight(size=512)
    config = QuantConfig.preset("iq4_nl")
    plain = config.format.quantize_weighted(w, config, None)
    assert torch.equal(plain.buffers["blocks"], quantize(w, "iq4_nl").buffers["blocks"])
    with pytest.raises(ValueError, match=r"importance must be 512 finite values"):
        config.format.quantize_weighted(w, config, torch.ones(256))
    nf4 = QuantConfig.preset("nf4")
    with pytest.raises(ValueError, match="importance-weighted rounding is not available for nf4"):
        nf4.format.quantize_weighted(w, nf4, importance())


def test_lq_lora_with_weighted_rounding_lowers_the_output_error():
    """The decomposition's H-norm error with the importance diag H below round to nearest's."""
    from lorq import DecomposeConfig, decompose

    x, w = correlated_inputs(size=256), weight(size=256)
    x = x * importance(256, seed=5).sqrt()  # features of very different scales
    h = x.T @ x / x.shape[0]
    errors = {}
    for rounding in ("nearest", "weighted"):
        config = DecomposeConfig(
            rank=4, quant="q4_0", weighting="activations", rounding=rounding, iters=2
        )
        d = decompose(w, config, hessian=h)
        errors[rounding] = (x @ (w - d.reconstruct()).T).norm().item()
    assert errors["weighted"] < 0.97 * errors["nearest"], errors

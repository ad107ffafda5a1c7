"""bitsandbytes 4-bit storage (``bnb-nf4``, ``bnb-fp4``). Oracles: bitsandbytes itself (its
tables, ``quantize_4bit``, ``dequantize_4bit``), and nearest-level rounding for the second level."""

import pytest
import torch

from lorq.io.bnb import as_bnb
from lorq.quant import BnbConfig, presets, quantize
from lorq.quant.bnb import block_absmax, code_table, dynamic_map

bnb = pytest.importorskip("bitsandbytes.functional")

CONFIGS = [BnbConfig(quant_type=t, double_quant=d) for t in ("nf4", "fp4") for d in (True, False)]


def awkward(seed: int = 0) -> torch.Tensor:
    """Random rows plus all-zero, constant, huge, tiny and single-spike blocks."""
    generator = torch.Generator().manual_seed(seed)
    w = torch.randn(96, 640, generator=generator) * 0.05
    w[0, :64] = 0.0
    w[1, :64] = 0.3
    w[2, 5] = 1e4
    w[3] = torch.randn(640, generator=generator) * 1e-30
    w[4, :128] = -2.5
    return w


def test_tables_are_bitsandbytes_own():
    assert torch.equal(code_table("nf4"), bnb.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(code_table("fp4"), bnb.get_4bit_type("fp4", device="cpu"))
    assert torch.equal(dynamic_map(), bnb.create_dynamic_map())


@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_codes_and_absmax_equal_quantize_4bit(config):
    w = awkward()
    q = quantize(w, config)
    packed, state = bnb.quantize_4bit(
        w, blocksize=64, quant_type=config.quant_type, compress_statistics=config.double_quant
    )
    assert torch.equal(q.codes, packed.flatten())
    if not config.double_quant:
        assert torch.equal(q.buffers["absmax"], state.absmax)
        return
    assert torch.equal(q.buffers["offset"], state.offset.reshape(1))
    assert torch.equal(q.buffers["nested_absmax"], state.state2.absmax)
    # the 8-bit absmax codes: lorq rounds to the nearest dynamic-map level (bitsandbytes' torch
    # reference); 0.50's CPU kernel searches approximately and may pick the other neighbour of
    # a value within a float32 hair of a midpoint
    ours, theirs = q.buffers["absmax"].long(), state.absmax.long()
    assert (ours != theirs).float().mean() < 0.005
    assert bool(((ours - theirs).abs() <= 1).all())


def test_second_level_codes_are_nearest_levels():
    w = awkward(1)
    q = quantize(w, BnbConfig(double_quant=True))
    absmax = w.reshape(-1, 64).abs().amax(1)
    centred = (absmax - absmax.mean()).view(-1)
    nested = q.buffers["nested_absmax"].repeat_interleave(256)[: centred.numel()]
    scaled = centred / nested
    distance = (scaled[:, None] - dynamic_map()[None, :]).abs()
    chosen = distance.gather(1, q.buffers["absmax"].long()[:, None])[:, 0]
    assert bool((chosen <= distance.min(1).values + 1e-7).all())


@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_decode_equals_dequantize_4bit_bit_for_bit(config):
    w = awkward(2)
    packed, state = bnb.quantize_4bit(
        w, blocksize=64, quant_type=config.quant_type, compress_statistics=config.double_quant
    )
    q = quantize(w, config)
    theirs = bnb.dequantize_4bit(packed, state)
    if config.double_quant:  # with bitsandbytes' own second-level codes in lorq's buffers
        buffers = {**q.buffers, "absmax": state.absmax}
        q = type(q)(config, q.shape, buffers)
    assert torch.equal(q.dequantize(), theirs)
    assert torch.equal(block_absmax(q), q.block_scales())


def test_storage_and_presets():
    nf4, fp4 = presets()["bnb-nf4"], presets()["bnb-fp4"]
    assert nf4 == BnbConfig(quant_type="nf4", double_quant=True, block_size=64)
    assert fp4.quant_type == "fp4"
    assert nf4.nominal_bits == pytest.approx(4 + 8 / 64 + 32 / (64 * 256))
    assert BnbConfig(double_quant=False).nominal_bits == 4.5
    q = quantize(awkward(), nf4)
    # codes 4 bits, 1 byte of absmax per 64 values, 4 bytes per 256 blocks, the fp32 offset
    assert q.nbytes == 96 * 640 // 2 + 960 + 4 * 4 + 4


def test_nf4_fp32_scales_is_bitsandbytes_nf4_without_double_quantization():
    w = awkward(3)
    q = quantize(w, "nf4-fp32-scales")
    stored = as_bnb(q)
    assert stored.config == BnbConfig(quant_type="nf4", double_quant=False)
    assert stored.codes is q.codes
    assert torch.equal(stored.dequantize(), q.dequantize())
    assert torch.equal(stored.codes, quantize(w, stored.config).codes)


@pytest.mark.parametrize("name", ["nf4", "nf3", "int4-g32", "q4_1"])
def test_other_formats_have_no_bitsandbytes_layout(name):
    q = quantize(awkward(), name)
    with pytest.raises(ValueError, match="no bitsandbytes 4-bit equivalent"):
        as_bnb(q)


@pytest.mark.parametrize(
    "field", [{"bits": 3}, {"quant_type": "int4"}, {"block_size": 48}, {"double_quant": 1.5}]
)
def test_bad_configs_are_refused(field):
    with pytest.raises(ValueError, match="is not supported"):
        BnbConfig(**field)

"""Every registered format passes one conformance suite. Oracles: a decode formula written here
independently for each format family (a format without one fails, so a new format must bring its
own), the bytes its buffers really hold, a bit-exact state-dict round trip, and the
round-to-nearest bound (no value further from W than half a grid step)."""

import pytest
import torch

from lorq.quant import BnbConfig, QuantizedTensor, format_of, formats, presets, quantize
from lorq.quant.bnb import code_table
from lorq.quant.codebook import nf_levels
from lorq.quant.kquants import unpack_scales
from lorq.quant.tensor import storage_nbytes

SHAPE = (64, 256)
PRESETS = list(presets())


def nf_reference(q: QuantizedTensor) -> torch.Tensor:
    """level[code] · scale of each block (the scales decoded by the format's own scale rule)."""
    values = nf_levels(q.config.bits)[q.codes_unpacked().long()].view(-1, q.config.block_size)
    return (values * q.block_scales()[:, None]).view(q.shape)


def int_reference(q: QuantizedTensor) -> torch.Tensor:
    """scale · (code − zero) with k-bit integer zeros."""
    codes = q.codes_unpacked().float().view(-1, q.config.block_size)
    return (q.scales.float()[:, None] * (codes - q.block_zeros()[:, None])).view(q.shape)


def fmin_reference(q: QuantizedTensor) -> torch.Tensor:
    """scale · code + min with float mins."""
    codes = q.codes_unpacked().float().view(-1, q.config.block_size)
    return (q.scales.float()[:, None] * codes + q.zeros.float()[:, None]).view(q.shape)


def ggml_reference(q: QuantizedTensor) -> torch.Tensor:
    """The gguf package's dequantize of the stored GGUF blocks."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    kind = GGMLQuantizationType[q.config.ggml_type.upper()]
    raw = q.buffers["blocks"].numpy().reshape(q.shape[0], -1)
    return torch.from_numpy(dequantize(raw, kind)).view(q.shape)


def bnb_reference(q: QuantizedTensor) -> torch.Tensor:
    """bitsandbytes' own dequantize_4bit of the same buffers."""
    bnb = pytest.importorskip("bitsandbytes.functional")
    return bnb.dequantize_4bit(q.codes.view(-1, 1), bnb_state(q))


def bnb_state(q: QuantizedTensor):
    """bitsandbytes' QuantState of a bnb-format tensor (its constructor, its own maps)."""
    bnb = pytest.importorskip("bitsandbytes.functional")
    config = q.config
    table = bnb.get_4bit_type(config.quant_type, device="cpu")
    nested = None
    if config.double_quant:
        nested = bnb.QuantState(
            absmax=q.buffers["nested_absmax"],
            code=bnb.create_dynamic_map(),
            blocksize=256,
            dtype=torch.float32,
        )
    offset = q.buffers["offset"][0] if config.double_quant else None
    return bnb.QuantState(
        absmax=q.buffers["absmax"], shape=torch.Size(q.shape), code=table,
        blocksize=config.block_size, quant_type=config.quant_type, dtype=torch.float32,
        offset=offset, state2=nested,
    )  # fmt: skip


REFERENCES = {
    "nf": nf_reference,
    "int": int_reference,
    "fmin": fmin_reference,
    "ggml": ggml_reference,
    "bnb": bnb_reference,
}


def weight(seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(SHAPE, generator=generator) * torch.rand(SHAPE[0], 1, generator=generator)


def test_registry_lists_every_format_and_preset():
    assert list(formats()) == ["nf", "int", "fmin", "ggml", "bnb"]
    for name, config in presets().items():
        assert format_of(config).name in formats()
        assert config.name == name


@pytest.mark.parametrize("name", PRESETS)
def test_decode_matches_the_family_formula(name):
    q = quantize(weight(), name)
    reference = REFERENCES[format_of(q.config).name]
    torch.testing.assert_close(q.dequantize(), reference(q), rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", PRESETS)
def test_nbytes_is_what_the_buffers_hold(name):
    q = quantize(weight(), name)
    held = sum(t.numel() * t.element_size() for t in q.buffers.values())
    assert q.nbytes == held == storage_nbytes(q.config, SHAPE)
    assert tuple(q.buffers) == format_of(q.config).buffer_keys(q.config)


@pytest.mark.parametrize("name", PRESETS)
def test_state_dict_round_trip_is_bit_exact(name):
    q = quantize(weight(1), name)
    back = QuantizedTensor.from_state_dict(q.to_state_dict())
    assert back.config == q.config and back.shape == q.shape
    assert all(torch.equal(back.buffers[k], v) for k, v in q.buffers.items())


@pytest.mark.parametrize("name", PRESETS)
def test_error_is_within_half_a_step(name):
    """Round to nearest: no value is further from W than half the widest gap of its grid (NF:
    plus what lies beyond a double-quantized scale below the block's absmax, clamped to ±1;
    bitsandbytes: codes of the exact absmax, plus the error of its stored form;
    GGUF: a step, plus the fp16 rounding of d and the min after the codes were chosen; IQ4_NL:
    half its widest gap, plus what its scale search clips)."""
    w = weight(2)
    q = quantize(w, name)
    fmt = format_of(q.config).name
    grid = nf_levels(q.config.bits) if fmt == "nf" else torch.arange(2.0**q.config.bits)
    if fmt == "bnb":
        grid = code_table(q.config.quant_type).sort().values
    widest = float((grid[1:] - grid[:-1]).max())
    scale = q.block_scales().repeat_interleave(q.config.block_size).view(SHAPE)
    bound = scale * widest / 2
    if fmt == "nf":
        bound = bound + (w.abs() - scale).clamp(min=0)
    if fmt == "bnb":  # codes chosen with the exact absmax a, decoded with the stored a'
        exact = w.reshape(-1, q.config.block_size).abs().amax(1)
        exact = exact.repeat_interleave(q.config.block_size).view(SHAPE)
        bound = exact * widest / 2 + (exact - scale).abs()
    if fmt == "ggml":  # d (and Q5_1's min) stored in fp16 after the codes were chosen; Q4_0 /
        scale = scale.abs()  # Q5_0 reach 8·|d| on one side only: a full step beyond 7·|d|
        bound = scale + 2.0**-10 * (w.abs() + 32 * scale)
    if name == "iq4_nl":  # levels d·{−127 … 113}, widest gap 24·|d|; the scale search may clip
        bound = 12 * scale + (w.abs() - 113 * scale).clamp(min=0)
        bound = bound + 2.0**-10 * (w.abs() + 127 * scale)
    if name in ("q4_k", "q5_k"):
        bound = kquant_bound(q, w)
    if name == "q6_k":
        bound = q6_k_bound(q, w)
    if name == "q2_k":
        bound = q2_k_bound(q, w)
    if name == "q3_k":
        bound = q3_k_bound(q, w)
    assert bool(((w - q.dequantize()).abs() <= bound * (1 + 1e-3) + 1e-6).all())


def kquant_bound(q: QuantizedTensor, w: torch.Tensor) -> torch.Tensor:
    """K-quants: codes nearest with each sub-block's stored step d·s_j and offset −dmin·m_j, so
    half a step, plus how far a value lies outside [−dmin·m_j, nmax·d·s_j − dmin·m_j]."""
    raw = q.buffers["blocks"].view(-1, q.config.block_type.nbytes)
    d, dmin = (raw[:, k : k + 2].contiguous().view(torch.float16).float() for k in (0, 2))
    ls, lm = unpack_scales(raw[:, 4:16])
    step, bottom = (d * ls)[..., None], -(dmin * lm)[..., None]
    top = bottom + (2**q.config.bits - 1) * step
    x = w.reshape(-1, 8, 32)
    outside = torch.maximum(x - top, bottom - x).clamp(min=0)
    return (step / 2 + outside).reshape(w.shape)


@pytest.mark.parametrize("name", PRESETS)
def test_config_round_trips_through_its_dict(name):
    config = presets()[name]
    assert type(config).from_dict(config.to_dict()) == config
    assert config.to_dict()["format"] == format_of(config).name


def test_lorq_0_1_configs_still_load():
    """lorq 0.1 wrote one config class with every field; its dicts map onto the formats."""
    old_q4_1 = {
        "format": "int", "bits": 4, "block_size": 32, "scale_bits": 8, "scale_block_size": 256,
        "super_scale_dtype": "fp32", "scale_dtype": "fp16", "zero": "float",
    }  # fmt: skip
    old_nf3 = {**old_q4_1, "format": "nf", "bits": 3, "block_size": 64, "scale_dtype": "fp32"}
    old_nf3["zero"] = "int"
    assert type(presets()["q4_1"]).from_dict(old_q4_1) == presets()["q4_1"]
    assert type(presets()["nf3"]).from_dict(old_nf3) == presets()["nf3"]
    old_int = {**old_q4_1, "zero": "int"}
    assert type(presets()["int4-g32"]).from_dict(old_int) == presets()["int4-g32"]


def known_nf() -> tuple[QuantizedTensor, torch.Tensor]:
    """NF4 with an fp32 scale of 2: codes 0..15 four times decode to 2 · level[code]."""
    config = presets()["nf4-fp32-scales"]
    codes = torch.arange(16, dtype=torch.uint8).repeat(4)
    packed = (codes[0::2] << 4) | codes[1::2]  # high nibble first
    buffers = {"codes": packed, "scales": torch.tensor([2.0])}
    expected = 2.0 * torch.tensor(QLORA_NF4).repeat(4)
    return QuantizedTensor(config, (1, 64), buffers), expected.view(1, 64)


# QLoRA's published NF4 table (Dettmers et al. 2023; bitsandbytes' NF4 code)
QLORA_NF4 = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
]  # fmt: skip


def known_affine(zero: bool) -> tuple[QuantizedTensor, torch.Tensor]:
    """int4, G = 32, scale 0.5: integer zero 3 → 0.5·(c − 3); float min −1 → 0.5·c − 1."""
    config = presets()["int4-g32" if zero else "q4_1"]
    codes = torch.arange(16, dtype=torch.uint8).repeat(2)
    packed = (codes[0::2] << 4) | codes[1::2]
    scales = torch.tensor([0.5], dtype=torch.float16)
    zeros = torch.tensor([0x30], dtype=torch.uint8) if zero else torch.tensor([-1.0]).half()
    values = 0.5 * (codes.float() - 3) if zero else 0.5 * codes.float() - 1
    buffers = {"codes": packed, "scales": scales, "zeros": zeros}
    return QuantizedTensor(config, (1, 32), buffers), values.view(1, 32)


def known_ggml() -> tuple[QuantizedTensor, torch.Tensor]:
    """Q8_0 with d = 0.25 (fp16 bytes 0x3400 little-endian) and q = −16 … 15: 0.25 · q."""
    q = torch.arange(-16, 16, dtype=torch.int8)
    block = torch.cat([torch.tensor([0x00, 0x34], dtype=torch.uint8), q.view(torch.uint8)])
    return QuantizedTensor(presets()["q8_0"], (1, 32), {"blocks": block}), 0.25 * q.float()[None]


def known_bnb() -> tuple[QuantizedTensor, torch.Tensor]:
    """bitsandbytes FP4, fp32 absmax 3: codes 0..15 (bit patterns) decode to 3 · their FP4 value
    (sign, 2 exponent bits, 1 mantissa bit; normalised by its largest value, 12)."""
    config = BnbConfig(quant_type="fp4", double_quant=False)
    codes = torch.arange(16, dtype=torch.uint8).repeat(4)
    packed = (codes[0::2] << 4) | codes[1::2]
    fp4 = [0, 0.0625, 8, 12, 4, 6, 2, 3]
    expected = 3.0 * torch.tensor(fp4 + [-v for v in fp4]).repeat(4) / 12
    buffers = {"codes": packed, "absmax": torch.tensor([3.0])}
    return QuantizedTensor(config, (1, 64), buffers), expected.view(1, 64)


KNOWN_BLOCKS = {
    "nf": known_nf,
    "int": lambda: known_affine(zero=True),
    "fmin": lambda: known_affine(zero=False),
    "ggml": known_ggml,
    "bnb": known_bnb,
}


@pytest.mark.parametrize("name", list(formats()))
def test_decode_of_a_known_block(name):
    """Hand-written buffers decode to hand-computed values (a new format must add its block)."""
    q, expected = KNOWN_BLOCKS[name]()
    torch.testing.assert_close(q.dequantize(), expected, rtol=0, atol=1e-6)


def q6_k_bound(q: QuantizedTensor, w: torch.Tensor) -> torch.Tensor:
    """Q6_K: codes nearest with each 16-value sub-block's step d·sc_j (signed), so half a step,
    plus how far a value lies outside the step's range −32 … 31."""
    raw = q.buffers["blocks"].view(-1, 210)
    d = raw[:, 208:210].contiguous().view(torch.float16).float()
    step = (d * raw[:, 192:208].contiguous().view(torch.int8).float())[..., None]
    return symmetric_bound(w, step, 32)


def q3_k_bound(q: QuantizedTensor, w: torch.Tensor) -> torch.Tensor:
    """Q3_K: as Q6_K with codes −4 … 3; the 6-bit signed scales unpacked here from the raw
    bytes as llama.cpp lays them out (low nibbles in bytes 0–7, two high bits in bytes 8–11)."""
    raw = q.buffers["blocks"].view(-1, 110)
    packed = raw[:, 96:108].int()
    low = torch.cat([packed[:, :8] & 0xF, packed[:, :8] >> 4], 1)
    tops = (packed[:, 8:12, None] >> (2 * torch.arange(4))) & 3
    sc = (low | (tops.transpose(1, 2).reshape(-1, 16) << 4)).float() - 32
    d = raw[:, 108:110].contiguous().view(torch.float16).float()
    return symmetric_bound(w, (d * sc)[..., None], 4)


def symmetric_bound(w: torch.Tensor, step: torch.Tensor, half: int) -> torch.Tensor:
    """Half a step plus how far a value lies outside step · (−half … half − 1), per 16 values."""
    ends = torch.stack([-half * step, (half - 1) * step])
    low, high = ends.amin(0), ends.amax(0)
    x = w.reshape(-1, 16, 16)
    outside = torch.maximum(x - high, low - x).clamp(min=0)
    return (step.abs() / 2 + outside).reshape(w.shape)


def q2_k_bound(q: QuantizedTensor, w: torch.Tensor) -> torch.Tensor:
    """Q2_K: as the other K-quants, with 4-bit s_j (low nibble) and m_j (high) per 16 values."""
    raw = q.buffers["blocks"].view(-1, 84)
    d, dmin = (raw[:, k : k + 2].contiguous().view(torch.float16).float() for k in (80, 82))
    packed = raw[:, :16]
    step = (d * (packed & 0xF).float())[..., None]
    bottom = -(dmin * (packed >> 4).float())[..., None]
    x = w.reshape(-1, 16, 16)
    outside = torch.maximum(x - (bottom + 3 * step), bottom - x).clamp(min=0)
    return (step / 2 + outside).reshape(w.shape)

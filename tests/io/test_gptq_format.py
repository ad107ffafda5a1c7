"""The GPTQ checkpoint layout. Oracles: a decoder written here from the format's public
description (shifts and masks on int32 words, Ŵ = scales·(q − (qzeros + 1))), AutoGPTQ's 3-bit
word-straddling positions, transformers' GPTQConfig, bit-exact round trips."""

import json

import numpy as np
import pytest
import torch
from conftest import tiny_llama
from safetensors.torch import load_file

from lorq import QuantConfig, quantize
from lorq.io.gptq import (
    from_gptq,
    gptq_quantization_config,
    pack_int32,
    to_gptq,
    write_gptq_checkpoint,
)
from lorq.model.targets import dense_weight, find_targets
from lorq.quant import IntConfig

INT_PRESETS = ["int2-g32", "int3-g32", "int4-g32", "int8-g128"]


def gaussian(out=64, size=256, seed=0):
    return torch.randn(out, size, generator=torch.Generator().manual_seed(seed))


def bit_stream(words):
    """The bits of int32 words along axis 0, word by word, least significant bit first."""
    u = words.numpy().view(np.uint32).astype(np.uint64)
    bits = (u[:, None, :] >> np.arange(32, dtype=np.uint64)[None, :, None]) & 1
    return bits.reshape(-1, u.shape[1])


def read_values(words, bits):
    """k-bit values stored little-endian one after another in the bit stream of each column."""
    stream = bit_stream(words)
    stream = stream.reshape(-1, bits, stream.shape[1])
    return (stream * (1 << np.arange(bits, dtype=np.uint64))[None, :, None]).sum(1)


def decode(tensors, bits, v1=True):
    """Ŵ (out × in) from qweight / qzeros / scales / g_idx, independently of lorq's packing."""
    codes = read_values(tensors["qweight"], bits).astype(np.float32)  # (in, out)
    zeros = read_values(tensors["qzeros"].T.contiguous(), bits).T.astype(np.float32)  # (G, out)
    if v1:
        zeros = zeros + 1
    g_idx = tensors["g_idx"].numpy().astype(np.int64)
    scales = tensors["scales"].float().numpy()
    return torch.from_numpy((scales[g_idx] * (codes - zeros[g_idx])).T.copy())


def decode_word_shifts(qweight, bits):
    """Classic 2/4/8-bit description: code i sits in word i // (32/k) at shift k·(i mod 32/k)."""
    per = 32 // bits
    rows = np.arange(qweight.shape[0] * per)
    u = qweight.numpy().view(np.uint32)
    return (u[rows // per] >> (bits * (rows % per))[:, None]) & ((1 << bits) - 1)


@pytest.mark.parametrize("preset", INT_PRESETS)
def test_independent_decoder_reproduces_dequantize(preset):
    q = quantize(gaussian(seed=1), preset)
    tensors = to_gptq(q)
    bits, group = q.config.bits, q.config.block_size
    assert tensors["qweight"].shape == (256 * bits // 32, 64)
    assert tensors["qzeros"].shape == (256 // group, 64 * bits // 32)
    assert tensors["scales"].shape == (256 // group, 64) and tensors["scales"].dtype == torch.half
    assert torch.equal(tensors["g_idx"], torch.arange(256, dtype=torch.int32) // group)
    assert all(tensors[k].dtype == torch.int32 for k in ("qweight", "qzeros", "g_idx"))
    assert torch.equal(decode(tensors, bits), q.dequantize())
    if bits != 3:
        codes = decode_word_shifts(tensors["qweight"], bits)
        assert np.array_equal(codes.T, q.codes_unpacked().numpy())


def test_three_bit_values_straddle_words_as_autogptq():
    """Of 32 3-bit values in 3 words, value 10 takes bits 30–31 of word 0 and bit 0 of word 1,
    value 11 starts at bit 1 of word 1, value 21 takes bit 31 of word 1 and bits 0–1 of word 2,
    value 22 starts at bit 2 of word 2."""
    values = torch.zeros(32, 1, dtype=torch.int64)
    values[10] = 0b111
    words = pack_int32(values, 3)[:, 0].tolist()
    assert words == [-(1 << 31) + (1 << 30), 1, 0]  # 0b11 << 30 as int32, then bit 0
    values[10], values[11], values[21], values[22] = 0, 0b101, 0b111, 0b011
    words = pack_int32(values, 3)[:, 0].tolist()
    assert words == [0, (0b101 << 1) - (1 << 31), 0b11 | (0b011 << 2)]


@pytest.mark.parametrize("preset", INT_PRESETS)
@pytest.mark.parametrize("checkpoint_format", ["gptq", "gptq_v2"])
def test_round_trip_is_bit_exact(preset, checkpoint_format):
    q = quantize(gaussian(out=96, size=128, seed=2), preset)
    config = QuantConfig.preset(preset)
    back = from_gptq(
        to_gptq(q, checkpoint_format), config.bits, config.block_size, checkpoint_format
    )
    assert back.config == q.config and back.shape == q.shape
    assert back.tensors().keys() == q.tensors().keys()
    for name, tensor in q.tensors().items():
        assert torch.equal(back.tensors()[name], tensor), name


def test_zero_point_zero_needs_v2():
    w = gaussian(out=32, size=64, seed=3)
    w[0, :32] = w[0, :32].abs()  # a group with min ≥ 0 has integer zero 0
    q = quantize(w, "int4-g32")
    assert q.block_zeros()[0] == 0
    with pytest.raises(ValueError, match="gptq_v2"):
        to_gptq(q)
    tensors = to_gptq(q, "gptq_v2")
    assert torch.equal(decode(tensors, 4, v1=False), q.dequantize())


@pytest.mark.parametrize(
    ("config", "match"),
    [
        (QuantConfig.preset("q4_1"), "integer zero.*int4-g32"),
        (QuantConfig.preset("nf4"), "nf4 cannot be written as GPTQ"),
        (IntConfig(bits=4, block_size=32, scale_dtype="bf16"), "fp16"),
    ],
)
def test_unsupported_configs_are_value_errors(config, match):
    q = quantize(gaussian(out=32, size=64), config)
    with pytest.raises(ValueError, match=match):
        to_gptq(q)
    with pytest.raises(ValueError, match=match):
        gptq_quantization_config(config)


def test_bad_bits_shapes_and_act_order_are_value_errors():
    tensors = to_gptq(quantize(gaussian(out=32, size=64), "int4-g32"))
    with pytest.raises(ValueError, match=r"bits=5.*2, 3, 4, 8"):
        from_gptq(tensors, 5, 32)
    with pytest.raises(ValueError, match="qzeros has shape"):
        from_gptq(tensors, 4, 64)
    with pytest.raises(ValueError, match="act-order"):
        from_gptq({**tensors, "g_idx": tensors["g_idx"].flip(0)}, 4, 32)
    with pytest.raises(ValueError, match="missing"):
        from_gptq({"qweight": tensors["qweight"]}, 4, 32)
    with pytest.raises(ValueError, match="multiple of 32"):
        to_gptq(quantize(gaussian(out=48, size=64), "int4-g32"))
    with pytest.raises(ValueError, match="checkpoint_format"):
        to_gptq(quantize(gaussian(out=32, size=64), "int4-g32"), "gptq_v3")


def test_quantization_config_is_read_by_transformers():
    from transformers import GPTQConfig

    entry = gptq_quantization_config(QuantConfig.preset("int3-g32"))
    assert entry["checkpoint_format"] == "gptq" and entry["sym"] is False
    parsed = GPTQConfig.from_dict(entry)
    assert (parsed.bits, parsed.group_size, parsed.desc_act, parsed.sym) == (3, 32, False, False)
    assert parsed.format == "gptq"


def compressed_llama(preset="int4-g32"):
    model = tiny_llama()
    targets = find_targets(model)
    layers = {name: quantize(dense_weight(m), preset) for name, m in targets.items()}
    dense = {k: v for k, v in model.state_dict().items() if k.removesuffix(".weight") not in layers}
    return model, layers, dense


def test_checkpoint_directory(tmp_path):
    model, layers, dense = compressed_llama()
    out = write_gptq_checkpoint(tmp_path / "gptq", layers, dense, model.config.to_dict())
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "gptq"
    assert config["model_type"] == "llama"
    tensors = load_file(out / "model.safetensors")
    expected = set(dense) | {
        f"{n}.{k}" for n in layers for k in ("qweight", "qzeros", "scales", "g_idx")
    }
    assert set(tensors) == expected
    # a loader built from the public description gives the same model as q.dequantize()
    decoded, reference = tiny_llama(seed=1), tiny_llama(seed=2)
    for name, q in layers.items():
        own = {k: tensors[f"{name}.{k}"] for k in ("qweight", "qzeros", "scales", "g_idx")}
        decoded.get_submodule(name).weight.data = decode(own, 4)
        reference.get_submodule(name).weight.data = q.dequantize()
    for key, value in dense.items():
        decoded.state_dict()[key].copy_(tensors[key])
        reference.state_dict()[key].copy_(value)
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(decoded(ids).logits, reference(ids).logits)


def test_checkpoint_refuses_to_overwrite_and_mixed_configs(tmp_path):
    model, layers, dense = compressed_llama()
    path = write_gptq_checkpoint(tmp_path / "m", layers, dense, model.config.to_dict())
    with pytest.raises(ValueError, match="overwrite"):
        write_gptq_checkpoint(path, layers, dense, model.config.to_dict())
    write_gptq_checkpoint(path, layers, dense, model.config.to_dict(), overwrite=True)
    (tmp_path / "other").mkdir()
    with pytest.raises(ValueError, match="not a GPTQ model"):
        write_gptq_checkpoint(tmp_path / "other", layers, dense, {}, overwrite=True)
    first = next(iter(layers))
    mixed = {**layers, first: quantize(layers[first].dequantize(), "int2-g32")}
    with pytest.raises(ValueError, match="one quantization config"):
        write_gptq_checkpoint(tmp_path / "mixed", mixed, dense, {})
    with pytest.raises(ValueError, match="clashes"):
        write_gptq_checkpoint(tmp_path / "clash", layers, {f"{first}.weight": torch.zeros(1)}, {})
    assert not (tmp_path / "mixed").exists() and not (tmp_path / "clash").exists()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("config", "checkpoint_format"),
    [
        (QuantConfig.preset("int4-g32"), "gptq"),
        (QuantConfig.preset("int3-g32"), "gptq"),
        (QuantConfig.preset("int2-g32"), "gptq_v2"),
        (IntConfig(bits=8, block_size=32), "gptq"),
    ],
)
def test_transformers_loads_the_checkpoint(tmp_path, config, checkpoint_format):
    """Independent implementation: transformers + optimum + GPTQModel's torch kernel."""
    pytest.importorskip("optimum")
    pytest.importorskip("gptqmodel")
    from transformers import AutoModelForCausalLM, GPTQConfig

    model = tiny_llama()
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        original = model(ids).logits
    targets = find_targets(model)
    layers = {name: quantize(dense_weight(m), config) for name, m in targets.items()}
    dense = {k: v for k, v in model.state_dict().items() if k.removesuffix(".weight") not in layers}
    for name, q in layers.items():
        model.get_submodule(name).weight.data = q.dequantize()
    path = write_gptq_checkpoint(
        tmp_path / "m", layers, dense, model.config.to_dict(), checkpoint_format=checkpoint_format
    )
    loaded = AutoModelForCausalLM.from_pretrained(
        path,
        device_map="cpu",
        dtype=torch.float32,
        quantization_config=GPTQConfig(bits=config.bits, backend="torch"),
    )
    with torch.no_grad():
        expected, got = model(ids).logits, loaded(ids).logits.float()
    quantization_error = (original - expected).abs().max().item()
    # the kernel's own rounding stays well below what quantization (or a wrong decoding) changes
    assert (got - expected).abs().max() < min(1e-3, 0.2 * quantization_error)

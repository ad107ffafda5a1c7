"""QuantizedTensor storage. Oracles: §1.2/§1.3 formulas, safetensors round trip, byte counts."""

import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorq import QuantConfig, QuantizedTensor, quantize
from lorq.quant import FloatMinConfig, IntConfig, NFConfig, presets
from lorq.quant.tensor import storage_nbytes

AFFINE = {"int": IntConfig, "float": FloatMinConfig}

GRID = [
    NFConfig(bits=b, block_size=bs, scale_bits=b0, scale_block_size=b1, super_scale_dtype=d)
    for b in (2, 3, 4, 8)
    for bs in (16, 64, 256)
    for b0, b1, d in ((8, 256, "fp32"), (3, 16, "fp16"), (4, 64, "bf16"), (None, 256, "fp32"))
] + [
    AFFINE[z](bits=b, block_size=g)
    for b in (2, 3, 4, 8)
    for g in (16, 32, 128)
    for z in ("int", "float")
]


@pytest.mark.parametrize("config", GRID, ids=lambda c: c.name)
def test_bits_per_param_matches_formula(config):
    w = torch.randn(256, 1024)
    q = quantize(w, config)
    assert q.nbytes == sum(t.numel() * t.element_size() for t in q.tensors().values())
    assert q.nbytes == storage_nbytes(config, (256, 1024))
    # the only difference from the formula: the fp32 offset scalar of double quantization
    overhead = 32 / w.numel() if getattr(config, "double_quant", False) else 0.0
    assert q.bits_per_param == pytest.approx(config.nominal_bits + overhead, abs=1e-9)


def test_nf4_preset_is_qlora_storage():
    q = quantize(torch.randn(4096, 1024), "nf4")
    assert q.bits_per_param == pytest.approx(4.127, abs=0.001)
    assert QuantConfig.preset("nf4-fp32-scales").nominal_bits == 4.5
    assert QuantConfig.preset("q4_1").nominal_bits == 5.0


@pytest.mark.parametrize("config", GRID[::5], ids=lambda c: c.name)
def test_safetensors_round_trip_is_bit_exact(config, tmp_path, heavy_tailed):
    q = quantize(heavy_tailed, config)
    save_file(q.to_state_dict(), tmp_path / "q.safetensors")
    back = QuantizedTensor.from_state_dict(load_file(tmp_path / "q.safetensors"))
    assert back.config == q.config and back.shape == q.shape
    assert q.tensors().keys() == back.tensors().keys()
    for name, tensor in q.tensors().items():
        assert (
            torch.equal(tensor, back.tensors()[name]) and tensor.dtype == back.tensors()[name].dtype
        )
    assert torch.equal(back.dequantize(), q.dequantize())


def test_state_dict_without_meta_is_rejected():
    with pytest.raises(ValueError, match="quant_meta"):
        QuantizedTensor.from_state_dict({"codes": torch.zeros(4, dtype=torch.uint8)})


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"bits": 5}, "bits=5"),
        ({"bits": 1}, "bits=1"),
        ({"block_size": 48}, "block_size=48"),
        ({"block_size": 8}, "block_size=8"),
        ({"block_size": 8192}, "block_size=8192"),
        ({"format": "int", "block_size": 2048}, "block_size=2048"),
        ({"format": "fp"}, "format='fp'"),
        ({"scale_bits": 5}, "scale_bits=5"),
        ({"super_scale_dtype": "fp64"}, "super_scale_dtype='fp64'"),
        ({"format": "int", "zero": "none"}, "zero='none'"),
    ],
)
def test_bad_config_names_field_and_value(kwargs, field):
    with pytest.raises(ValueError, match=field.replace("(", r"\(")) as info:
        QuantConfig.from_dict({"format": "nf", **kwargs})
    assert "allowed" in str(info.value)


def test_unknown_preset():
    with pytest.raises(ValueError, match=r"unknown quantization preset 'nf5'.*nf4"):
        QuantConfig.preset("nf5")


@pytest.mark.parametrize(
    ("weight", "config", "message"),
    [
        (torch.randn(4, 4, 4), "nf4", "2-D"),
        (torch.randn(64), "nf4", "2-D"),
        (torch.randint(0, 5, (4, 64)), "nf4", "dtype torch.int64"),
        (torch.full((4, 64), float("nan")), "nf4", "NaN or Inf"),
        (torch.tensor([[1.0, float("inf")] * 32]), "int4-g32", "NaN or Inf"),
        (torch.randn(3, 20), "nf4", "block_size=64 does not divide"),
        (torch.randn(4, 48), "int4-g32", "block_size=32 does not divide in_features=48"),
        (torch.zeros(0, 64), "nf4", "empty"),
    ],
)
def test_bad_weight(weight, config, message):
    with pytest.raises(ValueError, match=message):
        quantize(weight, config)


def test_config_dict_round_trip():
    for name in presets():
        config = QuantConfig.preset(name)
        assert QuantConfig.from_dict(config.to_dict()) == config
        assert config.name == name
    with pytest.raises(ValueError, match="unknown NFConfig field"):
        QuantConfig.from_dict({"format": "nf", "bitz": 4})


PEAK_SCRIPT = textwrap.dedent(
    """
    import resource, torch, lorq
    w = torch.randn(4096, 11008)
    lorq.quantize(w[:64], "{preset}")  # warm up code paths and allocator
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    q = lorq.quantize(w, "{preset}")
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print((after - before) * 1024 / (w.numel() * 4))
    """
)


@pytest.mark.parametrize("preset", ["nf4", "int4-g32"])
def test_quantize_temporary_memory_under_3x(preset):
    """Peak RSS growth while quantizing a 4096×11008 fp32 matrix, in units of the matrix size."""
    out = subprocess.run(
        [sys.executable, "-c", PEAK_SCRIPT.format(preset=preset)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert float(out.stdout.strip().splitlines()[-1]) < 3.0

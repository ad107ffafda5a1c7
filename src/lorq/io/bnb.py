"""bitsandbytes' pre-quantized 4-bit checkpoint: what transformers writes for a model loaded
with ``BitsAndBytesConfig(load_in_4bit=True)`` and reads back with ``from_pretrained``
(docs/algorithms.md §8).

For every quantized linear ``<module>`` (weight W, out × in, codes of a ``BnbConfig``):

    <module>.weight                                uint8 (out·in/2, 1): two codes a byte, high first
    <module>.weight.absmax                         (nb,) fp32, or (nb,) uint8 when double quantized
    <module>.weight.quant_map                      (16,) fp32: the NF4 / FP4 table
    <module>.weight.nested_absmax                  (⌈nb/256⌉,) fp32      (double quantization)
    <module>.weight.nested_quant_map               (256,) fp32 dynamic map (double quantization)
    <module>.weight.quant_state.bitsandbytes__<t>  uint8 JSON: quant_type, blocksize, dtype,
                                                   shape (+ nested_blocksize, _dtype, _offset)

``config.json`` carries ``quantization_config`` (``quant_method: bitsandbytes``, 4-bit, the quant
type, double quantization, compute dtype, the linears left dense). The codes are lorq's own bytes:
bitsandbytes packs 4-bit codes high nibble first, as lorq does, so nothing is requantized.
"""

from __future__ import annotations

import json

import torch

from lorq.quant import NFConfig, format_of
from lorq.quant.bnb import NESTED_BLOCK, BnbConfig, code_table, dynamic_map
from lorq.quant.tensor import QuantizedTensor

TORCH_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def _state_json(q: QuantizedTensor, dtype: torch.dtype) -> torch.Tensor:
    """The non-tensor part of bitsandbytes' quant state, as its uint8 JSON tensor."""
    config = q.config
    assert isinstance(config, BnbConfig)
    state = {
        "quant_type": config.quant_type,
        "blocksize": config.block_size,
        "dtype": TORCH_NAMES[dtype],
        "shape": list(q.shape),
    }
    if config.double_quant:
        state["nested_blocksize"] = NESTED_BLOCK
        state["nested_dtype"] = "float32"
        state["nested_offset"] = q.buffers["offset"].item()
    return torch.tensor(list(json.dumps(state).encode()), dtype=torch.uint8)


def bnb_tensors(name: str, q: QuantizedTensor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of the linear ``name`` holding ``q`` (a BnbConfig tensor)."""
    config = q.config
    assert isinstance(config, BnbConfig)
    key = f"{name}.weight"
    tensors = {
        key: q.codes.reshape(-1, 1).cpu(),
        f"{key}.absmax": q.buffers["absmax"].cpu(),
        f"{key}.quant_map": code_table(config.quant_type).clone(),
    }
    if config.double_quant:
        tensors[f"{key}.nested_absmax"] = q.buffers["nested_absmax"].cpu()
        tensors[f"{key}.nested_quant_map"] = dynamic_map().clone()
    tensors[f"{key}.quant_state.bitsandbytes__{config.quant_type}"] = _state_json(q, dtype)
    return tensors


def quantization_config(
    config: BnbConfig, dtype: torch.dtype, dense: list[str]
) -> dict[str, object]:
    """``config.json``'s ``quantization_config`` for codes of ``config`` computed in ``dtype``,
    the linears ``dense`` left unquantized."""
    from transformers import BitsAndBytesConfig

    bnb = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=config.quant_type,
        bnb_4bit_use_double_quant=config.double_quant,
        bnb_4bit_compute_dtype=dtype,
        bnb_4bit_quant_storage=torch.uint8,
        llm_int8_skip_modules=dense,
    )
    return bnb.to_dict()


def as_bnb(q: QuantizedTensor) -> QuantizedTensor:
    """``q`` as bitsandbytes 4-bit storage (a ``BnbConfig`` tensor) with the same codes and
    values, nothing requantized: bitsandbytes' own formats as they are, and NF4 with fp32
    absmax scales (``nf4-fp32-scales``: bitsandbytes' NF4 without double quantization, byte for
    byte: the same table, packing and scales); ValueError for anything else."""
    if isinstance(q.config, BnbConfig):
        return q
    config = q.config
    if isinstance(config, NFConfig) and format_of(config).name == "nf":
        fp32 = config.scale_bits is None and config.scale_dtype == "fp32"
        if config.bits == 4 and fp32 and config.block_size >= 32:
            bnb = BnbConfig(block_size=config.block_size, quant_type="nf4", double_quant=False)
            return QuantizedTensor(bnb, q.shape, {"codes": q.codes, "absmax": q.buffers["scales"]})
    raise ValueError(f"{q.config.name} has no bitsandbytes 4-bit equivalent")

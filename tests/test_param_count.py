"""Trainable parameters of LLaMA-7B adapters. Oracle: QA-LoRA paper (arXiv 2309.14717) Table 2,
r = 64, G = 32 on all seven projections: 89.3 M (QA-LoRA) vs 159.9 M (LoRA).

The layers are really built (QALoraLinear / QuantLoraLinear) on a meta-device LLaMA-7B, with an
int4-g32 Q of meta buffers (no weights are allocated or quantized), and their parameters counted.
"""

import pytest
import torch

from lorq import QuantConfig, QuantizedTensor
from lorq.model.targets import dense_weight, find_targets, freeze_all_but_lora, set_module
from lorq.nn import QALoraLinear, QuantLoraLinear
from lorq.quant.packing import packed_nbytes

PROJECTIONS = tuple(
    rf"\.{p}$"
    for p in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
)
RANK, QUANT = 64, QuantConfig.preset("int4-g32")


def meta_q(shape: tuple[int, int]) -> QuantizedTensor:
    """An int4-g32 QuantizedTensor of ``shape`` whose buffers live on the meta device."""
    numel, blocks = shape[0] * shape[1], shape[0] * shape[1] // QUANT.block_size

    def empty(n: int, dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(n, dtype=dtype, device="meta")

    codes, zeros = (
        empty(packed_nbytes(numel, 4), torch.uint8),
        empty(packed_nbytes(blocks, 4), torch.uint8),
    )
    buffers = {"codes": codes, "scales": empty(blocks, torch.float16), "zeros": zeros}
    return QuantizedTensor(QUANT, shape, buffers)


def qa_lora_layer(module: torch.nn.Module) -> QALoraLinear:
    out_features, in_features = dense_weight(module).shape
    q = meta_q((out_features, in_features))
    return QALoraLinear.from_linear(module, QUANT, RANK, 16.0, q=q)


def lora_layer(module: torch.nn.Module) -> QuantLoraLinear:
    out_features, in_features = dense_weight(module).shape
    lora_B = torch.empty(out_features, RANK, device="meta")
    lora_A = torch.empty(RANK, in_features, device="meta")
    return QuantLoraLinear(meta_q((out_features, in_features)), lora_B, lora_A, 16.0 / RANK)


@pytest.fixture(scope="module")
def llama_7b():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig()  # LLaMA-7B: hidden 4096, intermediate 11008, 32 layers, 32 heads
    assert (config.hidden_size, config.intermediate_size) == (4096, 11008)
    assert (config.num_hidden_layers, config.num_attention_heads) == (32, 32)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    return model


@pytest.mark.parametrize(("build", "millions"), [(qa_lora_layer, 89.3), (lora_layer, 159.9)])
def test_llama_7b_trainable_parameters(llama_7b, build, millions):
    import copy

    model = copy.deepcopy(llama_7b)
    targets = find_targets(model, include=PROJECTIONS)
    assert len(targets) == 7 * 32
    for name, module in targets.items():
        set_module(model, name, build(module))
    freeze_all_but_lora(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert round(trainable / 1e6, 1) == millions

"""Compression methods as units: each turns one target matrix — with its statistics and its plan
entry — into the layer that replaces it (docs/algorithms.md §2, §5).

    plain    Q = quant(W) (round to nearest, importance-weighted, or GPTQ on H); B = 0, A Kaiming
    lq       LQ-LoRA: SVD first, early stop          W ≈ Q + s·B·A      (QuantLoraLinear)
    loftq    LoftQ: quantize first, T = 5            W ≈ Q + s·B·A      (QuantLoraLinear)
    qa-lora  an INT-k base (RTN, GPTQ, or the source's own codes) + a group-pooled adapter

The pipeline calls ``method_of(config.method).compress(target, config)`` and knows no method by
name; a new method is one module here and one line in ``METHODS``.
"""

from __future__ import annotations

from lorq.methods.base import Compressed, Method, Target
from lorq.methods.lowrank import LowRank
from lorq.methods.plain import Plain
from lorq.methods.qa_lora import QALora

METHODS: dict[str, Method] = {
    "plain": Plain(),
    "lq": LowRank(),
    "loftq": LowRank(),
    "qa-lora": QALora(),
}


def method_of(name: str) -> Method:
    """The method registered as ``name`` (CompressConfig has validated it)."""
    return METHODS[name]


__all__ = ["METHODS", "Compressed", "Method", "Target", "method_of"]

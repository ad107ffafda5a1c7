"""Compression methods as units: each turns one target matrix — with its statistics and its plan
entry — into the layer that replaces it (docs/algorithms.md §2, §5).

    plain    Q = quant(W) (round to nearest, importance-weighted, or GPTQ on H); B = 0, A Kaiming
    lq       LQ-LoRA: SVD first, early stop          W ≈ Q + s·B·A      (QuantLoraLinear)
    loftq    LoftQ: quantize first, T = 5            W ≈ Q + s·B·A      (QuantLoraLinear)
    qa-lora  an INT-k base (RTN, GPTQ, or the source's own codes) + a group-pooled adapter

The pipeline calls ``method_of(config.method, rank).compress(target, config)`` and knows no
method by name; a new method is one module here and one line in ``METHODS``. A matrix a plan
gives rank 0 gets ``QuantOnly``: Q alone, no adapter.
"""

from __future__ import annotations

from lorq.methods.base import Compressed, Method, Target
from lorq.methods.lowrank import LowRank
from lorq.methods.plain import Plain, QuantOnly
from lorq.methods.qa_lora import QALora

METHODS: dict[str, Method] = {
    "plain": Plain(),
    "lq": LowRank(),
    "loftq": LowRank(),
    "qa-lora": QALora(),
}


def method_of(name: str, rank: int | None = None) -> Method:
    """The method registered as ``name`` (CompressConfig has validated it); Q alone at
    ``rank`` 0."""
    return QuantOnly() if rank == 0 else METHODS[name]


__all__ = ["METHODS", "Compressed", "Method", "Target", "method_of"]

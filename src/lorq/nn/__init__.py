"""nn.Module layers: the only place with nn.Module subclasses.

Every quantized layer is a :class:`QuantLinear` (``isinstance`` finds them all); ``kind`` tells
them apart ("quant", "lora", "qa-lora") and ``has_lora`` says whether it carries trainable
factors ``lora_A``, ``lora_B`` and a ``scaling`` (False for a merged, quantized-only layer).
A :class:`QuantEmbedding` holds a packed token-embedding table (kind "embedding").
"""

from lorq.nn.lora_linear import QuantLoraLinear
from lorq.nn.qa_lora_linear import MergeError, QALoraLinear
from lorq.nn.quant_embedding import QuantEmbedding, packed_linears, tied_packed_head
from lorq.nn.quant_linear import AdapterLinear, QuantLinear, decoded_once

__all__ = [
    "AdapterLinear",
    "MergeError",
    "QALoraLinear",
    "QuantEmbedding",
    "QuantLinear",
    "QuantLoraLinear",
    "decoded_once",
    "packed_linears",
    "tied_packed_head",
]

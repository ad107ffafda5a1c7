"""lorq: quantized + low-rank adaptation and compression of large language models.

W ≈ Q + s·B·A: a frozen, bit-packed quantized part Q and a small trainable low-rank part B·A.
"""

from lorq.config import DecomposeConfig, QuantConfig
from lorq.decompose import Decomposition, decompose
from lorq.quant import quantize
from lorq.quant.tensor import QuantizedTensor

__version__ = "0.1.0"

__all__ = [
    "DecomposeConfig",
    "Decomposition",
    "QuantConfig",
    "QuantizedTensor",
    "__version__",
    "decompose",
    "quantize",
]

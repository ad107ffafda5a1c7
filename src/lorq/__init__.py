"""lorq: quantized + low-rank adaptation and compression of large language models.

W ≈ Q + s·B·A: a frozen, bit-packed quantized part Q and a small trainable low-rank part B·A.
"""

__version__ = "0.1.0"

from lorq.budget import BudgetPlan, plan_budget
from lorq.config import CompressConfig, DecomposeConfig, QuantConfig
from lorq.decompose import Decomposition, decompose
from lorq.fisher import estimate_fisher
from lorq.io import load, save
from lorq.pipeline import CompressResult, compress
from lorq.quant import quantize
from lorq.quant.tensor import QuantizedTensor

__all__ = [
    "BudgetPlan",
    "CompressConfig",
    "CompressResult",
    "DecomposeConfig",
    "Decomposition",
    "QuantConfig",
    "QuantizedTensor",
    "__version__",
    "compress",
    "decompose",
    "estimate_fisher",
    "load",
    "plan_budget",
    "quantize",
    "save",
]

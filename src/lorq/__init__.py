"""lorq: quantized + low-rank adaptation and compression of large language models.

W ≈ Q + s·B·A: a frozen, bit-packed quantized part Q and a small trainable low-rank part B·A.
Every job is one call: ``compress_model`` (``compress_streaming`` for models larger than memory:
one block at a time, resumable, on many processes), ``finetune``, ``merge``, ``export``;
``save`` / ``load`` read and write lorq's own directory.
"""

from lorq._version import __version__
from lorq.budget import BudgetPlan, plan_budget
from lorq.compress import CompressResult, compress, compress_model
from lorq.compress_stream import StreamResult, compress_streaming, plan_streaming
from lorq.config import CompressConfig, DecomposeConfig
from lorq.decompose import Decomposition, decompose
from lorq.export import export, export_targets
from lorq.finetune import finetune_model as finetune
from lorq.fisher import estimate_fisher
from lorq.io import hf_quantizer as _hf_quantizer  # noqa: F401 (registers quant_method "lorq")
from lorq.io import load, save
from lorq.merge import MergeResult, merge
from lorq.quant import QuantConfig, QuantizedTensor, formats, presets, quantize
from lorq.train import FinetuneConfig

__all__ = [
    "BudgetPlan",
    "CompressConfig",
    "CompressResult",
    "DecomposeConfig",
    "Decomposition",
    "FinetuneConfig",
    "MergeResult",
    "QuantConfig",
    "QuantizedTensor",
    "StreamResult",
    "__version__",
    "compress",
    "compress_model",
    "compress_streaming",
    "decompose",
    "estimate_fisher",
    "export",
    "export_targets",
    "finetune",
    "formats",
    "load",
    "merge",
    "plan_budget",
    "plan_streaming",
    "presets",
    "quantize",
    "save",
]

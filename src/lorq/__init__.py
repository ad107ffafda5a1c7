"""lorq: quantized + low-rank adaptation and compression of large language models.

W ≈ Q + s·B·A: a frozen, bit-packed quantized part Q and a small trainable low-rank part B·A.
Every job is one call: ``compress_model`` (any source, into memory or a directory written as it
goes; ``compress`` on a model in memory, in place), ``plan_model``, ``finetune``, ``recover``,
``merge``, ``export``; ``save`` / ``load`` read and write lorq's own directory.
"""

from lorq._version import __version__
from lorq.budget import BudgetPlan, plan_budget
from lorq.calibrate.tokens import Calibration
from lorq.config import CompressConfig, DecomposeConfig
from lorq.decomposition import Decomposition, decompose
from lorq.exporters import export_targets
from lorq.io import hf_quantizer as _hf_quantizer  # noqa: F401 (registers quant_method "lorq")
from lorq.io import load, save
from lorq.jobs.compress import CompressResult, compress, compress_model, plan_model
from lorq.jobs.export import export
from lorq.jobs.finetune import finetune_model as finetune
from lorq.jobs.merge import MergeResult, merge
from lorq.jobs.recover import recover
from lorq.jobs.statistics import estimate_fisher, estimate_hessians
from lorq.quant import QuantConfig, QuantizedTensor, formats, presets, quantize
from lorq.train.trainer import FinetuneConfig, RecoverConfig

__all__ = [
    "BudgetPlan",
    "Calibration",
    "CompressConfig",
    "CompressResult",
    "DecomposeConfig",
    "Decomposition",
    "FinetuneConfig",
    "MergeResult",
    "QuantConfig",
    "QuantizedTensor",
    "RecoverConfig",
    "__version__",
    "compress",
    "compress_model",
    "decompose",
    "estimate_fisher",
    "estimate_hessians",
    "export",
    "export_targets",
    "finetune",
    "formats",
    "load",
    "merge",
    "plan_budget",
    "plan_model",
    "presets",
    "quantize",
    "recover",
    "save",
]

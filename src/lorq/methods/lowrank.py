"""LQ-LoRA and LoftQ: W ≈ Q + s·B·A by alternating quantization and a low-rank step
(docs/algorithms.md §2.1–§2.3, §5), weighted as ``config.weighting`` says:

    none         ‖W − Q − s·B·A‖_F
    fisher       ‖√F ⊙ (W − Q − s·B·A)‖_F                F (out × in)
    activations  ‖(W − Q − s·B·A)·L‖_F,  H_λ = L·Lᵀ      H (in × in)
    both         ‖diag(ρ)·(W − Q − s·B·A)·L‖_F
"""

from __future__ import annotations

from lorq.config import CompressConfig, uses_activations, uses_fisher
from lorq.decomposition import decompose
from lorq.methods.base import Compressed, Target
from lorq.model.targets import dense_weight, device_of, relative_error
from lorq.nn import QuantLoraLinear


class LowRank:
    def compress(self, target: Target, config: CompressConfig) -> Compressed:
        weight = dense_weight(target.module).float()
        fisher = target.fisher if uses_fisher(config.weighting) else None
        needs_h = uses_activations(config.weighting) or config.rounds_with_h
        hessian = target.hessian if needs_h else None
        d = decompose(weight, config.decompose_config(target.quant), fisher, hessian)
        layer = QuantLoraLinear.from_decomposition(d, getattr(target.module, "bias", None))
        return Compressed(
            layer.to(device_of(target.module)), relative_error(weight, d.reconstruct())
        )

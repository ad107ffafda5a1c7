"""QA-LoRA's merge into a quantized base: which formats can take a per-block shift Δ in their
zero points (docs/algorithms.md §2.4), and the shift itself.

    float mins (fmin: q4_1 …)     min'  = min + Δ                            exact up to its dtype
    integer zeros (int: GPTQ's)   zero' = clamp(round(zero − Δ / scale))     lossy: whole steps

The formats' codes and scales are untouched. A format is added here by one entry in
``SHIFTABLE``, keyed by its name.
"""

from __future__ import annotations

import dataclasses

import torch

from lorq.quant import QuantConfig, QuantizedTensor, format_of, presets
from lorq.quant.affine import AffineConfig, affine_tensor, block_scales, block_zeros
from lorq.quant.base import safe_reciprocal

SHIFTABLE = ("int", "fmin")  # the affine formats: a zero point or min per block


def shifts_zeros(config: QuantConfig) -> bool:
    """Whether a per-block shift folds into ``config``'s zero points."""
    return format_of(config).name in SHIFTABLE


def check_zero_shift(config: QuantConfig) -> None:
    """ValueError unless a per-block shift Δ can fold into Q (QA-LoRA's base)."""
    if not shifts_zeros(config):
        allowed = [n for n, c in presets().items() if shifts_zeros(c)]
        raise ValueError(
            f"quant={config.name!r} is not supported with method='qa-lora': its codes have no zero "
            f"point to merge the adapter into; use an affine INT preset ({', '.join(allowed)})"
        )


def shift_zeros(q: QuantizedTensor, delta: torch.Tensor, dtype: str | None) -> QuantizedTensor:
    """Q' with Δ (out × in/G) added to every group: mins + Δ, or zeros − Δ/scale rounded.

    ``dtype`` (float mins only): store the shifted mins, and the scales with them, in this dtype
    instead of ``scale_dtype`` (the scales widen exactly: fp16 ⊂ fp32).
    """
    check_zero_shift(q.config)
    config = q.config
    assert isinstance(config, AffineConfig)
    if dtype is not None and config.ZERO == "float" and dtype != config.scale_dtype:
        config = dataclasses.replace(config, scale_dtype=dtype)
    shift = delta.detach().float().to(q.device).reshape(-1)  # row-major blocks = (o, g)
    scales, zeros = block_scales(q), block_zeros(q)
    if config.ZERO == "float":
        new = zeros + shift
    else:
        new = torch.round(zeros - shift * safe_reciprocal(scales)).clamp_(0, 2**config.bits - 1)
    shifted = affine_tensor(config, q.shape, q.codes, scales, new)
    if not torch.isfinite(shifted.buffers["zeros"].float()).all():
        raise ValueError(
            f"a merged min overflows scale_dtype={config.scale_dtype}; the adapter is too "
            "large to merge into this format: export a dense model instead"
        )
    return shifted

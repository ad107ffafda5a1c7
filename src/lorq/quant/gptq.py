"""GPTQ: data-aware group-wise INT-k rounding (Frantar et al. 2023, arXiv 2210.17323;
docs/algorithms.md §1.7).

Minimises the layer output error on calibration inputs X (N × in) instead of the weight error:

    min_Q ‖X Wᵀ − X Qᵀ‖²_F        H = 2/N · Xᵀ X + λ · mean(diag H) · I      (in × in), λ = 0.01
    U = chol(H⁻¹)ᵀ  (upper)       columns j = 0 … in−1, left to right:
        q_j  = quant(w_j)                                   w_j: column j of W (out,)
        e_j  = (w_j − q_j) / U[j, j]
        w_k −= e_j · U[j, k]   for every k > j              (error feedback to later columns)

Shapes: weight W (out × in) float, hessian H (in × in) float32; the result is a QuantizedTensor
with exactly the layout of the affine formats' round to nearest (same packing; stored scales are
what codes come from).

Details (as the reference GPTQ code, act-order off so groups stay contiguous, §2.5):
- columns go in blocks of ``block_columns`` (rounded to a multiple of G, so no group straddles a
  block): the feedback inside a block is applied column by column, to later blocks once per block
  (the "lazy batch" update: same result up to float rounding, far fewer memory passes);
- the scale and zero (or min) of a group are chosen when its first column is reached, from the
  *current*, error-updated weights of the group;
- a dead input (diag H = 0: the feature was always 0) gets diag 1; its weights are kept and
  rounded to nearest (its row and column of H are 0, so it neither gives nor gets feedback);
- when the Cholesky factorisation fails, the damping is retried ×10 a few times.
"""

from __future__ import annotations

import torch

from lorq.quant.affine import (
    AffineConfig,
    affine_codes,
    affine_params,
    affine_tensor,
    affine_values,
)
from lorq.quant.base import QuantConfig, check_weight, format_of
from lorq.quant.packing import pack
from lorq.quant.tensor import QuantizedTensor

DAMP = 0.01  # λ of docs/algorithms.md §1.7 (the GPTQ paper's "percdamp")
DAMP_RETRIES = 3  # extra tries with λ ×10 each when H + λ·mean(diag H)·I is not positive definite


def _check_inputs(weight: torch.Tensor, hessian: torch.Tensor, config: QuantConfig) -> None:
    check_weight(weight)
    if not isinstance(config, AffineConfig):
        raise ValueError(
            f"GPTQ rounds affine INT-k codes; {config.name} is not supported: "
            "use an int preset (e.g. int4-g32, int3-g32, q4_1)"
        )
    format_of(config).check_shape(config, (weight.shape[0], weight.shape[1]))
    size = weight.shape[1]
    if not isinstance(hessian, torch.Tensor) or tuple(hessian.shape) != (size, size):
        shape = tuple(hessian.shape) if isinstance(hessian, torch.Tensor) else type(hessian)
        raise ValueError(
            f"hessian must be an (in × in) = ({size}, {size}) tensor for a weight of shape "
            f"{tuple(weight.shape)}, got {shape}; estimate it from the layer's inputs"
        )
    if not torch.isfinite(hessian).all():
        raise ValueError("hessian contains NaN or Inf values; re-estimate it from finite inputs")


def inverse_cholesky(hessian: torch.Tensor, damp: float = DAMP) -> torch.Tensor:
    """Upper Cholesky factor U of (H + λ·mean(diag H)·I)⁻¹, dead inputs given diag 1; (in × in).

    λ starts at ``damp`` and is multiplied by 10 up to ``DAMP_RETRIES`` times while a
    factorisation fails; then ValueError.
    """
    h = hessian.detach().float().clone()
    diag = h.diagonal()
    diag[diag == 0] = 1.0
    mean = diag.mean()
    for attempt in range(DAMP_RETRIES + 1):
        lam = damp * 10**attempt
        damped = h + lam * mean * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
        lower, info = torch.linalg.cholesky_ex(damped)
        if info.item() == 0:
            upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
            if info.item() == 0 and torch.isfinite(upper).all():
                return upper
    raise ValueError(
        f"the Hessian is not positive definite even with damping λ={lam:g}·mean(diag H) "
        f"(mean(diag H)={mean.item():.3g}); check the calibration inputs or pass a larger damp"
    )


def _quantize_block(
    block: torch.Tensor, upper: torch.Tensor, config: AffineConfig
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ on one block of columns (out × b, updated in place; b a multiple of G).

    Returns (codes (out × b) uint8, errors e (out × b), scales and zeros-or-mins (out × b/G)).
    """
    group, bits, zero = config.block_size, config.bits, config.ZERO
    codes = torch.empty(block.shape, dtype=torch.uint8, device=block.device)
    errors = torch.empty_like(block)
    scales, zeros = [], []
    for j in range(block.shape[1]):
        if j % group == 0:
            scale, zero_or_min = affine_params(
                block[:, j : j + group], bits, zero, config.scale_dtype
            )
            scales.append(scale)
            zeros.append(zero_or_min)
        column = block[:, j]
        code = affine_codes(column[:, None], scale[:, None], zero_or_min[:, None], bits, zero)
        codes[:, j] = code[:, 0]
        rounded = affine_values(code[:, 0], scale, zero_or_min, zero)
        errors[:, j] = (column - rounded) / upper[j, j]
        block[:, j + 1 :] -= errors[:, j, None] * upper[j, None, j + 1 :]
    return codes, errors, torch.stack(scales, 1), torch.stack(zeros, 1)


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    config: QuantConfig,
    damp: float = DAMP,
    block_columns: int = 128,
) -> QuantizedTensor:
    """GPTQ-rounded group-wise INT-``config.bits`` quantization of ``weight`` (out × in).

    ``hessian``: H = 2/N·XᵀX of the layer's inputs (in × in, e.g. from ``lorq.hessian``).
    Both integer-zero (GPTQ) and float-min (Q4_1) layouts; act-order off.
    """
    _check_inputs(weight, hessian, config)
    assert isinstance(config, AffineConfig)
    if not damp > 0:
        raise ValueError(f"damp={damp!r} is not supported; allowed: a positive float (0.01)")
    if not isinstance(block_columns, int) or block_columns <= 0:
        raise ValueError(f"block_columns={block_columns!r} is not supported; allowed: > 0")
    group = config.block_size
    step = max(group, block_columns // group * group)
    w = weight.detach().float().clone()
    upper = inverse_cholesky(hessian.to(w.device), damp)
    codes, scales, zeros = [], [], []
    for start in range(0, w.shape[1], step):
        stop = min(start + step, w.shape[1])
        block_codes, errors, block_scales, block_zeros = _quantize_block(
            w[:, start:stop], upper[start:stop, start:stop], config
        )
        w[:, stop:] -= errors @ upper[start:stop, stop:]
        codes.append(block_codes)
        scales.append(block_scales)
        zeros.append(block_zeros)
    scale, zero_or_min = torch.cat(scales, 1).reshape(-1), torch.cat(zeros, 1).reshape(-1)
    packed = pack(torch.cat(codes, 1).reshape(-1), config.bits)
    return affine_tensor(config, (weight.shape[0], weight.shape[1]), packed, scale, zero_or_min)

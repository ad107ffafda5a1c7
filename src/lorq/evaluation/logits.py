"""Next-token log-likelihood and KL divergence from logits made a vocabulary slice at a time.

For one position with logits z (vocabulary V) and a reference's logits z_ref:

    L       = log Σ_v exp z_v                              log p(v) = z_v − L
    −log p(x) = L − z_x                                    x: the next token
    KL(p_ref ‖ p) = Σ_v p_ref(v)·(z_ref,v − z_v) − L_ref + L

Both sums are taken over slices of ``VOCAB_CHUNK`` columns, rescaled to the running maximum
(online log-sum-exp), so a block's logits never exist whole: for all T positions of a block only
T × VOCAB_CHUNK values do, and the output layer is read once per block, as one matrix product of
all positions would. Shapes: outputs (batch, T, hidden) or (batch, T, V); ids (batch, T).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

VOCAB_CHUNK = 4096  # logit columns that exist at once, for every position of a block
LOWEST = torch.finfo(torch.float32).min  # the running maximum before any column (finite)


@dataclass(frozen=True)
class Head:
    """The output layer applied to slices of the vocabulary; no layer: the outputs are logits."""

    layer: nn.Module | None = None  # nn.Linear, or a packed QuantLinear (rows decoded per slice)

    def vocab_size(self, outputs: torch.Tensor) -> int:
        return outputs.shape[-1] if self.layer is None else self.layer.out_features

    def weight(self, cols: slice, dtype: torch.dtype) -> torch.Tensor:
        """Rows ``cols`` of the output layer's weight (out × hidden)."""
        weight = getattr(self.layer, "weight", None)
        if isinstance(weight, torch.Tensor):
            return weight[cols]
        rows = torch.arange(cols.start, cols.stop, device=self.layer.q.device)
        return self.layer.q.dequantize_rows(rows, dtype)

    def logits(self, outputs: torch.Tensor, cols: slice) -> torch.Tensor:
        """float32 logits of the columns ``cols``, shape (batch, T, len(cols)), a fresh buffer."""
        if self.layer is None:
            return outputs[..., cols].to(torch.float32, copy=True)
        bias = None if self.layer.bias is None else self.layer.bias[cols]
        return nn.functional.linear(outputs, self.weight(cols, outputs.dtype), bias).float()


@dataclass
class LogSumExp:
    """Running log Σ_v exp z_v over column slices, and with weights w also Σ_v exp z_v · w_v
    (both kept relative to the running maximum, in float64, shape (batch, T))."""

    max: torch.Tensor
    total: torch.Tensor
    weighted: torch.Tensor

    @classmethod
    def empty(cls, shape: torch.Size, device: torch.device) -> LogSumExp:
        zeros = torch.zeros(shape, dtype=torch.float64, device=device)
        return cls(torch.full(shape, LOWEST, device=device), zeros, zeros.clone())

    def add(self, z: torch.Tensor, weights: torch.Tensor | None = None) -> None:
        """Take in the columns ``z`` (batch, T, C), overwriting ``z`` with exp(z − max)."""
        new_max = torch.maximum(self.max, z.amax(-1).clamp(min=LOWEST))
        rescale = torch.exp((self.max - new_max).double())
        p = z.sub_(new_max[..., None]).exp_()
        self.total = self.total.mul_(rescale).add_(p.sum(-1, dtype=torch.float64))
        if weights is not None:  # 0 · nan (two −inf logits) counts as 0; an infinite KL stays
            terms = p.mul_(weights).nan_to_num_(nan=0.0, posinf=float("inf"))
            self.weighted = self.weighted.mul_(rescale).add_(terms.sum(-1, dtype=torch.float64))
        self.max = new_max

    def log_total(self) -> torch.Tensor:
        return self.max.double() + self.total.log()


def token_sums(
    outputs: torch.Tensor,
    head: Head,
    ids: torch.Tensor,
    ref_outputs: torch.Tensor | None = None,
    ref_head: Head | None = None,
) -> tuple[float, float]:
    """Σ_t −log p(x_t+1 | x_≤t) over positions with a next token, and Σ_t KL(p_ref ‖ p) over
    every position (0 without a reference)."""
    lse = LogSumExp.empty(ids.shape, outputs.device)
    ref_lse = LogSumExp.empty(ids.shape, outputs.device)
    target = torch.zeros(ids[:, 1:].shape, dtype=torch.float64, device=outputs.device)
    vocab = head.vocab_size(outputs)
    for start in range(0, vocab, VOCAB_CHUNK):
        cols = slice(start, min(start + VOCAB_CHUNK, vocab))
        z = head.logits(outputs, cols)
        target += _picked(z[:, :-1], ids[:, 1:], cols)
        if ref_outputs is not None:  # weights z_ref − z, taken before lse.add overwrites z
            ref_z = (ref_head or head).logits(ref_outputs, cols).to(z.device)
            ref_lse.add(ref_z, z.neg().add_(ref_z))
        lse.add(z)
    log_total = lse.log_total()
    nll = float((log_total[:, :-1] - target).sum())
    if ref_outputs is None:
        return nll, 0.0
    kl = ref_lse.weighted / ref_lse.total - ref_lse.log_total() + log_total
    return nll, float(kl.sum())


def _picked(z: torch.Tensor, ids: torch.Tensor, cols: slice) -> torch.Tensor:
    """z[..., ids − cols.start] where the token falls in ``cols``, else 0 (float64)."""
    local = ids - cols.start
    inside = (local >= 0) & (local < z.shape[-1])
    values = z.gather(-1, local.clamp(0, z.shape[-1] - 1)[..., None])[..., 0]
    return torch.where(inside, values, torch.zeros_like(values)).double()

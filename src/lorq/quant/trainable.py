"""What recovery may train in a format (ALGORITHMS.md §9): its continuous per-block parameters.

    Q = Σ_p  expand(round_p(v_p)) ⊙ U_p            v_p (groups_p,)  U_p (out × in), float32

Every format lorq has decodes affinely in its continuous parameters (GGUF ``d``/``dmin``, INT
scales and float mins, NF absmax): with the codes and integer sub-scales fixed, U_p is Q decoded
with v_p = 1 and every other parameter 0, and ``expand`` repeats each value over its group's
consecutive row-major elements. ``round_p`` is the stored precision (fp16 for GGUF, the buffer's
float type, the double-quantized grid for NF absmax); in training it is straight-through,
v + (round(v) − v) with no gradient through the rounding, so the model trained is the model
:meth:`Trainable.store` writes. Codes, integer zeros and sub-scales are inside U_p: frozen.

A format declares its parameters' names (``QuantFormat.trainable_keys``) and builds a
:class:`Trainable` for a tensor (``QuantFormat.trainable``); ``float_buffers`` serves formats
that keep the parameters as float buffers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from lorq.quant.base import format_of
from lorq.quant.tensor import QuantizedTensor

Values = dict[str, torch.Tensor]  # parameter name → float32 (groups,)
Write = Callable[[Values], QuantizedTensor]  # values exactly representable → a tensor storing them


@dataclass(frozen=True, eq=False)
class Trainable:
    """A tensor's continuous parameters, their bases and how they round and are written back."""

    values: Values  # as stored, float32
    basis: Values  # name → U (out × in) float32
    rounder: Callable[[str, torch.Tensor], torch.Tensor]  # (name, v) → v on the stored grid
    write: Write

    def round(self, values: Values) -> Values:
        return {name: self.rounder(name, v.detach()) for name, v in values.items()}

    def decode(self, values: Values) -> torch.Tensor:
        """Q (out × in, float32) of ``values`` rounded straight-through: differentiable in them."""
        out = None
        for name, basis in self.basis.items():
            v = values[name]
            stored = v + (self.rounder(name, v.detach()) - v).detach()
            term = (stored[:, None] * basis.reshape(stored.numel(), -1)).reshape(basis.shape)
            out = term if out is None else out + term
        assert out is not None
        return out

    def store(self, values: Values) -> QuantizedTensor:
        """The tensor with ``values`` rounded to their stored grid in place of its own."""
        return self.write(self.round(values))


def linear_trainable(q: QuantizedTensor, values: Values, rounder, write: Write) -> Trainable:
    """A :class:`Trainable` whose bases are decoded by ``write``-ing one-hot values (1 for one
    parameter, 0 for the rest: exact in every float type a format stores)."""
    fmt = format_of(q.config)
    basis = {}
    for name in values:
        probe = {k: v.new_full(v.shape, float(k == name)) for k, v in values.items()}
        basis[name] = fmt.decode(write(probe), torch.float32)
    return Trainable(dict(values), basis, rounder, write)


def to_float(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``v`` rounded to the nearest ``dtype`` value (clamped to its finite range), float32."""
    largest = torch.finfo(dtype).max
    return v.clamp(-largest, largest).to(dtype).float()


def float_buffers(q: QuantizedTensor, keys: tuple[str, ...]) -> Trainable:
    """The parameters a format stores as float buffers ``keys`` (rounding: their own dtype)."""
    dtypes = {key: q.buffers[key].dtype for key in keys}

    def write(values: Values) -> QuantizedTensor:
        stored = {k: values[k].to(dtypes[k]) if k in values else b for k, b in q.buffers.items()}
        return QuantizedTensor(q.config, q.shape, stored)

    values = {key: q.buffers[key].float() for key in keys}
    return linear_trainable(q, values, lambda name, v: to_float(v, dtypes[name]), write)

"""Training the continuous parameters a packed layer stores (ALGORITHMS.md §9).

    v_p = v_p⁰ + u_p · ρ_p                       ρ_p (groups_p,) an nn.Parameter, 0 at the start
    Q   = Σ_p expand(round_p(v_p)) ⊙ U_p         straight-through rounding (lorq.quant.trainable)
    y   = x Qᵀ (+ the layer's adapter and bias)

u_p = ``ratio`` · mean |v_p⁰|: Adam moves ρ by about its learning rate a step, so a scale moves by
about ``ratio`` · lr of its matrix's typical scale — one optimizer (and one checkpoint) serves the
factors and the scales, ``ratio`` is the scales' rate relative to the factors'. While attached,
the layer decodes Q from ρ with gradients (a dense Q per layer lives until the backward); when
detached with ``keep`` the rounded values are written into its buffers, so the saved model is the
trained one, and the parameters go.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from lorq.nn.quant_linear import SCALES, QuantLinear, buffer_name
from lorq.quant import format_of
from lorq.quant.trainable import Trainable

PREFIX = "trained_"  # the parameter of value p is ``trained_<p>`` (trained_d, trained_scales, …)


@dataclass(frozen=True, eq=False)
class Attached:
    """One layer's trainable parameters: what they decode through and where they start."""

    trainable: Trainable
    units: dict[str, torch.Tensor]  # u_p, 0-d

    def values(self, layer: nn.Module) -> dict[str, torch.Tensor]:
        start = self.trainable.values
        return {n: start[n] + u * getattr(layer, PREFIX + n) for n, u in self.units.items()}

    def decode(self, layer: nn.Module) -> torch.Tensor:
        return self.trainable.decode(self.values(layer))


def trainable_layers(module: nn.Module) -> list[QuantLinear]:
    """The packed linear layers under ``module`` whose format stores something to train."""
    return [
        m
        for m in module.modules()
        if isinstance(m, QuantLinear) and format_of(m.quant_config).trainable_keys(m.quant_config)
    ]


def attach_scales(module: nn.Module, ratio: float) -> list[nn.Parameter]:
    """Give every :func:`trainable_layers` layer its ρ parameters (module docstring)."""
    params = []
    for layer in trainable_layers(module):
        trainable = format_of(layer.quant_config).trainable(layer.q)
        units = {n: ratio * v.abs().mean().clamp(min=1e-12) for n, v in trainable.values.items()}
        for name, value in trainable.values.items():
            param = nn.Parameter(torch.zeros_like(value))
            layer.register_parameter(PREFIX + name, param)
            params.append(param)
        layer.__dict__[SCALES] = Attached(trainable, units)
    return params


def detach_scales(module: nn.Module, keep: bool) -> None:
    """Remove the ρ parameters; with ``keep`` first store the rounded values in the buffers."""
    for layer in module.modules():
        attached = layer.__dict__.pop(SCALES, None)
        if attached is None:
            continue
        if keep:
            with torch.no_grad():
                stored = attached.trainable.store(attached.values(layer))
            for key, tensor in stored.buffers.items():
                getattr(layer, buffer_name(key)).copy_(tensor)
        for name in attached.units:
            delattr(layer, PREFIX + name)


def training_bytes(layers: list[tuple[int, int]]) -> int:
    """Memory scale training adds for packed layers given as (elements, trainable parameters):
    a float32 basis per parameter, and the dense Q decoded with gradients and its gradient."""
    return sum(4 * numel * (keys + 2) for numel, keys in layers)


def check_memory(need: int, free: int, what: str, instead: str) -> None:
    """Raise ValueError before any work when ``need`` bytes exceed the ``free`` ones."""
    if need > free:
        raise ValueError(
            f"{what} needs about {need / 1e9:.1f} GB beside the model (a float32 basis per "
            f"trained scale and the dense Q of each layer) and {free / 1e9:.1f} GB is free; "
            f"{instead}, or run on a machine with more memory"
        )


@contextlib.contextmanager
def trained_scales(module: nn.Module, ratio: float) -> Iterator[Session]:
    """Attach the scales for the duration; they are kept unless ``session.keep`` is set False
    (an exception discards them too)."""
    session = Session(attach_scales(module, ratio))
    try:
        yield session
    except BaseException:
        session.keep = False
        raise
    finally:
        detach_scales(module, session.keep)


@dataclass
class Session:
    """The attached parameters, and whether to keep what they trained."""

    params: list[nn.Parameter]
    keep: bool = True

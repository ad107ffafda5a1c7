"""Candidate quantization configs for the bit budget (docs/algorithms.md §3).

default  b ∈ {2, 3, 4, 8} × B0 ∈ {16, 32, 64, 128}, second level (b0 = 8, B1 = 256, fp32):
         16 NF configs from 2.06 to 8.51 bits/param, practical on a CPU
full     LQ-LoRA's 432: b, b0 ∈ {2, 3, 4, 8} × b1 ∈ {fp16, bf16, fp32} × B0 ∈ {16, 32, 64}
         × B1 ∈ {16, 64, 256}
int      INT-k for QA-LoRA: b ∈ {2, 3, 4, 8} × G ∈ {32, 64, 128}, integer zeros
gguf     llama.cpp's types lorq holds as GGUF blocks (q4_0 … q8_0, iq4_nl, q2_k … q6_k):
         a plan that ``lorq export --format gguf`` writes as it is (registered by
         ``lorq.io.gguf_types``, which knows the GGUF identities)
a list   preset names or QuantConfig objects

Other units add named grids with :func:`register_grid`.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

from lorq.quant import IntConfig, NFConfig, QuantConfig, as_config

BITS = (2, 3, 4, 8)


def default_grid() -> tuple[QuantConfig, ...]:
    return tuple(NFConfig(bits=b, block_size=bs) for b in BITS for bs in (16, 32, 64, 128))


def full_grid() -> tuple[QuantConfig, ...]:
    return tuple(
        NFConfig(bits=b, block_size=bs, scale_bits=b0, scale_block_size=b1, super_scale_dtype=dtype)
        for b, b0, dtype, bs, b1 in itertools.product(
            BITS, BITS, ("fp16", "bf16", "fp32"), (16, 32, 64), (16, 64, 256)
        )
    )


def int_grid() -> tuple[QuantConfig, ...]:
    return tuple(IntConfig(bits=b, block_size=g) for b in BITS for g in (32, 64, 128))


GRIDS: dict[str, Callable[[], tuple[QuantConfig, ...]]] = {
    "default": default_grid,
    "full": full_grid,
    "int": int_grid,
}


def register_grid(name: str, grid: Callable[[], tuple[QuantConfig, ...]]) -> None:
    """Add the named candidate grid ``name`` (``candidates=name``, ``--candidates name``)."""
    GRIDS[name] = grid


def candidate_grid(candidates: str | Sequence[str | QuantConfig]) -> tuple[QuantConfig, ...]:
    """Resolve a grid name or a list of presets / configs into distinct QuantConfigs."""
    if isinstance(candidates, str):
        if candidates in GRIDS:
            return GRIDS[candidates]()
        candidates = [c.strip() for c in candidates.split(",") if c.strip()]
    configs = [as_config(c) for c in candidates]
    if not configs:
        raise ValueError(
            f"no candidate configs given; pass a grid name ({', '.join(GRIDS)}) or preset names"
        )
    return tuple(dict.fromkeys(configs))

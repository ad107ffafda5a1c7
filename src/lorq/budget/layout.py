"""Where a matrix sits in the model: its layer index and module kind, from its qualified name.

"model.layers.12.self_attn.q_proj"  →  (12, "self_attn.q_proj")
"encoder.layer.3.attention.self.query"  →  (3, "attention.self.query")
"""

from __future__ import annotations

import re
from typing import Any

_LAYER = re.compile(r"\.(\d+)\.")


def layer_and_kind(name: str) -> tuple[int | None, str]:
    match = _LAYER.search(f".{name}.")
    if match is None:
        return None, name
    return int(match.group(1)), f".{name}."[match.end() :].strip(".")


def bits_grid(names_bits: dict[str, Any]) -> tuple[list[int | None], list[str], dict]:
    """Layers (rows), kinds (columns) and {(layer, kind): value} (bits/param, a plan entry) for
    tables and heatmaps."""
    cells = {layer_and_kind(name): bits for name, bits in names_bits.items()}
    layers = sorted({k[0] for k in cells}, key=lambda x: -1 if x is None else x)
    kinds = list(dict.fromkeys(k[1] for k in cells))
    return layers, kinds, cells

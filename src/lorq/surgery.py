"""Which modules of a model are targets, and their dense weights in lorq's (out × in) layout.

Targets by default: every ``nn.Linear`` (and GPT-2 ``Conv1D``) inside the transformer blocks;
embeddings and the LM head stay dense unless asked for.
"""

from __future__ import annotations

import re

import torch
from torch import nn

DEFAULT_EXCLUDE = (r"(^|\.)lm_head$", r"(^|\.)embed_out$", r"(^|\.)score$", r"(^|\.)classifier$")


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2's Conv1D: a linear layer whose weight is stored (in × out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The module's weight as (out × in), whatever its storage layout (Conv1D is transposed)."""
    weight = module.weight.detach()
    return weight.t() if is_conv1d(module) else weight


def find_targets(
    model: nn.Module,
    include: tuple[str, ...] = (),
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE,
) -> dict[str, nn.Module]:
    """Linear modules by qualified name, in model order.

    ``include``: regexes; when given, a module must match one. ``exclude``: regexes a module must
    not match (default: the LM head and classification heads).
    """
    targets = {}
    for name, module in model.named_modules():
        if not is_linear(module):
            continue
        if include and not any(re.search(p, name) for p in include):
            continue
        if any(re.search(p, name) for p in exclude):
            continue
        targets[name] = module
    return targets

"""Which modules of a model are targets, their dense weights in lorq's (out × in) layout, and
the relative error of a replacement, ‖W − Ŵ‖_F / ‖W‖_F.

Targets by default: every ``nn.Linear`` (and GPT-2 ``Conv1D``) inside the transformer blocks;
embeddings and the LM head stay dense unless asked for.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping

import torch
from torch import nn

from lorq.config import CompressConfig
from lorq.nn.dense import dense_weight, device_of, is_conv1d, is_linear, weight_shape

__all__ = [
    "DenseWeights",
    "dense_weight",
    "device_of",
    "find_targets",
    "is_conv1d",
    "is_linear",
    "weight_shape",
]

# heads and poolers sit outside the transformer blocks
DEFAULT_EXCLUDE = (
    r"(^|\.)lm_head$",
    r"(^|\.)embed_out$",
    r"(^|\.)score$",
    r"(^|\.)classifier$",
    r"(^|\.)pooler\.",
)


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


class DenseWeights(Mapping[str, torch.Tensor]):
    """{name: W (out × in)} of linear modules, read on access: a packed layer's W is decoded
    each time, so going through the mapping holds one decoded matrix at a time."""

    def __init__(self, modules: Mapping[str, nn.Module]):
        self._modules = dict(modules)

    def __getitem__(self, name: str) -> torch.Tensor:
        return dense_weight(self._modules[name])

    def __iter__(self) -> Iterator[str]:
        return iter(self._modules)

    def __len__(self) -> int:
        return len(self._modules)


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at qualified ``name`` by ``module``."""
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, leaf, module)


def freeze_all_but_lora(model: nn.Module) -> None:
    """Only ``lora_A`` / ``lora_B`` parameters keep requires_grad."""
    for name, param in model.named_parameters():
        param.requires_grad_(name.endswith(("lora_A", "lora_B")))


def shared_copy(model: nn.Module) -> nn.Module:
    """A structural copy of ``model`` whose parameters and buffers are the original tensors.

    Replacing modules in the copy leaves the original's modules alone at no memory cost; the
    tensors themselves are shared, so only whole-module replacement is safe on the copy.
    """
    import copy

    memo = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return copy.deepcopy(model, memo)


def relative_error(weight: torch.Tensor, approximation: torch.Tensor) -> float:
    """‖W − approximation‖_F / ‖W‖_F."""
    residual = torch.linalg.vector_norm(weight - approximation)
    return float(residual / torch.linalg.vector_norm(weight).clamp_min(1e-30))


def targets_of(model: nn.Module, config: CompressConfig) -> dict[str, nn.Module]:
    """The linear modules ``config.include`` / ``config.exclude`` select; ValueError if none."""
    exclude = DEFAULT_EXCLUDE if config.exclude is None else config.exclude
    targets = find_targets(model, config.include, exclude)
    if not targets:
        raise ValueError(
            f"no linear layers matched the targets (include={config.include}, exclude={exclude}); "
            "check the patterns against the model's module names"
        )
    return targets

"""Layer-input statistics for GPTQ rounding and activation-aware decomposition
(docs/algorithms.md §1.3, §5).

For a linear layer y = x Wᵀ (+ b) with W (out × in), the expected output error of a replacement
Ŵ is  E‖x (W − Ŵ)ᵀ‖² = tr((W − Ŵ) H (W − Ŵ)ᵀ)  with

    H = 1/N · Σ_{rows x} x xᵀ = 1/N · Xᵀ X        X (N × in): every input row the layer saw
    shape (in × in), float32, N = calibration blocks × tokens per block

(GPTQ's proxy loss has Hessian 2·H; its rounding does not depend on a constant factor of H.)
Linears that read the same input tensor (q/k/v, gate/up) share one H: a first forward of one
short calibration row finds them, and they get one accumulator and the same tensor back.

collected by forward pre-hooks during no-grad forwards of the calibration blocks (batch size 1).
GPT-2 ``Conv1D`` takes the same (…, in) inputs, so it needs no special case.

This is the *non-sequential* variant: every layer's inputs come from the unquantized model, so
the Hessians of all targets are estimated at once (GPTQ's reference code re-runs each block on
inputs that went through the already-quantized earlier blocks).

Memory: one (in × in) fp32 accumulator per target. When all of them together exceed
``max_bytes``, the targets are split into groups that fit (in model order) and the forwards are
re-run once per group; a single target larger than ``max_bytes`` forms a group of its own.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from lorq.nn.dense import device_of, is_linear, weight_shape
from lorq.progress import Progress, no_progress

DEFAULT_MAX_BYTES = 1 << 30


class Hessians(Mapping[str, torch.Tensor]):
    """{target: H (in × in) fp32} that stores each distinct H once, as its lower triangle.

    H is symmetric and every consumer (Cholesky, GPTQ) reads its lower triangle only, so half the
    memory is enough: ``self[name]`` rebuilds the full symmetric matrix on each access. Targets
    that share an input share one stored triangle; :meth:`pop` frees it with its last target.
    """

    def __init__(
        self,
        packed: dict[str, tuple[int, torch.Tensor]] | None = None,
        leader: dict[str, str] | None = None,
    ) -> None:
        """``packed``: {leader: (in, lower triangle)}; ``leader``: {target: its leader}."""
        self._packed = dict(packed or {})
        self._leader = dict(leader or {})

    def leader(self, name: str) -> str:
        """The target whose stored H ``name`` shares (itself when its input is its own)."""
        return self._leader[name]

    def __getitem__(self, name: str) -> torch.Tensor:
        size, values = self._packed[self._leader[name]]
        rows, cols = _lower(size)
        full = torch.empty(size, size, dtype=values.dtype)
        full[rows, cols] = values
        full[cols, rows] = values
        return full

    def __iter__(self) -> Iterator[str]:
        return iter(self._leader)

    def __len__(self) -> int:
        return len(self._leader)

    @property
    def nbytes(self) -> int:
        return sum(v.numel() * v.element_size() for _, v in self._packed.values())

    def copy(self) -> Hessians:
        return Hessians(self._packed, self._leader)

    def pop(self, name: str, default: Any = None) -> Any:
        """H of ``name`` (full), removed; its storage is freed with the last target sharing it."""
        if name not in self._leader:
            return default
        h = self[name]
        leader = self._leader.pop(name)
        if leader not in self._leader.values():
            del self._packed[leader]
        return h


@functools.cache
def _lower(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = torch.tril_indices(size, size)
    return rows, cols


class _Accumulator:
    """Σ x xᵀ over input rows and their count N, for one input (one or more targets)."""

    def __init__(self, size: int, device: torch.device) -> None:
        self.sum = torch.zeros(size, size, dtype=torch.float32, device=device)
        self.rows = 0

    def hook(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        inputs = args[0] if args else next(iter(kwargs.values()))
        x = inputs.detach().reshape(-1, inputs.shape[-1]).float()
        self.sum.addmm_(x.T, x)
        self.rows += x.shape[0]

    def hessian(self) -> torch.Tensor:
        if self.rows == 0:
            raise ValueError("a target layer saw no input during the calibration forwards")
        return self.sum.div_(self.rows).cpu()


def _check_inputs(
    token_blocks: torch.Tensor, targets: Mapping[str, nn.Module], max_bytes: int
) -> None:
    if not isinstance(token_blocks, torch.Tensor) or token_blocks.dim() != 2:
        shape = tuple(token_blocks.shape) if isinstance(token_blocks, torch.Tensor) else None
        raise ValueError(f"token_blocks must be an (n × seq_len) tensor of token ids, got {shape}")
    if token_blocks.numel() == 0 or token_blocks.is_floating_point():
        raise ValueError(
            f"token_blocks must be a non-empty integer tensor, got shape "
            f"{tuple(token_blocks.shape)} dtype {token_blocks.dtype}"
        )
    if not targets:
        raise ValueError("no target layers given; pass {name: linear module}")
    for name, module in targets.items():
        if not is_linear(module):
            raise ValueError(
                f"target {name!r} is a {type(module).__name__}, not nn.Linear or GPT-2 Conv1D"
            )
    if not isinstance(max_bytes, int) or max_bytes <= 0:
        raise ValueError(f"max_bytes={max_bytes!r} is not supported; allowed: a positive integer")


def target_groups(
    targets: Mapping[str, nn.Module], max_bytes: int, leaders: Mapping[str, str] | None = None
) -> list[dict[str, nn.Module]]:
    """Targets split in model order into groups whose fp32 (in × in) accumulators fit max_bytes.

    ``leaders``: {target: the target whose input it shares}; a shared input costs one
    accumulator, and the targets sharing it stay in one group.
    """
    leaders = leaders or {}
    groups: list[dict[str, nn.Module]] = [{}]
    group_of: dict[str, int] = {}
    used = 0
    for name, module in targets.items():
        leader = leaders.get(name, name)
        if leader in group_of:  # the same input: no accumulator of its own
            groups[group_of[leader]][name] = module
            continue
        size = weight_shape(module)[1] ** 2 * 4
        if groups[-1] and used + size > max_bytes:
            groups.append({})
            used = 0
        groups[-1][name] = module
        group_of[name] = len(groups) - 1
        used += size
    return groups


def shared_inputs(
    model: nn.Module, token_blocks: torch.Tensor, targets: Mapping[str, nn.Module]
) -> dict[str, str]:
    """{target: the first target (in ``targets`` order) that reads the same input tensor}, from
    one forward of the first row's first 8 tokens."""
    device = next(model.parameters()).device

    def forward() -> None:
        model(input_ids=token_blocks[:1, :8].to(device))

    return input_leaders(targets, forward)


def input_leaders(targets: Mapping[str, nn.Module], forward: Callable[[], Any]) -> dict[str, str]:
    """{target: the first target (in ``targets`` order) that reads the same input tensor}.

    ``forward()`` runs the targets once under hooks that keep every input alive, so an identical
    storage pointer means the very same tensor (no freed memory can be reused)."""
    seen: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def keep(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            seen.setdefault(name, args[0] if args else next(iter(kwargs.values())))

        return keep

    handles = [m.register_forward_pre_hook(hook(n), with_kwargs=True) for n, m in targets.items()]
    try:
        with torch.no_grad():
            forward()
    finally:
        for handle in handles:
            handle.remove()
    first: dict[tuple[int, tuple[int, ...]], str] = {}
    leaders = {}
    for name in targets:
        x = seen.get(name)
        key = (x.data_ptr(), tuple(x.shape)) if x is not None else (id(name), ())
        leaders[name] = first.setdefault(key, name)
    return leaders


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    try:
        model.eval()
        yield
    finally:
        model.train(was_training)


def collect(
    group: Mapping[str, nn.Module],
    leaders: Mapping[str, str],
    forward: Callable[[], Any],
) -> dict[str, tuple[int, torch.Tensor]]:
    """Run ``forward()`` (every calibration forward, no grad) with hooks on the input leaders of
    ``group``; returns {leader: (in, H's lower triangle)}."""
    accumulators = {
        name: _Accumulator(weight_shape(m)[1], device_of(m))
        for name, m in group.items()
        if leaders.get(name, name) == name
    }
    handles = [
        group[name].register_forward_pre_hook(acc.hook, with_kwargs=True)
        for name, acc in accumulators.items()
    ]
    try:
        with torch.no_grad():
            forward()
    finally:
        for handle in handles:
            handle.remove()
    packed = {}
    for name in list(accumulators):  # one full (in × in) matrix at a time becomes a triangle
        h = accumulators.pop(name).hessian()
        rows, cols = _lower(h.shape[0])
        packed[name] = (h.shape[0], h[rows, cols])
        del h
    return packed


def _rows(model: nn.Module, token_blocks: torch.Tensor, advance: Callable[[int], None]):
    """A forward of every calibration block, one row at a time."""
    device = next(model.parameters()).device

    def forward() -> None:
        for row in token_blocks:
            model(input_ids=row[None].to(device))
            advance(1)

    return forward


def estimate_hessians(
    model: nn.Module,
    token_blocks: torch.Tensor,
    targets: Mapping[str, nn.Module],
    progress: Progress = no_progress,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> Hessians:
    """H = 1/N·XᵀX of every target's inputs from calibration ``token_blocks`` (n × seq_len).

    ``targets``: {name: nn.Linear or Conv1D} inside ``model``. Returns {name: fp32 (in × in)} on
    the CPU, in the order of ``targets``, stored once per distinct input as a lower triangle
    (:class:`Hessians`). The model's train/eval mode is restored and every hook removed, also
    when a forward fails.
    """
    _check_inputs(token_blocks, targets, max_bytes)
    with _eval_mode(model):
        leaders = shared_inputs(model, token_blocks, targets)
        groups = target_groups(targets, max_bytes, leaders)
        advance = progress("Hessians", len(groups) * token_blocks.shape[0])
        packed: dict[str, tuple[int, torch.Tensor]] = {}
        for group in groups:
            packed.update(collect(group, leaders, _rows(model, token_blocks, advance)))
    return Hessians(packed, {name: leaders.get(name, name) for name in targets})

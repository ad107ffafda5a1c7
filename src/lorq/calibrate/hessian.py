"""Layer-input statistics of one transformer block, for GPTQ rounding and activation-aware
decomposition (docs/algorithms.md §1.3, §5, §6).

For a linear layer y = x Wᵀ (+ b) with W (out × in), the expected output error of a replacement
Ŵ is  E‖x (W − Ŵ)ᵀ‖² = tr((W − Ŵ) H (W − Ŵ)ᵀ)  with

    H = 1/N · Σ_{rows x} x xᵀ = 1/N · Xᵀ X        X (N × in): every input row the layer saw
    shape (in × in), float32, N = calibration sequences × tokens per sequence

(GPTQ's proxy loss has Hessian 2·H; its rounding does not depend on a constant factor of H.)
Linears that read the same input tensor (q/k/v, gate/up) share one H: a first forward of one
calibration sequence finds them, and they get one accumulator and the same tensor back.

H is collected by forward pre-hooks while the block runs on its inputs X (n × L × d), one
sequence at a time in order (batch size 1), and summed in that order. Under ``torchrun`` each
process runs the block on its share of the sequences and keeps what the hooks saw; the sums are
then replayed in sequence order on every process, so every H is bit for bit what one process
computes. Memory: one (in × in) fp32 accumulator per distinct input of the block; when they
exceed ``max_bytes`` the targets are split into groups that fit and the block runs once per group.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from lorq.calibrate.blocks import BlockInputs, run_block
from lorq.nn import decoded_once
from lorq.nn.dense import device_of, weight_shape
from lorq.util import dist

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

    def renamed(self, rename) -> Hessians:
        """The same H under other target names: ``rename({old: value})`` → {new: value}."""
        return Hessians(self._packed, rename(self._leader))

    @staticmethod
    def joined(parts: list[Hessians], order: list[str]) -> Hessians:
        """One mapping of several (e.g. each block's), its targets in ``order``."""
        packed, leader = {}, {}
        for part in parts:
            packed.update(part._packed)
            leader.update(part._leader)
        return Hessians(packed, {name: leader[name] for name in order if name in leader})

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


def first_input(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    """The input tensor of a forward (pre-)hook's call."""
    return args[0] if args else next(iter(kwargs.values()))


class _Accumulator:
    """Σ x xᵀ over input rows and their count N, for one input (one or more targets)."""

    def __init__(self, size: int, device: torch.device) -> None:
        self.sum = torch.zeros(size, size, dtype=torch.float32, device=device)
        self.rows = 0

    def hook(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.add(first_input(args, kwargs))

    def add(self, inputs: torch.Tensor) -> None:
        """Σ x xᵀ += the rows of ``inputs`` (…, in)."""
        x = inputs.detach().reshape(-1, inputs.shape[-1]).float().to(self.sum.device)
        self.sum.addmm_(x.T, x)
        self.rows += x.shape[0]

    def hessian(self) -> torch.Tensor:
        if self.rows == 0:
            raise ValueError("a target layer saw no input during the calibration forwards")
        return self.sum.div_(self.rows).cpu()


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


def input_leaders(targets: Mapping[str, nn.Module], forward: Callable[[], Any]) -> dict[str, str]:
    """{target: the first target (in ``targets`` order) that reads the same input tensor}.

    ``forward()`` runs the targets once under hooks that keep every input alive, so an identical
    storage pointer means the very same tensor (no freed memory can be reused)."""
    seen: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def keep(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            seen.setdefault(name, first_input(args, kwargs))

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
    return _triangles(accumulators)


class _Keep:
    """A pre-hook that keeps what each leader reads (on the CPU), until taken."""

    def __init__(self) -> None:
        self.seen: dict[str, torch.Tensor] = {}

    def hook(self, name: str):
        def keep(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            self.seen[name] = first_input(args, kwargs).detach().cpu()

        return keep

    def take(self) -> dict[str, torch.Tensor]:
        seen, self.seen = self.seen, {}
        return seen


def _collect_shared(
    block: nn.Module,
    group: Mapping[str, nn.Module],
    leaders: Mapping[str, str],
    inputs: BlockInputs,
    output: torch.Tensor | None,
    world: dist.World,
) -> dict[str, tuple[int, torch.Tensor]]:
    """:func:`collect` with the sequences shared out: each process runs its own and keeps what the
    leaders saw; every process then adds them in sequence order (module docstring)."""
    heads = {n: m for n, m in group.items() if leaders.get(n, n) == n}
    keep = _Keep()
    handles = [
        m.register_forward_pre_hook(keep.hook(n), with_kwargs=True) for n, m in heads.items()
    ]
    kept, rows = {}, {}
    try:
        with decoded_once(block):
            for i in (i for i in range(len(inputs)) if world.owns(i)):
                rows[i] = run_block(block, inputs.row(i))[0]
                kept[i] = keep.take()
    finally:
        for handle in handles:
            handle.remove()
    accumulators = {n: _Accumulator(weight_shape(m)[1], device_of(m)) for n, m in heads.items()}
    for i in range(len(inputs)):
        for name, x in dist.broadcast(kept.pop(i, None), i % world.size, world).items():
            accumulators[name].add(x)
    if output is not None:
        for i, row in dist.gather_rows(rows, world).items():
            output[i] = row.to(output.device)
    return _triangles(accumulators)


def _triangles(accumulators: dict[str, _Accumulator]) -> dict[str, tuple[int, torch.Tensor]]:
    """{leader: (in, H's lower triangle)}, one full (in × in) matrix at a time."""
    packed = {}
    for name in list(accumulators):
        h = accumulators.pop(name).hessian()
        rows, cols = _lower(h.shape[0])
        packed[name] = (h.shape[0], h[rows, cols])
        del h
    return packed


def block_hessians(
    block: nn.Module,
    targets: dict[str, nn.Module],
    inputs: BlockInputs,
    keep_output: bool,
    world: dist.World | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> tuple[Hessians, torch.Tensor | None]:
    """(H of ``targets`` inside ``block`` on X = ``inputs``, the block's output X_b (n × L × d)
    when ``keep_output``); the sequences shared out over ``world``'s processes."""
    world = world or dist.World()
    leaders = input_leaders(targets, lambda: run_block(block, inputs.row(0)))
    output = inputs.empty() if keep_output else None
    packed: dict[str, tuple[int, torch.Tensor]] = {}
    for index, group in enumerate(target_groups(targets, max_bytes, leaders)):
        out = output if index == 0 else None  # the first run of the block gives X_b
        if world.size == 1:
            packed.update(collect(group, leaders, lambda o=out: run_block(block, inputs, o)))
        else:
            packed.update(_collect_shared(block, group, leaders, inputs, out, world))
    return Hessians(packed, {name: leaders.get(name, name) for name in targets}), output

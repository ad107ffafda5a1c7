"""KL sensitivities of the targets (ALGORITHMS.md §10): α_l with KL(p ‖ p̂) ≈ Σ_l α_l t_l².

    t_l = ‖(Ŵ_l − W_l) L_l‖_F / ‖W_l L_l‖_F     relative output error of target l (H-norm, §5)
    Ŵ_l = W_l + Δ_l,   Δ_l = t · ‖W_l L_l‖_F / ‖G_l L_l‖_F · G_l
    G_l ~ N(0, 1) (out × in), seeded by the target's name and the run's seed
    α_l = KL(p ‖ p̂_l) / t²                      p̂_l: the model with target l alone perturbed

G is white in weight space, as the residual of rounding nearly is; the H-norm then gives its
output error, the measure the plan's costs use. KL is the mean, over the tokens of the first S
calibration sequences, of the full-vocabulary KL between next-token distributions; for an
encoder (no next-token distribution), the mean 1 − cos of the mean-pooled embeddings instead.

The token embedding E (plan_embeddings) is probed the same way with Δ_E white and relative to E
as a whole, ‖Δ_E‖_F = t‖E‖_F (its cost's t is the table's relative Frobenius error): its stream
starts at X_0 looked up in E + Δ_E, and a tied head computes with E + Δ_E at the top.

Block by block: a probe's hidden states (S × L × d) leave the clean stream at its target's block
(that block run with the target perturbed) and are carried through every later block while it is
loaded, each block loaded once for all probes; the model's top turns each into logits at the end.
Forward passes: Σ_l (N − b_l) block forwards of S sequences (b_l: target l's block, of N) and
one run of the top per probe (and per target outside the blocks).
"""

from __future__ import annotations

import contextlib
import math
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from lorq.calibrate.blocks import BlockInputs, first_output, run_block
from lorq.config import DecomposeConfig
from lorq.decomposition.common import Weighting
from lorq.nn import decoded_once

SENSITIVITY_T = 0.05  # the probes' relative output error t
SENSITIVITY_SEQUENCES = 4  # S: the first calibration sequences the KL is measured on


def perturbation(
    weight: torch.Tensor, hessian: torch.Tensor, t: float, seed: int, damp: float | None = None
) -> torch.Tensor:
    """Δ (out × in, float32) with ‖Δ L‖ / ‖W L‖ = t in the H-norm of ``hessian`` (in × in)."""
    weight = weight.detach().float()
    config = DecomposeConfig(weighting="activations", **({} if damp is None else {"damp": damp}))
    weighting = Weighting.build(weight, config, hessian=hessian)
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(weight.shape, generator=generator).to(weight.device)
    scale = weighting.error(weight) / weighting.error(noise)
    if not scale > 0 or scale == float("inf"):
        raise ValueError("a target's weight has zero output on the calibration inputs")
    return noise.mul_(t * scale)


def table_perturbation(weight: torch.Tensor, t: float, seed: int) -> torch.Tensor:
    """Δ (vocab × dim, float32) with ‖Δ‖_F / ‖E‖_F = t: the token embedding's probe, white noise
    relative to the table as a whole (its rows are looked up, not multiplied by inputs)."""
    weight = weight.detach().float()
    noise = torch.randn(weight.shape, generator=torch.Generator().manual_seed(seed))
    noise = noise.to(weight.device)
    scale = torch.linalg.norm(weight) / torch.linalg.norm(noise)
    if not scale > 0 or not torch.isfinite(scale):
        raise ValueError("the token embedding table is zero or not finite")
    return noise.mul_(t * scale)


@contextlib.contextmanager
def looked_up(module: nn.Module, delta: torch.Tensor, scale: float) -> Iterator[None]:
    """While active, the token embedding ``module`` returns (E + Δ)[ids]·scale (its own scale:
    Gemma's √dim) for ids."""

    def add(_module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(args[0], delta.to(device=output.device, dtype=output.dtype))
        return output + rows * scale

    handle = module.register_forward_hook(add)
    try:
        yield
    finally:
        handle.remove()


def probe_seed(name: str, seed: int) -> int:
    """The seed of target ``name``'s G: the same in every process and every run."""
    return zlib.crc32(name.encode()) ^ (seed & 0xFFFFFFFF)


@contextlib.contextmanager
def perturbed(module: nn.Module, delta: torch.Tensor) -> Iterator[None]:
    """While active, ``module`` (a linear layer, dense or packed) computes y + x Δᵀ."""

    def add(_module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        x = args[0]
        return output + F.linear(x, delta.to(device=x.device, dtype=x.dtype))

    handle = module.register_forward_hook(add)
    try:
        yield
    finally:
        handle.remove()


def mean_kl(reference: torch.Tensor, logits: torch.Tensor) -> float:
    """Mean over tokens of KL(softmax(reference) ‖ softmax(logits)); both (… × V): the
    divergence of a causal LM's next-token distributions."""
    log_p = torch.log_softmax(reference.float().flatten(0, -2), -1)
    log_q = torch.log_softmax(logits.float().flatten(0, -2), -1)
    return float((log_p.exp() * (log_p - log_q)).sum(-1).mean())


def mean_one_minus_cos(reference: torch.Tensor, pooled: torch.Tensor) -> float:
    """Mean over sequences of 1 − cos(reference, pooled); both (S × d): the divergence of an
    encoder's mean-pooled embeddings (KL-free; also ∝ t² for small t)."""
    cos = F.cosine_similarity(reference.double(), pooled.double(), dim=-1)
    return float((1.0 - cos).mean())


def divergence(reference: torch.Tensor, output: torch.Tensor) -> float:
    """:func:`mean_kl` of logits (S × L × V), :func:`mean_one_minus_cos` of pooled embeddings
    (S × d)."""
    return (mean_kl if reference.dim() == 3 else mean_one_minus_cos)(reference, output)


def carry_streams(block: nn.Module, streams: list[torch.Tensor], kwargs: list, chunk: int = 32):
    """Each of ``streams`` (S × L × d, in place) through ``block``: for every sequence i the
    streams' row i run as batches of ``chunk`` with sequence i's kwargs (their batch of one
    broadcasts), the block's matrices decoded once."""
    with torch.no_grad(), decoded_once(block):
        for i, (args, extra) in enumerate(kwargs):
            for start in range(0, len(streams), chunk):
                group = streams[start : start + chunk]
                out = first_output(block(torch.stack([s[i] for s in group]), *args, **extra))
                for stream, row in zip(group, out, strict=True):
                    stream[i] = row


@dataclass
class Probes:
    """The probes of one process: each target's perturbed stream since its block.

    ``t``: the probes' relative error; ``rows``: S; ``seed``: the run's seed."""

    t: float = SENSITIVITY_T
    rows: int = SENSITIVITY_SEQUENCES
    seed: int = 0
    states: dict[str, torch.Tensor] = field(default_factory=dict)

    def delta(self, name: str, weight: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
        """Target ``name``'s Δ (its seed, t); a weight it cannot be scaled to is named."""
        try:
            return perturbation(weight, hessian, self.t, probe_seed(name, self.seed))
        except ValueError as err:
            raise ValueError(f"{name}: {err}") from None

    def first_rows(self, inputs: BlockInputs) -> BlockInputs:
        return BlockInputs(inputs.hidden[: self.rows], inputs.kwargs[: self.rows])

    def block(
        self,
        block: nn.Module,
        targets: dict[str, nn.Module],
        weights: Callable[[str], torch.Tensor],
        hessians,
        inputs: BlockInputs,
    ) -> None:
        """Carry every probe through ``block`` (its original weights), then start the probes of
        ``targets`` (this process's share of the block's) from the clean ``inputs``."""
        clean = self.first_rows(inputs)
        carry_streams(block, list(self.states.values()), clean.kwargs)
        for name, module in targets.items():
            with perturbed(module, self.delta(name, weights(name), hessians[name])):
                self.states[name] = run_block(block, clean, clean.hidden.clone())

    def finish(
        self,
        output: Callable[[torch.Tensor], torch.Tensor],
        clean: torch.Tensor,
        outside: dict[str, tuple[nn.Module, torch.Tensor]],
        tied: dict[str, tuple[nn.Module, torch.Tensor]] | None = None,
    ) -> dict[str, float]:
        """{target: α}: each probe's ``output`` (X_N (S × L × d) → a causal LM's logits or an
        encoder's pooled embeddings; :func:`divergence`) against the clean stream's ``clean``
        X_N; ``outside``: {name: (module, Δ)} perturbed at the top; ``tied``: {name of a carried
        probe: (module, Δ)} perturbed at the top too while that probe finishes (a tied head)."""
        reference = output(clean[: self.rows])
        kls = {}
        for name in list(self.states):
            module, delta = (tied or {}).get(name, (None, None))
            with perturbed(module, delta) if module is not None else contextlib.nullcontext():
                kls[name] = divergence(reference, output(self.states.pop(name)))
        for name, (module, delta) in outside.items():
            with perturbed(module, delta):
                kls[name] = divergence(reference, output(clean[: self.rows]))
        # a KL below 0 is the float noise of one that is 0
        alphas = {name: max(kl, 0.0) / self.t**2 for name, kl in kls.items()}
        bad = [name for name, a in alphas.items() if not math.isfinite(a)]
        if bad:
            raise ValueError(
                f"the KL sensitivity of {bad[0]} is not finite: the model's output is NaN or "
                "infinite on the calibration text; check the model and the text"
            )
        return alphas

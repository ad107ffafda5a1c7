"""Measurements: reconstruction error and size of quantized weights, and a model's perplexity,
KL divergence to a reference and embedding cosine on token blocks.

relative error = sqrt(Σ_i ‖W_i − Q_i‖²_F / Σ_i ‖W_i‖²_F)   over the matrices of a model
bits / param   = 8 · Σ_i nbytes(Q_i) / Σ_i numel(W_i)      (every stored buffer counted)
perplexity, KL: see EvalResult; the sums over the vocabulary are lorq.evaluation.logits'
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lorq.evaluation.logits import Head, token_sums
from lorq.quant import QuantConfig, quantize
from lorq.util.progress import Progress, no_progress

EVAL_SEQ_LEN = 256  # tokens per evaluation block of the jobs (lorq compress, lorq eval)
# config fields of causal LMs that transform logits after the output layer (full logits kept)
LOGIT_RESCALING = ("final_logit_softcapping", "logit_scale", "logits_scaling")


@dataclass(frozen=True)
class QuantReportRow:
    config: QuantConfig
    numel: int
    nbytes: int
    squared_error: float
    squared_norm: float

    @property
    def bits_per_param(self) -> float:
        return 8.0 * self.nbytes / self.numel

    @property
    def relative_error(self) -> float:
        return (self.squared_error / self.squared_norm) ** 0.5


def quantization_report(
    weights: Mapping[str, torch.Tensor],
    configs: Iterable[QuantConfig],
    progress: Progress = no_progress,
) -> list[QuantReportRow]:
    """Quantize every weight with every config; one row per config, totals over the weights."""
    configs = list(configs)
    advance = progress("quantizing", len(weights) * len(configs))
    rows = []
    for config in configs:
        numel = nbytes = 0
        err = norm = 0.0
        for weight in weights.values():
            w = weight.float()
            q = quantize(w, config)
            numel, nbytes = numel + w.numel(), nbytes + q.nbytes
            err += float(torch.sum((q.dequantize() - w) ** 2))
            norm += float(torch.sum(w**2))
            advance(1)
        rows.append(QuantReportRow(config, numel, nbytes, err, norm))
    return rows


def model_nbytes(model: torch.nn.Module) -> int:
    """Bytes of every parameter and buffer of ``model``, shared tensors counted once."""
    seen: set[int] = set()
    total = 0
    for tensor in (*model.parameters(), *model.buffers()):
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            total += tensor.numel() * tensor.element_size()
    return total


def compressed_bits(model: torch.nn.Module, factor_bits: int = 16) -> tuple[float, float]:
    """Bits/param of the quantized layers: Q alone, and with B, A at ``factor_bits`` (a factor
    on its 8-bit grid, as ``lorq.io.native`` stores it: its 8-bit bytes)."""
    from lorq.nn import packed_linears
    from lorq.quant.factors import exact_rows

    layers = list(packed_linears(model).values())
    if not layers:
        raise ValueError("the model has no quantized layers")
    numel = sum(m.in_features * m.out_features for m in layers)
    quant = sum(8 * m.quantized_nbytes() for m in layers)
    factors = [f.detach() for m in layers if m.has_lora for f in (m.lora_A, m.lora_B)]
    rows = [(f, exact_rows(f.float())) for f in factors]
    stored = sum(factor_bits * f.numel() if r is None else 8 * r.nbytes for f, r in rows)
    return quant / numel, (quant + stored) / numel


@dataclass(frozen=True)
class EvalResult:
    """Perplexity and KL to a reference (causal LMs), or embedding cosine to a reference (encoders).

    perplexity = exp(Σ −log p(x_t | x_<t) / T)
    kl         = mean over positions of KL(p_ref ‖ p_model) of the next-token distributions
    cosine     = mean cosine similarity of mean-pooled last hidden states, block by block
    """

    tokens: int
    perplexity: float | None = None
    kl: float | None = None
    cosine: float | None = None


def _is_causal(output) -> bool:
    return getattr(output, "logits", None) is not None


@contextlib.contextmanager
def _deferred_head(model: nn.Module) -> Iterator[Head]:
    """While active, ``model(...).logits`` are the final hidden states and the yielded head
    turns them into logits a slice of the vocabulary at a time (``lorq.evaluation.logits``). A
    model whose output layer is not a plain nn.Linear, or that rescales logits after it, keeps
    its full logits and yields ``Head()``."""
    from lorq.nn import QuantLinear

    get = getattr(model, "get_output_embeddings", None)
    head = get() if get is not None else None
    config = getattr(model, "config", None)
    plain = isinstance(head, nn.Linear) or (isinstance(head, QuantLinear) and not head.has_lora)
    if not plain or any(getattr(config, k, None) for k in LOGIT_RESCALING):
        yield Head()
        return
    try:
        model.set_output_embeddings(nn.Identity())
    except (AttributeError, NotImplementedError):  # no setter: keep the full logits
        yield Head()
        return
    try:
        yield Head(head)
    finally:
        model.set_output_embeddings(head)


def _forward(model: nn.Module, ids: torch.Tensor):
    """``model(input_ids=ids)`` without a key/value cache where the model has one: one pass
    over the whole block needs none, and the cache would hold every layer's keys and values."""
    if getattr(getattr(model, "config", None), "use_cache", None) is None:
        return model(input_ids=ids)
    return model(input_ids=ids, use_cache=False)


@torch.no_grad()
def evaluate_model(
    model: torch.nn.Module,
    blocks: torch.Tensor,
    reference: torch.nn.Module | None = None,
    batch_size: int = 1,
    progress: Progress = no_progress,
    label: str = "evaluating",
) -> EvalResult:
    """Measure ``model`` on token ``blocks`` (n × seq_len); compare with ``reference`` if given."""
    if blocks.dim() != 2 or blocks.shape[0] == 0:
        raise ValueError(
            f"evaluation blocks must be a non-empty (n × seq_len) tensor, got {tuple(blocks.shape)}"
        )
    with contextlib.ExitStack() as stack:
        head = stack.enter_context(_deferred_head(model))
        ref_head = head
        if reference is not None and reference is not model:
            ref_head = stack.enter_context(_deferred_head(reference))
        return _evaluate(model, blocks, reference, batch_size, progress, label, head, ref_head)


def _evaluate(model, blocks, reference, batch_size, progress, label, head, ref_head) -> EvalResult:
    device = next(model.parameters()).device
    advance = progress(label, blocks.shape[0])
    nll = kl = cosine = 0.0
    tokens = positions = 0
    causal = True
    for start in range(0, blocks.shape[0], batch_size):
        ids = blocks[start : start + batch_size].to(device)
        out = _forward(model, ids)
        ref = None
        if reference is not None:
            ref = _forward(reference, ids.to(next(reference.parameters()).device))
        causal = _is_causal(out)
        if causal:
            ref_logits = None if ref is None else ref.logits
            block_nll, block_kl = token_sums(out.logits, head, ids, ref_logits, ref_head)
            nll, kl = nll + block_nll, kl + block_kl
            tokens += ids[:, 1:].numel()
            positions += ids.numel() if ref is not None else 0
        elif ref is not None:
            a = out.last_hidden_state.float().mean(1)
            b = ref.last_hidden_state.float().to(device).mean(1)
            cosine += float(torch.nn.functional.cosine_similarity(a, b, dim=-1).sum())
        advance(ids.shape[0])
    n = blocks.shape[0]
    if not causal:
        return EvalResult(blocks.numel(), cosine=cosine / n if reference is not None else None)
    return EvalResult(
        tokens,
        perplexity=float(torch.exp(torch.tensor(nll / tokens))),
        kl=kl / positions if reference is not None else None,
    )


@dataclass(frozen=True)
class Measurement:
    """One row of a results table; the model itself can be freed once measured."""

    label: str
    bits: tuple[float | None, float | None]  # Q alone, with B, A as saved (None: not quantized)
    megabytes: float  # every parameter and buffer in memory
    result: EvalResult


def measure(
    model: nn.Module,
    blocks: torch.Tensor,
    reference: nn.Module | None,
    label: str,
    progress: Progress = no_progress,
    quantized: bool = True,
) -> Measurement:
    """Evaluate ``model`` (KL / cosine to ``reference`` when given), its bits and its size."""
    from lorq.util.runtime import release_free_memory

    result = evaluate_model(
        model, blocks, reference, progress=progress, label=f"evaluating {label}"
    )
    release_free_memory()
    bits = compressed_bits(model) if quantized else (None, None)
    return Measurement(label, bits, model_nbytes(model) / 1e6, result)


def evaluation_summary(rows: list[Measurement]) -> dict[str, float | None] | None:
    """What lorq.json records of a job's rows: the original's and the result's numbers."""
    if not rows:
        return None
    first, last = rows[0].result, rows[-1].result
    return {
        "original_perplexity": first.perplexity,
        "perplexity": last.perplexity,
        "kl": last.kl,
        "cosine": last.cosine,
    }


def evaluation_blocks(tokenizer: Any, count: int) -> torch.Tensor:
    """``count`` blocks of EVAL_SEQ_LEN tokens of the built-in evaluation text (the jobs' rows)."""
    from lorq.text.corpus import TextConfig, load_blocks

    return load_blocks(tokenizer, TextConfig(seq_len=EVAL_SEQ_LEN, max_blocks=count), "evaluation")


def llama_cpp_perplexity(model: nn.Module, ids: torch.Tensor, n_ctx: int, chunks: int) -> float:
    """Perplexity as llama.cpp's ``llama-perplexity -c n_ctx --chunks chunks`` scores ``ids``
    (1-D, special tokens as the text holds them): per chunk of ``n_ctx`` tokens, the NLL of
    tokens n_ctx/2 + 1 … n_ctx − 1 given every token before them in the chunk."""
    first, nll, count = n_ctx // 2, 0.0, 0
    if ids.numel() < chunks * n_ctx:
        raise ValueError(f"{ids.numel()} tokens are fewer than {chunks} chunks of {n_ctx}")
    for c in range(chunks):
        chunk = ids[c * n_ctx : (c + 1) * n_ctx]
        with torch.no_grad():
            logits = model(input_ids=chunk[None]).logits[0].double()
        logp = torch.log_softmax(logits[first : n_ctx - 1], dim=-1)
        nll -= float(logp.gather(1, chunk[first + 1 :, None]).sum())
        count += n_ctx - first - 1
    return float(torch.exp(torch.tensor(nll / count)))

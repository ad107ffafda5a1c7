"""The evaluation of every job, one implementation: rows of perplexity / KL (causal LMs) or
embedding cosine (encoders) on the built-in evaluation text, which no calibration or training
text overlaps (``lorq.text.corpus``).

    original                      the source model, the reference of every other row
    plain (the same formats)      round to nearest, no low-rank part (lq / loftq)
    the result                    in memory, or loaded back from its directory

``lorq compress`` (in memory or written as it goes) and ``lorq eval`` both use it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorq.config import CompressConfig
from lorq.evaluation.measure import Measurement, evaluation_blocks, evaluation_summary, measure
from lorq.util.progress import Progress, no_progress

WEIGHTING_TAGS = {"none": "", "fisher": " +Fisher", "activations": " +act", "both": " +act+Fisher"}
Baseline = Callable[[], tuple[nn.Module, str]]  # builds the plain model and its row label


@dataclass(frozen=True)
class Evaluation:
    """The evaluation token blocks of one job (cut when first needed) and its rows."""

    tokenizer: Any
    eval_blocks: int

    @functools.cached_property
    def blocks(self) -> torch.Tensor | None:
        if self.eval_blocks <= 0:
            return None
        return evaluation_blocks(self.tokenizer, self.eval_blocks)

    def rows(
        self,
        original: nn.Module | None,
        compressed: nn.Module,
        label: str,
        progress: Progress = no_progress,
        baseline: Baseline | None = None,
    ) -> list[Measurement]:
        """The original (when given: also the reference), the baseline, the result."""
        first = self.reference(original, progress, baseline)
        return first + self.result(compressed, original, label, progress)

    def reference(
        self, original: nn.Module | None, progress: Progress, baseline: Baseline | None = None
    ) -> list[Measurement]:
        """The rows of the original and of the baseline (built, measured and freed)."""
        if self.blocks is None or original is None:
            return []
        rows = [measure(original, self.blocks, None, "original", progress, False)]
        if baseline is not None:
            plain, plain_label = baseline()
            rows.append(measure(plain, self.blocks, original, plain_label, progress))
            del plain
        return rows

    def result(
        self, compressed: nn.Module, original: nn.Module | None, label: str, progress: Progress
    ) -> list[Measurement]:
        """The row of the result (KL / cosine to ``original`` when given)."""
        if self.blocks is None:
            return []
        return [measure(compressed, self.blocks, original, label, progress)]

    @staticmethod
    def summary(rows: list[Measurement]) -> dict[str, float | None] | None:
        return evaluation_summary(rows)


def quant_label(config: CompressConfig) -> str:
    if config.quant is None:
        return f"{config.budget} bits"
    return config.quant if isinstance(config.quant, str) else config.quant.name


def job_label(config: CompressConfig, gguf_codes: bool = False) -> str:
    """The result's row label: method, rank, weighting, formats."""
    label = f"lorq {config.method} r={config.rank}" + WEIGHTING_TAGS[config.weighting]
    details = quant_label(config) + (", GPTQ" if config.gptq else "")
    if config.plan_weighting and config.plan_weighting != config.weighting:
        details += f", {config.plan_weighting} plan"
    return label + f" ({details}{', GGUF codes' if gguf_codes else ''})"


def baseline_label(config: CompressConfig) -> str:
    weighting = config.cost_weighting
    planned = f", {weighting} plan" if weighting != "none" and config.budget else ""
    return f"plain NF ({quant_label(config)}{planned})"


def evaluate_saved(
    path: str | Path,
    eval_blocks: int = 16,
    reference: bool = True,
    progress: Progress = no_progress,
    device: str = "cpu",
) -> tuple[list[Measurement], str | None]:
    """The ``lorq eval`` job: rows for a saved lorq model (and its source, for KL / cosine),
    both run on ``device`` (auto, cpu, cuda, cuda:N). Returns the rows and, when the source was
    wanted but could not be loaded, why not."""
    from lorq.io import load_with_tokenizer
    from lorq.io.models import load_model, recorded_model
    from lorq.io.native import model_meta
    from lorq.pipeline.devices import resolve_device

    where = resolve_device(device)
    model, tokenizer = load_with_tokenizer(path)
    model = model.to(where)
    source = recorded_model(model_meta(model).get("source") or {})
    original, missing = None, None
    if reference and source:
        try:
            original = load_model(source, with_tokenizer=False, packed=True, hub=False).model
            original = original.to(where)
        except (FileNotFoundError, ValueError) as err:
            missing = str(err)
    rows = Evaluation(tokenizer, eval_blocks).rows(original, model, str(path), progress)
    return rows, missing

"""A compress job's run and the evaluation around it (``lorq.compress_model``'s body).

    in memory:          original ─▶ baseline (plain, the same formats) ─▶ compress ─▶ result
    written as it goes: compress into the directory ─▶ original (read whole) ─▶ baseline ─▶ result

In memory the original and the baseline are measured before the compression, so two models are
held at once, not three; a budget's plan is then made first (the baseline uses it) and given to
the compression. The rows and lorq.json's ``evaluation`` are the same either way.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from torch import nn

from lorq.budget import BudgetPlan
from lorq.calibrate.tokens import Calibration
from lorq.config import CompressConfig
from lorq.evaluation.measure import Measurement
from lorq.io.models import LoadedModel, ModelSource, load_model
from lorq.io.native import LORQ_FILE, load, set_model_meta
from lorq.jobs.evaluate import Evaluation, baseline_label, job_label
from lorq.jobs.result import CompressResult
from lorq.model.targets import shared_copy
from lorq.pipeline import Outcome, Where, plan_pipeline, run_pipeline
from lorq.pipeline.sources import ResidentSource, Source
from lorq.pipeline.writer import write_json
from lorq.util.progress import Progress, no_progress
from lorq.util.runtime import release_free_memory


@dataclass
class CompressRun:
    """One compress job: the pipeline's run and the evaluation around it. In memory, the
    original and the baseline are measured before the compression (two models held at once,
    not three); written as it goes, all three after, the original read back whole."""

    source: Source
    config: CompressConfig
    calibration: Calibration | None
    tokenizer: Any
    where: Where
    progress: Progress = no_progress
    options: tuple[int, bool] = (0, False)

    @functools.cached_property
    def text(self) -> Evaluation:
        return Evaluation(self.tokenizer, self.options[0])

    def run(self, plan, **written) -> Outcome:
        return run_pipeline(
            self.source, self.config, plan=plan, calibration=self.calibration,
            tokenizer=self.tokenizer, where=self.where, progress=self.progress, **written,
        )  # fmt: skip

    def in_memory(self, loaded: LoadedModel, plan, budget) -> CompressResult:
        original, text = loaded.model, self.text
        if (
            self.wants_baseline
            and self.config.budgeted
            and plan is None
            and text.blocks is not None
        ):
            plan = self.plan()  # the baseline uses the plan: made first
        rows = text.reference(original, self.progress, self.baseline(original, plan))
        outcome = self.run(plan)
        rows += text.result(outcome.model, original, self.label, self.progress)
        return self.described(_result(outcome, self.config, self.tokenizer, None, budget), rows)

    def written(self, plan, budget, options: dict) -> CompressResult:
        outcome = self.run(plan, **options)
        result = _result(outcome, self.config, self.tokenizer, options["out"], budget)
        text = self.text
        if text.blocks is None:
            return result
        original = _reloaded(self.source)
        rows = text.reference(original, self.progress, self.baseline(original, result.plan))
        rows += text.result(_saved(result.path), original, self.label, self.progress)
        return self.described(result, rows)

    def plan(self) -> BudgetPlan:
        (plan,) = plan_pipeline(
            self.source, self.config, calibration=self.calibration, tokenizer=self.tokenizer,
            where=self.where, progress=self.progress,
        )  # fmt: skip
        return plan

    @property
    def wants_baseline(self) -> bool:
        return self.options[1] and self.config.method in ("lq", "loftq")

    def baseline(self, original: nn.Module, plan: BudgetPlan | None):
        return _baseline(original, self.config, plan) if self.wants_baseline else None

    @property
    def label(self) -> str:
        codes = self.config.method == "qa-lora" and self.config.gguf_codes
        return job_label(self.config, codes and self.source.origin.gguf_file is not None)

    def described(self, result: CompressResult, rows: list[Measurement]) -> CompressResult:
        """``result`` with the rows and lorq.json's ``evaluation``."""
        release_free_memory()
        metadata = {**result.metadata, "evaluation": Evaluation.summary(rows)}
        if result.model is not None:
            set_model_meta(result.model, metadata)
        else:
            _record_evaluation(result.path, metadata["evaluation"])
        return replace(result, measurements=tuple(rows), metadata=metadata)


def _result(outcome: Outcome, config, tokenizer, out, budget) -> CompressResult:
    metadata = {**outcome.metadata, **({"gguf_budget": budget.to_dict()} if budget else {})}
    model = outcome.model if out is None else None
    if model is not None:
        set_model_meta(model, metadata)
    return CompressResult(
        model, config, outcome.plan, outcome.errors, tokenizer, (), metadata,
        Path(out) if out is not None else None, outcome.computed, outcome.reused,
    )  # fmt: skip


def _reloaded(source: Source) -> nn.Module:
    """The original of a streamed source, whole (for the evaluation's reference)."""
    origin = source.origin
    name = str(Path(origin.path) / origin.gguf_file) if origin.gguf_file else origin.path
    return load_model(name, with_tokenizer=False, packed=True, hub=False).model


def _saved(path: Path | None) -> nn.Module:
    assert path is not None
    return load(path)


def _record_evaluation(path: Path | None, evaluation) -> None:
    """lorq.json of a written directory with the evaluation added (replaced atomically)."""
    assert path is not None
    meta = json.loads((path / LORQ_FILE).read_text())
    write_json(path / LORQ_FILE, {**meta, "evaluation": evaluation})


def _baseline(original: nn.Module, config: CompressConfig, plan: BudgetPlan | None):
    """A function giving plain round-to-nearest quantization of ``original`` in the job's
    formats (its uniform preset or its plan) and its row label."""

    def build() -> tuple[nn.Module, str]:
        plain = replace(
            config, method="plain", iters=None, rounding="nearest", weighting="none",
            plan_weighting=None, plan_rounding=None, embeddings=None, factor_bits=None,
            plan_ranks=None, plan_factor_bits=None, plan_embeddings=False,
        )  # fmt: skip
        planned = replace(plan, method="plain") if plan is not None else None
        source = ResidentSource(shared_copy(original), ModelSource(type(original).__name__, ""))
        return run_pipeline(source, plain, plan=planned).model, baseline_label(config)

    return build

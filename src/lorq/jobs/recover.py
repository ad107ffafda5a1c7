"""The ``lorq recover`` job as one library call: end-to-end recovery of a compressed model
(ALGORITHMS.md §9) — the fine-tune job with the KL to the original model as its loss.

    lorq model ─▶ teacher cache (the original's top-k, once) ─▶ train B, A ─▶ lorq model in ``out``

The original is the model the directory's lorq.json names as its source (or ``teacher``); it is
read block by block to make the cache (lorq.pipeline.teacher) — a teacher larger than memory
works — and never held beside the student. Checkpoints, resume, progress and the
saved provenance (``recover``: config, result, teacher) follow ``lorq finetune``'s conventions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from lorq.io.models import recorded_model
from lorq.io.native import model_meta
from lorq.jobs.compress import streamed_source
from lorq.jobs.finetune import finetune_model
from lorq.nn.dense import device_of
from lorq.nn.scales import check_memory, trainable_layers, training_bytes
from lorq.pipeline.devices import free_memory
from lorq.pipeline.teacher import teacher_rows
from lorq.quant import format_of
from lorq.recovery.teacher import Text
from lorq.recovery.topk import TopK
from lorq.train.distill import Teacher
from lorq.train.trainer import FinetuneResult, RecoverConfig

RECOVERED = "-recovered"  # the default output: PATH-recovered beside the input
TEACHER_SCRATCH = ".teacher-activations"  # the teacher's hidden states, when offloaded


def teacher_of(model: nn.Module, teacher: str | None = None) -> Teacher:
    """The original of ``model``: ``teacher`` (a model name or path) or its recorded source."""
    name = teacher or recorded_model(model_meta(model).get("source") or {})
    if name is None:
        raise ValueError(
            "the model's lorq.json names no original model to recover toward; pass teacher= "
            "(--teacher NAME_OR_PATH)"
        )
    device = device_of(model)

    def rows(texts: list[Text], k: int, scratch: Path) -> list[list[TopK]]:
        return teacher_rows(streamed_source(name), texts, k, device, scratch / TEACHER_SCRATCH)

    return Teacher(rows, {"teacher": name})


def recover(
    model: nn.Module,
    tokenizer: Any,
    config: RecoverConfig | None = None,
    out: str | Path | None = None,
    *,
    teacher: str | None = None,
    **options: Any,
) -> FinetuneResult:
    """Train ``model``'s factors (in place) toward its original's next-token distributions and
    save it to ``out``; ``options`` as :func:`lorq.jobs.finetune.finetune_model`'s."""
    if out is None:
        raise ValueError("recover needs out= (the CLI's default is PATH-recovered)")
    config = config or RecoverConfig()
    if not isinstance(config, RecoverConfig):
        raise ValueError(
            f"recover takes a RecoverConfig (its top_k and training settings), not "
            f"{type(config).__name__}; use lorq.finetune for a next-token fine-tune"
        )
    if config.scales:
        layers = [(m.q.numel, len(format_of(m.quant_config).trainable_keys(m.quant_config)))
                  for m in trainable_layers(model)]  # fmt: skip
        need, free = training_bytes(layers), free_memory(device_of(model))
        check_memory(need, free, "training the stored scales (--scales)", "recover without it")
    return finetune_model(model, tokenizer, config, out, teacher=teacher_of(model, teacher),
                          **options)  # fmt: skip

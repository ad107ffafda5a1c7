"""End-to-end recovery: the fine-tune's loss replaced by the KL to the original model
(ALGORITHMS.md §9; lorq.recovery.topk, lorq.recovery.teacher).

    minimise  mean over counted positions t of  KL_k( p_orig(·|x_≤t) ‖ p̂(·|x_≤t) )
    counted positions of an example: t with labels[t + 1] ≠ ignore (what the LM loss counts)

The teacher's top-k are computed once for the training examples and the evaluation blocks and
cached beside the checkpoints (``teacher-train.safetensors``, ``teacher-eval.safetensors``), so
the teacher is never held beside the student and a resumed run reads them back. Evaluation is
the same KL on the evaluation blocks: text neither the compression's calibration nor this
training saw.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorq.recovery.teacher import TeacherCache, Text, cache_of, text_digest
from lorq.recovery.topk import TopK, topk_kl
from lorq.train.data import IGNORE, Example


@dataclass(frozen=True)
class Teacher:
    """The original model, run only when a cache must be made, and what identifies it.

    ``rows(texts, k, scratch)``: per text, per example, the top-k at its positions
    (lorq.pipeline.teacher.teacher_rows, block by block; ``scratch`` for its disk buffers).
    """

    rows: Callable[[list[Text], int, Path], list[list[TopK]]]
    identity: dict[str, Any]


@dataclass(frozen=True)
class Caches:
    train: TeacherCache
    eval: TeacherCache


def seen_examples(examples: Sequence[Example], steps: int | None, per_step: int) -> list[Example]:
    """The examples a run of ``steps`` optimizer steps of ``per_step`` examples reads in its
    one epoch, spread evenly over ``examples`` (all of them without a step count): the teacher
    is run on these only."""
    if steps is None or steps * per_step >= len(examples):
        return list(examples)
    needed = steps * per_step
    return [examples[i * len(examples) // needed] for i in range(needed)]


def counted(example: Example) -> list[int]:
    """The positions whose next-token distribution the loss counts."""
    labels = example.labels
    return [t for t in range(len(labels) - 1) if labels[t + 1] != IGNORE]


def teacher_caches(
    teacher: Teacher,
    examples: Sequence[Example],
    blocks: torch.Tensor,
    k: int,
    folder: Path,
) -> Caches:
    """The training examples' and evaluation blocks' caches: read from ``folder`` when there,
    else made (one pass of the teacher's blocks for both) and written there."""
    evaluation = [Example(row, row) for row in blocks.tolist()]
    parts = {"train": examples, "eval": evaluation}
    made_from, missing = {}, []
    for name, part in parts.items():
        text = [(e.input_ids, counted(e)) for e in part]
        made_from[name] = ({**teacher.identity, "text": text_digest(text), "k": k}, text)
        if not (folder / f"teacher-{name}.safetensors").is_file():
            missing.append(name)
    caches = {}
    if missing:
        folder.mkdir(parents=True, exist_ok=True)
    made = iter(teacher.rows([made_from[n][1] for n in missing], k, folder) if missing else [])
    for name, (record, _) in made_from.items():
        path = folder / f"teacher-{name}.safetensors"
        if name in missing:
            caches[name] = cache_of(next(made), record)
            caches[name].save(path)
        else:
            caches[name] = TeacherCache.load(path, record)
    return Caches(caches["train"], caches["eval"])


def distill_loss(
    model: nn.Module, inputs: dict[str, torch.Tensor], cache: TeacherCache
) -> torch.Tensor:
    """Mean KL_k over the batch's counted positions (``inputs``: the collator's batch with each
    example's ``index``)."""
    logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    total, count = logits.new_zeros(()), 0
    for row, index in enumerate(inputs["index"].tolist()):
        labels = inputs["labels"][row]
        positions = torch.nonzero(labels[1:] != IGNORE).flatten()
        teacher = cache.of(index)
        total = total + topk_kl(logits[row, positions], teacher).sum()
        count += len(positions)
    return total / max(count, 1)


def indexed(items: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each item with its ``index`` (the cache's example number)."""
    return [{**item, "index": i} for i, item in enumerate(items)]

"""The ``lorq finetune`` job as one library call: train the LoRA factors, checkpoint, save.

    lorq model ─▶ train.finetune (Trainer; only lora_A / lora_B) ─▶ lorq model in ``out``
                  checkpoints in ``OUT-checkpoints``: a re-run with the same settings resumes

The checkpoint folder records the settings that made it (``lorq_finetune.json``). A resume may
change any setting but ``trainable`` (which decides what a checkpoint holds): a smaller lr after
a NaN stop, more steps; each change is recorded. A checkpoint counts once it is whole (the
Trainer's files, then ``lorq_complete``); one a kill cut short is skipped. The saved model
carries the source model's provenance plus the fine-tuning's config, result and changes.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from torch import nn

from lorq.io.native import input_paths, is_lorq_dir, save
from lorq.train.distill import Teacher
from lorq.train.trainer import FinetuneConfig, FinetuneResult, Monitor, finetune
from lorq.util.atomic import check_not_input, check_output, exclusive

CHECKPOINT_CONFIG = "lorq_finetune.json"
FIXED_ON_RESUME = ("trainable",)  # settings that decide which tensors a checkpoint holds


def is_main_process() -> bool:
    """False in the non-zero ranks of a multi-process launch (torchrun / accelerate launch)."""
    return int(os.environ.get("RANK", "0")) == 0


def checkpoint_dir(out: Path) -> Path:
    """Where the checkpoints of a fine-tune writing ``out`` live: ``OUT-checkpoints``."""
    return out.with_name(out.name + "-checkpoints")


def _settings(config: FinetuneConfig) -> dict[str, Any]:
    """The config as JSON gives it back (tuples are lists), so a re-run compares equal."""
    return json.loads(json.dumps(config.to_dict()))


def _read_marker(marker: Path) -> dict[str, Any]:
    """``{"settings": …, "changes": […]}`` of a checkpoint folder (lorq 0.1: the settings alone)."""
    try:
        data = json.loads(marker.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(
            f"{marker} is unreadable ({err}); pass resume=False to start again"
        ) from None
    if not isinstance(data, dict):
        raise ValueError(f"{marker} is not a lorq checkpoint record; pass resume=False")
    return data if "settings" in data else {"settings": data, "changes": []}


def resume_changes(saved: dict[str, Any], settings: dict[str, Any]) -> dict[str, list]:
    """{setting: [saved, now]} of what differs; ValueError when a difference changes which
    tensors train (the checkpoints could not be continued)."""
    changed = {k: [saved.get(k), v] for k, v in settings.items() if saved.get(k) != v}
    fixed = sorted(set(changed) & set(FIXED_ON_RESUME))
    if fixed:
        raise ValueError(
            f"the checkpoints were made with other {', '.join(fixed)} "
            f"({', '.join(f'{k}={changed[k][0]!r}' for k in fixed)}); pass the same, "
            "or resume=False to start again"
        )
    return changed


def prepare_checkpoints(out: Path, config: FinetuneConfig, resume: bool) -> tuple[Path, list]:
    """``OUT-checkpoints``, reused when resuming, else started afresh; with the changes of
    settings made on each resume (a smaller lr after a NaN stop, more steps, …)."""
    folder = checkpoint_dir(out)
    if not is_main_process():
        return folder, []
    marker = folder / CHECKPOINT_CONFIG
    if folder.exists() and not marker.exists():
        raise ValueError(
            f"{folder} exists and is not a lorq checkpoint folder; choose another output"
        )
    settings, changes = _settings(config), []
    if folder.exists() and resume and any(folder.glob("checkpoint-*")):
        record = _read_marker(marker)
        changes = list(record.get("changes", []))
        changed = resume_changes(record["settings"], settings)
        if changed:
            changes.append(changed)
    if folder.exists() and not resume:
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{CHECKPOINT_CONFIG}.tmp"
    tmp.write_text(json.dumps({"settings": settings, "changes": changes}, indent=1))
    os.replace(tmp, marker)
    return folder, changes


def default_finetune_out(path: str | Path, suffix: str = "-finetuned") -> Path:
    """``PATH-finetuned`` (or another ``suffix``) beside the model directory ``path`` (``.``
    included)."""
    folder = Path(path).resolve()
    return folder.with_name(folder.name + suffix)


def check_finetune_out(out: str | Path, overwrite: bool, inputs: Iterable[str | Path] = ()) -> None:
    """``out`` must be new or a lorq directory (replaced only with ``overwrite``), none of
    ``inputs``, and its checkpoint folder too."""
    check_output(out, overwrite, is_lorq_dir, "lorq model", inputs=inputs)
    check_not_input(checkpoint_dir(Path(out)), inputs)


def finetune_model(
    model: nn.Module,
    tokenizer: Any,
    config: FinetuneConfig,
    out: str | Path,
    *,
    resume: bool = True,
    keep_checkpoints: bool = False,
    overwrite: bool = False,
    monitor: Monitor | None = None,
    source: str | None = None,
    teacher: Teacher | None = None,
) -> FinetuneResult:
    """Fine-tune ``model``'s LoRA factors (in place) and save it to ``out`` as a lorq model.

    Checkpoints go to ``OUT-checkpoints`` (see the module docstring) and are removed at the end
    unless ``keep_checkpoints``; an interrupted run that saved none leaves no folder behind.
    ``source``: where ``model`` was loaded from, recorded in the saved provenance.
    """
    out = Path(out)
    check = lambda: check_finetune_out(out, overwrite, input_paths(model))  # noqa: E731
    # one fine-tune per output (and its checkpoints) at a time; the other ranks only train
    with exclusive(out, check) if is_main_process() else contextlib.nullcontext():
        checkpoints, changes = prepare_checkpoints(out, config, resume)
        try:
            result = finetune(model, tokenizer, config, checkpoints, resume, monitor, teacher)
        except BaseException:
            if not any(checkpoints.glob("checkpoint-*")):  # nothing to resume from: no trace
                shutil.rmtree(checkpoints, ignore_errors=True)
            raise
        if not is_main_process():
            return result
        record = {"config": config.to_dict(), "result": result.to_dict(), "from": source}
        record["changed_on_resume"] = changes
        if teacher is not None:
            record["teacher"] = teacher.identity
        save(model, out, tokenizer, {"recover" if teacher else "finetune": record}, overwrite)
        if not keep_checkpoints:
            shutil.rmtree(checkpoints, ignore_errors=True)
    return result

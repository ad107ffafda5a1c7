"""The ``lorq finetune`` job as one library call: train the LoRA factors, checkpoint, save.

    lorq model ─▶ train.finetune (Trainer; only lora_A / lora_B) ─▶ lorq model in ``out``
                  checkpoints in ``OUT-checkpoints``: a re-run with the same settings resumes

The checkpoint folder records the settings that made it (``lorq_finetune.json``); a different
setting refuses to resume unless ``resume=False`` starts again. The saved model carries the
source model's provenance plus the fine-tuning's config and result.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from torch import nn

from lorq.atomic import check_output
from lorq.io.native import is_lorq_dir, save
from lorq.train import FinetuneConfig, FinetuneResult, Monitor, finetune

CHECKPOINT_CONFIG = "lorq_finetune.json"


def is_main_process() -> bool:
    """False in the non-zero ranks of a multi-process launch (torchrun / accelerate launch)."""
    return int(os.environ.get("RANK", "0")) == 0


def checkpoint_dir(out: Path) -> Path:
    """Where the checkpoints of a fine-tune writing ``out`` live: ``OUT-checkpoints``."""
    return out.with_name(out.name + "-checkpoints")


def _settings(config: FinetuneConfig) -> dict[str, Any]:
    """The config as JSON gives it back (tuples are lists), so a re-run compares equal."""
    return json.loads(json.dumps(config.to_dict()))


def prepare_checkpoints(out: Path, config: FinetuneConfig, resume: bool) -> Path:
    """``OUT-checkpoints``: reused when resuming with the same settings, else started afresh."""
    folder = checkpoint_dir(out)
    if not is_main_process():
        return folder
    marker = folder / CHECKPOINT_CONFIG
    if folder.exists() and not marker.exists():
        raise ValueError(
            f"{folder} exists and is not a lorq checkpoint folder; choose another output"
        )
    settings = _settings(config)
    if folder.exists() and resume and json.loads(marker.read_text()) != settings:
        raise ValueError(
            f"the checkpoints in {folder} were made with other settings; pass the same settings, "
            "or resume=False to start again"
        )
    if folder.exists() and not resume:
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(settings, indent=1))
    return folder


def check_finetune_out(out: str | Path, overwrite: bool) -> None:
    """``out`` must be new or a lorq directory (replaced only with ``overwrite``)."""
    check_output(out, overwrite, is_lorq_dir, "lorq model")


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
) -> FinetuneResult:
    """Fine-tune ``model``'s LoRA factors (in place) and save it to ``out`` as a lorq model.

    Checkpoints go to ``OUT-checkpoints`` (see the module docstring) and are removed at the end
    unless ``keep_checkpoints``; an interrupted run that saved none leaves no folder behind.
    ``source``: where ``model`` was loaded from, recorded in the saved provenance.
    """
    out = Path(out)
    check_finetune_out(out, overwrite)
    checkpoints = prepare_checkpoints(out, config, resume)
    try:
        result = finetune(model, tokenizer, config, checkpoints, resume, monitor)
    except BaseException:
        if not any(checkpoints.glob("checkpoint-*")):  # nothing to resume from: no trace
            shutil.rmtree(checkpoints, ignore_errors=True)
        raise
    if not is_main_process():
        return result
    record = {"config": config.to_dict(), "result": result.to_dict(), "from": source}
    save(model, out, tokenizer, {"finetune": record}, overwrite)
    if not keep_checkpoints:
        shutil.rmtree(checkpoints, ignore_errors=True)
    return result

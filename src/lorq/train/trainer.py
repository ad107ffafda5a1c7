"""Fine-tuning the low-rank part through ``transformers.Trainer`` (accelerate underneath).

    minimise  mean over label tokens of  −log p(token | prefix)    over  {lora_A, lora_B} only
    y = x Qᵀ + s·(x Aᵀ) Bᵀ : Q stays packed and frozen; no gradient or optimizer state for it

The Trainer gives mixed precision, gradient accumulation and checkpointing, and, through
``accelerate launch`` / ``torchrun``, DDP on several GPUs with no code of lorq's own. Checkpoints
hold only the trainable tensors (the LoRA factors) plus the Trainer's optimizer, scheduler and
RNG states, so a resumed run continues exactly where the interrupted one stopped.
"""

from __future__ import annotations

import dataclasses
import math
import os
import pickle
import re
import shutil
import time
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lorq.config import _Serializable
from lorq.nn.scales import PREFIX, trained_scales
from lorq.text.corpus import TextConfig, load_blocks
from lorq.train.data import Collator, ExampleDataset, training_examples
from lorq.train.distill import Teacher, distill_loss, indexed, seen_examples, teacher_caches

TRAINABLE_FILE = "trainable.safetensors"
COMPLETE_FILE = "lorq_complete"  # written last, atomically: the checkpoint is whole


@dataclass(frozen=True)
class FinetuneConfig(_Serializable):
    """What ``finetune`` does. ``steps`` (optimizer steps) or ``epochs``; default 100 steps.

    ``trainable``: regexes of extra parameter names to train besides the LoRA factors (e.g.
    ``"norm"``); quantized buffers never train. Evaluation: ``eval_blocks`` blocks of ``seq_len``
    tokens of the built-in evaluation text, every ``eval_every`` steps (0: before and after only).
    """

    data: str = "builtin"
    steps: int | None = None
    epochs: float | None = None
    lr: float = 2e-4
    batch_size: int = 4
    grad_accum: int = 1
    seq_len: int = 256
    warmup: float = 0.03
    scheduler: str = "cosine"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    gradient_checkpointing: bool = False
    eval_every: int = 0
    eval_blocks: int = 16
    save_every: int = 25
    trainable: tuple[str, ...] = ()
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps is not None and self.epochs is not None:
            raise ValueError(f"give steps={self.steps!r} or epochs={self.epochs!r}, not both")
        if self.steps is None and self.epochs is None:
            object.__setattr__(self, "steps", 100)
        positive = ("batch_size", "grad_accum", "seq_len", "eval_blocks", "save_every")
        for name in (*positive, "steps"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise ValueError(f"{name}={value!r} is not supported; allowed: a positive integer")
        if self.epochs is not None and not self.epochs > 0:
            raise ValueError(f"epochs={self.epochs!r} is not supported; allowed: > 0")
        if not self.lr > 0:
            raise ValueError(f"lr={self.lr!r} is not supported; allowed: > 0")
        if not 0 <= self.warmup < 1:
            raise ValueError(f"warmup={self.warmup!r} is not supported; allowed: a ratio in [0, 1)")
        if not isinstance(self.eval_every, int) or self.eval_every < 0:
            raise ValueError(f"eval_every={self.eval_every!r} is not supported; allowed: ≥ 0")
        object.__setattr__(self, "trainable", tuple(self.trainable or ()))
        for pattern in self.trainable:
            try:
                re.compile(pattern)
            except re.error as err:
                raise ValueError(
                    f"trainable={pattern!r} is not a valid regular expression ({err})"
                ) from None


CONFIG_FIELDS = frozenset(f.name for f in dataclasses.fields(FinetuneConfig))
TOP_K = 64  # teacher tokens kept per position (ALGORITHMS.md §9: 64–256)


@dataclass(frozen=True)
class RecoverConfig(FinetuneConfig):
    """What end-to-end recovery does: a fine-tune whose loss is the KL to the original model's
    next-token distributions, kept as their ``top_k`` (``lorq.recovery.topk``). With ``scales``
    the continuous parameters the formats store train too, at ``scale_lr`` of their matrix's
    mean value (``lorq.nn.scales``)."""

    lr: float = 1e-4
    top_k: int = TOP_K
    scales: bool = False
    scale_lr: float = 1e-3

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1:
            raise ValueError(f"top_k={self.top_k!r} is not supported; allowed: an integer ≥ 1")
        if self.scales not in (True, False):
            raise ValueError(f"scales={self.scales!r} is not supported; allowed: True, False")
        if isinstance(self.scale_lr, bool) or not 0 < self.scale_lr < 1:
            raise ValueError(f"scale_lr={self.scale_lr!r} is not supported; allowed: 0 < lr < 1")


RECOVER_FIELDS = frozenset(f.name for f in dataclasses.fields(RecoverConfig))


@dataclass
class FinetuneResult:
    """What a run did: losses per step, evaluation perplexities, speed."""

    steps: int
    losses: list[tuple[int, float]] = field(default_factory=list)
    evaluations: list[tuple[int, float]] = field(default_factory=list)  # (step, metric)
    metric: str = "perplexity"  # of the evaluations: perplexity, or kl (distillation)
    tokens: int = 0
    seconds: float = 0.0
    resumed_from: str | None = None

    @property
    def perplexity_before(self) -> float | None:
        return self.evaluations[0][1] if self.evaluations else None

    @property
    def perplexity_after(self) -> float | None:
        return self.evaluations[-1][1] if len(self.evaluations) > 1 else None

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "losses": self.losses,
            "evaluations": self.evaluations,
            "metric": self.metric,
            "tokens": self.tokens,
            "seconds": self.seconds,
            "tokens_per_second": self.tokens_per_second,
            "resumed_from": self.resumed_from,
        }


class NonFiniteLoss(ValueError):
    """Training stopped because the loss became NaN or infinite."""


Monitor = Callable[[str, dict[str, Any]], None]  # (event: "start" | "step" | "eval", values)


def set_trainable(model: nn.Module, extra: tuple[str, ...] = ()) -> list[str]:
    """Only LoRA factors, attached scales (``lorq.nn.scales``) and parameters matching ``extra``
    regexes train; returns their names."""
    names = []
    own = ("lora_A", "lora_B")
    for name, param in model.named_parameters():
        train = name.rpartition(".")[2].startswith((*own, PREFIX))
        train = train or any(re.search(p, name) for p in extra)
        param.requires_grad_(train)
        if train:
            names.append(name)
    if not names:
        raise ValueError(
            "the model has no LoRA factors to train (a merged model has none); pass a model "
            "from lorq compress, or train its stored scales with lorq recover --scales"
        )
    return names


def max_positions(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    return None


def check_seq_len(model: nn.Module, seq_len: int) -> None:
    limit = max_positions(model)
    if limit is not None and seq_len > limit:
        raise ValueError(
            f"seq_len={seq_len} is above the model's limit of {limit} positions; pass a smaller "
            "seq_len"
        )


def _trainer_class():
    import transformers

    class LorqTrainer(transformers.Trainer):
        """Checkpoints hold the trainable tensors only (the frozen Q never changes). With
        ``caches`` the loss is the KL to the cached teacher (``lorq.train.distill``)."""

        caches = None

        def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
            if self.caches is None:
                return super().compute_loss(model, inputs, return_outputs, **kwargs)
            cache = self.caches.train if model.training else self.caches.eval
            loss = distill_loss(model, inputs, cache)
            return (loss, {"loss": loss}) if return_outputs else loss

        def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
            directory = Path(output_dir or self.args.output_dir)
            directory.mkdir(parents=True, exist_ok=True)
            trainable = {
                n: p.detach().contiguous().cpu()
                for n, p in self.model.named_parameters()
                if p.requires_grad
            }
            save_file(trainable, directory / TRAINABLE_FILE, metadata={"format": "pt"})

        def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
            """As saved, except a learning rate changed on resume (e.g. after a NaN stop)."""
            super()._load_optimizer_and_scheduler(checkpoint)
            scheduler, lr = self.lr_scheduler, self.args.learning_rate
            if checkpoint is None or not hasattr(scheduler, "lr_lambdas"):
                return
            if all(base == lr for base in scheduler.base_lrs):
                return
            scheduler.base_lrs = [lr] * len(scheduler.base_lrs)
            groups = self.optimizer.param_groups
            for group, factor in zip(groups, scheduler.lr_lambdas, strict=True):
                group["initial_lr"], group["lr"] = lr, lr * factor(scheduler.last_epoch)

        def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
            model = model or self.model
            file = Path(resume_from_checkpoint) / TRAINABLE_FILE
            if not file.exists():
                raise ValueError(f"{file} not found; {resume_from_checkpoint} is not a checkpoint")
            params = dict(model.named_parameters())
            with torch.no_grad():
                for name, tensor in load_file(file).items():
                    if name not in params:
                        raise ValueError(f"{file} has {name!r}, which the model does not have")
                    params[name].copy_(tensor)

    return LorqTrainer


def _checkpointing(arguments: type, enabled: bool) -> dict[str, Any]:
    """Activation checkpointing under the option name this transformers version uses."""
    names = {f.name for f in dataclasses.fields(arguments)}
    prefix = "activation" if "activation_checkpointing" in names else "gradient"
    return {
        f"{prefix}_checkpointing": enabled,
        f"{prefix}_checkpointing_kwargs": {"use_reentrant": False},
    }


def _arguments(config: FinetuneConfig, checkpoints: Path):
    from transformers import TrainingArguments

    cuda = torch.cuda.is_available()
    return TrainingArguments(
        output_dir=str(checkpoints),
        max_steps=config.steps or -1,
        num_train_epochs=config.epochs or 1.0,
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=1,  # equal-length blocks: the mean of block means is exact
        prediction_loss_only=True,  # never gather the evaluation logits (n × L × vocab)
        gradient_accumulation_steps=config.grad_accum,
        learning_rate=config.lr,
        lr_scheduler_type=config.scheduler,
        warmup_steps=config.warmup,
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm,
        **_checkpointing(TrainingArguments, config.gradient_checkpointing),
        logging_steps=1,
        logging_nan_inf_filter=False,
        include_num_input_tokens_seen="non_padding",
        eval_strategy="steps" if config.eval_every else "no",
        eval_steps=config.eval_every or None,
        save_strategy="steps",
        save_steps=config.save_every,
        save_total_limit=2,
        report_to="none",
        disable_tqdm=True,
        seed=config.seed,
        data_seed=config.seed,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        use_cpu=not cuda,
        bf16=cuda and torch.cuda.is_bf16_supported(),
    )


def _watch(result: FinetuneResult, monitor: Monitor | None, state: dict[str, Any]):
    from transformers import TrainerCallback

    def emit(event: str, values: dict[str, Any]) -> None:
        if monitor is not None:
            monitor(event, values)

    class Watch(TrainerCallback):
        def on_save(self, args, trainer_state, control, **kwargs):
            folder = Path(args.output_dir) / f"checkpoint-{trainer_state.global_step}"
            if folder.is_dir():
                mark_complete(folder)

        def on_train_begin(self, args, trainer_state, control, **kwargs):
            state.update(start=time.perf_counter(), tokens=trainer_state.num_input_tokens_seen)
            emit("start", {"step": trainer_state.global_step, "total": trainer_state.max_steps})

        def on_log(self, args, trainer_state, control, logs=None, **kwargs):
            step, logs = trainer_state.global_step, logs or {}
            if "eval_loss" in logs:
                value = logs["eval_loss"]
                value = math.exp(value) if result.metric == "perplexity" else value
                result.evaluations.append((step, value))
                emit("eval", {"step": step, result.metric: value})
            if "loss" not in logs:
                return
            if not math.isfinite(logs["loss"]):
                state["nonfinite"] = step
                control.should_training_stop, control.should_save = True, False
                return
            result.losses.append((step, float(logs["loss"])))
            result.tokens = int(trainer_state.num_input_tokens_seen - state["tokens"])
            result.seconds = time.perf_counter() - state["start"]
            emit(
                "step",
                {"step": step, "loss": logs["loss"], "tokens_per_s": result.tokens_per_second},
            )

    return Watch()


def mark_complete(folder: Path) -> None:
    """Mark a checkpoint folder whole (after the Trainer wrote every file of it)."""
    tmp = folder / f".{COMPLETE_FILE}.tmp"
    tmp.write_text("complete\n")
    os.replace(tmp, folder / COMPLETE_FILE)


def last_checkpoint(checkpoints: Path) -> str | None:
    """The newest whole ``checkpoint-N`` folder under ``checkpoints``, if any; folders a kill
    left half-written are removed, with a warning."""
    folders = (
        [p for p in checkpoints.glob("checkpoint-*") if p.is_dir()] if checkpoints.is_dir() else []
    )
    whole = []
    for folder in folders:
        if (folder / COMPLETE_FILE).is_file():
            whole.append(folder)
        else:
            warnings.warn(
                f"{folder} is incomplete (interrupted while saving); skipped", stacklevel=2
            )
            shutil.rmtree(folder, ignore_errors=True)
    step = lambda folder: int(folder.name.rpartition("-")[2])  # noqa: E731
    return str(max(whole, key=step)) if whole else None


def _train(trainer, resumed: str | None) -> None:
    """``trainer.train``; a checkpoint whose optimizer, scheduler or RNG file is more than plain
    tensors (refused by torch's weights-only unpickler) or corrupted is one ValueError."""
    try:
        trainer.train(resume_from_checkpoint=resumed)
    except (pickle.UnpicklingError, RuntimeError) as err:
        unreadable = isinstance(err, pickle.UnpicklingError) or "PytorchStreamReader" in str(err)
        if resumed is None or not unreadable:
            raise
        reason = str(err).splitlines()[0]
        raise ValueError(
            f"{resumed} holds a file that is corrupted or more than plain tensors ({reason}); "
            "delete that checkpoint, or pass resume=False to start again"
        ) from None


def _datasets(examples, blocks: torch.Tensor, teacher: Teacher | None, config, checkpoints):
    """The training and evaluation datasets, and with a teacher its caches (each item then
    carries its ``index`` into them)."""
    train = ExampleDataset(examples)
    evaluation = [{"input_ids": row, "labels": row} for row in blocks.tolist()]
    if teacher is None:
        return train, evaluation, None
    examples = seen_examples(examples, config.steps, config.batch_size * config.grad_accum)
    caches = teacher_caches(teacher, examples, blocks, config.top_k, checkpoints)
    train = [{"input_ids": e.input_ids, "labels": e.labels} for e in examples]
    return indexed(train), indexed(evaluation), caches


def finetune(
    model: nn.Module,
    tokenizer: Any,
    config: FinetuneConfig,
    checkpoints: str | Path,
    resume: bool = True,
    monitor: Monitor | None = None,
    teacher: Teacher | None = None,
) -> FinetuneResult:
    """Train the LoRA factors of a compressed ``model`` in place; checkpoints under ``checkpoints``.
    With ``teacher`` (a :class:`RecoverConfig`), toward the teacher's next-token distributions
    instead of the text's next tokens (``lorq.train.distill``).

    With ``resume``, the newest checkpoint there is continued (same parameters as an uninterrupted
    run). A NaN / infinite loss stops training before the bad step is checkpointed and raises
    :class:`NonFiniteLoss` naming the last good checkpoint. A :class:`RecoverConfig` with
    ``scales`` trains the stored scales too; they are written into the packed buffers when
    training ends (and left as they were when it fails).
    """
    scales = isinstance(config, RecoverConfig) and config.scales
    if scales and torch.cuda.is_available():
        model.to("cuda")  # where the Trainer trains, before the scales' bases are made there
    with trained_scales(model, config.scale_lr / config.lr) if scales else nullcontext():
        return _finetune(model, tokenizer, config, checkpoints, resume, monitor, teacher)


def _finetune(model, tokenizer, config, checkpoints, resume, monitor, teacher) -> FinetuneResult:
    from transformers import PrinterCallback

    checkpoints = Path(checkpoints)
    check_seq_len(model, config.seq_len)
    set_trainable(model, config.trainable)
    examples = training_examples(tokenizer, config.data, config.seq_len)
    text = TextConfig(seq_len=config.seq_len, max_blocks=config.eval_blocks)
    blocks = load_blocks(tokenizer, text, "evaluation")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    result, state = FinetuneResult(steps=0, metric="kl" if teacher else "perplexity"), {}
    resumed = last_checkpoint(checkpoints) if resume else None
    train, evaluation, caches = _datasets(examples, blocks, teacher, config, checkpoints)
    trainer = _trainer_class()(
        model=model,
        args=_arguments(config, checkpoints),
        train_dataset=train,
        eval_dataset=evaluation,
        data_collator=Collator(0 if pad is None else pad),
        callbacks=[_watch(result, monitor, state)],
    )
    if teacher is not None:
        trainer.caches, trainer.model_accepts_loss_kwargs = caches, False  # a per-batch mean
    trainer.remove_callback(PrinterCallback)  # lorq reports through ``monitor``
    trainer.evaluate()
    _train(trainer, resumed)
    result.steps, result.resumed_from = trainer.state.global_step, resumed
    if "nonfinite" in state:
        good = last_checkpoint(checkpoints)
        where = f"the last good checkpoint is {good}" if good else "no checkpoint was saved yet"
        raise NonFiniteLoss(
            f"the loss became NaN or infinite at step {state['nonfinite']}; training stopped and "
            f"nothing was written; {where} (resume from it with a smaller lr)"
        )
    trainer.evaluate()
    model.eval()
    return result

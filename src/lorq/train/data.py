"""Training examples for fine-tuning: token ids and labels, −100 where no loss is taken.

    text (builtin, .txt, .jsonl {"text"}, hf:)   consecutive blocks of seq_len tokens; labels = ids
    .jsonl {"prompt", "completion"}             prompt + completion + EOS; loss on the completion
    .jsonl {"messages": [{role, content}, …]}   the chat template; loss on the assistant turns

Every example is cut to ``seq_len`` tokens; a batch is right-padded to its longest example
(padding: attention 0, label −100). A JSONL file holds one kind of record throughout; a line of
another kind, or a malformed one, is a ValueError naming the file and the line.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lorq.text.corpus import SEPARATOR, load_text, numbered_lines, token_blocks

IGNORE = -100  # label of tokens without loss (PyTorch's cross-entropy ignore_index)
KINDS = {"text": ("text",), "prompt": ("prompt", "completion"), "messages": ("messages",)}


@dataclass(frozen=True)
class Example:
    """One training sequence: ``input_ids`` and ``labels`` of one length (−100: no loss)."""

    input_ids: list[int]
    labels: list[int]


def _record_kind(path: Path, number: int, line: str) -> tuple[str, dict[str, Any]]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: line {number} is not valid JSON ({err.msg}); fix it") from None
    if isinstance(record, dict):
        for kind, fields in KINDS.items():
            if all(isinstance(record.get(f), list if kind == "messages" else str) for f in fields):
                return kind, record
    found = sorted(record) if isinstance(record, dict) else type(record).__name__
    raise ValueError(
        f"{path}: line {number} is not a training record (found {found}); each line must be "
        '{"text": ...}, {"prompt": ..., "completion": ...} or {"messages": [{"role", "content"}]}'
    )


def read_records(path: str | Path) -> tuple[str, list[tuple[int, dict[str, Any]]]]:
    """The kind ("text" | "prompt" | "messages") and the (line number, record) pairs of a JSONL."""
    path = Path(path)
    kind, records = None, []
    for number, line in numbered_lines(path):
        if not line.strip():
            continue
        line_kind, record = _record_kind(path, number, line)
        if kind is not None and line_kind != kind:
            raise ValueError(
                f"{path}: line {number} is a {line_kind!r} record but the file began with "
                f"{kind!r} records; use one kind per file"
            )
        kind = line_kind
        records.append((number, record))
    if kind is None:
        raise ValueError(f"{path} has no records; pass a JSONL file with one JSON object per line")
    return kind, records


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def prompt_completion_example(
    tokenizer: Any, prompt: str, completion: str, seq_len: int
) -> Example:
    """prompt + completion + EOS; the loss covers the completion and EOS only."""
    head, tail = _ids(tokenizer, prompt), _ids(tokenizer, completion)
    if tokenizer.eos_token_id is not None:
        tail.append(tokenizer.eos_token_id)
    ids = (head + tail)[:seq_len]
    labels = ([IGNORE] * len(head) + tail)[:seq_len]
    return Example(ids, labels)


def _check_messages(messages: list[Any], where: str) -> None:
    ok = all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in messages
    )
    if not ok or not any(m["role"] == "assistant" for m in messages):
        raise ValueError(
            f"{where}: 'messages' must be a list of {{'role': str, 'content': str}} objects with "
            "at least one 'assistant' turn"
        )


def _render(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool) -> list[int]:
    text = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=generation_prompt
    )
    return _ids(tokenizer, text)


def chat_example(
    tokenizer: Any, messages: list[dict[str, str]], seq_len: int, where: str = "messages"
) -> Example:
    """The chat template of ``messages``; the loss covers each assistant turn (its end mark too).

    Assistant turn i spans the tokens between the template of the turns before it with the
    generation prompt and the template of the turns up to it; each must be a prefix of the whole.
    """
    _check_messages(messages, where)
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"{where}: the tokenizer has no chat template; use prompt/completion records instead"
        )
    ids = _render(tokenizer, messages, False)
    labels = [IGNORE] * len(ids)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], True) if i else []
        through = _render(tokenizer, messages[: i + 1], False)
        if ids[: len(before)] != before or ids[: len(through)] != through:
            raise ValueError(
                f"{where}: the chat template does not render turn {i} as a prefix of the whole "
                "conversation, so the assistant tokens cannot be located; use prompt/completion"
            )
        labels[len(before) : len(through)] = through[len(before) :]
    return Example(ids[:seq_len], labels[:seq_len])


def _jsonl_examples(tokenizer: Any, path: Path, seq_len: int) -> list[Example] | str:
    """The examples of a prompt/completion or chat JSONL; for ``text`` records, their text."""
    kind, records = read_records(path)
    if kind == "text":
        return SEPARATOR.join(r["text"] for _, r in records)
    if kind == "prompt":
        return [
            prompt_completion_example(tokenizer, r["prompt"], r["completion"], seq_len)
            for _, r in records
        ]
    return [
        chat_example(tokenizer, r["messages"], seq_len, f"{path}: line {number}")
        for number, r in records
    ]


def training_examples(
    tokenizer: Any, source: str, seq_len: int, max_examples: int | None = None
) -> list[Example]:
    """The training examples of ``source`` (see the module docstring), at most ``max_examples``."""
    path = Path(str(source)).expanduser()
    examples = None
    if path.suffix == ".jsonl" and path.is_file():
        examples = _jsonl_examples(tokenizer, path, seq_len)
    if not isinstance(examples, list):
        text = load_text(source, "train") if examples is None else examples
        name = f"training data from {source!r}"
        blocks = token_blocks(tokenizer, text, seq_len, max_examples, name=name)
        examples = [Example(row.tolist(), row.tolist()) for row in blocks]
    if not any(label != IGNORE for e in examples for label in e.labels):
        raise ValueError(f"training data from {source!r} has no tokens to learn from")
    return examples[:max_examples]


class ExampleDataset(torch.utils.data.Dataset):
    """A list of :class:`Example` as a map-style dataset of dicts."""

    def __init__(self, examples: Sequence[Example]):
        self.examples = list(examples)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        example = self.examples[index]
        return {"input_ids": example.input_ids, "labels": example.labels}


@dataclass(frozen=True)
class Collator:
    """Right-pads a batch to its longest example: input_ids, attention_mask, labels (B, L)."""

    pad_token_id: int

    def __call__(self, batch: Sequence[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        length = max(len(item["input_ids"]) for item in batch)
        ids = torch.full((len(batch), length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(batch), length), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(batch), length), dtype=torch.long)
        for row, item in enumerate(batch):
            n = len(item["input_ids"])
            ids[row, :n] = torch.tensor(item["input_ids"])
            labels[row, :n] = torch.tensor(item["labels"])
            mask[row, :n] = 1
        batch_out = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        if "index" in batch[0]:  # distillation: which cached teacher rows each example has
            batch_out["index"] = torch.tensor([item["index"] for item in batch])
        return batch_out

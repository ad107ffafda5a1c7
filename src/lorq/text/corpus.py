"""Text for calibration, evaluation and training, and its cut into token blocks.

    text   = load_text(source, split)                   one string; parts joined by a blank line
    blocks = token_blocks(tokenizer, text, seq_len)     LongTensor (n_blocks, seq_len)
    ids    = bos? + tokenize(text);  n_blocks = min(len(ids) // seq_len, max_blocks)
    blocks[i] = ids[i·seq_len : (i+1)·seq_len]          consecutive, non-overlapping, tail dropped

Sources:
    "builtin"                  the standard library's ``pydoc_data.topics`` (≈465 k characters of
                               English technical prose), split by topic (``split_of``)
    "notes.txt"                a local text file, used whole
    "data.jsonl"               a local JSON-lines file, one ``{"text": ...}`` object per line
    "hf:NAME[:CONFIG][@SPLIT]" a Hugging Face dataset's ``text`` column (needs ``datasets``)

Built-in split rule: a topic key k goes to ``calibration`` if sha256(k) mod 10 == 0, to
``evaluation`` if it is 1, else to ``train``; topics are sorted by key. The rule depends on the key
only, so the parts never overlap, and a topic's part never changes across runs, machines or
Python versions (the topic texts themselves are those of the running Python). On Python 3.11 the
parts are 64 / 10 / 5 topics, about 391 k / 45 k / 29 k characters (train / calibration /
evaluation); 10 % by hash gives calibration and evaluation enough text for a few dozen blocks.
"""

from __future__ import annotations

import hashlib
import importlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lorq.config import _Serializable

SPLITS = ("train", "calibration", "evaluation")
BUILTIN = "builtin"
HF_PREFIX = "hf:"
# Dataset split read for each lorq split when an ``hf:`` spec names none (GPTQ's convention:
# calibrate on train, measure on test). ``@SPLIT`` overrides it, slices included: ``@train[:1%]``.
HF_DEFAULT_SPLITS = {"train": "train", "calibration": "train", "evaluation": "test"}
FILE_SUFFIXES = (".txt", ".jsonl")
SEPARATOR = "\n\n"
# Texts longer than this are tokenized in pieces cut at a newline (or space); shorter texts are
# tokenized in one call, so their ids equal ``tokenizer(text, add_special_tokens=False)`` exactly.
CHUNK_CHARS = 1_000_000
_SOURCES_HELP = "'builtin', a .txt or .jsonl file, or 'hf:NAME[:CONFIG][@SPLIT]'"


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not supported; allowed: {', '.join(SPLITS)}")


def _check_positive(field: str, value: Any, optional: bool = False) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        allowed = "a positive integer" + (" or None" if optional else "")
        raise ValueError(f"{field}={value!r} is not supported; allowed: {allowed}")


# ── built-in corpus ──────────────────────────────────────────────────────────────────────────────


def split_of(topic: str) -> str:
    """The built-in split of a topic key: sha256(key) mod 10 → 0 calibration, 1 evaluation."""
    bucket = int(hashlib.sha256(topic.encode("utf-8")).hexdigest(), 16) % 10
    return "calibration" if bucket == 0 else "evaluation" if bucket == 1 else "train"


def builtin_topics(split: str) -> list[str]:
    """The sorted ``pydoc_data.topics`` keys in ``split``."""
    from pydoc_data.topics import topics

    _check_split(split)
    return [key for key in sorted(topics) if split_of(key) == split]


def builtin_text(split: str) -> str:
    """The built-in corpus part ``split``: its topics' texts in key order, joined by blank lines."""
    from pydoc_data.topics import topics

    return SEPARATOR.join(topics[key].strip() for key in builtin_topics(split))


# ── local files ──────────────────────────────────────────────────────────────────────────────────


def numbered_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of every line of a UTF-8 file; ValueError naming the file and line
    that is not UTF-8."""
    with path.open("rb") as lines:
        for number, raw in enumerate(lines, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise ValueError(
                    f"{path}: line {number} is not UTF-8 text ({err.reason} at byte {err.start}); "
                    "save the file as UTF-8"
                ) from None
            yield number, line


def _jsonl_text(path: Path, number: int, line: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(
            f"{path}: line {number} is not valid JSON ({err.msg}); fix the line"
        ) from None
    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
        found = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise ValueError(
            f"{path}: line {number} has no string field 'text' (found {found}); each line must be "
            'a JSON object like {"text": "..."}'
        )
    return record["text"]


def read_jsonl(path: str | Path) -> str:
    """The ``text`` fields of a JSON-lines file joined by blank lines (blank lines are skipped)."""
    path = Path(path)
    lines = numbered_lines(path)
    return SEPARATOR.join(_jsonl_text(path, n, line) for n, line in lines if line.strip())


def _read_file(source: str) -> str:
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"text file {source!r} not found; pass {_SOURCES_HELP}")
    if not path.is_file() or path.suffix not in FILE_SUFFIXES:
        raise ValueError(
            f"text source {source!r} is not a .txt or .jsonl file; pass {_SOURCES_HELP}"
        )
    if path.suffix == ".jsonl":
        return read_jsonl(path)
    return "".join(line for _, line in numbered_lines(path))


# ── Hugging Face datasets ────────────────────────────────────────────────────────────────────────


@dataclass(frozen=True)
class HFSpec:
    """A parsed ``hf:NAME[:CONFIG][@SPLIT]``; ``split=None`` means: by the lorq split."""

    name: str
    config: str | None = None
    split: str | None = None


def parse_hf_spec(spec: str) -> HFSpec:
    """``"hf:Salesforce/wikitext:wikitext-2-raw-v1@test"`` → HFSpec(name, config, split)."""
    if not spec.startswith(HF_PREFIX):
        raise ValueError(
            f"{spec!r} is not a Hugging Face dataset spec; write 'hf:NAME[:CONFIG][@SPLIT]'"
        )
    rest, _, split = spec[len(HF_PREFIX) :].partition("@")
    name, _, config = rest.partition(":")
    if not name or ("@" in spec and not split) or (":" in rest and not config):
        raise ValueError(
            f"bad Hugging Face dataset spec {spec!r}; write 'hf:NAME[:CONFIG][@SPLIT]', "
            "e.g. 'hf:Salesforce/wikitext:wikitext-2-raw-v1@test'"
        )
    return HFSpec(name, config or None, split or None)


def _load_hf(spec: str, split: str) -> str:
    parsed = parse_hf_spec(spec)
    try:
        datasets = importlib.import_module("datasets")
    except ImportError:
        raise ValueError(
            f"text source {spec!r} needs the Hugging Face datasets package: pip install datasets"
        ) from None
    hf_split = parsed.split or HF_DEFAULT_SPLITS[split]
    dataset = datasets.load_dataset(parsed.name, parsed.config, split=hf_split)
    if "text" not in dataset.column_names:
        raise ValueError(
            f"dataset {spec!r} (split {hf_split!r}) has no 'text' column (columns: "
            f"{', '.join(dataset.column_names)}); pass a dataset with a 'text' column"
        )
    # every row, empty ones included, as GPTQ's wikitext2 protocol: "\n\n".join(data["text"])
    return SEPARATOR.join(text or "" for text in dataset["text"])


# ── entry points ─────────────────────────────────────────────────────────────────────────────────


def load_text(source: str = BUILTIN, split: str = "train") -> str:
    """The text of ``source`` for ``split`` (one of SPLITS).

    ``split`` picks the built-in part and the default dataset split of an ``hf:`` spec; a local
    file is used whole whatever the split. Empty (or all-whitespace) text is a ValueError.
    """
    _check_split(split)
    source = str(source)
    if source == BUILTIN:
        text = builtin_text(split)
    elif source.startswith(HF_PREFIX):
        text = _load_hf(source, split)
    else:
        text = _read_file(source)
    if not text.strip():
        raise ValueError(f"{split} data from {source!r} is empty; pass a source with some text")
    return text


def _chunks(text: str, size: int) -> Iterator[str]:
    """Consecutive pieces of at most ``size`` characters, cut just before a newline or space."""
    start = 0
    while len(text) - start > size:
        end = start + size
        cut = text.rfind("\n", start + 1, end)
        cut = cut if cut > start else text.rfind(" ", start + 1, end)
        cut = cut if cut > start else end
        yield text[start:cut]
        start = cut
    yield text[start:]


def _bos(tokenizer: Any) -> list[int]:
    """[bos_token_id] when the tokenizer itself starts its encodings with BOS, else []."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return []
    ids = tokenizer("", add_special_tokens=True)["input_ids"]
    return [bos] if list(ids[:1]) == [bos] else []


def token_blocks(
    tokenizer: Any,
    text: str,
    seq_len: int,
    max_blocks: int | None = None,
    *,
    name: str = "text",
) -> torch.Tensor:
    """Consecutive non-overlapping token blocks of ``text``: LongTensor (n_blocks, seq_len).

    The text is tokenized without special tokens and, when the tokenizer itself begins encodings
    with BOS (LLaMA-2 style; not GPT-2 / SmolLM2 or BERT), one BOS is put before the whole text, as
    in GPTQ's perplexity protocol; blocks after the first start mid-text. The incomplete tail is
    dropped and at most ``max_blocks`` blocks are kept (tokenizing stops once they are full).
    ``name`` labels the text in error messages (e.g. "calibration data from 'builtin'").
    """
    _check_positive("seq_len", seq_len)
    _check_positive("max_blocks", max_blocks, optional=True)
    if not text.strip():
        raise ValueError(f"{name} is empty ({len(text)} characters); pass a source with some text")
    wanted = None if max_blocks is None else max_blocks * seq_len
    ids = _bos(tokenizer)
    for chunk in _chunks(text, CHUNK_CHARS):
        ids.extend(tokenizer(chunk, add_special_tokens=False, verbose=False)["input_ids"])
        if wanted is not None and len(ids) >= wanted:
            break
    n_blocks = len(ids) // seq_len if max_blocks is None else min(len(ids) // seq_len, max_blocks)
    if n_blocks == 0:
        raise ValueError(
            f"{name} has {len(ids)} tokens ({len(text)} characters), fewer than seq_len={seq_len}, "
            "so not one block; pass a longer text or a smaller seq_len"
        )
    return torch.tensor(ids[: n_blocks * seq_len], dtype=torch.long).view(n_blocks, seq_len)


@dataclass(frozen=True)
class TextConfig(_Serializable):
    """Which text to use and how to cut it: ``source`` as in ``load_text``, ``seq_len`` blocks."""

    source: str = BUILTIN
    seq_len: int = 256
    max_blocks: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.source, str) or not self.source.strip():
            raise ValueError(f"source={self.source!r} is not supported; allowed: {_SOURCES_HELP}")
        _check_positive("seq_len", self.seq_len)
        _check_positive("max_blocks", self.max_blocks, optional=True)


def load_blocks(tokenizer: Any, config: TextConfig, split: str) -> torch.Tensor:
    """``token_blocks`` of ``load_text(config.source, split)``: LongTensor (n_blocks, seq_len)."""
    text = load_text(config.source, split)
    name = f"{split} data from {config.source!r}"
    return token_blocks(tokenizer, text, config.seq_len, config.max_blocks, name=name)

"""The calibration tokens of a job: one type for a text to cut and for token ids given as they are.

    Calibration("builtin" | FILE | "hf:NAME", seq_len L, blocks n)  ─▶ tokens (n × L) of the text
    Calibration.of(tensor (n × L))                                  ─▶ those ids

``record()`` is what an artifact (lorq.json, a resumable run's settings) stores of it: the text's
source and cut, or the ids' shape and sha256.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from typing import Any

import torch

from lorq.text.corpus import TextConfig, load_blocks

CALIBRATION_SEQ_LEN = 128  # tokens per calibration sequence (H, Fisher, GPTQ)
CALIBRATION_BLOCKS = 64  # calibration sequences (docs/algorithms.md §4)
GIVEN = "tokens"  # the source of ids given as they are


@dataclass(frozen=True)
class Calibration:
    """``source`` (builtin, a .txt / .jsonl file or ``hf:NAME``) cut into ``blocks`` sequences of
    ``seq_len`` tokens — or ``tokens`` (n × L ids) given as they are."""

    source: str = "builtin"
    seq_len: int = CALIBRATION_SEQ_LEN
    blocks: int = CALIBRATION_BLOCKS
    tokens: torch.Tensor | None = field(default=None, compare=False, repr=False)
    cut_ids: torch.Tensor | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.tokens is None:
            TextConfig(self.source, self.seq_len, self.blocks)  # validates
            return
        ids = self.tokens
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.numel() == 0:
            shape = tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__
            raise ValueError(f"calibration token ids must be an (n × seq_len) tensor, got {shape}")
        if ids.is_floating_point() or ids.is_complex():
            raise ValueError(f"calibration token ids must be integers, got dtype {ids.dtype}")

    @classmethod
    def of(cls, value: Calibration | str | torch.Tensor) -> Calibration:
        """A Calibration from itself, a text source, or token ids (n × L)."""
        if isinstance(value, Calibration):
            return value
        if isinstance(value, torch.Tensor):
            n, length = tuple(value.shape) if value.dim() == 2 else (1, 1)
            return cls(GIVEN, int(length), int(n), value)
        if isinstance(value, str):
            return cls(value)
        raise ValueError(
            f"calibration={value!r} is not supported; pass a text source ('builtin', a .txt / "
            ".jsonl file, 'hf:NAME'), a Calibration or token ids (n × seq_len)"
        )

    @property
    def needs_tokenizer(self) -> bool:
        return self.tokens is None

    def cut(self, tokenizer: Any) -> Calibration:
        """This calibration with its text cut into token ids now (a bad file fails here, before
        any work); its record stays the text's."""
        if self.tokens is not None or self.cut_ids is not None:
            return self
        return dataclasses.replace(self, cut_ids=self.load(tokenizer))

    def load(self, tokenizer: Any) -> torch.Tensor:
        """The token ids (n × L, int64)."""
        if self.tokens is not None:
            return self.tokens.long()
        if self.cut_ids is not None:
            return self.cut_ids
        return load_blocks(
            tokenizer, TextConfig(self.source, self.seq_len, self.blocks), "calibration"
        )

    def record(self) -> dict[str, Any]:
        """What an artifact records of it (JSON)."""
        if self.tokens is None:
            return {"source": self.source, "seq_len": self.seq_len, "blocks": self.blocks}
        digest = hashlib.sha256(self.tokens.long().cpu().numpy().tobytes()).hexdigest()
        return {"tokens": list(self.tokens.shape), "sha256": digest}

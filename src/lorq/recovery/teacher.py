"""The teacher of end-to-end recovery, computed once and cached on disk (ALGORITHMS.md §9).

    for each example e (token ids x_e) and each of its positions t ∈ P_e:
        TopK.of(teacher(x_e)[t], k)           the k most likely next tokens and the rest's mass
    rows of e: offsets[e] … offsets[e + 1]    (P = Σ_e |P_e| rows; lorq.recovery.topk)

The file (safetensors: ``logp`` (P, k) float32, ``ids`` (P, k) int32, ``log_rest`` (P,) float32,
``offsets`` (E + 1,) int64) records what it was made from — the teacher, the text (sha256 of every
example's ids and positions) and k — and a cache made for another teacher or text is refused,
naming the difference. The rows are made block by block (lorq.pipeline.teacher).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from lorq.recovery.topk import TopK

Positions = Sequence[int]  # the positions of one example whose next-token distribution counts
Text = Sequence[tuple[Sequence[int], Positions]]  # examples: token ids and counted positions


def text_digest(examples: Text) -> str:
    """sha256 of every example's token ids and counted positions, in order."""
    digest = hashlib.sha256()
    for ids, positions in examples:
        digest.update(json.dumps([list(ids), list(positions)]).encode())
    return digest.hexdigest()


@dataclass(frozen=True)
class TeacherCache:
    """The teacher's top-k at every counted position of every example, and what it came from."""

    rows: TopK
    offsets: torch.Tensor  # (E + 1,) int64
    made_from: dict[str, Any]  # {"teacher": …, "text": sha256, "k": k}

    def of(self, index: int) -> TopK:
        """The rows of example ``index``."""
        start, end = int(self.offsets[index]), int(self.offsets[index + 1])
        rows = self.rows
        return TopK(rows.logp[start:end], rows.ids[start:end], rows.log_rest[start:end])

    def save(self, path: Path) -> None:
        tensors = {"logp": self.rows.logp, "ids": self.rows.ids, "log_rest": self.rows.log_rest}
        tensors["offsets"] = self.offsets
        tmp = path.with_name(f".{path.name}.tmp")  # whole or absent: a kill leaves no cache
        save_file(tensors, tmp, metadata={"made_from": json.dumps(self.made_from)})
        os.replace(tmp, path)

    @staticmethod
    def load(path: Path, made_from: dict[str, Any]) -> TeacherCache:
        """The cache at ``path``; ValueError when it was made from anything but ``made_from``."""
        try:
            with safe_open(str(path), "pt") as f:
                recorded = json.loads((f.metadata() or {}).get("made_from", "null"))
                tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
        except (SafetensorError, OSError, ValueError) as err:
            raise ValueError(f"{path} is not a teacher cache ({err}); delete it") from None
        if recorded != made_from:
            differ = sorted(k for k in made_from if (recorded or {}).get(k) != made_from[k])
            raise ValueError(
                f"{path} was made for another {' and '.join(differ) or 'job'} "
                f"({', '.join(f'{k}: {(recorded or {}).get(k)!r}' for k in differ)}); "
                "delete it or use a new --out"
            )
        rows = TopK(tensors["logp"], tensors["ids"], tensors["log_rest"])
        return TeacherCache(rows, tensors["offsets"], recorded)


def cache_of(rows: Sequence[TopK], made_from: dict[str, Any]) -> TeacherCache:
    """The cache of one text from its examples' rows, in order."""
    offsets = [0]
    for part in rows:
        offsets.append(offsets[-1] + part.logp.shape[0])
    fields = (torch.cat([getattr(p, f) for p in rows]) for f in ("logp", "ids", "log_rest"))
    return TeacherCache(TopK(*fields), torch.tensor(offsets, dtype=torch.int64), made_from)

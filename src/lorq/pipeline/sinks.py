"""Where a compress run's finished parts go.

    MemorySink      the compressed layers stay in the source's model (the in-memory job)
    DirectorySink   each part is written as it finishes: a sharded, resumable lorq directory
                    (``lorq.pipeline.writer``), ``lorq.json`` last

Shards: ``model-00001-of-0000n.safetensors`` holds the tensors outside the blocks (written last:
an LM head among the targets needs every block's output), shard b + 2 block b. Scratch files
(the Fisher per block, cost rows, the plan) live in the output directory, so a resumed run finds
them, or in a temporary folder for the in-memory job.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from torch import nn

from lorq.io.native import LORQ_FILE, write_config
from lorq.io.safetensors import INDEX_FILE
from lorq.pipeline.finish import directory_meta, shard_index
from lorq.pipeline.shards import load_shard_into, shard_payload
from lorq.pipeline.writer import ShardWriter, shard_names, write_json

SCRATCH = (".fisher", ".costs", ".activations")
Part = tuple[str, nn.Module, bool]


class MemorySink:
    """The model in memory is the result; scratch files go to a temporary folder."""

    keeps_layers = True

    def __init__(self) -> None:
        self._scratch = tempfile.TemporaryDirectory(prefix="lorq-")
        self.scratch = Path(self._scratch.name)

    def finished(self, index: int | None) -> bool:
        return False

    def write(self, index: int | None, model: nn.Module, parts: list[Part], extra: dict) -> None:
        """Nothing to write: the layers are in ``model``."""

    def close(self) -> None:
        self._scratch.cleanup()


class DirectorySink:
    """A sharded lorq directory written part by part by ``writer`` (rank 0's; the others keep
    the records only). ``index``: a block, or None for the tensors outside the blocks."""

    def __init__(self, writer: ShardWriter, blocks: int, keeps_layers: bool):
        self.writer = writer
        self.names = shard_names(blocks + 1)
        self.keeps_layers = keeps_layers
        self.scratch = writer.out
        self.computed: list[str] = []

    def shard(self, index: int | None) -> str:
        return self.names[0 if index is None else index + 1]

    def finished(self, index: int | None) -> bool:
        return self.shard(index) in self.writer.finished

    @property
    def reused(self) -> tuple[str, ...]:
        return tuple(n for n in self.names if n in self.writer.finished and n not in self.computed)

    def write(self, index: int | None, model: nn.Module, parts: list[Part], extra: dict) -> None:
        tensors, record = shard_payload(model, parts)
        self.writer.write(self.shard(index), tensors, {**record, **extra})
        self.computed.append(self.shard(index))

    def load_finished(self, model: nn.Module, index: int, device) -> None:
        """Put a finished block's layers and tensors back into ``model``: what the run that
        wrote it computed with."""
        shard = self.shard(index)
        load_shard_into(model, self.writer.out / shard, self.writer.shards[shard], device)

    def finish(self, model: nn.Module, provenance: dict[str, Any], tokenizer: Any) -> dict:
        """The index, config.json, tokenizer and, last, lorq.json (by the writing process)."""
        if not self.writer.active:  # the first process writes; the others know the provenance
            return provenance
        shards = {name: self.writer.shards[name] for name in self.names}
        meta = directory_meta(model, shards, provenance)
        out = self.writer.out
        write_json(out / INDEX_FILE, shard_index(shards))
        tmp = out / ".config.json.tmp"
        if write_config(model, tmp, meta):
            tmp.replace(out / "config.json")
        if tokenizer is not None:
            tokenizer.save_pretrained(out)
        for scratch in SCRATCH:
            shutil.rmtree(out / scratch, ignore_errors=True)
        write_json(out / LORQ_FILE, meta)  # last: the directory is finished
        return meta

    def close(self) -> None:
        """Nothing: the writer's context ends with the run."""

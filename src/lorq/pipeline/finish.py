"""The files that finish a streamed directory: transformers' shard index and lorq.json.

lorq.json holds what ``lorq.io.native.payload`` records for a whole model (layers, aliases,
restored dtypes, int8 factors, trainable names, every tensor), gathered from the shards' records
in the manifest, plus the job's provenance.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from lorq._version import __version__
from lorq.io.native import FORMAT, FORMAT_VERSION, hf_config
from lorq.io.safetensors import ITEM_BYTES


def directory_meta(
    model: nn.Module, shards: dict[str, dict], provenance: dict[str, Any]
) -> dict[str, Any]:
    """lorq.json of the finished directory: what ``lorq.io.native.payload`` records, gathered
    from the shards' records, with the job's provenance."""
    meta: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "lorq_version": __version__,
        "model_class": type(model).__name__,
        "hf_config": hf_config(model),
    }
    for key in ("layers", "aliases", "restore_dtypes", "tensors"):
        meta[key] = {k: v for record in shards.values() for k, v in record[key].items()}
    for key in ("int8_factors", "trainable"):
        meta[key] = sorted(v for record in shards.values() for v in record[key])
    meta["checksums"] = {
        "algorithm": "sha256",
        "files": {name: {"size": r["size"], "sha256": r["sha256"]} for name, r in shards.items()},
        "tensors": {k: v for r in shards.values() for k, v in r.get("tensor_sha256", {}).items()},
    }
    records = [r["recovery"] for r in shards.values() if "recovery" in r]
    recovery = {str(r["block"]): r for r in sorted(records, key=lambda r: r["block"])} or None
    return {**meta, **provenance, "recovery": recovery}  # every block's, a resumed run's too


def shard_index(shards: dict[str, dict]) -> dict[str, Any]:
    """transformers' model.safetensors.index.json of the shards."""
    weight_map, total = {}, 0
    for shard, record in shards.items():
        for name, (dtype, shape) in record["tensors"].items():
            weight_map[name] = shard
            count = 1
            for n in shape:
                count *= n
            total += count * ITEM_BYTES[dtype]
    return {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}

"""Synthetic LLaMA-shaped Hugging Face checkpoints on disk: random weights, real shapes and layout.

``write_llama_checkpoint(path, shape)`` writes what ``LlamaForCausalLM.save_pretrained`` would:
``config.json`` (a transformers ``LlamaConfig``, untied head, bf16), sharded safetensors
``model-0000k-of-0000N.safetensors`` and ``model.safetensors.index.json``
(``{"metadata": {"total_size", "total_parameters"}, "weight_map": {name: file}}``), with the state
dict's tensor names in its order. Tensors are generated one at a time and each shard is written
by ``safetensors.torch.save_file`` as soon as it is full, so peak RAM is about one shard
(``shard_bytes``) plus one fp32 tensor.

Weights (seeded per tensor from ``sha256(f"{seed}:{name}")``, so equal seeds give equal bytes):

- every 2-D tensor W (rows × cols: embeddings, q/k/v/o, gate/up/down, lm_head) is
  ``W_ij = 0.02 · z_ij · r_i · c_j``, z ~ N(0, 1), with a log-normal scale per row
  ``r_i = exp(0.25 · N(0, 1))`` and per column ``c_j = exp(0.25 · N(0, 1))`` (real LLM weight
  matrices have row and column norms that spread over about ×2);
- outlier columns: ``max(1, cols // 512)`` columns scaled ×8. For tensors whose columns are the
  residual stream (embed_tokens, q/k/v, gate/up, lm_head) they are the same hidden channels
  across the whole model, as LLMs' outlier features are; elsewhere (o_proj, down_proj) a
  per-tensor draw;
- RMSNorm weights ``1 + 0.05 · N(0, 1)``.

No tokenizer by default: the built-in SmolLM2 tokenizer has 49 152 tokens, more than the 32 000
rows of these embeddings, so a benchmark on these checkpoints runs without calibration text
(``--weighting none``). ``tokenizer=`` takes a tokenizer (``save_pretrained``) whose vocabulary
fits.

    python bench/synthetic.py 7b --out /work/scale-ckpt/7b      # 13.5 GB, bf16
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

DEFAULT_ROOT = Path("/work/scale-ckpt")
STD = 0.02
LOG_SCALE_STD = 0.25
OUTLIER_EVERY = 512
OUTLIER_GAIN = 8.0
NORM_STD = 0.05
RESIDUAL_READERS = ("embed_tokens", "q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "lm_head")


@dataclass(frozen=True)
class Shape:
    """The sizes of a LLaMA-architecture model (``LlamaConfig``'s names)."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int = 32000
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-5
    source: str = ""


SHAPES = {
    "tiny": Shape(64, 128, 2, 4, 2, source="test size"),
    "1b": Shape(2048, 5632, 22, 32, 4, source="TinyLlama-1.1B"),
    "3b": Shape(3200, 8640, 26, 32, 32, rms_norm_eps=1e-6, source="OpenLLaMA-3B"),
    "7b": Shape(4096, 11008, 32, 32, 32, max_position_embeddings=4096, source="LLaMA-2-7B"),
}


def tensor_shapes(shape: Shape) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor of ``LlamaForCausalLM``'s state dict, in its order."""
    h, i = shape.hidden_size, shape.intermediate_size
    head_dim = h // shape.num_attention_heads
    kv = shape.num_key_value_heads * head_dim
    layer = [
        ("self_attn.q_proj.weight", (h, h)),
        ("self_attn.k_proj.weight", (kv, h)),
        ("self_attn.v_proj.weight", (kv, h)),
        ("self_attn.o_proj.weight", (h, h)),
        ("mlp.gate_proj.weight", (i, h)),
        ("mlp.up_proj.weight", (i, h)),
        ("mlp.down_proj.weight", (h, i)),
        ("input_layernorm.weight", (h,)),
        ("post_attention_layernorm.weight", (h,)),
    ]
    names = [("model.embed_tokens.weight", (shape.vocab_size, h))]
    for n in range(shape.num_hidden_layers):
        names += [(f"model.layers.{n}.{name}", size) for name, size in layer]
    return [*names, ("model.norm.weight", (h,)), ("lm_head.weight", (shape.vocab_size, h))]


def parameter_count(shape: Shape) -> int:
    return sum(_numel(size) for _, size in tensor_shapes(shape))


def _numel(size: tuple[int, ...]) -> int:
    n = 1
    for d in size:
        n *= d
    return n


def _generator(seed: int, name: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def _outlier_columns(seed: int, name: str, cols: int) -> torch.Tensor:
    """Indices of the columns scaled by OUTLIER_GAIN; shared by the residual-stream readers."""
    shared = any(part in name for part in RESIDUAL_READERS)
    g = _generator(seed, "residual-outliers" if shared else f"{name}:outliers")
    return torch.randperm(cols, generator=g)[: max(1, cols // OUTLIER_EVERY)]


def synthetic_tensor(name: str, size: tuple[int, ...], seed: int, dtype: torch.dtype):
    """One tensor of the synthetic model (see the module docstring for the distribution)."""
    g = _generator(seed, name)
    if len(size) == 1:
        return (1.0 + NORM_STD * torch.randn(size, generator=g)).to(dtype)
    rows, cols = size
    row_scale = torch.exp(LOG_SCALE_STD * torch.randn(rows, 1, generator=g)) * STD
    col_scale = torch.exp(LOG_SCALE_STD * torch.randn(1, cols, generator=g))
    col_scale[0, _outlier_columns(seed, name, cols)] *= OUTLIER_GAIN
    weight = torch.randn(rows, cols, generator=g)
    weight.mul_(row_scale).mul_(col_scale)
    return weight.to(dtype)


def plan_shards(tensors, dtype: torch.dtype, shard_bytes: int) -> list[list[tuple]]:
    """Consecutive tensors grouped greedily into shards of at most shard_bytes (a bigger tensor
    gets a shard of its own), as transformers' ``max_shard_size`` does."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    shards: list[list[tuple]] = [[]]
    used = 0
    for name, size in tensors:
        nbytes = _numel(size) * itemsize
        if shards[-1] and used + nbytes > shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append((name, size))
        used += nbytes
    return shards


def llama_config(shape: Shape, dtype: torch.dtype) -> dict:
    """config.json's contents: LlamaConfig's dict, untied head, both ``dtype`` (transformers 5)
    and ``torch_dtype`` (older readers)."""
    from transformers import LlamaConfig

    fields = {k: v for k, v in vars(shape).items() if k != "source"}
    dtype_name = str(dtype).removeprefix("torch.")
    config = LlamaConfig(
        **fields,
        tie_word_embeddings=False,
        architectures=["LlamaForCausalLM"],
        dtype=dtype_name,
    ).to_dict()
    config["torch_dtype"] = dtype_name
    return config


def write_llama_checkpoint(
    path,
    shape: str | Shape,
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    shard_bytes: int = 2 * 1024**3,
    tokenizer=None,
) -> dict:
    """Write a synthetic LLaMA checkpoint into folder ``path``; return the index's metadata plus
    ``files`` (shard names). ``shape``: a SHAPES key or a Shape."""
    shape = SHAPES[shape] if isinstance(shape, str) else shape
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if tokenizer is not None:
        _save_tokenizer(tokenizer, shape, path)
    (path / "config.json").write_text(json.dumps(llama_config(shape, dtype), indent=2) + "\n")
    shards = plan_shards(tensor_shapes(shape), dtype, shard_bytes)
    weight_map, total_size, total_params, files = {}, 0, 0, []
    for k, shard in enumerate(shards, 1):
        file = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        tensors = {name: synthetic_tensor(name, size, seed, dtype) for name, size in shard}
        save_file(tensors, str(path / file), metadata={"format": "pt"})
        for name, tensor in tensors.items():
            weight_map[name] = file
            total_size += tensor.numel() * tensor.element_size()
            total_params += tensor.numel()
        files.append(file)
        del tensors
    metadata = {"total_parameters": total_params, "total_size": total_size}
    index = {"metadata": metadata, "weight_map": dict(sorted(weight_map.items()))}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return {**metadata, "files": files}


def _save_tokenizer(tokenizer, shape: Shape, path: Path) -> None:
    if len(tokenizer) > shape.vocab_size:
        raise ValueError(
            f"the tokenizer has {len(tokenizer)} tokens, more than the {shape.vocab_size} "
            "rows of the synthetic embeddings"
        )
    tokenizer.save_pretrained(str(path))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("shape", choices=sorted(SHAPES))
    parser.add_argument("--out", type=Path, help=f"folder (default: {DEFAULT_ROOT}/SHAPE)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shard-gb", type=float, default=2.0, help="GiB per shard at most")
    args = parser.parse_args(argv)
    out = args.out or DEFAULT_ROOT / args.shape
    began = time.perf_counter()
    written = write_llama_checkpoint(
        out, args.shape, seed=args.seed, shard_bytes=int(args.shard_gb * 1024**3)
    )
    seconds = time.perf_counter() - began
    print(
        f"{args.shape}: {written['total_parameters'] / 1e9:.3f} B params, "
        f"{written['total_size'] / 1e9:.2f} GB in {len(written['files'])} shards, "
        f"{seconds:.1f} s -> {out}"
    )


if __name__ == "__main__":
    main()

"""Streaming: safetensors checkpoints read tensor by tensor, a model skeleton on the meta device
filled one block at a time, and a sharded, resumable lorq directory (ALGORITHMS.md §6)."""

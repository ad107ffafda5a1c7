"""File formats: lorq's native directory, GGUF and GPTQ layouts (exports live in lorq.export)."""

from lorq.io.native import LORQ_FILE, WEIGHTS_FILE, load, load_with_tokenizer, save

__all__ = ["LORQ_FILE", "WEIGHTS_FILE", "load", "load_with_tokenizer", "save"]

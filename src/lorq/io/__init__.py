"""File formats: lorq's native directory, GGUF and GPTQ layouts (exports live in lorq.exporters)."""

from lorq.io import gguf_types  # noqa: F401  (registers the candidate grid "gguf")
from lorq.io.native import LORQ_FILE, WEIGHTS_FILE, load, load_with_tokenizer, save

__all__ = ["LORQ_FILE", "WEIGHTS_FILE", "load", "load_with_tokenizer", "save"]

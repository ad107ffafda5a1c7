"""The ``lorq`` command line: each verb is a thin typed map onto the library; only the CLI prints.

User errors (ValueError, FileNotFoundError) become one line on stderr and exit code 2.
"""

from __future__ import annotations

import logging
import os
import sys

from lorq.cli import verbs  # noqa: F401  (registers the verbs on ``app``, in --help order)
from lorq.cli.app import app

# isort: split
from lorq.cli import adapt  # noqa: F401

__all__ = ["app", "main"]


def main() -> None:
    from transformers.utils import logging as hf_logging

    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)
    hf_logging.disable_progress_bar()  # the CLI draws its own bars
    os.environ.setdefault("TQDM_DISABLE", "1")  # the GGUF loader's own bar
    sys.exit(app())

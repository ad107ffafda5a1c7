"""Every Python example of README.md and docs/ runs. Oracle: each block executes without error,
in order, in one namespace per file (as a reader would run them), on a tiny random LLaMA with a
character-level tokenizer in place of the built-in ``"smollm2"``; the folders an example reads
(written by CLI commands shown before it) are made by the library calls those commands map to.
A new example needs no change here unless it reads such a folder (then add its maker to SETUP).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import tiny_causal, tiny_tokenizer

import lorq

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```$", re.S | re.M)


def blocks(path: Path) -> list[tuple[int, str]]:
    """(line, code) of every ```python block of ``path``."""
    text = path.read_text()
    return [(text[: m.start()].count("\n") + 1, m.group(1)) for m in BLOCK.finditer(text)]


def tiny_model(folder: Path) -> Path:
    """A tiny LLaMA with its tokenizer, saved as a Hugging Face folder."""
    tiny_causal("llama", 0, max_position_embeddings=512).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def compressed(model: Path, out: Path, quant: str) -> None:
    result = lorq.compress_model(
        str(model), lorq.CompressConfig(quant=quant, rank=4), eval_blocks=0
    )
    lorq.save(result, out)


def qlora_handoff(model: Path) -> None:
    """``lorq compress --method loftq --quant bnb-nf4`` + ``lorq export --format bnb``."""
    config = lorq.CompressConfig(method="loftq", quant="bnb-nf4", rank=4)
    result = lorq.compress_model(str(model), config, eval_blocks=0)
    lorq.export(result.model, "smol-qlora", format="bnb", tokenizer=result.tokenizer)


SETUP = {
    '"smol-qlora/base"': qlora_handoff,
    '"out/llama-3b-lorq"': lambda model: compressed(model, Path("out/llama-3b-lorq"), "nf4"),
}
FILES = [path for path in DOCS if blocks(path)]


def test_the_docs_have_examples():
    assert FILES and all(path.name.endswith(".md") for path in FILES)


@pytest.mark.parametrize("path", FILES, ids=[p.name for p in FILES])
def test_every_python_example_runs(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = tiny_model(tmp_path / "tiny")
    namespace: dict = {"__name__": "__docs__"}
    for line, code in blocks(path):
        for marker, make in SETUP.items():
            if marker in code:
                make(model)
        code = code.replace('"smollm2"', repr(str(model)))
        exec(compile(code, f"{path.name}:{line}", "exec"), namespace)

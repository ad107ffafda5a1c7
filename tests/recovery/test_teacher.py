"""The teacher of end-to-end recovery made block by block (lorq.pipeline.teacher). Oracles: the
whole model run on each example by transformers (its logits' top-k by TopK.of), for a safetensors
checkpoint and a GGUF file; invariants: every block is read once and let go before the next, and
disk buffers leave nothing behind."""

from __future__ import annotations

import pytest
import torch
from conftest import quantized_export, tiny_arch, tiny_llama

from lorq.jobs.compress import streamed_source
from lorq.pipeline import devices
from lorq.pipeline import teacher as blockwise
from lorq.recovery.topk import TopK

K = 8


def texts(vocab: int) -> list[list[tuple[list[int], list[int]]]]:
    """Two texts of examples of two lengths, each counting some of its positions."""
    g = torch.Generator().manual_seed(1)

    def example(length: int, positions: list[int]):
        return torch.randint(0, vocab, (length,), generator=g).tolist(), positions

    first = [example(12, list(range(11))), example(7, [2, 5]), example(12, [0, 3, 10])]
    return [first, [example(7, list(range(6)))]]


def whole_rows(model, text) -> list[TopK]:
    with torch.no_grad():
        return [
            TopK.of(model(input_ids=torch.tensor([ids])).logits[0, pos], K) for ids, pos in text
        ]


def assert_rows_equal(ours: list[TopK], theirs: list[TopK]) -> None:
    for a, b in zip(ours, theirs, strict=True):
        assert torch.equal(a.ids, b.ids)
        torch.testing.assert_close(a.logp, b.logp, atol=2e-5, rtol=0)
        torch.testing.assert_close(a.log_rest, b.log_rest, atol=2e-5, rtol=0)


def saved(kind: str, folder):
    """(the model whose weights the saved file holds, the path lorq reads)."""
    if kind == "gguf":
        return quantized_export(tiny_arch("qwen3"), folder / "m.gguf"), folder / "m.gguf"
    model = tiny_llama()
    model.save_pretrained(folder / "m")
    return model, folder / "m"


@pytest.mark.parametrize("kind", ["checkpoint", "gguf"])
def test_block_by_block_rows_equal_the_whole_models(kind, tmp_path):
    model, path = saved(kind, tmp_path)
    given = texts(model.config.vocab_size)
    rows = blockwise.teacher_rows(streamed_source(str(path)), given, K, torch.device("cpu"),
                                  tmp_path / "scratch")  # fmt: skip
    assert [len(r) for r in rows] == [3, 1]
    for ours, text in zip(rows, given, strict=True):
        assert_rows_equal(ours, whole_rows(model, text))


def test_each_block_is_read_once_and_let_go_before_the_next(tmp_path):
    model, path = saved("checkpoint", tmp_path)
    source = streamed_source(str(path))
    events, load, release = [], source.load, source.release

    def spy(kind, call):
        def wrapped(parts, *args, **kwargs):
            events.extend((kind, name) for name, _, whole in parts if whole)
            return call(parts, *args, **kwargs)

        return wrapped

    source.load, source.release = spy("load", load), spy("release", release)
    blockwise.teacher_rows(source, texts(model.config.vocab_size), K, torch.device("cpu"), tmp_path)
    names = [source.blocks.name(i) for i in range(len(source.blocks))]
    assert events == [(kind, name) for name in names for kind in ("load", "release")]
    assert all(p.is_meta for block in source.blocks.modules for p in block.parameters())


def test_offloaded_states_give_the_same_rows_and_leave_no_file(tmp_path, monkeypatch):
    model, path = saved("checkpoint", tmp_path)
    given = texts(model.config.vocab_size)
    scratch = tmp_path / "scratch"
    made = []
    real = blockwise.capture_inputs

    def capture(*args):
        made.append(args[-1])  # the offload folder capture_inputs was given
        return real(*args)

    monkeypatch.setattr(devices, "available_memory", lambda: 0)
    monkeypatch.setattr(blockwise, "capture_inputs", capture)
    rows = blockwise.teacher_rows(
        streamed_source(str(path)), given, K, torch.device("cpu"), scratch
    )
    assert made == [scratch, scratch]
    for ours, text in zip(rows, given, strict=True):
        assert_rows_equal(ours, whole_rows(model, text))
    assert list(scratch.iterdir()) == []

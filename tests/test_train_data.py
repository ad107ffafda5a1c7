"""Training examples. Oracles: hand-made token sequences, the tokenizer's own encodings, errors."""

import json

import pytest
import torch
from conftest import tiny_tokenizer

from lorq.train.data import IGNORE, Collator, chat_example, training_examples


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def write_jsonl(path, records):
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


def test_chat_loss_only_on_assistant_turns(tok):
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo"},
        {"role": "user", "content": "ok?"},
        {"role": "assistant", "content": "ok"},
    ]
    example = chat_example(tok, messages, seq_len=200)
    # the template, written out by hand: <|role|>content<|end|>\n per turn
    whole = "".join(f"<|{m['role']}|>{m['content']}<|end|>\n" for m in messages)
    assert example.input_ids == ids(tok, whole)
    learned = [
        t for t, label in zip(example.input_ids, example.labels, strict=True) if label != IGNORE
    ]
    assert learned == ids(tok, "yo<|end|>\nok<|end|>\n")
    assert all(
        label in (IGNORE, t) for t, label in zip(example.input_ids, example.labels, strict=True)
    )


def test_prompt_completion_masks_the_prompt(tok, tmp_path):
    path = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "Q: 2+2?", "completion": " 4"}])
    (example,) = training_examples(tok, str(path), seq_len=64)
    assert example.input_ids == [*ids(tok, "Q: 2+2? 4"), tok.eos_token_id]
    assert example.labels == [*[IGNORE] * 7, *ids(tok, " 4"), tok.eos_token_id]


def test_text_sources_are_blocks(tok, tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "abcdefgh" * 4}, {"text": "xyz" * 8}])
    examples = training_examples(tok, str(path), seq_len=8)
    flat = [t for e in examples for t in e.input_ids]
    text = "abcdefgh" * 4 + "\n\n" + "xyz" * 8
    assert flat == ids(tok, text)[: len(flat)] and len(flat) == len(ids(tok, text)) // 8 * 8
    assert all(e.labels == e.input_ids for e in examples)


def test_collator_pads_right_without_loss():
    batch = Collator(pad_token_id=1)(
        [{"input_ids": [5, 6, 7], "labels": [IGNORE, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    )
    assert torch.equal(batch["input_ids"], torch.tensor([[5, 6, 7], [8, 1, 1]]))
    assert torch.equal(batch["labels"], torch.tensor([[IGNORE, 6, 7], [8, IGNORE, IGNORE]]))
    assert torch.equal(batch["attention_mask"], torch.tensor([[1, 1, 1], [1, 0, 0]]))


@pytest.mark.parametrize(
    ("lines", "text"),
    [
        (['{"prompt": "a", "completion": "b"}', "{not json"], "line 2 is not valid JSON"),
        (['{"text": "a"}', '{"prompt": "a", "completion": "b"}'], "line 2 is a 'prompt' record"),
        (['{"question": "a"}'], "line 1 is not a training record"),
        (['{"messages": [{"role": "user", "content": "a"}]}'], "at least one 'assistant'"),
        ([""], "has no records"),
    ],
)
def test_malformed_jsonl_names_file_and_line(tok, tmp_path, lines, text):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=text) as err:
        training_examples(tok, str(path), seq_len=16)
    assert str(path) in str(err.value)


def test_missing_file_is_a_clear_error(tok, tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        training_examples(tok, str(tmp_path / "none.jsonl"), seq_len=16)

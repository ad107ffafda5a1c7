"""Tests for lorq.text.corpus: built-in splits, local files, hf: specs, token blocks. No network."""

from __future__ import annotations

import hashlib
import json
import sys
import types
from pydoc_data.topics import topics

import pytest
import torch

from lorq.text import corpus as data
from lorq.text.corpus import (
    SPLITS,
    HFSpec,
    TextConfig,
    builtin_text,
    builtin_topics,
    load_blocks,
    load_text,
    parse_hf_spec,
    split_of,
    token_blocks,
)

# ── built-in corpus ──────────────────────────────────────────────────────────────────────────────


def test_builtin_splits_are_disjoint_and_cover_every_topic():
    # oracle: set arithmetic on the pydoc_data.topics keys
    parts = {split: set(builtin_topics(split)) for split in SPLITS}
    assert all(parts.values()), "every split has at least one topic"
    assert not parts["train"] & parts["calibration"]
    assert not parts["train"] & parts["evaluation"]
    assert not parts["calibration"] & parts["evaluation"]
    assert parts["train"] | parts["calibration"] | parts["evaluation"] == set(topics)


def test_split_rule_is_the_documented_hash():
    # oracle: the rule recomputed independently (sha256 digest as a big-endian integer, mod 10)
    expected = {0: "calibration", 1: "evaluation"}
    for key in topics:
        bucket = int.from_bytes(hashlib.sha256(key.encode()).digest(), "big") % 10
        assert split_of(key) == expected.get(bucket, "train")


def test_builtin_text_is_deterministic_and_ordered():
    for split in SPLITS:
        keys = builtin_topics(split)
        assert keys == sorted(keys)
        text = builtin_text(split)
        assert text == builtin_text(split) == load_text("builtin", split)
        assert text == "\n\n".join(topics[key].strip() for key in keys)
    assert len(builtin_text("train")) > len(builtin_text("calibration")) > 10_000
    assert len(builtin_text("evaluation")) > 10_000


def test_unknown_split_is_rejected():
    with pytest.raises(ValueError, match=r"split='test'.*train, calibration, evaluation"):
        load_text("builtin", "test")


# ── local files ──────────────────────────────────────────────────────────────────────────────────


def test_txt_file_is_read_whole_whatever_the_split(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("Héllo wörld.\n\nSecond paragraph.\n", encoding="utf-8")
    for split in SPLITS:
        assert load_text(str(path), split) == "Héllo wörld.\n\nSecond paragraph.\n"


def test_jsonl_texts_are_joined_and_blank_lines_skipped(tmp_path):
    path = tmp_path / "data.jsonl"
    rows = [{"text": "first record"}, {"text": "second", "id": 7}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    assert load_text(str(path), "calibration") == "first record\n\nsecond"


def test_missing_file_names_the_path(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError, match=r"nope\.txt"):
        load_text(str(missing), "train")


def test_malformed_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{"text": oops}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.jsonl: line 2 is not valid JSON"):
        load_text(str(path), "train")


@pytest.mark.parametrize("line", ['{"prompt": "a", "completion": "b"}', '["text"]', '{"text": 3}'])
def test_jsonl_line_without_text_names_file_and_line(tmp_path, line):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"text": "ok"}\n\n' + line + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"rows\.jsonl: line 3 has no string field 'text'"):
        load_text(str(path), "train")


def test_unsupported_file_kind_is_rejected(tmp_path):
    path = tmp_path / "table.csv"
    path.write_text("a,b\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"table\.csv.*\.txt or \.jsonl"):
        load_text(str(path), "train")
    with pytest.raises(ValueError, match=r"not a \.txt or \.jsonl file"):
        load_text(str(tmp_path), "train")


def test_empty_text_is_rejected(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("  \n\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"calibration data from .*empty\.txt.* is empty"):
        load_text(str(path), "calibration")


# ── Hugging Face datasets (a fake module; never the network) ─────────────────────────────────────


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("hf:wikitext", HFSpec("wikitext")),
        (
            "hf:Salesforce/wikitext:wikitext-2-raw-v1",
            HFSpec("Salesforce/wikitext", "wikitext-2-raw-v1"),
        ),
        ("hf:wikitext:wikitext-2-raw-v1@test", HFSpec("wikitext", "wikitext-2-raw-v1", "test")),
        ("hf:c4@train[:1%]", HFSpec("c4", None, "train[:1%]")),
    ],
)
def test_parse_hf_spec(spec, expected):
    assert parse_hf_spec(spec) == expected


@pytest.mark.parametrize("spec", ["hf:", "hf::cfg", "hf:name:", "hf:name@", "wikitext"])
def test_bad_hf_spec_is_rejected(spec):
    with pytest.raises(ValueError, match="hf:NAME"):
        parse_hf_spec(spec)


def test_hf_without_datasets_says_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(ValueError, match="pip install datasets"):
        load_text("hf:wikitext:wikitext-2-raw-v1", "evaluation")


class _FakeDataset:
    def __init__(self, columns: dict[str, list]):
        self.columns = columns
        self.column_names = list(columns)

    def __getitem__(self, column: str) -> list:
        return self.columns[column]


def _fake_datasets(monkeypatch, columns: dict[str, list]) -> list[tuple]:
    calls: list[tuple] = []

    def load_dataset(name, config, split):
        calls.append((name, config, split))
        return _FakeDataset(columns)

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    return calls


def test_hf_text_column_is_joined_and_splits_map(monkeypatch):
    calls = _fake_datasets(monkeypatch, {"text": ["a", "", "b"], "label": [0, 1, 2]})
    assert load_text("hf:wikitext:wikitext-2-raw-v1", "evaluation") == "a\n\n\n\nb"
    load_text("hf:wikitext", "calibration")
    load_text("hf:org/set@validation", "evaluation")
    assert calls == [
        ("wikitext", "wikitext-2-raw-v1", "test"),
        ("wikitext", None, "train"),
        ("org/set", None, "validation"),
    ]


def test_hf_without_text_column_is_rejected(monkeypatch):
    _fake_datasets(monkeypatch, {"prompt": ["a"], "completion": ["b"]})
    with pytest.raises(ValueError, match=r"no 'text' column.*prompt, completion"):
        load_text("hf:org/chat", "train")


# ── token blocks ─────────────────────────────────────────────────────────────────────────────────


@pytest.fixture(scope="module")
def tokenizer():
    transformers = pytest.importorskip("transformers")
    from lorq.io.models import builtin_path

    try:
        path = builtin_path("minilm")
    except FileNotFoundError as err:
        pytest.skip(str(err))
    return transformers.AutoTokenizer.from_pretrained(path)


def test_token_blocks_are_the_consecutive_prefix_of_the_tokenization(tokenizer):
    text = builtin_text("calibration")
    blocks = token_blocks(tokenizer, text, seq_len=128)
    # oracle: the tokenizer called directly on the whole text (MiniLM has no BOS)
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    n = len(ids) // 128
    assert blocks.dtype == torch.long
    assert blocks.shape == (n, 128)
    assert torch.equal(blocks.flatten(), torch.tensor(ids[: n * 128]))


def test_max_blocks_caps_the_count(tokenizer):
    text = builtin_text("evaluation")
    full = token_blocks(tokenizer, text, seq_len=64)
    capped = token_blocks(tokenizer, text, seq_len=64, max_blocks=3)
    assert capped.shape == (3, 64)
    assert torch.equal(capped, full[:3])
    assert torch.equal(token_blocks(tokenizer, text, 64, max_blocks=10**6), full)


def test_chunked_tokenization_matches_one_call(tokenizer, monkeypatch):
    # oracle: one tokenizer call; WordPiece drops whitespace, so cuts at newlines/spaces are exact
    text = builtin_text("evaluation")
    monkeypatch.setattr(data, "CHUNK_CHARS", 1000)
    pieces = list(data._chunks(text, 1000))
    assert "".join(pieces) == text and max(map(len, pieces)) <= 1000
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    blocks = token_blocks(tokenizer, text, seq_len=100)
    assert torch.equal(blocks.flatten(), torch.tensor(ids[: len(ids) // 100 * 100]))


def test_long_text_gives_no_max_length_warning(tokenizer, caplog):
    token_blocks(tokenizer, builtin_text("calibration"), seq_len=256)
    assert "longer than the specified maximum" not in caplog.text


@pytest.mark.parametrize("seq_len", [0, -5, 2.5, None])
def test_bad_seq_len_is_rejected(tokenizer, seq_len):
    with pytest.raises(ValueError, match=f"seq_len={seq_len!r}"):
        token_blocks(tokenizer, "some text", seq_len)


def test_bad_max_blocks_is_rejected(tokenizer):
    with pytest.raises(ValueError, match="max_blocks=0"):
        token_blocks(tokenizer, "some text", 4, max_blocks=0)


def test_text_shorter_than_one_block_names_the_sizes(tokenizer):
    with pytest.raises(ValueError, match=r"calibration data has 2 tokens \(11 characters\).*512"):
        token_blocks(tokenizer, "hello world", 512, name="calibration data")


def test_empty_text_has_no_blocks(tokenizer):
    with pytest.raises(ValueError, match="evaluation data is empty"):
        token_blocks(tokenizer, " \n", 8, name="evaluation data")


class _WordTokenizer:
    """Splits on spaces; ids are word lengths; optionally starts encodings with BOS = 99."""

    def __init__(self, adds_bos: bool):
        self.bos_token_id = 99
        self.adds_bos = adds_bos

    def __call__(self, text, add_special_tokens=True, verbose=True):
        ids = [len(word) for word in text.split()]
        return {"input_ids": ([99] if add_special_tokens and self.adds_bos else []) + ids}


def test_bos_is_prepended_once_only_when_the_tokenizer_adds_it():
    text = "a bb ccc dddd eeeee"
    with_bos = token_blocks(_WordTokenizer(adds_bos=True), text, seq_len=3)
    without = token_blocks(_WordTokenizer(adds_bos=False), text, seq_len=3)
    assert with_bos.tolist() == [[99, 1, 2], [3, 4, 5]]
    assert without.tolist() == [[1, 2, 3]]


# ── TextConfig ───────────────────────────────────────────────────────────────────────────────────


def test_text_config_validates_and_round_trips():
    config = TextConfig(seq_len=32, max_blocks=2)
    assert TextConfig.from_dict(config.to_dict()) == config
    for bad in (dict(seq_len=0), dict(max_blocks=-1), dict(source="")):
        with pytest.raises(ValueError, match=next(iter(bad))):
            TextConfig(**bad)


def test_load_blocks_uses_the_config(tokenizer):
    blocks = load_blocks(tokenizer, TextConfig(seq_len=32, max_blocks=2), "evaluation")
    assert torch.equal(blocks, token_blocks(tokenizer, builtin_text("evaluation"), 32, 2))

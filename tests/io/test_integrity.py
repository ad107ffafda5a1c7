"""Integrity of lorq directories and of the files lorq reads.

Oracles: a byte flipped anywhere in a weight file (header, first / middle / last tensor) or in
the checksum lorq.json records is refused by every reader (lorq.load, transformers'
from_pretrained) with one ValueError naming the file and, for a tensor, the tensor; the same
directory untouched loads with equal logits; the checksums of a directory written in memory and
of one written block by block agree tensor by tensor (the same bytes); a directory without
checksums (an earlier lorq) loads with one notice; a checkpoint without tokenizer files
compresses when no text is needed.
"""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
from conftest import compress_to, tiny_causal
from test_cli import run

import lorq
from lorq.io.safetensors import read_header

CONFIG = lorq.CompressConfig(quant="nf4", rank=2, iters=1)
IDS = torch.randint(0, 128, (1, 8), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """One directory in memory → model.safetensors, one written block by block → shards."""
    root = tmp_path_factory.mktemp("integrity")
    tiny_causal("llama", 0).save_pretrained(root / "src", max_shard_size="60KB")
    lorq.save(lorq.compress(tiny_causal("llama", 0), CONFIG), root / "single")
    compress_to(str(root / "src"), root / "sharded", CONFIG)
    return root


def flipped(folder, tmp_path, where: str):
    """A copy of ``folder`` with one byte flipped at ``where`` of its first weight file."""
    copy = tmp_path / f"{folder.name}-{where}"
    shutil.copytree(folder, copy)
    file = sorted(copy.glob("model*.safetensors"))[-1]
    entries = list(read_header(file).values())
    offset = {"header": 30, "first": entries[0].begin, "middle": entries[len(entries) // 2].begin,
              "last": entries[-1].end - 1}[where]  # fmt: skip
    data = bytearray(file.read_bytes())
    data[offset] ^= 0x01
    file.write_bytes(bytes(data))
    return copy, file


@pytest.mark.parametrize("kind", ["single", "sharded"])
@pytest.mark.parametrize("where", ["header", "first", "middle", "last"])
def test_a_flipped_byte_is_refused_by_every_reader(saved, tmp_path, kind, where):
    from transformers import AutoModelForCausalLM

    copy, file = flipped(saved / kind, tmp_path, where)
    for read in (lorq.load, AutoModelForCausalLM.from_pretrained):
        with pytest.raises(ValueError) as refused:
            read(copy)
        message = str(refused.value)
        assert "\n" not in message and file.name in message, message
        if where != "header":  # the damaged tensor is named
            assert "tensor '" in message and "is damaged" in message, message


@pytest.mark.parametrize("kind", ["single", "sharded"])
def test_a_damaged_checksum_is_refused_and_untouched_directories_load(saved, tmp_path, kind):
    from transformers import AutoModelForCausalLM

    copy = tmp_path / kind
    shutil.copytree(saved / kind, copy)
    meta = json.loads((copy / "lorq.json").read_text())
    record = next(iter(meta["checksums"]["files"].values()))
    record["sha256"] = "f" * 64
    (copy / "lorq.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"sha256 differs from lorq\.json's"):
        lorq.load(copy)
    model = lorq.load(saved / kind)
    with torch.no_grad():
        expected = model(input_ids=IDS).logits
        got = AutoModelForCausalLM.from_pretrained(saved / kind)(input_ids=IDS).logits
    assert torch.equal(expected, got)


def test_both_sinks_record_the_same_tensor_checksums(saved):
    single = json.loads((saved / "single" / "lorq.json").read_text())["checksums"]
    sharded = json.loads((saved / "sharded" / "lorq.json").read_text())["checksums"]
    assert single["tensors"] == sharded["tensors"] and len(single["tensors"]) > 10
    assert list(single["files"]) == ["model.safetensors"] and len(sharded["files"]) > 2


def test_a_directory_without_checksums_loads_with_a_notice(saved, tmp_path, caplog):
    copy = tmp_path / "old"
    shutil.copytree(saved / "single", copy)
    meta = json.loads((copy / "lorq.json").read_text())
    del meta["checksums"]
    (copy / "lorq.json").write_text(json.dumps(meta))
    with caplog.at_level(logging.WARNING, logger="lorq.io.verify"):
        lorq.load(copy)
    notices = [r.getMessage() for r in caplog.records if "no checksums" in r.getMessage()]
    assert len(notices) == 1 and str(copy) in notices[0]


def test_plain_quantization_needs_no_tokenizer(tmp_path):
    """Round to nearest without evaluation runs on a checkpoint without tokenizer files; a job
    that needs text stops before loading with the option that needs it."""
    tiny_causal("llama", 0).save_pretrained(tmp_path / "src")
    assert not list((tmp_path / "src").glob("*token*"))
    flags = ["--model", tmp_path / "src", "--method", "plain", "--quant", "nf4", "--weighting",
             "none", "--eval-blocks", "0"]  # fmt: skip
    done = run("compress", *flags, "--out", tmp_path / "plain")
    assert done.exit_code == 0, done.output
    assert lorq.load(tmp_path / "plain") is not None
    refused = run("compress", *flags[:-4], "--out", tmp_path / "act")
    assert refused.exit_code == 2 and "needs a tokenizer" in refused.output
    assert "--weighting" in refused.output and not (tmp_path / "act").exists()

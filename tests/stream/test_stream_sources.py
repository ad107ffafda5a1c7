"""Where a streaming run reads from and what reads its output: a hub id from the Hugging Face
cache, a partial streamed directory met by the in-memory CLI.

Oracles: streaming the snapshot folder itself (every shard tensor ``torch.equal``), the error
texts (one line, exit code 2).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch
from conftest import assert_same_bytes, compress_to, saved_tensors, tiny_causal
from test_cli import one_line_error, run, tiny_dir  # noqa: F401  (fixture)

from lorq.config import CompressConfig
from lorq.pipeline.writer import MANIFEST_FILE

PLAIN = CompressConfig(method="lq", quant="nf4", rank=4)
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def hub_cache(root: Path, repo: str, model) -> Path:
    """``model`` in huggingface_hub's cache layout under ``root``, as a download leaves it:
    ``models--org--name/refs/main`` (the commit), ``blobs/<sha256>`` (the files) and
    ``snapshots/<commit>/<file>`` (relative links to the blobs). Returns the snapshot folder."""
    storage = root / f"models--{repo.replace('/', '--')}"
    staging = root / "staging"
    model.save_pretrained(staging, max_shard_size="60KB")
    snapshot = storage / "snapshots" / COMMIT
    (storage / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for file in sorted(staging.iterdir()):
        digest = hashlib.sha256(file.read_bytes()).hexdigest()
        file.rename(storage / "blobs" / digest)
        os.symlink(Path("..", "..", "blobs", digest), snapshot / file.name)
    staging.rmdir()
    (storage / "refs").mkdir()
    (storage / "refs" / "main").write_text(COMMIT)
    return snapshot


@pytest.fixture
def offline_cache(tmp_path, monkeypatch) -> Path:
    """HF_HOME and HF_HUB_CACHE at an empty folder of ``tmp_path``, the hub switched off."""
    cache = tmp_path / "home" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_a_hub_id_streams_from_the_cache(tmp_path, offline_cache):
    """``org/name`` resolves to its cached snapshot (refs/main → snapshots/<commit>, links into
    blobs/) and streams the same tensors as the snapshot folder itself (torch.equal)."""
    snapshot = hub_cache(offline_cache, "org/name", tiny_causal("llama", 0, num_hidden_layers=2))
    assert (snapshot / "model.safetensors.index.json").is_symlink()
    by_id = compress_to("org/name", tmp_path / "by_id", PLAIN, device="cpu")
    by_folder = compress_to(str(snapshot), tmp_path / "by_folder", PLAIN, device="cpu")
    assert by_id.computed == by_folder.computed
    assert_same_bytes(saved_tensors(tmp_path / "by_folder"), saved_tensors(tmp_path / "by_id"))


def test_a_hub_id_absent_from_the_cache_is_named(tmp_path, offline_cache):
    """HF_HUB_OFFLINE=1 and nothing cached: FileNotFoundError naming the model; nothing
    written."""
    with pytest.raises(FileNotFoundError, match=r"model 'org/absent' is not in the Hugging Face"):
        compress_to("org/absent", tmp_path / "out", PLAIN, device="cpu")
    assert not (tmp_path / "out").exists()


def test_in_memory_compress_names_a_partial_streamed_run(tiny_dir, tmp_path):  # noqa: F811
    """``lorq compress`` without --stream on a directory a streamed run left partial (manifest,
    no lorq.json): one error line pointing to --stream --resume; the directory is untouched."""
    flags = ["--method", "lq", "--quant", "nf4", "--rank", "4", "--weighting", "none",
             "--eval-blocks", "0", "--out", tmp_path / "out"]  # fmt: skip
    done = run("compress", "--model", tiny_dir, *flags, "--stream", "--device", "cpu")
    assert done.exit_code == 0, done.output
    (tmp_path / "out" / "lorq.json").unlink()  # as if killed before its end
    before = sorted(p.name for p in (tmp_path / "out").iterdir())
    for extra in ([], ["--overwrite"]):
        one_line_error(
            run("compress", "--model", tiny_dir, *flags, *extra),
            "holds a partial streamed run",
        )
    refused = run("compress", "--model", tiny_dir, *flags)
    assert "--stream --resume" in " ".join(refused.output.split())
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == before
    assert (tmp_path / "out" / MANIFEST_FILE).is_file()
    resumed = run("compress", "--model", tiny_dir, *flags, "--stream", "--resume")
    assert resumed.exit_code == 0 and (tmp_path / "out" / "lorq.json").is_file(), resumed.output


@pytest.mark.parametrize("factor_bits", [None, 8], ids=["factors-fp", "factors-int8"])
def test_from_pretrained_reads_a_streamed_directory(tmp_path, factor_bits):
    """``AutoModelForCausalLM.from_pretrained`` (after ``import lorq``) on the shards and index
    compress_streaming writes gives lorq.load's logits exactly (torch.equal), with 8-bit
    factors decoded from their shard too."""
    import transformers

    import lorq

    tiny_causal("llama", 0, num_hidden_layers=3).save_pretrained(tmp_path / "src")
    config = CompressConfig(method="lq", quant="nf4", rank=4, factor_bits=factor_bits)
    compress_to(str(tmp_path / "src"), tmp_path / "out", config, device="cpu")
    assert len(list((tmp_path / "out").glob("model-*-of-*.safetensors"))) == 4
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    reference = lorq.load(tmp_path / "out")
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, reference(input_ids=ids)[0])
    trainable = {n for n, p in loaded.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in reference.named_parameters() if p.requires_grad}

"""lorq.load verifies a directory against lorq.json before it allocates anything.

Oracles: each altered directory (the kinds a corrupted or hostile file takes) is refused with one
ValueError naming the file and what is wrong; the unaltered one loads; an absurd lorq.json is
refused by a fresh process whose peak memory stays far below what the sizes claim.
"""

import json
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama
from safetensors.torch import load_file, save_file

import lorq

CODES = "model.layers.0.self_attn.q_proj.q_codes"
FACTOR = "model.layers.0.mlp.up_proj.lora_A"
EMBED = "model.embed_tokens.weight"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = tiny_llama()
    lorq.compress(model, lorq.CompressConfig(rank=2, quant="nf4"))
    path = tmp_path_factory.mktemp("verify") / "model"
    lorq.save(model, path)
    return path


def altered(saved: Path, tmp: Path, tensors=None, meta=None, keep_manifest=False) -> Path:
    """A copy of ``saved`` with its tensors and lorq.json changed by the given functions."""
    out = tmp / "altered"
    shutil.copytree(saved, out)
    weights = load_file(out / "model.safetensors")
    data = json.loads((out / "lorq.json").read_text())
    if tensors is not None:
        tensors(weights)
        save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
        files = {"model.safetensors": out / "model.safetensors"}
        data["checksums"] = lorq.io.verify.file_checksums(files)  # consistent: the deeper checks
        if not keep_manifest:  # an attacker who also rewrote the manifest
            data["tensors"] = {k: v for k, v in lorq.io.verify.manifest(weights).items()}
    if meta is not None:
        data = meta(data)
    (out / "lorq.json").write_text(json.dumps(data))
    return out


def _set(d, key, value):
    d[key] = value
    return d


def _layer(d, **fields):
    d["layers"]["model.layers.0.self_attn.q_proj"].update(fields)
    return d


CASES = {
    "int32 codes": (dict(tensors=lambda w: w.update({CODES: w[CODES].int()})), "bytes"),
    "int32 codes, manifest kept": (
        dict(tensors=lambda w: w.update({CODES: w[CODES].int()}), keep_manifest=True),
        "lorq.json says",
    ),
    "NaN factors": (
        dict(tensors=lambda w: w[FACTOR].__setitem__((0, 0), float("nan"))),
        "NaN",
    ),
    "infinite scale": (
        dict(
            tensors=lambda w: w[CODES.replace("codes", "scales_super_scales")].fill_(float("inf"))
        ),
        "NaN or infinite",
    ),
    "fp16 embedding": (dict(tensors=lambda w: w.update({EMBED: w[EMBED].half()})), "mix dtypes"),
    "extra tensor": (
        dict(tensors=lambda w: w.update({"model.evil": torch.zeros(3)})),
        "does not have",
    ),
    "missing tensor": (dict(tensors=lambda w: w.pop("model.norm.weight")), "no tensor"),
    "wrong dense shape": (
        dict(tensors=lambda w: w.update({"model.norm.weight": torch.ones(5)})),
        "the model needs",
    ),
    "absurd layer shape": (
        dict(meta=lambda d: _layer(d, shape=[10**9, 10**9])),
        "takes",
    ),
    "negative layer shape": (dict(meta=lambda d: _layer(d, shape=[-1, 64])), "expected [out, in]"),
    "wrong rank": (dict(meta=lambda d: _layer(d, rank=7)), "do not fit"),
    "lorq.json a list": (dict(meta=lambda d: [d]), "not a lorq model description"),
    "layers a list": (dict(meta=lambda d: _set(d, "layers", [])), "wrong JSON type"),
    "aliases a string": (dict(meta=lambda d: _set(d, "aliases", "x")), "wrong JSON type"),
    "quant a string": (dict(meta=lambda d: _layer(d, quant="nf4")), "not a layer description"),
    "restore to int": (dict(meta=lambda d: _set(d, "restore_dtypes", {EMBED: "int64"})), "dtype"),
}


def test_the_saved_directory_loads(saved):
    lorq.load(saved)


@pytest.mark.parametrize("case", list(CASES))
def test_an_altered_directory_is_refused(case, saved, tmp_path):
    change, text = CASES[case]
    path = altered(saved, tmp_path, **change)
    with pytest.raises(ValueError, match="") as err:
        lorq.load(path)
    message = str(err.value)
    assert text in message and "\n" not in message, message
    assert str(path) in message or "lorq.json" in message


def test_a_truncated_file_is_refused(saved, tmp_path):
    path = altered(saved, tmp_path)
    file = path / "model.safetensors"
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"has the wrong size for lorq\.json"):
        lorq.load(path)


ABSURD = """
import json, sys, lorq
path = sys.argv[1]
data = json.load(open(path + "/lorq.json"))
if sys.argv[2] == "layers":  # a million blocks of modules to build
    data["hf_config"]["num_hidden_layers"] = 10**7
else:  # terabytes of codes and embeddings
    data["hf_config"].update(vocab_size=10**12, hidden_size=2**20, intermediate_size=2**22)
    for spec in data["layers"].values():
        spec["shape"] = [2**30, 2**30]
json.dump(data, open(path + "/lorq.json", "w"))
try:
    lorq.load(path)
except ValueError as err:
    print("refused:", err)
"""


@pytest.mark.parametrize("claim", ["sizes", "layers"])
def test_absurd_sizes_are_refused_without_allocating_them(claim, saved, tmp_path):
    path = altered(saved, tmp_path)
    result = subprocess.run(
        [sys.executable, "-c", ABSURD, str(path), claim],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0 and result.stdout.startswith("refused:"), result.stderr
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1e3
    assert peak_mb < 2000, peak_mb  # the claimed sizes are terabytes

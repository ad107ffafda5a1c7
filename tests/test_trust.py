"""Bad input, as a new user and an adversary give it, to every verb.

Oracle for every row: exit code 2, exactly one line that says ``error:`` and names the problem, no
traceback, nothing new anywhere on disk (hidden files included) and every input byte-identical.
"""

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import Hostile
from test_cli import run, tiny_dir  # noqa: F401  (the module-scoped fixture)

from lorq.io.models import builtin_path


def snapshot(*roots: Path) -> dict[str, str]:
    """Every file and folder under ``roots`` (hidden ones too) with its content's hash."""
    seen = {}
    for root in roots:
        for folder, dirs, files in os.walk(root):
            for name in dirs:
                seen[os.path.join(folder, name)] = "dir"
            for name in files:
                path = os.path.join(folder, name)
                seen[path] = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return seen


@pytest.fixture(scope="module")
def inputs(tiny_dir, tmp_path_factory):  # noqa: F811
    """Broken, hostile and ordinary inputs beside a good lorq directory (``lorq``)."""
    root = tmp_path_factory.mktemp("inputs")
    result = run("compress", "--model", tiny_dir, "--rank", "2", "--eval-blocks", "1",
                 "--no-baseline", "--out", root / "lorq")  # fmt: skip
    assert result.exit_code == 0, result.output
    _broken_models(tiny_dir, root)
    _broken_lorq_dirs(root)
    _files(root)
    return root


def _broken_models(tiny: Path, root: Path) -> None:
    for name in ("trunc", "remote", "pickle", "badconfig", "evil", "notok", *HEADERS):
        shutil.copytree(tiny, root / name)
    for name, damage in HEADERS.items():
        damage(root / name / "model.safetensors")
    for file in (root / "notok").glob("*token*"):
        file.unlink()
    weights = root / "trunc" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    config = json.loads((root / "remote" / "config.json").read_text())
    config.update(model_type="mycustom", auto_map={"AutoConfig": "custom.MyConfig"})
    (root / "remote" / "config.json").write_text(json.dumps(config))
    (root / "remote" / "custom.py").write_text(f"open({str(root / 'RAN')!r}, 'w')\n")
    state = {k: v.clone() for k, v in _tensors(root / "pickle" / "model.safetensors").items()}
    torch.save(state, root / "pickle" / "pytorch_model.bin")
    (root / "pickle" / "model.safetensors").unlink()
    (root / "badconfig" / "config.json").write_text("[1, 2]")
    (root / "evil" / "model.safetensors").unlink()
    torch.save(
        {"model.embed_tokens.weight": Hostile(root / "RAN")}, root / "evil" / "pytorch_model.bin"
    )
    gguf = builtin_path("smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    with open(gguf, "rb") as source:
        (root / "cut.gguf").write_bytes(source.read(4096))
    (root / "fake.gguf").write_text("not a gguf")


def _header_edit(edit):
    """Damage a safetensors file's JSON header by ``edit`` (header dict → bytes)."""

    def damage(file: Path) -> None:
        data = file.read_bytes()
        length = int.from_bytes(data[:8], "little")
        header = edit(json.loads(data[8 : 8 + length]))
        new = header if isinstance(header, bytes) else json.dumps(header).encode()
        new = new.ljust(length) if len(new) <= length else new
        file.write_bytes(len(new).to_bytes(8, "little") + new + data[8 + length :])

    return damage


def _first(header: dict) -> dict:
    return next(v for k, v in header.items() if k != "__metadata__")


def _set(header: dict, key: str, value) -> dict:
    _first(header)[key] = value
    return header


def _overlap(header: dict) -> dict:
    entries = [v for k, v in header.items() if k != "__metadata__"]
    entries[1]["data_offsets"] = list(entries[0]["data_offsets"])
    return header


def _length(file: Path) -> None:
    data = file.read_bytes()
    file.write_bytes((10**9).to_bytes(8, "little") + data[8:])


HEADERS = {
    "hdr-dtype": _header_edit(lambda h: _set(h, "dtype", "F99")),
    "hdr-json": _header_edit(lambda h: b"{" + json.dumps(h).encode()[2:]),
    "hdr-shape": _header_edit(lambda h: _set(h, "shape", [3, 5])),
    "hdr-offsets": _header_edit(_overlap),
    "hdr-length": _length,
}


def _tensors(path: Path):
    from safetensors.torch import load_file

    return load_file(path)


def _broken_lorq_dirs(root: Path) -> None:
    from safetensors.torch import save_file

    for name in [*BROKEN, "lorq-copy"]:
        shutil.copytree(root / "lorq", root / name)
    (root / "lorq-list" / "lorq.json").write_text("[]")
    (root / "lorq-nofile" / "model.safetensors").unlink()
    (root / "lorq-nojson" / "lorq.json").unlink()
    meta = json.loads((root / "lorq" / "lorq.json").read_text())
    (root / "lorq-version" / "lorq.json").write_text(json.dumps({**meta, "format_version": 9}))
    (root / "lorq-types" / "lorq.json").write_text(json.dumps({**meta, "trainable": "all"}))
    tensors = _tensors(root / "lorq-int32" / "model.safetensors")
    codes = next(name for name in tensors if name.endswith("q_codes"))
    tensors[codes] = tensors[codes].int()
    save_file(tensors, root / "lorq-int32" / "model.safetensors", metadata={"format": "pt"})
    tensors = _tensors(root / "lorq-extra" / "model.safetensors")
    save_file({**tensors, "evil": torch.zeros(2)}, root / "lorq-extra" / "model.safetensors")
    weights = root / "lorq-trunc" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    tensors = _tensors(root / "lorq-nan" / "model.safetensors")
    factor = next(name for name in tensors if name.endswith("lora_B"))
    tensors[factor] = torch.full_like(tensors[factor], float("nan"))
    save_file(tensors, root / "lorq-nan" / "model.safetensors", metadata={"format": "pt"})
    for name in ("lorq-int32", "lorq-extra", "lorq-nan"):  # consistent checksums: deeper checks
        _rechecksum(root / name)
    _flip_bytes(root)


def _rechecksum(folder: Path) -> None:
    """lorq.json (and config.json's copy) with the checksums of the files as they now are."""
    from lorq.io.verify import file_checksums

    record = file_checksums({"model.safetensors": folder / "model.safetensors"})
    meta = json.loads((folder / "lorq.json").read_text())
    (folder / "lorq.json").write_text(json.dumps({**meta, "checksums": record}))
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"]["checksums"] = record
    (folder / "config.json").write_text(json.dumps(config))


def _flip_bytes(root: Path) -> None:
    """One byte flipped in the header, the first, a middle and the last tensor, and in the
    checksum lorq.json records."""
    from lorq.io.safetensors import read_header

    entries = list(read_header(root / "lorq" / "model.safetensors").values())
    offsets = {"head": 20, "first": entries[0].begin, "middle": entries[len(entries) // 2].begin,
               "last": entries[-1].end - 1}  # fmt: skip
    for where, offset in offsets.items():
        file = root / f"lorq-flip-{where}" / "model.safetensors"
        data = bytearray(file.read_bytes())
        data[offset] ^= 0x10
        file.write_bytes(bytes(data))
    meta = json.loads((root / "lorq-flip-sum" / "lorq.json").read_text())
    recorded = meta["checksums"]["files"]["model.safetensors"]
    recorded["sha256"] = ("0" if recorded["sha256"][0] != "0" else "1") + recorded["sha256"][1:]
    (root / "lorq-flip-sum" / "lorq.json").write_text(json.dumps(meta))


def _files(root: Path) -> None:
    (root / "notes.txt").write_text("my notes")
    (root / "afile").write_text("a file, not a folder")
    (root / "foreign").mkdir()
    (root / "foreign" / "keep.txt").write_text("mine")
    (root / "list.json").write_text("[1]")
    (root / "bad.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "\xff\xfe"}\n')
    (root / "list.jsonl").write_text("[1]\n")
    (root / "orphan.png").write_bytes(b"\x89PNG not ours")


COMPRESS = ["compress", "--model", "TINY", "--rank", "2", "--eval-blocks", "1", "--no-baseline"]
CASES = [
    # compress: the model
    (["compress", "--model", "/no/such/model"], "not found"),
    (["compress", "--model", "IN/trunc"], "not a whole safetensors file"),
    (["compress", "--model", "IN/hdr-dtype"], "has dtype 'F99'"),
    (["compress", "--model", "IN/hdr-json"], "header is not JSON"),
    (["compress", "--model", "IN/hdr-shape"], "spans bytes"),
    (["compress", "--model", "IN/hdr-offsets"], "overlaps the one before"),
    (["compress", "--model", "IN/hdr-length"], "a header of"),
    ([*COMPRESS[:2], "IN/hdr-dtype", "--stream", *COMPRESS[3:]], "has dtype 'F99'"),
    (
        ["compress", "--model", "IN/notok", "--weighting", "activations", "--eval-blocks", "0"],
        "needs a tokenizer",
    ),
    (
        ["compress", "--model", "IN/notok", "--method", "plain", "--weighting", "none"],
        "the evaluation (eval_blocks; --eval-blocks 0 skips it) needs a tokenizer",
    ),
    (["compress", "--model", "IN/remote"], "own Python code"),
    (["compress", "--model", "IN/pickle"], "--allow-pickle"),
    (["compress", "--model", "IN/evil", "--allow-pickle"], "weights-only unpickler refused"),
    (["compress", "--model", "IN/badconfig"], "JSON object"),
    (["compress", "--model", "IN/cut.gguf"], "cut.gguf"),
    (["compress", "--model", "IN/fake.gguf"], "fake.gguf"),
    # compress: the settings, before any loading
    ([*COMPRESS[:-3], "--rank", "100000"], "rank=100000 must be smaller"),
    ([*COMPRESS, "--budget", "1.0"], "outside the feasible range"),
    ([*COMPRESS, "--budget", "3", "--candidates", "nf4,zz"], "unknown quantization preset 'zz'"),
    ([*COMPRESS, "--budget", "3", "--candidates", ","], "no candidate"),
    ([*COMPRESS, "--quant", "nf5"], "nf5"),
    ([*COMPRESS, "--method", "qa-lora", "--quant", "nf4"], "method='qa-lora'"),
    ([*COMPRESS, "--embeddings", "q9"], "q9"),
    ([*COMPRESS, "--factor-bits", "4"], "factor_bits=4"),
    ([*COMPRESS, "--plan", "IN/list.json"], "not a valid lorq plan"),
    ([*COMPRESS, "--plan", "IN/missing.json"], "not found"),
    ([*COMPRESS, "--fisher", "--calibration", "IN/bad.jsonl"], "line 2 is not UTF-8"),
    ([*COMPRESS, "--calibration", "IN/none.txt", "--fisher"], "not found"),
    ([*COMPRESS, "--weighting", "hessian"], "weighting='hessian' is not supported"),
    ([*COMPRESS, "--rounding", "gptp"], "rounding='gptp' is not supported"),
    ([*COMPRESS, "--fisher", "--weighting", "activations"], "--fisher is --weighting fisher"),
    ([*COMPRESS, "--gptq", "--rounding", "nearest"], "--gptq is --rounding gptq"),
    ([*COMPRESS, "--rounding", "gptq", "--quant", "bnb-nf4"], "GPTQ rounding is not available"),
    ([*COMPRESS, "--rounding", "weighted", "--quant", "nf4"], "weighted rounding is not available"),
    ([*COMPRESS, "--budget-mb", "0"], "budget_mb=0.0 is not supported; allowed: MiB > 0"),
    ([*COMPRESS, "--quant", "q4_k"], "self_attn.q_proj: q4_k stores blocks of 256 weights"),
    ([*COMPRESS, "--method", "qa-lora", "--budget-mb", "50"], "budget_mb=50.0 is not supported"),
    ([*COMPRESS, "--budget-mb", "50", "--plan", "IN/list.json"], "give --plan or --budget-mb"),
    ([*COMPRESS, "--recover", "layer"], "recover='layer' is not supported"),
    (["recover", "IN/lorq", "--top-k", "0"], "top_k=0 is not supported"),
    (["recover", "IN/lorq", "--lr", "0"], "lr=0.0 is not supported"),
    ([*COMPRESS, "--recover", "block", "--recover-scale-lr", "5"], "recover_scale_lr=5.0 is not"),
    ([*COMPRESS, "--recover", "block", "--recover-lr", "2"], "recover_lr=2.0 is not supported"),
    ([*COMPRESS, "--recover", "block", "--recover-steps", "-1"], "recover_steps=-1 is not"),
    ([*COMPRESS, "--weighting", "activations", "--calibration-tokens", "0"], "calibration-tokens"),
    ([*COMPRESS, "--weighting", "activations", "--calibration", "IN/none.txt"], "not found"),
    ([*COMPRESS, "--method", "qa-lora", "--weighting", "both"], "weighting='both'"),
    ([*COMPRESS, "--plan-weighting", "fisher"], "plan_weighting='fisher' shapes the costs"),
    ([*COMPRESS, "--budget", "3", "--plan-weighting", "hessian"], "plan_weighting='hessian'"),
    # compress: the output
    ([*COMPRESS, "--out", "TINY", "--overwrite"], "input"),
    ([*COMPRESS, "--out", "TINY/sub"], "input"),
    ([*COMPRESS, "--out", "IN/afile/x"], "not a directory"),
    ([*COMPRESS, "--out", "IN/notes.txt", "--overwrite"], "is a file"),
    ([*COMPRESS, "--out", "IN/foreign", "--overwrite"], "not a lorq model directory"),
    ([*COMPRESS, "--out", "IN/lorq"], "--overwrite"),
    # plan
    (["plan", "--budget", "1", "--model", "TINY"], "outside the feasible range"),
    (["plan", "--budget", "3", "--model", "TINY", "--out", "IN/notes.txt"], "not a lorq plan"),
    (["plan", "--budget", "3", "--model", "TINY", "--out", "IN/afile/p.json"], "not a directory"),
    (["plan", "--budget", "3", "--model", "TINY", "--out", "IN/orphan.json"], "orphan.png"),
    (["plan", "--budget", "3", "--model", "IN/pickle"], "pickle"),
    (["plan", "--budget", "3", "--model", "TINY", "--rank", "9999"], "rank=9999"),
    # eval, generate
    (["eval", "/no/such/dir"], "not a lorq model directory"),
    (["eval", "IN/lorq-list"], "not a lorq model description"),
    (["eval", "IN/lorq-trunc"], "has the wrong size for lorq.json"),
    (["eval", "TINY"], "not a lorq model directory"),
    (["generate", "IN/lorq-nan", "--prompt", "hi"], "NaN"),
    (["generate", "/no/such/dir", "--prompt", "hi"], "not a lorq model directory"),
    # finetune
    (["finetune", "IN/lorq", "--out", "IN/lorq", "--overwrite"], "input"),
    (["finetune", "IN/lorq", "--out", "IN/lorq/sub"], "input"),
    (["finetune", "IN/lorq", "--trainable", "(", "--out", "o"], "regular expression"),
    (["finetune", "IN/lorq", "--data", "IN/bad.jsonl", "--out", "o"], "line 2 is not UTF-8"),
    (["finetune", "IN/lorq", "--data", "IN/list.jsonl", "--out", "o"], "not a training record"),
    (["finetune", "IN/lorq", "--steps", "0", "--out", "o"], "steps=0"),
    (["finetune", "IN/lorq", "--out", "IN/afile/x"], "not a directory"),
    (["finetune", "IN/lorq", "--out", "IN/foreign", "--overwrite"], "not a lorq model"),
    (["finetune", "IN/lorq-list", "--out", "o"], "not a lorq model description"),
    (["finetune", "."], "not a lorq model directory"),
    # merge
    (["merge", "IN/lorq", "--out", "IN/lorq", "--overwrite"], "input"),
    (["merge", "IN/lorq", "--out", "IN/foreign", "--overwrite"], "not a lorq export directory"),
    (["merge", "IN/lorq", "--out", "o", "--dtype", "fp8"], "dtype='fp8'"),
    (["merge", "IN/lorq-trunc", "--out", "o"], "has the wrong size for lorq.json"),
    # export
    (["export", "IN/lorq", "--out", "IN/lorq", "--overwrite"], "input"),
    (["export", "IN/lorq", "--format", "gguf", "--out", "IN/notes.txt", "--overwrite"], "GGUF"),
    (["export", "IN/lorq", "--format", "onnx", "--out", "o"], "'onnx' is not supported"),
    (["export", "IN/lorq", "--out", "IN/afile/x"], "not a directory"),
    (["export", "IN/lorq-nan", "--out", "o"], "NaN"),
    # reports
    (["quantize-report", "--preset", "nf5"], "nf5"),
    (["quantize-report", "--model", "IN/pickle"], "pickle"),
]


# every verb that reads a lorq directory × every way one is broken
BROKEN = {
    "lorq-list": "not a lorq model description",
    "lorq-trunc": "has the wrong size for lorq.json",
    "lorq-flip-head": "lorq-flip-head/model.safetensors",
    "lorq-flip-first": "is damaged (its sha256 differs)",
    "lorq-flip-middle": "is damaged (its sha256 differs)",
    "lorq-flip-last": "is damaged (its sha256 differs)",
    "lorq-flip-sum": "its sha256 differs from lorq.json's",
    "lorq-nan": "NaN",
    "lorq-nofile": "not found",
    "lorq-nojson": "not a lorq model directory",
    "lorq-int32": "lorq.json says",
    "lorq-extra": "not in lorq.json",
    "lorq-version": "format_version 9",
    "lorq-types": "wrong JSON type",
}
READERS = [["eval", "D"], ["generate", "D", "--prompt", "hi"], ["finetune", "D", "--out", "o"],
           ["recover", "D", "--out", "o"], ["merge", "D", "--out", "o"],
           ["export", "D", "--out", "o"]]  # fmt: skip
# every verb that writes × every bad output location: (args, its input, --overwrite, refusals)
WRITERS = {
    "compress": (COMPRESS, "TINY", True, ["not a lorq model directory"] * 2),
    "finetune": (["finetune", "IN/lorq"], "IN/lorq", True, ["not a lorq model directory"] * 2),
    "recover": (["recover", "IN/lorq"], "IN/lorq", True, ["not a lorq model directory"] * 2),
    "merge": (["merge", "IN/lorq"], "IN/lorq", True, ["not a lorq export directory"] * 2),
    "export": (["export", "IN/lorq"], "IN/lorq", True, ["not a lorq export directory"] * 2),
    "plan": (["plan", "--budget", "3", "--model", "TINY"], None, False,
             ["not a lorq plan file", "is a directory"]),
}  # fmt: skip


def _outputs(args: list, source: str | None, overwrite: bool, refusals: list) -> list:
    flag = ["--overwrite"] if overwrite else []
    rows = [
        ([*args, "--out", "IN/afile/x"], "not a directory"),
        ([*args, "--out", "IN/notes.txt", *flag], refusals[0]),
        ([*args, "--out", "IN/foreign", *flag], refusals[1]),
    ]
    return rows + ([([*args, "--out", f"{source}/o"], "input")] if source else [])


CROSS = [([w if w != "D" else f"IN/{broken}" for w in verb], text)
         for broken, text in BROKEN.items() for verb in READERS]  # fmt: skip
CROSS += [row for writer in WRITERS.values() for row in _outputs(*writer)]
CROSS += [(["finetune", "IN/lorq", "--out", "IN/lorq-copy"], "--overwrite"),
          (["merge", "IN/lorq", "--out", "IN/lorq", "--overwrite"], "input")]  # fmt: skip


def _arg(arg: str, tiny: Path, root: Path) -> str:
    return arg.replace("TINY", str(tiny)).replace("IN/", f"{root}/")


ALL = CASES + CROSS


@pytest.mark.parametrize(("args", "text"), ALL, ids=[" ".join(a[:4]) for a, _ in ALL])
def test_bad_input(args, text, tiny_dir, inputs, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path, inputs, tiny_dir)
    result = run(*[_arg(a, tiny_dir, inputs) for a in args])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert text in lines[0], lines[0]
    assert "Traceback" not in result.output
    assert snapshot(tmp_path, inputs, tiny_dir) == before  # nothing new, every input unchanged
    assert not (inputs / "RAN").exists()  # the model's own code never ran


def test_allow_pickle_loads_plain_tensors(tiny_dir, inputs, tmp_path):  # noqa: F811
    args = ["compress", "--model", inputs / "pickle", "--allow-pickle", "--rank", "2",
            "--eval-blocks", "1", "--no-baseline", "--out", tmp_path / "p"]  # fmt: skip
    assert run(*args).exit_code == 0
    args[2], args[-1] = tiny_dir, tmp_path / "s"  # the same weights from safetensors
    assert run(*args[:3], *args[4:]).exit_code == 0
    same = [(tmp_path / d / "model.safetensors").read_bytes() for d in "ps"]
    assert same[0] == same[1]


def test_the_table_is_long_enough():
    assert len(ALL) >= 100 and all(sum(v in a for a, _ in ALL) >= 4 for v in WRITERS)


@pytest.mark.parametrize("writer", ["export_peft", "save_merged"])
def test_the_export_writers_never_replace_the_model_folder(writer, inputs, tmp_path):
    import lorq
    from lorq.exporters import hf, peft

    folder = tmp_path / "lorq"
    shutil.copytree(inputs / "lorq", folder)
    before = snapshot(folder)
    write = {"export_peft": peft.export_peft, "save_merged": hf.save_merged}[writer]
    with pytest.raises(ValueError, match="input"):
        write(lorq.load(folder), folder / "o", overwrite=True)
    assert snapshot(folder) == before

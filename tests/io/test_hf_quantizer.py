"""transformers' from_pretrained, save_pretrained and Trainer on lorq directories (hf_quantizer).

Oracles: ``lorq.load`` of the same directory — the same layer classes, every tensor bit-identical
with its dtype, the same trainable set, the same ties, and torch.equal logits (same modules, same
tensors, same CPU float32 kernels, so nothing may differ by even one ulp); lorq.load reading what
save_pretrained wrote; a Trainer / SFTTrainer step changing exactly the LoRA factors (every other
tensor bit-identical); bad directories refused with errors that name the fix."""

import json
import logging

import pytest
import torch
from conftest import tied_llama, tiny_bert, tiny_gpt2, tiny_llama, train_b
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM, Trainer, TrainingArguments
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

import lorq
from lorq.config import CompressConfig
from lorq.io import hf_quantizer
from lorq.io.native import CONFIG_FILE, FORMAT_VERSION, LORQ_FILE, WEIGHTS_FILE, is_lorq_dir
from lorq.io.native import payload as native_payload
from lorq.io.verify import file_checksums
from lorq.jobs.compress import compress
from lorq.jobs.merge import merge_qa_lora
from lorq.nn import QuantEmbedding, QuantLinear, tied_packed_head

IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))


def outputs(model):
    with torch.no_grad():
        out = model(input_ids=IDS)
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def qa_lora(make):
    model = make()
    compress(model, CompressConfig(method="qa-lora", quant="int4-g32", rank=4))
    train_b(model)
    return model


def merged_qa_lora():
    model = qa_lora(tiny_llama)
    merge_qa_lora(model)
    return model


def compressed(make, config):
    model = make()
    compress(model, config)
    return model


NF4_8BIT_EMBEDDINGS = CompressConfig(
    method="plain", quant="nf4", rank=2, embeddings="q8_0", factor_bits=8
)
CASES = {  # name: (the compressed model, the Auto class)
    "lq": (lambda: compressed(tiny_llama, CompressConfig(quant="nf3", rank=4)), "causal"),
    "loftq": (
        lambda: compressed(
            tiny_llama, CompressConfig(method="loftq", quant="nf4", rank=4, iters=1)
        ),
        "causal",
    ),
    "qa-lora-gpt2": (lambda: qa_lora(tiny_gpt2), "causal"),
    "merged": (merged_qa_lora, "causal"),
    "packed-tied-embeddings": (lambda: compressed(tied_llama, NF4_8BIT_EMBEDDINGS), "causal"),
    "bert": (lambda: compressed(tiny_bert, CompressConfig(quant="nf3", rank=4)), "encoder"),
}
KINDS = {
    "lq": {"lora"},
    "loftq": {"lora"},
    "qa-lora-gpt2": {"qa-lora"},
    "merged": {"quant"},
    "packed-tied-embeddings": {"lora", "embedding", "quant"},  # the head: a view of the table
    "bert": {"lora"},
}


def auto(kind: str):
    return AutoModelForCausalLM if kind == "causal" else AutoModel


def trainable(model) -> set[str]:
    return {n for n, p in model.named_parameters(remove_duplicate=False) if p.requires_grad}


def factor_names(model) -> set[str]:
    return {n for n, _ in model.named_parameters() if n.endswith((".lora_A", ".lora_B"))}


def everything(model) -> dict[str, torch.Tensor]:
    """Every parameter and buffer (non-persistent ones too) by name, copied."""
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers()]
    return {n: t.detach().clone() for n, t in named}


def assert_same_model(expected, got) -> None:
    assert torch.equal(outputs(expected), outputs(got))
    a, b = everything(expected), everything(got)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    assert trainable(got) == trainable(expected) == factor_names(expected)
    classes = {n: type(m) for n, m in expected.named_modules()}
    assert classes == {n: type(m) for n, m in got.named_modules()}
    assert native_payload(got)[1]["aliases"] == native_payload(expected)[1]["aliases"]


@pytest.mark.parametrize("case", list(CASES))
def test_from_pretrained_builds_what_lorq_load_builds(case, tmp_path):
    make, kind = CASES[case]
    model = make()
    lorq.save(model, tmp_path / "m")
    spec = json.loads((tmp_path / "m" / CONFIG_FILE).read_text())["quantization_config"]
    assert {s["kind"] for s in spec["layers"].values()} == KINDS[case]
    got = auto(kind).from_pretrained(tmp_path / "m")
    assert_same_model(lorq.load(tmp_path / "m"), got)
    assert torch.equal(outputs(model), outputs(got))
    assert got.is_quantized and got.hf_quantizer.is_qat_trainable == (case != "merged")
    if case == "packed-tied-embeddings":  # one packed table, the head a view of its buffers
        assert isinstance(got.model.embed_tokens, QuantEmbedding)
        assert tied_packed_head(got) is got.lm_head
        assert spec["int8_factors"]  # 8-bit factors decoded on load
    if case == "qa-lora-gpt2":  # dense tied embeddings stay one parameter
        assert got.lm_head.weight is got.transformer.wte.weight


@pytest.fixture(scope="module")
def lq_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("lq") / "m"
    lorq.save(compressed(tiny_llama, CompressConfig(quant="nf3", rank=4)), path)
    return path


def test_save_pretrained_writes_a_lorq_directory(lq_dir, tmp_path, monkeypatch):
    model = AutoModelForCausalLM.from_pretrained(lq_dir)
    out = tmp_path / "out"
    out.mkdir()
    (out / "tokenizer_config.json").write_text("{}")  # what Trainer writes beside the model
    seen_by_write_meta = []
    write_meta = hf_quantizer.write_meta

    def recording_write_meta(file, meta):
        seen_by_write_meta.append(sorted(p.name for p in out.iterdir() if p.name[0] != "."))
        write_meta(file, meta)

    monkeypatch.setattr(hf_quantizer, "write_meta", recording_write_meta)
    model.save_pretrained(out)
    # lorq.json comes last: when it is written, the weights and config.json are in place
    expected = sorted([CONFIG_FILE, WEIGHTS_FILE, "tokenizer_config.json"])
    assert seen_by_write_meta == [expected]
    assert is_lorq_dir(out) and (out / "tokenizer_config.json").read_text() == "{}"
    assert_same_model(model, lorq.load(out))
    assert_same_model(model, AutoModelForCausalLM.from_pretrained(out))
    lorq.save(model, tmp_path / "native")  # lorq.save of a from_pretrained model reads back too
    assert_same_model(model, AutoModelForCausalLM.from_pretrained(tmp_path / "native"))
    meta, source = (json.loads((d / LORQ_FILE).read_text()) for d in (out, lq_dir))
    assert meta["hf_config"]["model_type"] == "llama"
    assert meta["compress"] == source["compress"]  # the provenance travels with the model

    def disk_full(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(hf_quantizer, "save_file", disk_full)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(out)
    assert not is_lorq_dir(out)  # a failed save never leaves a finished-looking directory


def test_lorq_save_writes_the_quantization_config(lq_dir, tmp_path):
    config = json.loads((lq_dir / CONFIG_FILE).read_text())
    meta = json.loads((lq_dir / LORQ_FILE).read_text())
    spec = config["quantization_config"]
    assert spec["quant_method"] == "lorq" and spec["format_version"] == FORMAT_VERSION
    assert spec["lorq_version"] == lorq.__version__
    assert {k: spec[k] for k in ("layers", "aliases", "int8_factors", "trainable")} == {
        k: meta[k] for k in ("layers", "aliases", "int8_factors", "trainable")
    }
    assert config["architectures"] == ["LlamaForCausalLM"]
    old = tmp_path / "old"  # a directory written before config.json existed
    old.mkdir()
    for name in (LORQ_FILE, WEIGHTS_FILE):
        (old / name).write_bytes((lq_dir / name).read_bytes())
    assert torch.equal(outputs(lorq.load(old)), outputs(lorq.load(lq_dir)))


def training_args(tmp_path, **kwargs):
    common = dict(max_steps=1, learning_rate=1e-2, report_to=[], save_strategy="no")
    common |= dict(use_cpu=True, logging_strategy="no", disable_tqdm=True)
    return {"output_dir": str(tmp_path / "run"), "per_device_train_batch_size": 4} | common | kwargs


def assert_only_factors_changed(before, model, expected: set[str]) -> None:
    after = everything(model)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed == expected


def test_trainer_step_changes_only_the_factors(lq_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(lq_dir)
    before = everything(model)
    rows = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(1))
    data = [{"input_ids": r, "labels": r} for r in rows]
    trainer = Trainer(
        model=model, args=TrainingArguments(**training_args(tmp_path)), train_dataset=data
    )
    trainer.train()
    assert_only_factors_changed(before, model, factor_names(model))
    trainer.save_model(tmp_path / "saved")  # Trainer's save is lorq's writer
    assert_same_model(model, lorq.load(tmp_path / "saved"))


def test_trainer_resumes_from_its_checkpoint(tmp_path):
    """resume_from_checkpoint reads model.safetensors as a plain state dict: save_pretrained
    stores the factors as they are (A, still on its 8-bit grid after a step from B = 0, would
    otherwise come back as its int8 codes)."""
    lorq.save(compressed(tied_llama, NF4_8BIT_EMBEDDINGS), tmp_path / "m")
    rows = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(1))
    data = [{"input_ids": r, "labels": r} for r in rows]
    args = TrainingArguments(
        **training_args(tmp_path, max_steps=2, save_strategy="steps", save_steps=1)
    )
    straight = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    Trainer(model=straight, args=args, train_dataset=data).train()
    resumed = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    trainer = Trainer(model=resumed, args=args, train_dataset=data)
    trainer.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-1"))
    assert_same_model(straight, resumed)


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing` is deprecated:FutureWarning")
def test_sft_trainer_step_changes_only_the_factors(tmp_path):
    """TRL's SFTTrainer computes the log-probabilities from ``lm_head.weight``: it needs a dense
    head (a model compressed with ``embeddings=`` has a packed one; train it with Trainer)."""
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    from conftest import tiny_tokenizer

    lorq.save(qa_lora(tied_llama), tmp_path / "m")  # B nonzero: A and B both get gradients
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    before = everything(model)
    texts = ["the quick brown fox", "jumps over the lazy dog", "hello world", "lorq packs"]
    args = trl.SFTConfig(**training_args(tmp_path, max_length=32))
    data = datasets.Dataset.from_dict({"text": texts})
    trainer = trl.SFTTrainer(
        model=model, args=args, train_dataset=data, processing_class=tiny_tokenizer()
    )
    trainer.train()
    assert_only_factors_changed(before, model, factor_names(model))


def test_a_merged_model_is_purely_quantized_for_trainer(tmp_path):
    lorq.save(merged_qa_lora(), tmp_path / "m")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert not any(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="purely quantized"):
        Trainer(model=model, args=TrainingArguments(**training_args(tmp_path)), train_dataset=[])


def test_a_newer_format_version_is_refused(lq_dir, tmp_path):
    newer = tmp_path / "newer"
    newer.mkdir()
    for name in (CONFIG_FILE, WEIGHTS_FILE, LORQ_FILE):
        (newer / name).write_bytes((lq_dir / name).read_bytes())
    config = json.loads((newer / CONFIG_FILE).read_text())
    config["quantization_config"] |= {"format_version": FORMAT_VERSION + 1, "lorq_version": "9.0"}
    (newer / CONFIG_FILE).write_text(json.dumps(config))
    message = (
        rf"format_version {FORMAT_VERSION + 1} \(written by lorq 9\.0\) is newer than lorq "
        rf"{lorq.__version__} reads \(format_version {FORMAT_VERSION}\); upgrade lorq"
    )
    with pytest.raises(ValueError, match=message):
        AutoModelForCausalLM.from_pretrained(newer)
    meta = json.loads((newer / LORQ_FILE).read_text())
    (newer / LORQ_FILE).write_text(json.dumps(meta | {"format_version": FORMAT_VERSION + 1}))
    with pytest.raises(ValueError, match="upgrade lorq"):
        lorq.load(newer)


def test_altered_weights_are_refused_before_loading(lq_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    for change, message in [
        (lambda t: t.pop("model.norm.weight"), "has no tensor 'model.norm.weight'"),
        (lambda t: t.update(extra=torch.zeros(2)), r"holds tensors the model does not have"),
        (lambda t: t.update({"model.norm.weight": torch.ones(3)}), r"has shape \[3\]"),
    ]:
        altered = tmp_path / "altered"
        altered.mkdir(exist_ok=True)
        tensors = load_file(lq_dir / WEIGHTS_FILE)
        change(tensors)
        save_file(tensors, altered / WEIGHTS_FILE)
        config = json.loads((lq_dir / CONFIG_FILE).read_text())  # checksums of the new weights:
        record = file_checksums({WEIGHTS_FILE: altered / WEIGHTS_FILE})  # the deeper checks
        config["quantization_config"]["checksums"] = record
        (altered / CONFIG_FILE).write_text(json.dumps(config))
        with pytest.raises(ValueError, match=message):
            AutoModelForCausalLM.from_pretrained(altered)


def test_another_head_is_refused(lq_dir):
    with pytest.raises(ValueError, match="holds a LlamaForCausalLM, not a LlamaModel"):
        AutoModel.from_pretrained(lq_dir)


def test_without_import_lorq_transformers_skips_the_quantization(lq_dir, monkeypatch):
    """What the module docstring says happens when lorq is not imported: transformers warns and
    builds plain, randomly initialised linear layers (the registry is all import lorq changes)."""
    from transformers.utils import logging as hf_logging

    monkeypatch.delitem(AUTO_QUANTIZATION_CONFIG_MAPPING, "lorq")
    monkeypatch.delitem(AUTO_QUANTIZER_MAPPING, "lorq")
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())  # type: ignore[method-assign]
    root, level = hf_logging.get_logger(), hf_logging.get_verbosity()
    root.addHandler(handler)
    hf_logging.set_verbosity_warning()
    try:
        model = AutoModelForCausalLM.from_pretrained(lq_dir)
    finally:
        root.removeHandler(handler)
        hf_logging.set_verbosity(level)
    assert any("Unknown quantization type, got lorq" in r for r in records)
    assert any("MISSING" in r and "q_proj.weight" in r for r in records)  # its load report
    assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear
    assert not any(isinstance(m, QuantLinear) for m in model.modules())
    assert not torch.equal(outputs(model), outputs(lorq.load(lq_dir)))
    hf_quantizer.register()  # idempotent: registering again (import lorq did) changes nothing
    hf_quantizer.register()
    assert AUTO_QUANTIZER_MAPPING["lorq"] is hf_quantizer.LorqHfQuantizer

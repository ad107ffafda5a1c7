"""Merged and PEFT exports. Oracles: independent readers (transformers, PEFT) reproduce the lorq
model's logits; lorq's own model is left unchanged; bad input writes nothing."""

import json

import pytest
import torch
from conftest import adapted, tiny_bert, tiny_causal, tiny_gpt2

import lorq
from lorq.exporters.hf import save_merged
from lorq.exporters.peft import export_peft

BUILDERS = {
    "llama": lambda: tiny_causal("llama"),
    "gpt2": tiny_gpt2,
    "opt": lambda: tiny_causal("opt"),
}


def compressed(build, rank=4):
    return adapted(build, rank=rank)


def logits(model, ids):
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("family", list(BUILDERS))
def test_merged_model_loads_in_transformers(family, tmp_path):
    from transformers import AutoModelForCausalLM

    model = compressed(BUILDERS[family])
    ids = torch.randint(0, 128, (2, 12))
    expected = logits(model, ids)
    before = {n: t.clone() for n, t in model.state_dict().items()}
    save_merged(model, tmp_path / "merged")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(logits(loaded, ids), expected, rtol=1e-4, atol=1e-5)
    assert all(torch.equal(before[n], t) for n, t in model.state_dict().items())


def test_merged_bf16_is_within_bf16_rounding(tmp_path):
    from transformers import AutoModelForCausalLM

    model = compressed(BUILDERS["llama"])
    save_merged(model, tmp_path / "m", dtype="bf16")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype="auto")
    assert loaded.dtype == torch.bfloat16
    layer = model.model.layers[0].mlp.down_proj
    dense = loaded.model.layers[0].mlp.down_proj.weight
    assert torch.equal(dense, layer.merged_weight().to(torch.bfloat16))


@pytest.mark.parametrize("family", list(BUILDERS))
def test_peft_export_reproduces_lorq_logits(family, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = compressed(BUILDERS[family])
    ids = torch.randint(0, 128, (2, 12))
    export_peft(model, tmp_path / "p")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "p" / "base")
    peft_model = PeftModel.from_pretrained(base, tmp_path / "p" / "adapter").eval()
    torch.testing.assert_close(logits(peft_model, ids), logits(model, ids), rtol=1e-4, atol=1e-5)


def test_peft_export_of_an_encoder(tmp_path):
    from peft import PeftModel
    from transformers import AutoModel

    model = compressed(tiny_bert)
    ids = torch.randint(0, 128, (2, 12))
    export_peft(model, tmp_path / "p")
    config = json.loads((tmp_path / "p" / "adapter" / "adapter_config.json").read_text())
    assert config["task_type"] == "FEATURE_EXTRACTION" and config["r"] == 4
    base = AutoModel.from_pretrained(tmp_path / "p" / "base", add_pooling_layer=True)
    peft_model = PeftModel.from_pretrained(base, tmp_path / "p" / "adapter").eval()
    torch.testing.assert_close(logits(peft_model, ids), logits(model, ids), rtol=1e-4, atol=1e-5)


def test_per_module_ranks_go_to_rank_and_alpha_patterns(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = compressed(BUILDERS["llama"])
    small = tiny_causal("llama")
    lorq.compress(
        small,
        lorq.CompressConfig(method="lq", quant="nf3", rank=2, lora_alpha=5.0, include=("v_proj",)),
    )
    model.model.layers[1].self_attn.v_proj = small.model.layers[1].self_attn.v_proj
    ids = torch.randint(0, 128, (1, 8))
    export_peft(model, tmp_path / "p")
    config = json.loads((tmp_path / "p" / "adapter" / "adapter_config.json").read_text())
    assert config["rank_pattern"] == {"model.layers.1.self_attn.v_proj": 2}
    assert config["alpha_pattern"] == {"model.layers.1.self_attn.v_proj": 5.0}
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "p" / "base")
    peft_model = PeftModel.from_pretrained(base, tmp_path / "p" / "adapter").eval()
    torch.testing.assert_close(logits(peft_model, ids), logits(model, ids), rtol=1e-4, atol=1e-5)


def test_exports_refuse_foreign_directories_and_bad_dtypes(tmp_path):
    model = compressed(BUILDERS["llama"])
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    for export in (save_merged, export_peft):
        with pytest.raises(ValueError, match="not a lorq export directory"):
            export(model, foreign, overwrite=True)
        with pytest.raises(ValueError, match="dtype='fp8'"):
            export(model, tmp_path / "new", dtype="fp8")
    assert (foreign / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]
    save_merged(model, tmp_path / "m")
    with pytest.raises(ValueError, match="pass overwrite"):
        save_merged(model, tmp_path / "m")
    save_merged(model, tmp_path / "m", overwrite=True)


def test_a_model_without_lorq_layers_is_refused(tmp_path):
    with pytest.raises(ValueError, match="no lorq layers"):
        save_merged(tiny_gpt2(), tmp_path / "m")

"""The built-in real models (slow: loading SmolLM2 takes ~20 s). Oracles: plain quantization
error, transformers' own GGUF dequantization, and the published architecture."""

import pytest
import torch

from lorq import DecomposeConfig, QuantConfig, decompose, quantize
from lorq.io.models import builtin_path, load_model
from lorq.model.targets import dense_weight, find_targets

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2", with_tokenizer=False).model


def test_smollm2_architecture(smollm2):
    targets = find_targets(smollm2)
    assert len(targets) == 210  # 30 layers × 7 projections; the tied LM head stays dense
    assert smollm2.config.num_hidden_layers == 30


@pytest.mark.parametrize("preset", ["nf3", "nf2"])
@pytest.mark.parametrize("method", ["loftq", "lq"])
def test_decompositions_beat_plain_on_real_matrices(smollm2, method, preset):
    targets = list(find_targets(smollm2).items())
    for name, module in (targets[0], targets[100], targets[-1]):
        weight = dense_weight(module).float()
        config = DecomposeConfig(method=method, rank=16, quant=QuantConfig.preset(preset))
        d = decompose(weight, config)
        plain = float((quantize(weight, config.quant).dequantize() - weight).norm())
        assert d.error < plain, name
        assert d.error == min(d.errors)


def test_minilm_loads_as_encoder():
    model = load_model("minilm").model
    assert len(find_targets(model)) == 36  # 6 layers × (q, k, v, attention out, intermediate, out)
    out = model(input_ids=torch.tensor([[101, 7592, 102]]))
    assert out.last_hidden_state.shape == (1, 3, 384)


def test_gguf_model_is_a_plain_float_model_that_trains(smollm2):
    """Oracle: transformers.Trainer's own check for quantized models accepts the loaded model."""
    from transformers.trainer_utils import validate_quantization_for_training

    model = smollm2
    assert not model.is_quantized and model.hf_quantizer is None
    assert all(p.dtype == torch.float32 for p in model.parameters())
    validate_quantization_for_training(model)  # raises for a GGUF-quantized base model


def test_smollm2_packed_equals_transformers_loader(smollm2):
    """Oracle: transformers' GGUF loader (every tensor dequantized to float32) — same logits."""
    from lorq.nn import QuantEmbedding, QuantLinear, tied_packed_head

    packed = load_model("smollm2", with_tokenizer=False, packed=True).model
    head = tied_packed_head(packed)  # the tied output layer: the Q8_0 table of the embedding
    assert isinstance(packed.model.embed_tokens, QuantEmbedding) and head is packed.lm_head
    layers = [m for m in packed.modules() if isinstance(m, QuantLinear) and m is not head]
    assert len(layers) == len(find_targets(packed)) == 210
    ids = torch.randint(0, 49152, (1, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(packed(input_ids=ids).logits, smollm2(input_ids=ids).logits)
    numel = sum(m.in_features * m.out_features for m in layers)
    assert sum(m.quantized_nbytes() for m in layers) == numel * 20 // 32  # Q4_1: 20 B / 32


def test_default_output_is_smaller_than_its_source(tmp_path):
    """Oracle: the bytes on disk. The default job's output (nf3, r = 16; plain quantization
    stores the same shapes as LQ-LoRA) is smaller than the GGUF it came from, with the Q8_0
    token table kept as the source's own codes; 8-bit factors shrink it further."""
    import lorq
    from lorq.io.models import resolve

    source = resolve("smollm2")
    source_bytes = (builtin_path("smollm2") / source.gguf_file).stat().st_size
    sizes, loaded = {}, load_model("smollm2", packed=True)
    for factor_bits in (None, 8):
        config = lorq.CompressConfig(method="plain", quant="nf3", factor_bits=factor_bits)
        result = lorq.compress_model(loaded, config, eval_blocks=0)
        out = lorq.save(result, tmp_path / str(factor_bits))
        sizes[factor_bits] = sum(p.stat().st_size for p in out.iterdir())
    assert sizes[8] < sizes[None] < source_bytes


@pytest.mark.parametrize("name", ["minilm", "smollm2"])
def test_gptq_on_nf_grids_never_worse_than_nearest_on_real_layers(name):
    """Real weights and real calibration inputs (the built-in text): in the H-norm
    tr((W − Q) H (W − Q)ᵀ), GPTQ's Q is at most round to nearest's for NF2/3/4, on an attention
    and an MLP layer of the first, middle and last blocks."""
    from lorq.calibrate.tokens import Calibration
    from lorq.jobs.statistics import estimate_hessians
    from lorq.quant.gptq import gptq_quantize

    loaded = load_model(name)
    targets = find_targets(loaded.model)
    names, per_block = list(targets), len(targets) // loaded.model.config.num_hidden_layers
    firsts = [0, len(names) // per_block // 2 * per_block, len(names) - per_block]
    picked = {names[i + k]: targets[names[i + k]] for i in firsts for k in (0, per_block - 1)}
    calibration = Calibration("builtin", 128, 8).load(loaded.tokenizer)
    hessians = estimate_hessians(loaded.model, calibration, picked)
    for layer, module in picked.items():
        weight, h = dense_weight(module).float(), hessians[layer].double()

        def err(q, weight=weight, h=h):
            r = (weight - q.dequantize()).double()
            return float(torch.trace(r @ h @ r.T))

        for preset in ("nf2", "nf3", "nf4"):
            config = QuantConfig.preset(preset)
            gptq, nearest = (
                err(gptq_quantize(weight, hessians[layer], config)),
                err(quantize(weight, config)),
            )
            assert gptq <= nearest, (layer, preset, gptq, nearest)

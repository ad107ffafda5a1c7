"""QALoraLinear and QuantLinear. Oracles: F.linear on the dequantized weight, an independent dense
x(Q + s·B·Ā)ᵀ with Ā built column by column, the fp16 rounding bound of the merged mins, the
zero-point formula of docs/algorithms.md §2.5 recomputed here, and the untouched source layer."""

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from lorq import QuantConfig, quantize
from lorq.nn import QALoraLinear, QuantLinear, QuantLoraLinear
from lorq.quant.packing import unpack
from lorq.quant.tensor import MergeError

IN, OUT, RANK = 128, 96, 8


@pytest.fixture
def linear():
    torch.manual_seed(0)
    return nn.Linear(IN, OUT, bias=True)


def adapted(linear, preset: str, std: float = 0.05, alpha: float = 16.0) -> QALoraLinear:
    """A QALoraLinear of ``linear`` with B set to seeded N(0, std²) values, as if trained."""
    layer = QALoraLinear.from_linear(linear, QuantConfig.preset(preset), RANK, alpha, seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(OUT, RANK, generator=g) * std)
    return layer


def dense_lora_A(lora_A: torch.Tensor, group_size: int) -> torch.Tensor:
    """Ā[:, j] = A[:, j // G] / G, built column by column (independent of the library's)."""
    columns = [lora_A[:, j // group_size] / group_size for j in range(lora_A.shape[1] * group_size)]
    return torch.stack(columns, dim=1)


def dense_delta(layer: QALoraLinear) -> torch.Tensor:
    A = dense_lora_A(layer.lora_A.detach(), layer.quant_config.block_size)
    return layer.scaling * layer.lora_B.detach() @ A


@pytest.mark.parametrize("preset", ["int4-g32", "q4_1", "int3-g32", "int8-g128"])
def test_zero_b_equals_dequantized_linear(linear, preset):
    layer = QALoraLinear.from_linear(linear, QuantConfig.preset(preset), RANK, 16.0, seed=0)
    q = quantize(linear.weight.detach(), preset)
    assert torch.all(layer.lora_B == 0)
    assert torch.equal(layer.q.dequantize(), q.dequantize())
    x = torch.randn(5, 7, IN)
    assert torch.equal(layer(x), F.linear(x, q.dequantize(), linear.bias))


def test_init_of_a_is_seeded_kaiming_uniform(linear):
    quant = QuantConfig.preset("int4-g32")
    a = QALoraLinear.from_linear(linear, quant, RANK, seed=3).lora_A
    assert a.shape == (RANK, IN // 32)
    assert a.abs().max() <= 1 / (IN // 32) ** 0.5
    assert torch.equal(a, QALoraLinear.from_linear(linear, quant, RANK, seed=3).lora_A)
    assert not torch.equal(a, QALoraLinear.from_linear(linear, quant, RANK, seed=4).lora_A)


@pytest.mark.parametrize("preset", ["int4-g32", "q4_1", "int4-g64"])
def test_pooled_forward_equals_dense_equivalent(linear, preset):
    layer = adapted(linear, preset, alpha=3.0)
    expected_delta = dense_delta(layer)
    torch.testing.assert_close(layer.delta_weight(), expected_delta, rtol=1e-6, atol=1e-8)
    x = torch.randn(4, 3, IN)
    expected = x @ (layer.q.dequantize() + expected_delta).T + linear.bias
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.merged_weight(), layer.q.dequantize() + expected_delta)
    # the pooled adapter is a real contribution, not lost in the tolerance
    assert (layer(x) - F.linear(x, layer.q.dequantize(), linear.bias)).abs().max() > 1e-3


def test_q4_1_merge_is_exact_up_to_fp16_min_rounding(linear):
    layer = adapted(linear, "q4_1")
    merged = layer.merge()
    assert isinstance(merged, QuantLinear) and not merged.has_lora
    assert torch.equal(merged.q_codes, layer.q_codes)
    assert torch.equal(merged.q_scales, layer.q_scales)
    groups = IN // 32
    delta = layer.scaling * (layer.lora_B.detach() @ layer.lora_A.detach()) / 32
    expected_mins = (layer.q_zeros.float().view(OUT, groups) + delta).half()
    assert torch.equal(merged.q_zeros.view(OUT, groups), expected_mins)
    x = torch.randn(16, IN)
    y, y_merged = layer(x), merged(x)
    # Each merged min is min + Δ rounded to fp16: |error| ≤ 2⁻¹¹·|min'| (normal) or 2⁻²⁵
    # (subnormal); it multiplies the group sum of x. Plus fp32 matmul rounding, n·2⁻²⁴·|x||W|.
    rounding = 2.0**-11 * merged.q_zeros.float().abs().view(OUT, groups) + 2.0**-25
    group_sums = x.view(-1, groups, 32).sum(-1).abs()
    matmul = 2 * IN * 2.0**-24 * (x.abs() @ (layer.merged_weight().abs()).T + linear.bias.abs())
    bound = group_sums @ rounding.T + matmul
    assert torch.all((y - y_merged).abs() <= bound)
    effect = (y - F.linear(x, layer.q.dequantize(), linear.bias)).abs()
    assert effect.mean() > 10 * bound.mean()  # dropping Δ would break the bound
    error = layer.merge_error(merged)
    assert 0 < error.max_abs <= 2.0**-11 * float(merged.q_zeros.float().abs().max()) + 2.0**-25


@pytest.mark.parametrize("preset", ["int4-g32", "int3-g32", "int2-g32"])
def test_int_zero_merge_is_lossy_and_reported(linear, preset):
    layer = adapted(linear, preset)
    merged = layer.merge()
    config, groups = layer.quant_config, IN // 32
    assert torch.equal(merged.q_codes, layer.q_codes)
    assert torch.equal(merged.q_scales, layer.q_scales)
    zeros = unpack(layer.q_zeros, config.bits, OUT * groups).float().view(OUT, groups)
    scales = layer.q_scales.float().view(OUT, groups)
    delta = layer.scaling * (layer.lora_B.detach() @ layer.lora_A.detach()) / 32
    exact = zeros - delta / scales
    expected = torch.round(exact).clamp(0, 2**config.bits - 1)
    assert torch.equal(
        unpack(merged.q_zeros, config.bits, OUT * groups).view(OUT, groups), expected
    )
    diff = merged.q.dequantize() - (layer.q.dequantize() + dense_delta(layer))
    error = layer.merge_error(merged)
    assert error.max_abs == pytest.approx(float(diff.abs().max()), rel=1e-6)
    target = layer.q.dequantize() + dense_delta(layer)
    assert error.relative == pytest.approx(float(diff.norm() / target.norm()), rel=1e-5)
    assert error.delta_relative == pytest.approx(
        float(diff.norm() / dense_delta(layer).norm()), rel=1e-5
    )
    assert error.max_abs > 0  # rounding the zero point loses part of Δ
    # where the zero was not clamped, the loss is the zero's rounding: ≤ scale / 2 per weight
    unclamped = (exact >= 0) & (exact <= 2**config.bits - 1)
    per_group = diff.view(OUT, groups, 32).abs().amax(-1)
    assert torch.all(per_group[unclamped] <= scales[unclamped] / 2 * (1 + 1e-5) + 1e-7)


@pytest.mark.parametrize("preset", ["int4-g32", "q4_1"])
def test_merge_leaves_the_source_layer_alone_and_is_idempotent(linear, preset):
    layer = adapted(linear, preset)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.randn(3, IN)
    y = layer(x)
    first, second = layer.merge(), layer.merge()
    after = layer.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(layer(x), y)
    assert all(torch.equal(a, b) for a, b in zip(first.buffers(), second.buffers(), strict=True))
    assert isinstance(layer.merge_error(), MergeError)


def test_zero_adapter_merges_to_the_same_q(linear):
    layer = QALoraLinear.from_linear(linear, QuantConfig.preset("int4-g32"), RANK)
    merged = layer.merge()
    assert torch.equal(merged.q_zeros, layer.q_zeros)
    assert layer.merge_error(merged) == MergeError(0.0, 0.0, 0.0)


def test_expanded_a_gives_the_pooled_adapter(linear):
    layer = adapted(linear, "int4-g32")
    a_bar = layer.expanded_lora_A()
    assert torch.equal(a_bar, dense_lora_A(layer.lora_A.detach(), 32))
    x = torch.randn(6, IN)
    pooled = torch.stack([x[:, g * 32 : (g + 1) * 32].mean(1) for g in range(IN // 32)], dim=1)
    torch.testing.assert_close(x @ a_bar.T, pooled @ layer.lora_A.detach().T)


def test_precomputed_base_is_used_as_is(linear):
    quant = QuantConfig.preset("q4_1")
    q = quantize(linear.weight.detach() * 2, quant)  # deliberately not W's own quantization
    layer = QALoraLinear.from_linear(linear, quant, RANK, q=q)
    assert layer.q_codes is q.codes
    assert torch.equal(layer.q.dequantize(), q.dequantize())


def test_conv1d(gpt2):
    conv = gpt2.transformer.h[0].mlp.c_fc
    layer = QALoraLinear.from_linear(conv, _q("int4-g32"), 4)
    x = torch.randn(2, 5, conv.weight.shape[0])
    q = quantize(conv.weight.detach().t(), "int4-g32")
    assert torch.equal(layer(x), F.linear(x, q.dequantize(), conv.bias))
    assert (layer.out_features, layer.in_features) == (conv.nf, conv.weight.shape[0])


def _q(name: str) -> QuantConfig:
    return QuantConfig.preset(name)


def test_errors(linear):
    with pytest.raises(ValueError, match="quant='nf4' is not supported with method='qa-lora'"):
        QALoraLinear.from_linear(linear, _q("nf4"), RANK)
    with pytest.raises(ValueError, match="in_features=48 is not a multiple of"):
        QALoraLinear.from_linear(nn.Linear(48, 16), _q("int4-g32"), RANK)
    with pytest.raises(ValueError, match="block_size=64 differs from the quantization group"):
        QALoraLinear.from_linear(linear, _q("int4-g32"), RANK, block_size=64)
    q = quantize(linear.weight.detach(), "int4-g32")
    with pytest.raises(ValueError, match=r"lora_A .* do not fit"):
        QALoraLinear(q, torch.zeros(OUT, RANK), torch.zeros(RANK, IN), 1.0)
    with pytest.raises(ValueError, match=r"pass quant=q\.config"):
        QALoraLinear.from_linear(linear, _q("q4_1"), RANK, q=q)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_compute(linear, dtype):
    layer = adapted(linear, "int4-g32")
    x = torch.randn(4, IN)
    y = layer(x.to(dtype))
    assert y.dtype == dtype
    torch.testing.assert_close(y.float(), layer(x), rtol=0.05, atol=0.05)


def test_only_lora_trainable_and_gradients_flow(linear):
    layer = adapted(linear, "int4-g32")
    assert {n for n, p in layer.named_parameters() if p.requires_grad} == {"lora_A", "lora_B"}
    assert layer.quantized_nbytes() == layer.q.nbytes
    layer(torch.randn(2, IN)).sum().backward()
    assert layer.lora_A.grad is not None and layer.lora_A.grad.abs().sum() > 0


def test_quant_linear_is_the_shared_base(linear):
    q = quantize(linear.weight.detach(), "int4-g32")
    plain = QuantLinear(q, linear.bias)
    x = torch.randn(3, IN)
    assert torch.equal(plain(x), F.linear(x, q.dequantize(), linear.bias))
    assert not any(p.requires_grad for p in plain.parameters())
    assert [plain.kind, plain.has_lora] == ["quant", False]
    lora = QuantLoraLinear(q, torch.zeros(OUT, 4), torch.zeros(4, IN), 1.0)
    qa = QALoraLinear(q, torch.zeros(OUT, 4), torch.zeros(4, IN // 32), 1.0)
    assert [(m.kind, m.has_lora) for m in (lora, qa)] == [("lora", True), ("qa-lora", True)]
    assert all(isinstance(m, QuantLinear) for m in (lora, qa))
    names = {n for n, _ in plain.named_buffers()}
    assert names == {n for n, _ in lora.named_buffers()} == {n for n, _ in qa.named_buffers()}
    rebuilt = QuantLinear.from_buffers(q.config, q.shape, dict(plain.named_buffers()), plain.bias)
    assert torch.equal(rebuilt(x), plain(x))


def test_a_small_adapter_survives_float_mins_only(linear):
    """|Δ| < scale / 2 in every group (a typical trained adapter): integer zeros round it away."""
    int_layer, float_layer = (
        adapted(linear, "int4-g32", std=1e-2),
        adapted(linear, "q4_1", std=1e-2),
    )
    scales = int_layer.q_scales.float().view(OUT, IN // 32)
    assert torch.all(int_layer.group_delta().abs() < scales / 2)
    assert torch.equal(int_layer.merge().q_zeros, int_layer.q_zeros)
    assert int_layer.merge_error().delta_relative == pytest.approx(1.0, rel=1e-5)
    assert float_layer.merge_error().delta_relative < 0.1


def test_fp32_mins_keep_an_adapter_below_the_fp16_spacing(linear):
    """Oracle: the dense Q + s·B·Ā. An adapter far below the fp16 spacing of the mins vanishes in
    a q4_1 merge and survives with min_dtype="fp32"; codes untouched, scales widened exactly."""
    layer = adapted(linear, "q4_1", std=1e-5)
    spacing = 2.0**-11 * layer.q.block_zeros().abs()
    assert torch.all(layer.group_delta().abs().flatten() < spacing / 2)
    assert layer.merge_error().delta_relative > 0.9  # fp16 mins: the adapter is gone
    merged = layer.merge(min_dtype="fp32")
    assert merged.quant_config.scale_dtype == "fp32" and merged.q_zeros.dtype == torch.float32
    assert torch.equal(merged.q_codes, layer.q_codes)
    assert torch.equal(merged.q_scales, layer.q_scales.float())
    assert layer.merge_error(merged).delta_relative < 1e-2
    x = torch.randn(5, IN)
    expected = x @ (layer.q.dequantize() + dense_delta(layer)).T + layer.bias
    torch.testing.assert_close(merged(x), expected, rtol=1e-5, atol=1e-6)

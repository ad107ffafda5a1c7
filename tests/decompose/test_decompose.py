"""LoftQ and LQ-LoRA. Oracles: constructed exact solutions, plain quantization, the reported
reconstruction, the unweighted algorithm (uniform Fisher), and invariants."""

import dataclasses
import itertools

import pytest
import torch

from lorq import DecomposeConfig, QuantConfig, decompose, quantize
from lorq.quant import NFConfig
from lorq.quant.codebook import nf_levels

NF4 = NFConfig(bits=4, block_size=64, scale_bits=None)


def spread(out, rank, generator):
    return torch.linalg.qr(torch.randn(out, rank, generator=generator)).Q


def loftq_exact_case(out=64, inn=256, rank=3):
    """Q0 representable in NF4; L below half the smallest level gap and zero on each block's
    absmax column, so quant(Q0 + L) = Q0 and LoftQ's first SVD sees L exactly."""
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(1, 15, (out * inn // 64, 64), generator=g)
    codes[:, 0] = 15
    scales = torch.rand(out * inn // 64, generator=g) + 0.5
    q0 = (nf_levels(4)[codes] * scales[:, None]).view(out, inn)
    right = torch.randn(rank, inn, generator=g)
    right[:, ::64] = 0
    low = spread(out, rank, g) @ right
    return q0, low / low.abs().max() * 0.01


def lq_exact_case(out=64, inn=256, rank=3):
    """Q0 representable (one ±c per block, on the block's first column) and L orthogonal to it on
    both sides with larger singular values, so svd_r(Q0 + L) = L and quant(W − L) = Q0."""
    g = torch.Generator().manual_seed(1)
    q0 = torch.zeros(out, inn)
    q0[: out // 2, ::64] = torch.sign(torch.randn(out // 2, inn // 64, generator=g))
    right = torch.randn(rank, inn, generator=g)
    right[:, ::64] = 0
    left = torch.zeros(out, rank)
    left[out // 2 :] = spread(out // 2, rank, g) * 50
    return q0, left @ right


@pytest.mark.parametrize("svd", ["exact", "randomized"])
@pytest.mark.parametrize(("method", "case"), [("loftq", loftq_exact_case), ("lq", lq_exact_case)])
def test_exact_recovery(method, case, svd):
    q0, low = case()
    weight = q0 + low
    config = DecomposeConfig(method=method, rank=3, quant=NF4, svd=svd, lora_alpha=7.0)
    d = decompose(weight, config)
    assert d.error <= 1e-5 * float(weight.norm())
    tolerance = 1e-5 * float(weight.abs().max())  # float32 round-off of the SVD
    torch.testing.assert_close(d.q.dequantize(), q0, rtol=0, atol=tolerance)
    torch.testing.assert_close(d.reconstruct(), weight, rtol=0, atol=tolerance)


def plain_error(weight, quant):
    return float((quantize(weight, quant).dequantize() - weight).norm())


@pytest.mark.parametrize("method", ["loftq", "lq"])
@pytest.mark.parametrize("matrix", ["gaussian", "heavy_tailed"])
@pytest.mark.parametrize("preset", ["nf4", "nf3", "nf2", "int4-g32"])
def test_beats_plain_quantization(method, matrix, preset, request):
    weight = request.getfixturevalue(matrix)
    config = DecomposeConfig(method=method, rank=8, quant=QuantConfig.preset(preset))
    d = decompose(weight, config)
    assert d.error < plain_error(weight, config.quant)
    assert d.error == min(d.errors)
    assert d.lora_B.shape == (128, 8) and d.lora_A.shape == (8, 512)


@pytest.mark.parametrize("method", ["loftq", "lq"])
@pytest.mark.parametrize(("alpha", "rslora"), [(16.0, False), (3.0, False), (16.0, True)])
def test_reported_error_is_the_reconstruction(method, alpha, rslora, heavy_tailed):
    config = DecomposeConfig(method=method, rank=8, lora_alpha=alpha, rslora=rslora, iters=3)
    d = decompose(heavy_tailed, config)
    assert d.scaling == pytest.approx(alpha / (8**0.5 if rslora else 8))
    manual = d.q.dequantize() + d.scaling * (d.lora_B @ d.lora_A)
    assert float((heavy_tailed - manual).norm()) == pytest.approx(d.error, rel=1e-5)


def test_alpha_does_not_change_the_decomposition(gaussian):
    a = decompose(gaussian, DecomposeConfig(method="loftq", rank=8, lora_alpha=8.0, iters=2))
    b = decompose(gaussian, DecomposeConfig(method="loftq", rank=8, lora_alpha=32.0, iters=2))
    torch.testing.assert_close(a.low_rank(), b.low_rank(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(b.lora_B, a.lora_B / 2, rtol=1e-4, atol=1e-6)  # √(8/32)


def test_lq_stops_when_error_stops_falling(heavy_tailed):
    d = decompose(
        heavy_tailed, DecomposeConfig(method="lq", rank=4, quant=QuantConfig.preset("nf2"))
    )
    errors = d.errors
    assert all(b < a for a, b in itertools.pairwise(errors[:-1]))
    assert len(errors) == 20 or errors[-1] >= errors[-2] * (1 - 1e-6)


def test_loftq_runs_all_iterations_and_returns_best(heavy_tailed):
    d = decompose(heavy_tailed, DecomposeConfig(method="loftq", rank=4, iters=6))
    assert len(d.errors) == 6 and d.error == min(d.errors)


def test_seeded_randomized_is_deterministic(gaussian):
    config = DecomposeConfig(method="lq", rank=8, svd="randomized", iters=3, seed=7)
    a, b = decompose(gaussian, config), decompose(gaussian, config)
    assert torch.equal(a.lora_A, b.lora_A) and a.errors == b.errors


def test_randomized_close_to_exact(gaussian):
    exact = decompose(gaussian, DecomposeConfig(method="loftq", rank=8, svd="exact"))
    fast = decompose(gaussian, DecomposeConfig(method="loftq", rank=8, svd="randomized"))
    assert fast.error <= exact.error * 1.01


@pytest.mark.parametrize("method", ["loftq", "lq"])
def test_uniform_fisher_gives_unweighted_factors(method, gaussian):
    config = DecomposeConfig(method=method, rank=8, iters=3)
    plain = decompose(gaussian, config)
    fisher_config = dataclasses.replace(config, weighting="fisher")
    weighted = decompose(gaussian, fisher_config, fisher=torch.full_like(gaussian, 4.0))
    torch.testing.assert_close(weighted.lora_B, plain.lora_B, rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(weighted.lora_A, plain.lora_A, rtol=1e-3, atol=1e-5)
    assert torch.equal(weighted.q.codes, plain.q.codes)
    assert weighted.error == pytest.approx(2.0 * plain.error, rel=1e-4)  # √4 · ‖E‖


@pytest.mark.parametrize("method", ["loftq", "lq"])
def test_zero_fisher_rows_are_ignored(method, heavy_tailed):
    fisher = torch.ones_like(heavy_tailed)
    fisher[64:] = 0.0
    config = DecomposeConfig(method=method, rank=8, svd="exact", iters=4)
    plain = decompose(heavy_tailed, config)
    weighted = decompose(heavy_tailed, dataclasses.replace(config, weighting="fisher"), fisher)

    def errors(d):
        residual = heavy_tailed - d.reconstruct()
        return float(residual[:64].norm()), float(residual.norm())

    (w_kept, w_all), (p_kept, p_all) = errors(weighted), errors(plain)
    assert weighted.error == pytest.approx(w_kept, rel=1e-4)
    assert w_kept < 0.98 * p_kept  # the weighted rows get all r components
    assert torch.all(weighted.lora_B[64:] == 0)
    assert w_all > p_all  # and the ignored rows pay for it


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rank": 0}, "rank=0"),
        ({"rank": -2}, "rank=-2"),
        ({"iters": 0}, "iters=0"),
        ({"method": "svd"}, "method='svd'"),
        ({"svd": "lanczos"}, "svd='lanczos'"),
        ({"lora_alpha": 0.0}, "lora_alpha=0.0"),
    ],
)
def test_bad_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DecomposeConfig(**kwargs)


def test_rank_too_large(gaussian):
    with pytest.raises(ValueError, match=r"rank=128 must be smaller than min\(out, in\) = 128"):
        decompose(gaussian, DecomposeConfig(rank=128))


@pytest.mark.parametrize(
    ("fisher", "message"),
    [
        (torch.ones(128, 511), "fisher has shape"),
        (-torch.ones(128, 512), "negative"),
        (torch.full((128, 512), float("nan")), "NaN"),
    ],
)
def test_bad_fisher(gaussian, fisher, message):
    with pytest.raises(ValueError, match=message):
        decompose(gaussian, DecomposeConfig(rank=4, weighting="fisher"), fisher=fisher)


def test_config_round_trip():
    config = DecomposeConfig(method="loftq", rank=32, quant=QuantConfig.preset("nf3"), iters=2)
    assert DecomposeConfig.from_dict(config.to_dict()) == config

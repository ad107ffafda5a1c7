"""Activation-aware decomposition (docs/algorithms.md §5). Oracles: an iterative minimiser of the
H-norm and random rank-r perturbations (closed-form step), the unweighted algorithm bit for bit
(H = I), the measured output error of the layer on its calibration inputs (H-norm), least squares
on an explicit pooling matrix (QA-LoRA's pooled step)."""

import dataclasses

import pytest
import torch

from lorq import DecomposeConfig, decompose
from lorq.decomposition.pooled import pooled_low_rank
from lorq.decomposition.svd import activation_svd
from lorq.quant.gptq import damped_cholesky


def inputs(n=512, size=64, seed=0):
    """Correlated, unevenly scaled calibration inputs X (n × size)."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(size, size, generator=g) / size**0.5 + torch.eye(size)
    return (torch.randn(n, size, generator=g) * torch.linspace(0.2, 3, size)) @ mixing


def matrix(out=48, size=64, seed=1):
    return torch.randn(out, size, generator=torch.Generator().manual_seed(seed))


def h_norm(residual, chol):
    return float((residual.double() @ chol.double()).norm() ** 2)


def test_closed_form_step_equals_an_iterative_minimiser():
    """Alternating least squares on ‖(M − B·A)·L‖ (an independent method) reaches the same error."""
    m, chol = matrix().double(), damped_cholesky(inputs().T @ inputs() / 512).double()
    low = activation_svd(m, 4, chol, None, "exact")
    closed = h_norm(m - low.dense(), chol)
    b = torch.randn(48, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    h = chol @ chol.T
    for _ in range(500):  # B-step: (M H Aᵀ)(A H Aᵀ)⁻¹; A-step: (BᵀB)⁻¹ Bᵀ M
        a = torch.linalg.solve(b.T @ b, b.T @ m)
        b = torch.linalg.solve(a @ h @ a.T, a @ h @ m.T).T
    assert closed == pytest.approx(h_norm(m - b @ a, chol), rel=1e-6)
    assert closed < h_norm(
        m - activation_svd(m, 4, torch.eye(64).double(), None, "exact").dense(), chol
    )


@pytest.mark.parametrize("rows", [False, True])
def test_no_perturbed_rank_r_matrix_does_better(rows):
    m, chol = matrix(), damped_cholesky(inputs().T @ inputs() / 512)
    rho = torch.rand(48, generator=torch.Generator().manual_seed(4)) + 0.1 if rows else None
    low = activation_svd(m, 6, chol, rho, "exact")

    def err(d):
        r = (m - d) if rho is None else (m - d) * rho[:, None]
        return h_norm(r, chol)

    best, g = err(low.dense()), torch.Generator().manual_seed(5)
    u, vh = low.U * low.S, low.Vh
    for scale in (1e-3, 1e-2, 1e-1):
        for _ in range(20):
            du, dv = torch.randn(u.shape, generator=g), torch.randn(vh.shape, generator=g)
            assert err(
                (u + scale * du * u.norm() / du.norm()) @ (vh + scale * dv * vh.norm() / dv.norm())
            ) >= best * (1 - 1e-6)


@pytest.mark.parametrize("method", ["lq", "loftq"])
@pytest.mark.parametrize("quant", ["nf3", "nf2", "int4-g32", "q4_1"])
@pytest.mark.parametrize("svd", ["exact", "randomized"])
def test_identity_hessian_is_the_unweighted_algorithm_bit_for_bit(method, quant, svd):
    """H = I, λ = 0: the closed form is svd_r, GPTQ is round to nearest, the error is Frobenius."""
    w = matrix(64, 128)
    plain = DecomposeConfig(method=method, rank=4, quant=quant, svd=svd, iters=4)
    aware = dataclasses.replace(plain, weighting="activations", rounding="gptq", damp=0.0)
    a, b = decompose(w, plain), decompose(w, aware, hessian=torch.eye(128))
    assert a.errors == b.errors and a.best_iter == b.best_iter
    assert torch.equal(a.lora_A, b.lora_A) and torch.equal(a.lora_B, b.lora_B)
    for name, tensor in a.q.tensors().items():
        assert torch.equal(tensor, b.q.tensors()[name]), name


@pytest.mark.parametrize("weighting", ["activations", "both"])
@pytest.mark.parametrize("rounding", ["nearest", "gptq"])
def test_h_norm_error_is_the_measured_output_error(weighting, rounding):
    """λ = 0: err² = tr(R H Rᵀ) = mean over calibration tokens of ‖x·Rᵀ‖² (with ρ: of ρ ⊙ x·Rᵀ)."""
    x, w = inputs(), matrix()
    fisher = (
        torch.rand(w.shape, generator=torch.Generator().manual_seed(6))
        if weighting == "both"
        else None
    )
    config = DecomposeConfig(rank=4, quant="nf3", weighting=weighting, rounding=rounding, damp=0.0)
    d = decompose(w, config, fisher, x.T @ x / x.shape[0])
    out = x.double() @ (w - d.reconstruct()).double().T  # (tokens × out)
    if fisher is not None:
        out = out * fisher.double().mean(1).sqrt()
    assert d.error**2 == pytest.approx(float((out**2).sum(1).mean()), rel=1e-4)


@pytest.mark.parametrize("method", ["lq", "loftq"])
def test_activation_aware_lowers_the_output_error(method):
    x, w = inputs(), matrix()
    h = x.T @ x / x.shape[0]
    chol = damped_cholesky(h, 0.0)
    base = DecomposeConfig(method=method, rank=4, quant="nf3", iters=5)
    errors = {}
    for weighting, rounding in [
        ("none", "nearest"),
        ("activations", "nearest"),
        ("activations", "gptq"),
    ]:
        config = dataclasses.replace(base, weighting=weighting, rounding=rounding)
        d = decompose(w, config, hessian=None if weighting == "none" else h)
        errors[weighting, rounding] = h_norm(w - d.reconstruct(), chol)
    # with round to nearest only the low-rank step knows H (not guaranteed to help); GPTQ does
    nearest = min(errors["none", "nearest"], errors["activations", "nearest"])
    assert errors["activations", "gptq"] < 0.8 * nearest


def explicit_pooling(size, group):
    p = torch.zeros(size // group, size, dtype=torch.float64)
    for k in range(size // group):
        p[k, k * group : (k + 1) * group] = 1 / group
    return p


def test_pooled_step_at_full_rank_is_least_squares_on_the_pooling_matrix():
    """rank ≥ in/G: Z = s·B·A must be the unconstrained minimiser of ‖(R − Z·P)·L‖ (normal eqs.)."""
    r, x = matrix(24, 64).double(), inputs().double()
    chol = damped_cholesky((x.T @ x / x.shape[0]).float()).double()
    p = explicit_pooling(64, 16)  # 4 groups
    lora_B, lora_A = pooled_low_rank(r, chol, 16, 8, 0.5)
    assert lora_B.shape == (24, 4) and lora_A.shape == (4, 4)
    h = chol @ chol.T
    z_star = torch.linalg.solve(p @ h @ p.T, p @ h @ r.T).T
    torch.testing.assert_close(0.5 * lora_B @ lora_A, z_star, rtol=1e-7, atol=1e-9)


def test_pooled_step_beats_perturbed_pooled_adapters():
    r, x = matrix(24, 128), inputs(size=128)
    chol = damped_cholesky(x.T @ x / x.shape[0])
    p = explicit_pooling(128, 16).float()  # 8 groups, rank 3
    lora_B, lora_A = pooled_low_rank(r, chol, 16, 3, 2.0, "exact")

    def err(b, a):
        return h_norm(r - 2.0 * b @ a @ p, chol)

    best, g = err(lora_B, lora_A), torch.Generator().manual_seed(7)
    assert best < h_norm(r, chol)
    for _ in range(40):
        db, da = torch.randn(lora_B.shape, generator=g), torch.randn(lora_A.shape, generator=g)
        assert err(
            lora_B + 1e-2 * db * lora_B.norm() / db.norm(),
            lora_A + 1e-2 * da * lora_A.norm() / da.norm(),
        ) >= best * (1 - 1e-6)


@pytest.mark.parametrize(
    ("config", "fisher", "hessian", "match"),
    [
        (DecomposeConfig(rank=2, weighting="activations"), None, None, "needs hessian="),
        (DecomposeConfig(rank=2, rounding="gptq"), None, None, "needs hessian="),
        (DecomposeConfig(rank=2, weighting="both"), None, torch.eye(64), "needs fisher="),
        (DecomposeConfig(rank=2), None, torch.eye(64), "hessian= was given"),
        (DecomposeConfig(rank=2, weighting="activations"), None, torch.eye(32), r"\(64, 64\)"),
        (
            DecomposeConfig(rank=2, weighting="activations", damp=0.0),
            None,
            -torch.eye(64),
            "not positive definite",
        ),
        (
            DecomposeConfig(rank=2, rounding="gptq", quant="bnb-nf4"),
            None,
            torch.eye(64),
            "GPTQ rounding is not available",
        ),
    ],
)
def test_bad_statistics_are_value_errors(config, fisher, hessian, match):
    with pytest.raises(ValueError, match=match):
        decompose(matrix(), config, fisher, hessian)


def test_pooled_step_returns_no_component_for_a_zero_residual():
    """W = Q (e.g. a GGUF's own codes as the base): nothing to fit, LoRA's init must stay."""
    chol = damped_cholesky(inputs().T @ inputs() / 512)
    lora_B, lora_A = pooled_low_rank(torch.zeros(24, 64), chol, 16, 3, 1.0)
    assert lora_B.shape == (24, 0) and lora_A.shape == (0, 4)

"""Plans calibrated to the KL (docs/algorithms.md §10): the sensitivities α the pipeline measures
block by block, against an independent whole-model finite difference."""

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_bert, tiny_llama

from lorq.calibrate.sensitivity import SENSITIVITY_T, probe_seed
from lorq.config import DAMP, CompressConfig
from lorq.jobs.compress import plan_budgets_for


def _peaked_llama():
    """The tiny LLaMA with a head 30× larger: confident next-token distributions, whose KL a
    small perturbation moves well above float32's resolution."""
    model = tiny_llama()
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)
    return model


def _tokens(n: int = 4, length: int = 32) -> torch.Tensor:
    return torch.randint(0, 128, (n, length), generator=torch.Generator().manual_seed(3))


def _input_grams(model, tokens, names) -> dict[str, torch.Tensor]:
    """XᵀX of every linear layer ``names`` over all tokens, by hooks on the whole model."""
    grams, handles = {}, []
    for name, module in model.named_modules():
        if name in names:

            def keep(_m, args, _out, name=name):
                x = args[0].reshape(-1, args[0].shape[-1]).double()
                grams[name] = grams.get(name, 0) + x.T @ x

            handles.append(module.register_forward_hook(keep))
    with torch.no_grad():
        model(input_ids=tokens)
    for handle in handles:
        handle.remove()
    return grams


def _finite_difference(model, tokens, name: str, gram: torch.Tensor) -> float:
    """KL(p ‖ p̂) / t² with W of ``name`` moved by t‖WL‖/‖GL‖·G, G seeded as the library seeds
    it, L the Cholesky factor of the damped Gram matrix; the whole model run in float64."""
    model = model.double()
    module = model.get_submodule(name)
    weight = module.weight.detach().clone()
    damped = gram + DAMP * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=gram.dtype)
    lower = torch.linalg.cholesky(damped)
    noise = torch.randn(weight.shape, generator=torch.Generator().manual_seed(probe_seed(name, 0)))
    noise = noise.double()
    scale = torch.linalg.norm(weight @ lower) / torch.linalg.norm(noise @ lower)
    with torch.no_grad():
        clean = model(input_ids=tokens)
        module.weight += SENSITIVITY_T * scale * noise
        moved = model(input_ids=tokens)
        module.weight.copy_(weight)
    model.float()
    if not hasattr(clean, "logits"):  # an encoder: 1 − cos of the mean-pooled embeddings
        a, b = clean.last_hidden_state.mean(1), moved.last_hidden_state.mean(1)
        return float((1 - F.cosine_similarity(a, b, dim=-1)).mean()) / SENSITIVITY_T**2
    log_p, log_q = clean.logits.log_softmax(-1), moved.logits.log_softmax(-1)
    kl = F.kl_div(log_q.flatten(0, 1), log_p.flatten(0, 1), log_target=True, reduction="batchmean")
    return float(kl) / SENSITIVITY_T**2


HEAD = {"include": ("proj", "lm_head"), "exclude": ()}  # an untied output layer a target too


@pytest.mark.parametrize("family", ["llama", "llama+head", "bert"])
def test_sensitivities_equal_a_whole_model_finite_difference(family):
    """α of every target, measured block by block on 4 calibration sequences, equals the
    divergence of the whole model with that target alone perturbed (float64, independent H) /
    t²: the KL of a causal LM's next-token distributions, 1 − cos of an encoder's mean-pooled
    embeddings. An untied output layer, made a target, is measured the same way (on X_N)."""
    model, tokens = (tiny_bert() if family == "bert" else _peaked_llama()), _tokens()
    targets = HEAD if family == "llama+head" else {}
    config = CompressConfig(budget=3.0, rank=4, weighting="activations", plan_weighting="kl",
                            **targets)  # fmt: skip
    (plan,) = plan_budgets_for(model, config, [3.0], calibration=tokens)
    alphas = plan.sensitivities
    assert alphas is not None
    assert len(alphas) == {"llama": 14, "llama+head": 15, "bert": 12}[family]
    assert ("lm_head" in alphas) == (family == "llama+head")
    assert ("lm_head" in {e.name for e in plan.entries}) == (family == "llama+head")
    grams = _input_grams(model, tokens, set(alphas))
    expected = {name: _finite_difference(model, tokens, name, grams[name]) for name in alphas}
    floor = 1e-4 * max(expected.values())  # the float32 forwards' noise on the smallest KLs
    for name, alpha in alphas.items():
        assert alpha == pytest.approx(expected[name], rel=2e-3, abs=floor), name
    assert len(set(alphas.values())) == len(alphas)  # every target its own measurement


def test_a_kl_plan_predicts_the_sum_of_its_costs():
    """The plan's predicted KL is Σ α·t² over its entries, t² the H-norm relative error."""
    model, tokens = _peaked_llama(), _tokens()
    config = CompressConfig(budget=3.0, rank=4, weighting="activations", plan_weighting="kl")
    (plan,) = plan_budgets_for(model, config, [3.0], calibration=tokens)
    activations = CompressConfig(budget=3.0, rank=4, weighting="activations")
    (reference,) = plan_budgets_for(model, activations, [3.0], calibration=tokens)
    by_name = {e.name: e for e in reference.entries}
    predicted = 0.0
    for entry in plan.entries:
        same = by_name[entry.name]
        if same.config == entry.config:  # the same candidate: the same H-norm error
            assert entry.error == pytest.approx(entry.norm * same.error / same.norm, rel=1e-9)
        predicted += entry.error
    assert plan.predicted_kl == pytest.approx(predicted)
    assert reference.predicted_kl is None


def test_plan_budgets_plans_from_given_sensitivities():
    """plan_budgets(weighting="kl", sensitivities=α) on the matrices and their H makes the plan
    the pipeline makes with the same α and H; without α it is refused by name."""
    from lorq.budget import plan_budget
    from lorq.jobs.statistics import estimate_hessians
    from lorq.model.targets import dense_weight, targets_of

    model, tokens = _peaked_llama(), _tokens()
    config = CompressConfig(budget=3.0, rank=4, weighting="activations", plan_weighting="kl")
    targets = targets_of(model, config)
    hessians = estimate_hessians(model, tokens, targets)
    (made,) = plan_budgets_for(model, config, [3.0], hessians=hessians, calibration=tokens)
    matrices = {name: dense_weight(m).float() for name, m in targets.items()}
    given = plan_budget(
        matrices, 3.0, rank=4, hessians=hessians, weighting="kl", sensitivities=made.sensitivities
    )
    assert [e.config for e in given.entries] == [e.config for e in made.entries]
    assert given.predicted_kl == pytest.approx(made.predicted_kl, rel=1e-9)
    with pytest.raises(ValueError, match="sensitivities"):
        plan_budget(matrices, 3.0, rank=4, hessians=hessians, weighting="kl")


def test_a_kl_plan_of_ranks_predicts_the_sum_of_its_columns_costs():
    """A KL plan over formats × ranks (§10.1): each entry's cost is α · t² of its own column (the
    activation-weighted plan of the same grid's error over its norm, times α), and the plan
    predicts their sum."""
    from lorq.budget import plan_budget
    from lorq.jobs.statistics import estimate_hessians
    from lorq.model.targets import dense_weight, targets_of

    model, tokens = _peaked_llama(), _tokens()
    config = CompressConfig(budget=3.0, rank=4, weighting="activations")
    targets = targets_of(model, config)
    hessians = estimate_hessians(model, tokens, targets)
    matrices = {name: dense_weight(m).float() for name, m in targets.items()}
    alphas = {name: 1.0 + i for i, name in enumerate(matrices)}
    common = dict(hessians=hessians, ranks=(0, 4), factor_bits=(16, 8))
    plan = plan_budget(matrices, 4.0, "nf2,nf3,nf4", weighting="kl", sensitivities=alphas, **common)
    assert plan.adapters_planned and plan.achieved_total_bits <= 4.0
    for entry in plan.entries:  # the same column priced by the H-norm alone
        (alone,) = plan_budget(
            {entry.name: matrices[entry.name]}, entry.bits_per_param + entry.adapter_bits
            / entry.numel, [entry.config], weighting="activations",
            hessians={entry.name: hessians[entry.name]}, ranks=(entry.rank,),
            factor_bits=(entry.factor_bits or 16,),
        ).entries  # fmt: skip
        expected = alphas[entry.name] * alone.error / alone.norm
        assert entry.error == pytest.approx(expected, rel=1e-9), entry.name
    assert plan.predicted_kl == pytest.approx(sum(e.error for e in plan.entries))

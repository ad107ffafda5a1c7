"""Fisher estimate. Oracle: a naive loop of torch.autograd.grad per sample, squared and summed."""

import pytest
import torch

from lorq.jobs.statistics import estimate_fisher
from lorq.model.targets import dense_weight, find_targets


def naive_fisher(model, batches):
    targets = find_targets(model)
    weights = [m.weight for m in targets.values()]
    for p in model.parameters():
        p.requires_grad_(False)
    for w in weights:
        w.requires_grad_(True)
    total = {name: torch.zeros_like(dense_weight(m)) for name, m in targets.items()}
    for row in batches:
        loss = model(input_ids=row[None], labels=row[None]).loss
        grads = torch.autograd.grad(loss, weights)
        for (name, module), grad in zip(targets.items(), grads, strict=True):
            total[name] += (grad.T if type(module).__name__ == "Conv1D" else grad) ** 2
    for p in model.parameters():
        p.requires_grad_(True)
    return total


@pytest.mark.parametrize("model_name", ["llama", "gpt2"])
def test_equals_naive_per_sample_loop(model_name, request):
    model = request.getfixturevalue(model_name)
    batches = torch.randint(0, 128, (5, 12), generator=torch.Generator().manual_seed(0))
    fisher = estimate_fisher(model, batches)
    expected = naive_fisher(model, batches)
    assert fisher.keys() == expected.keys() and len(fisher) == (14 if model_name == "llama" else 8)
    for name in fisher:
        torch.testing.assert_close(fisher[name], expected[name], rtol=1e-5, atol=1e-10)
        assert fisher[name].shape == dense_weight(find_targets(model)[name]).shape


def test_per_sample_not_batch_gradient(llama):
    batches = torch.randint(0, 128, (4, 12), generator=torch.Generator().manual_seed(1))
    fisher = estimate_fisher(llama, batches)
    name = next(iter(fisher))
    weight = find_targets(llama)[name].weight
    total = sum(llama(input_ids=r[None], labels=r[None]).loss for r in batches)
    (grad,) = torch.autograd.grad(total, [weight])
    assert not torch.allclose(fisher[name], grad**2)  # Σ g² ≠ (Σ g)²
    assert torch.all(fisher[name] >= 0)


def test_model_left_as_it_was(llama):
    llama.train()
    llama.model.embed_tokens.weight.requires_grad_(False)
    before = {n: p.detach().clone() for n, p in llama.named_parameters()}
    flags = {n: p.requires_grad for n, p in llama.named_parameters()}
    estimate_fisher(llama, torch.randint(0, 128, (2, 8)))
    assert llama.training
    for n, p in llama.named_parameters():
        assert torch.equal(p, before[n]) and p.requires_grad == flags[n] and p.grad is None


@pytest.mark.parametrize("shape", [(0, 8), (3,), (2, 1)])
def test_empty_or_malformed_batches(llama, shape):
    with pytest.raises(ValueError, match="calibration batches"):
        estimate_fisher(llama, torch.zeros(shape, dtype=torch.long))


def test_encoder_without_loss_is_rejected():
    from transformers import BertConfig, BertModel

    model = BertModel(
        BertConfig(
            vocab_size=64,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
        )
    )
    with pytest.raises(ValueError, match="causal language model"):
        estimate_fisher(model, torch.randint(0, 64, (2, 8)))

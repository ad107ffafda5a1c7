"""Layer-input Hessians, collected block by block (lorq.calibrate.hessian, through
lorq.estimate_hessians). Oracles: 1/N·XᵀX from inputs computed by hand or captured independently
(forward hooks of the test's own), one group equals many groups, state restored."""

import pytest
import torch
from conftest import captured_inputs, tiny_gpt2, tiny_llama
from torch import nn

from lorq.calibrate.hessian import input_leaders, target_groups
from lorq.jobs.statistics import estimate_hessians
from lorq.model.targets import find_targets


def shared_inputs(model, ids, targets):
    """{target: the first target reading the same input}, from one whole-model forward."""
    return input_leaders(targets, lambda: model(input_ids=ids[:1, :8]))


def blocks(n=2, length=8, vocab=128, seed=0):
    return torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(seed))


def by_hand(inputs):
    """1/N·XᵀX in float64 from a list of (…, in) input tensors."""
    x = torch.cat([t.reshape(-1, t.shape[-1]) for t in inputs]).double()
    return x.T @ x / x.shape[0]


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2])
def test_equals_one_over_n_xtx_of_captured_inputs(build):
    model, ids = build(), blocks()
    targets = find_targets(model)
    hessians = estimate_hessians(model, ids, targets)
    seen = captured_inputs(model, ids, targets)
    assert list(hessians) == list(targets)
    for name, h in hessians.items():
        assert h.dtype == torch.float32 and h.device.type == "cpu"
        torch.testing.assert_close(h.double(), by_hand(seen[name]), rtol=1e-5, atol=1e-6)


def test_first_llama_projection_by_hand():
    """q_proj of block 0 sees RMSNorm(embedding): computed without any hook."""
    model, ids = tiny_llama(), blocks()
    layer = model.model.layers[0]
    h = estimate_hessians(model, ids, {"q": layer.self_attn.q_proj})["q"]
    with torch.no_grad():
        x = layer.input_layernorm(model.model.embed_tokens(ids))
    torch.testing.assert_close(h.double(), by_hand([x]), rtol=1e-5, atol=1e-6)


def test_first_gpt2_conv1d_by_hand():
    """c_attn (a Conv1D, weight stored in × out) of block 0 sees LayerNorm(wte + wpe)."""
    model, ids = tiny_gpt2(), blocks()
    block = model.transformer.h[0]
    h = estimate_hessians(model, ids, {"c_attn": block.attn.c_attn})["c_attn"]
    with torch.no_grad():
        positions = torch.arange(ids.shape[1])
        x = block.ln_1(model.transformer.wte(ids) + model.transformer.wpe(positions))
    assert h.shape == (64, 64)
    torch.testing.assert_close(h.double(), by_hand([x]), rtol=1e-5, atol=1e-6)


def test_groups_give_the_same_result_as_one_pass():
    model, ids = tiny_llama(), blocks()
    targets = find_targets(model)
    calls = []

    def progress(stage, total):
        calls.append((stage, total))
        return lambda steps: None

    budget = 3 * 64 * 64 * 4  # three 64-wide accumulators per group
    one = estimate_hessians(model, ids, targets)
    many = estimate_hessians(model, ids, targets, progress=progress, max_bytes=budget)
    groups = len(target_groups(targets, budget, shared_inputs(model, ids, targets)))
    assert groups > 2 and calls == [("Hessians", len(model.model.layers))]
    for name in targets:
        assert torch.equal(one[name], many[name]), name


def test_linears_reading_one_input_share_one_hessian():
    """q/k/v read the attention norm's output, gate/up the MLP norm's: one tensor each."""
    model, ids = tiny_llama(), blocks()
    targets = find_targets(model)
    leaders = shared_inputs(model, ids, targets)
    hessians = estimate_hessians(model, ids, targets)
    for i in range(len(model.model.layers)):
        p = f"model.layers.{i}."
        for follower, leader in [
            ("k_proj", "q_proj"),
            ("v_proj", "q_proj"),
            ("up_proj", "gate_proj"),
        ]:
            kind = "self_attn." if leader == "q_proj" else "mlp."
            assert leaders[p + kind + follower] == p + kind + leader
            assert hessians.leader(p + kind + follower) == p + kind + leader
            assert torch.equal(hessians[p + kind + follower], hessians[p + kind + leader])
        for alone in ("self_attn.o_proj", "mlp.down_proj", "self_attn.q_proj"):
            assert leaders[p + alone] == p + alone
    assert len({hessians.leader(n) for n in hessians}) == 4 * len(model.model.layers)
    # one lower triangle per distinct input: 3 of 64 wide and 1 of 128 wide per layer
    assert hessians.nbytes == len(model.model.layers) * 4 * (3 * 64 * 65 // 2 + 128 * 129 // 2)


def test_stored_triangles_rebuild_symmetric_hessians_and_pop_frees_them():
    model, ids = tiny_llama(), blocks()
    targets = find_targets(model)
    hessians = estimate_hessians(model, ids, targets)
    seen = captured_inputs(model, ids, targets)
    q, k = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj"
    torch.testing.assert_close(hessians[q].double(), by_hand(seen[q]), rtol=1e-5, atol=1e-6)
    assert torch.equal(hessians[q], hessians[q].T)
    copy, before = hessians.copy(), hessians.nbytes
    assert torch.equal(copy.pop(q), hessians[q]) and copy.nbytes == before  # k still uses it
    copy.pop(k)
    assert copy.nbytes == before  # v_proj still does
    copy.pop(q.replace("q_proj", "v_proj"))
    assert (
        copy.nbytes == before - 4 * 64 * 65 // 2
        and q not in copy
        and k not in copy
        and q in hessians
    )
    assert copy.pop(q, "gone") == "gone"


def test_shared_inputs_stay_in_their_leaders_group():
    model, ids = tiny_llama(), blocks()
    targets = find_targets(model)
    leaders = shared_inputs(model, ids, targets)
    for group in target_groups(targets, 1, leaders):  # every accumulator alone
        assert {leaders[n] for n in group} <= set(group)
        assert len({leaders[n] for n in group}) == 1


def test_target_groups_fit_the_budget():
    model = tiny_llama()
    targets = find_targets(model)  # in = 64 (q/k/v/o, gate, up) or 128 (down_proj)
    groups = target_groups(targets, max_bytes=3 * 64 * 64 * 4)
    assert [n for g in groups for n in g] == list(targets)
    for group in groups:
        sizes = [m.in_features**2 * 4 for m in group.values()]
        assert sum(sizes) <= 3 * 64 * 64 * 4 or len(group) == 1
    assert len(target_groups(targets, max_bytes=1 << 30)) == 1


def test_mode_restored_and_hooks_removed_even_on_failure():
    model = tiny_llama().train()
    targets = find_targets(model)
    estimate_hessians(model, blocks(n=1), targets)
    assert model.training
    with pytest.raises(IndexError):
        estimate_hessians(model, blocks(n=1, vocab=1000, seed=1) + 128, targets)
    assert model.training
    assert all(not m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize(
    ("ids", "targets", "max_bytes", "match"),
    [
        (torch.zeros(5, dtype=torch.long), None, 1, "n × seq_len"),
        (torch.zeros(2, 4), None, 1, "integer"),
        (torch.zeros(0, 4, dtype=torch.long), None, 1, "non-empty"),
        (torch.zeros(1, 4, dtype=torch.long), {}, 1, "no target"),
        (torch.zeros(1, 4, dtype=torch.long), {"norm": nn.LayerNorm(4)}, 1, "not nn.Linear"),
        (torch.zeros(1, 4, dtype=torch.long), None, 0, "max_bytes"),
    ],
)
def test_bad_inputs_are_value_errors(ids, targets, max_bytes, match):
    model = tiny_llama()
    targets = find_targets(model) if targets is None else targets
    with pytest.raises(ValueError, match=match):
        estimate_hessians(model, ids, targets, max_bytes=max_bytes)

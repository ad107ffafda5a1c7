"""The token embedding as a row of a KL plan (``plan_embeddings``, docs/algorithms.md §10).

Oracles: α_E against an independent whole-model float64 finite difference (tied and untied
heads); the row's bits and costs against quantizing E here; the ILP against brute force over a
small table with the row in it; the bytes the plan gives E against the native file's and the
GGUF file's tensors (gguf's own reader); the refusals by their messages."""

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_arch, tiny_causal
from gguf import GGUFReader
from safetensors import safe_open

import lorq
from lorq.budget.choices import Choices
from lorq.budget.cost import cost_table, embedding_row, kl_costs
from lorq.budget.grid import candidate_grid
from lorq.budget.plan import plans_of_table, table_config
from lorq.calibrate.sensitivity import SENSITIVITY_T, probe_seed
from lorq.config import CompressConfig
from lorq.jobs.compress import plan_budgets_for
from lorq.nn import QuantEmbedding
from lorq.pipeline.passes import join_tables

NAME = "model.embed_tokens"
KL = dict(rank=4, weighting="activations", plan_weighting="kl", plan_embeddings=True)


def _tokens(vocab: int = 128, n: int = 4, length: int = 32) -> torch.Tensor:
    return torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(3))


def _model(tied: bool):
    """The tiny LLaMA with a table 5× larger: confident next-token distributions (tied: the
    head is the table)."""
    model = tiny_causal("llama", 0, tie_word_embeddings=tied)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(5.0)
        if not tied:
            model.lm_head.weight.mul_(30.0)
    return model


def _finite_difference(model, tokens) -> float:
    """KL(p ‖ p̂) / t² with E moved by t‖E‖_F/‖G‖_F·G (G seeded as the library seeds it; a tied
    head moved with it), the whole model in float64."""
    model = model.double()
    table = model.get_input_embeddings().weight
    weight = table.detach().clone()
    noise = torch.randn(weight.shape, generator=torch.Generator().manual_seed(probe_seed(NAME, 0)))
    delta = SENSITIVITY_T * torch.linalg.norm(weight) / torch.linalg.norm(noise.double()) * noise
    with torch.no_grad():
        clean = model(input_ids=tokens).logits
        table += delta
        moved = model(input_ids=tokens).logits
        table.copy_(weight)
    model.float()
    log_p, log_q = clean.log_softmax(-1), moved.log_softmax(-1)
    kl = F.kl_div(log_q.flatten(0, 1), log_p.flatten(0, 1), log_target=True, reduction="batchmean")
    return float(kl) / SENSITIVITY_T**2


@pytest.mark.parametrize("tied", [False, True])
def test_the_tables_sensitivity_equals_a_whole_model_finite_difference(tied):
    model, tokens = _model(tied), _tokens()
    config = CompressConfig(budget=3.5, candidates="nf2,nf3,nf4", **KL)
    (plan,) = plan_budgets_for(model, config, [3.5], calibration=tokens)
    assert plan.embedding == NAME and plan.embedding_entry is not None
    alpha = plan.sensitivities[NAME]
    assert alpha == pytest.approx(_finite_difference(model, tokens), rel=2e-3)
    assert len(plan.sensitivities) == 15  # 14 matrices and the table


def test_the_row_holds_each_formats_bits_and_error_and_no_adapter():
    weight = torch.randn(96, 64, generator=torch.Generator().manual_seed(0))
    choices = Choices(tuple(candidate_grid("nf3,q4_0,q8_0")), (0, 4), (16,))
    row = embedding_row(NAME, weight, choices)
    for column, (quant, rank, _) in enumerate(choices.columns):
        q = lorq.quantize(weight, quant)
        error = float(((weight - q.dequantize()) ** 2).sum())
        assert row.cost[0, column] == pytest.approx(error, rel=1e-5)
        assert row.bits[0, column] == (np.inf if rank else 8 * q.nbytes)
    assert row.norms[0] == pytest.approx(float((weight**2).sum()), rel=1e-6)
    relative = kl_costs(row, {NAME: 2.0}).cost[0, 0] / 2.0
    assert relative == pytest.approx(row.cost[0, 0] / row.norms[0])


def test_the_plan_with_the_table_is_optimal_for_its_costs():
    """Three matrices and the table × (3 formats × ranks 0, 4): the ILP's choice at every budget
    is the cheapest of all 6³ · 3 feasible combinations (the table's rank-4 columns never)."""
    g = torch.Generator().manual_seed(1)
    matrices = {f"m{i}": torch.randn(48, 64, generator=g) for i in range(3)}
    choices = Choices(tuple(candidate_grid("nf2,nf3,nf4")), (0, 4), (16,))
    table = cost_table(matrices, choices, "lq", table_config("lq", 4, 1, "none", "nearest"))
    table = join_tables([table, embedding_row(NAME, torch.randn(128, 64, generator=g), choices)])
    alphas = {**{name: 1.0 + i for i, name in enumerate(matrices)}, NAME: 3.0}
    table = kl_costs(table, alphas)
    shapes = {**{n: (48, 64) for n in matrices}, NAME: (128, 64)}
    for budget in (2.6, 3.0, 3.6, 4.4):
        (plan,) = plans_of_table(table, shapes, [budget], ("lq", 4, ("kl", "nearest")), 0.0)
        best = min(
            table.cost[range(4), combo].sum()
            for combo in itertools.product(range(len(choices.columns)), repeat=4)
            if table.bits[range(4), combo].sum() <= budget * table.numels.sum()
        )
        assert plan.total_error == pytest.approx(best, rel=1e-9)
        assert table.bits[3, [c == plan.entries[3].config for c in table.candidates]].min() < np.inf


def test_compress_packs_the_planned_table_with_the_bytes_the_files_hold(tmp_path):
    """A tied 256-wide model, GGUF formats: the table becomes a QuantEmbedding of the planned
    format (the tied head over it), whose bytes are the plan's and the native and GGUF files'."""
    model, tokens = tiny_arch("llama", tie_word_embeddings=True), _tokens(320)
    config = CompressConfig(budget=5.0, candidates="q4_0,q5_0,q8_0", **KL)
    result = lorq.compress_model(model, config, calibration=tokens, eval_blocks=0, baseline=False)
    entry = result.plan.embedding_entry
    table = result.model.get_input_embeddings()
    assert isinstance(table, QuantEmbedding) and table.quant_config == entry.config
    assert 8 * table.q.nbytes == entry.bits
    lorq.save(result.model, tmp_path / "native")
    with safe_open(str(tmp_path / "native" / "model.safetensors"), "pt") as f:
        stored = sum(f.get_tensor(k).nbytes for k in f.keys() if k.startswith(f"{NAME}."))  # noqa: SIM118
    assert 8 * stored == entry.bits
    lorq.export(result.model, tmp_path / "m.gguf", "gguf", tokenizer=None)
    token_embd = next(
        t for t in GGUFReader(tmp_path / "m.gguf").tensors if t.name == "token_embd.weight"
    )
    assert 8 * int(token_embd.n_bytes) == entry.bits


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (dict(plan_weighting="fisher"), "plan_weighting='kl'"),
        (dict(embeddings="q8_0"), "not both"),
        (dict(plan_ranks=(4, 8)), "must include 0"),
    ],
)
def test_refusals(fields, message):
    with pytest.raises(ValueError, match=message):
        CompressConfig(budget=3.0, **{**KL, **fields})
    with pytest.raises(ValueError, match="budget"):
        CompressConfig(quant="nf4", plan_embeddings=True)

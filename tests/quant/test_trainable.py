"""What recovery may train in each format (``QuantFormat.trainable``, lorq.quant.trainable).

Oracles, for every preset: the bases reproduce the format's own decode exactly; storing the
values as they are gives the same bytes; trained values are stored on the format's grid (a fresh
``trainable`` of the stored tensor reads back exactly the rounded values, and the format decodes
them to the trained Q); every byte that is not a trainable parameter — the codes, integer zeros,
K-quant sub-scales, second-level maxima — stays as it was; the straight-through gradient of a
value is the sum of its group's basis times the upstream gradient.
"""

from __future__ import annotations

import pytest
import torch

from lorq.quant import GGMLConfig, format_of, presets, quantize

WEIGHT = torch.randn(32, 512, generator=torch.Generator().manual_seed(0)) * 0.02
NAMES = list(presets())
# the buffers that hold trainable values (GGUF blocks: only the bytes of their fp16 fields)
PARAMETER_BUFFERS = {"nf": ("scales", "scales.codes"), "int": ("scales",),
                     "fmin": ("scales", "zeros"), "bnb": ("absmax",)}  # fmt: skip


def tensor_of(name: str):
    return quantize(WEIGHT, presets()[name])


def perturbed(values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return {
        k: v * (1 + 0.05 * torch.randn(v.shape, generator=generator)) for k, v in values.items()
    }


@pytest.mark.parametrize("name", NAMES)
def test_the_bases_decode_exactly_and_storing_as_is_changes_no_byte(name):
    q = tensor_of(name)
    trainable = format_of(q.config).trainable(q)
    assert tuple(trainable.values) == format_of(q.config).trainable_keys(q.config)
    assert torch.equal(trainable.decode(trainable.values), q.dequantize())
    stored = trainable.store(trainable.values)
    for key, tensor in q.buffers.items():
        assert torch.equal(stored.buffers[key], tensor), key


@pytest.mark.parametrize("name", NAMES)
def test_trained_values_are_stored_on_the_grid_and_nothing_else_moves(name):
    q = tensor_of(name)
    fmt = format_of(q.config)
    trainable = fmt.trainable(q)
    trained = perturbed(trainable.values)
    stored = trainable.store(trained)
    again = fmt.trainable(stored)
    rounded = trainable.round(trained)
    for key in trained:
        assert torch.equal(again.values[key], rounded[key]), key
        assert not torch.equal(rounded[key], trainable.values[key]), key  # the values moved
    torch.testing.assert_close(stored.dequantize(), trainable.decode(trained), rtol=1e-6, atol=1e-9)
    if isinstance(q.config, GGMLConfig):
        fields = [at + i for _, at in q.config.block_type.fields for i in (0, 1)]
        keep = [i for i in range(q.config.block_type.nbytes) if i not in fields]
        before, after = (
            t.buffers["blocks"].view(-1, q.config.block_type.nbytes) for t in (q, stored)
        )
        assert torch.equal(before[:, keep], after[:, keep])
        return
    for key, tensor in q.buffers.items():
        if key not in PARAMETER_BUFFERS[q.config.FORMAT]:
            assert torch.equal(stored.buffers[key], tensor), key


@pytest.mark.parametrize("name", ["nf3", "q4_k", "int4-g32", "q4_1", "bnb-nf4"])
def test_the_straight_through_gradient_is_the_groups_basis_times_the_upstream(name):
    q = tensor_of(name)
    trainable = format_of(q.config).trainable(q)
    values = {k: v.clone().requires_grad_(True) for k, v in trainable.values.items()}
    upstream = torch.randn(q.shape, generator=torch.Generator().manual_seed(2))
    (trainable.decode(values) * upstream).sum().backward()
    for key, value in values.items():
        basis = trainable.basis[key].reshape(value.numel(), -1)
        expected = (basis * upstream.reshape(value.numel(), -1)).sum(1)
        torch.testing.assert_close(value.grad, expected)

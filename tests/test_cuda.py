"""The same code on a GPU (skipped without one). Oracle: the CPU results, bit for bit where the
arithmetic is the same."""

import pytest
import torch

from lorq import DecomposeConfig, QuantConfig, decompose, quantize
from lorq.config import CompressConfig
from lorq.jobs.compress import compress
from lorq.nn import QuantLoraLinear

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("preset", ["nf4", "nf3", "nf2", "nf4-fp32-scales", "int4-g32", "q4_1"])
def test_quantize_on_gpu_equals_cpu(heavy_tailed, preset):
    cpu = quantize(heavy_tailed, preset)
    gpu = quantize(heavy_tailed.cuda(), preset)
    for name, tensor in cpu.tensors().items():
        assert torch.equal(gpu.tensors()[name].cpu(), tensor), name
    torch.testing.assert_close(gpu.dequantize().cpu(), cpu.dequantize(), rtol=0, atol=1e-6)
    assert torch.equal(cpu.to("cuda").dequantize().cpu(), gpu.dequantize().cpu())


def test_decompose_and_layer_on_gpu(gaussian):
    config = DecomposeConfig(rank=8, quant=QuantConfig.preset("nf3"), iters=3)
    d = decompose(gaussian.cuda(), config)
    assert d.lora_A.is_cuda and d.error < float(
        (quantize(gaussian, "nf3").dequantize() - gaussian).norm()
    )
    layer = QuantLoraLinear.from_decomposition(d)
    x = torch.randn(4, 512, device="cuda")
    torch.testing.assert_close(layer(x), x @ d.reconstruct().T, rtol=1e-3, atol=1e-3)
    assert layer(x.bfloat16()).dtype == torch.bfloat16


def test_compress_save_load_on_gpu(llama, tmp_path):
    from lorq.io import load, save

    model = llama.cuda()
    compress(model, CompressConfig(quant="nf4", rank=4))
    ids = torch.randint(0, 128, (2, 12), device="cuda")
    with torch.no_grad():
        logits = model(ids).logits
    save(model, tmp_path / "m")
    back = load(tmp_path / "m", device="cuda")
    with torch.no_grad():
        assert torch.equal(back(ids).logits, logits)

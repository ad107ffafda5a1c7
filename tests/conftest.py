import pytest
import torch


@pytest.fixture
def gaussian() -> torch.Tensor:
    """A seeded Gaussian weight, shape (128, 512)."""
    g = torch.Generator().manual_seed(0)
    return torch.randn(128, 512, generator=g)


@pytest.fixture
def heavy_tailed() -> torch.Tensor:
    """A seeded Student-t (3 degrees of freedom) weight, shape (128, 512)."""
    torch.manual_seed(1)
    return torch.distributions.StudentT(3.0).sample((128, 512))

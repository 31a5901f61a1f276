"""Shared fixtures for the core-model tests (kept small on purpose)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same RNG state, so failures reproduce."""
    torch.manual_seed(0)
    yield


@pytest.fixture
def randomize():
    """``randomize(module, std=0.5, seed=0)``: overwrite EVERY parameter with N(0, std^2) noise.

    Used where a zero-initialised parameter (biases, position embeddings, LayerNorm affine)
    would otherwise make an equivalence test pass trivially.
    """

    def _randomize(module: torch.nn.Module, std: float = 0.5, seed: int = 0) -> torch.nn.Module:
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in module.parameters():
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype) * std)
        return module

    return _randomize

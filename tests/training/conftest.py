"""Fixtures for the training tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

# Two code paths that compute the same function (packed vs per sample, padded vs tight) round
# differently in float32, by amounts that depend on GEMM blocking, the CPU's SIMD width and the
# thread count. In float64 that rounding is ~1e-15, so EXACT_F64 is a bound that holds on any
# machine while every real bug (a leak between samples, a wrong mask: >= 1e-3) still fails it.
EXACT_F64 = 1e-10


@pytest.fixture
def float64() -> Iterator[None]:
    """Run the test with float64 as torch's default dtype (models, randn, tensors)."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(before)

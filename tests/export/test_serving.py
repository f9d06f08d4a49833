"""Serving helpers: vLLM's rank buckets and exact zero-row padding."""

import pytest
import torch

from lorasoup.adapters import LoraFactors
from lorasoup.export.serving import next_bucket, pad_factors


def test_vllm_buckets():
    assert [next_bucket(r) for r in (1, 8, 9, 64, 65, 300, 512)] == [8, 8, 16, 64, 128, 320, 512]
    with pytest.raises(ValueError):
        next_bucket(513)


def test_pad_factors_keeps_the_update_and_casts():
    g = torch.Generator().manual_seed(0)
    factors = LoraFactors(torch.randn(3, 5, generator=g), torch.randn(7, 3, generator=g), 1.0)
    padded = pad_factors(factors, 8, torch.float64)
    assert padded.rank == 8 and padded.A.dtype == padded.B.dtype == torch.float64
    torch.testing.assert_close(padded.delta(torch.float64), factors.delta(torch.float64))
    with pytest.raises(ValueError):
        pad_factors(factors, 2)

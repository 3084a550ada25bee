"""The weight loader's finiteness check: one min/max pass must catch what isfinite catches."""

from __future__ import annotations

import pytest
import torch

from llmquant.loading.weights import _all_finite


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("where", [0, 777, -1])
def test_any_non_finite_value_is_found(bad, where):
    t = torch.randn(40, 50)
    assert _all_finite(t)
    t.view(-1)[where] = bad
    assert not _all_finite(t)
    assert not _all_finite(t.to(torch.bfloat16).to(torch.float32))


def test_extremes_that_are_finite_pass():
    t = torch.tensor([torch.finfo(torch.float32).max, torch.finfo(torch.float32).min, 0.0, -0.0])
    assert _all_finite(t) and _all_finite(torch.empty(0, 3))

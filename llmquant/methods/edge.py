"""The numpy edge of the methods: where a tensor leaves its device for numpy, and comes back.

The methods compute on whatever device their tensors are on (the CPU or a
GPU); the formats' ``rtn``, ``pack`` and ``dequantize`` and llama.cpp's
k-quant searches take numpy arrays. Every crossing goes through these two
functions, so a GPU run moves exactly what numpy needs and nothing is left
on the CPU by accident (``tests/test_device.py`` holds the methods to it).
"""

from __future__ import annotations

import numpy as np
import torch


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """A tensor as a numpy array (copied to the CPU where it lives elsewhere, shared where it is there)."""
    return t.detach().cpu().numpy()


def to_torch(a: np.ndarray, like: torch.Tensor | torch.device) -> torch.Tensor:
    """A numpy array as a tensor on ``like``'s device (shared memory on the CPU, as ``torch.from_numpy``)."""
    device = like.device if isinstance(like, torch.Tensor) else like
    return torch.from_numpy(a).to(device)

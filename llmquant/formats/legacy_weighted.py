"""The legacy types' searches with an importance matrix (``quantize_row_q{4,5}_{0,1}_impl``), in torch.

Without an imatrix llama.cpp rounds each 32-wide block from its extreme (``rtn_torch``
of each format). With one it runs another quantizer: every element gets the weight
``qw[j] · sqrt(sigma2 + x[j]²)``, where ``qw`` is the column's importance and
``sigma2`` the mean square of the element's *whole row*, and the block's scale
is searched for the least weighted squared error — ``make_qx_quants`` for the
symmetric q4_0/q5_0, ``make_qkx3_quants`` (36 candidate steps from -0.9 by 0.05)
for q4_1/q5_1, which have a min. q8_0 ignores the matrix. The sums run in C's
float32 order (``torch_grid.row_sum``) because the searches' comparisons
depend on their last bits. Everything runs on the rows' device (on a CPU in
the calling thread alone, ``torch_grid.serial``).
"""

from __future__ import annotations

import torch

from . import torch_grid as tg
from .qkx_search import make_qkx_quants
from .torch_grid import Projection

BLOCK = 32


def element_weights(rows: torch.Tensor, importance: torch.Tensor) -> torch.Tensor:
    """rows float32 [r, c], importance float32 [c] -> float32 [r·c/32, 32], the search's weights."""
    x2 = rows * rows
    sigma2 = tg.row_sum(x2) / tg.const(float(rows.shape[1]), rows)
    weights = importance.to(device=rows.device, dtype=torch.float32)[None, :] * tg.sqrt(sigma2[:, None] + x2)
    return weights.reshape(-1, BLOCK)


def symmetric(rows: torch.Tensor, importance: torch.Tensor, nmax: int) -> tuple[torch.Tensor, Projection]:
    """q4_0 (nmax 8) and q5_0 (nmax 16): rows float32 [r, c], importance float32 [c]
    -> codes int32 [r·c/32, 32] in [-nmax, nmax - 1] and the searched scale stored as fp16
    (inf past its range, as llama.cpp)."""
    x = rows.to(torch.float32)
    with tg.serial(x):
        codes, d = tg.make_qx_quants(x.reshape(-1, BLOCK), nmax, element_weights(x, importance))
    return codes, Projection(scales=tg.f16_round(d, saturate=False))


def with_min(rows: torch.Tensor, importance: torch.Tensor, nmax: int) -> tuple[torch.Tensor, Projection]:
    """q4_1 (nmax 15) and q5_1 (nmax 31): rows float32 [r, c], importance float32 [c]
    -> levels int32 [r·c/32, 32] in [0, nmax] and ``w = d·level + m`` (m = −the_min), d and m fp16."""
    x = rows.to(torch.float32)
    with tg.serial(x):
        levels, d, the_min = make_qkx_quants(x.reshape(-1, BLOCK), element_weights(x, importance), nmax,
                                             -0.9, 0.05, 36, False)
    return levels, Projection(scales=tg.f16_round(d, saturate=False), mins=tg.f16_round(-the_min, saturate=False))

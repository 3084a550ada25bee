"""ggml block formats; importing this package registers every one of them."""

from . import q2_k, q3_k, q4, q4_k, q5, q6_k, q8_0  # noqa: F401  (imported for registration)
from .base import BlockFormat, QuantBlocks, block_formats, get_format

__all__ = ["BlockFormat", "QuantBlocks", "block_formats", "get_format"]

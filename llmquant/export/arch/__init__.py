"""Architecture specs; importing this package registers every supported family."""

from . import llama  # noqa: F401  (registers llama, mistral, qwen2)
from .base import ArchSpec, config_int, get_arch, supported_architectures

__all__ = ["ArchSpec", "config_int", "get_arch", "supported_architectures"]

"""Architecture specs; importing this package registers every supported family."""

from . import gemma3, llama, phi3, qwen3  # noqa: F401  (registers gemma3, llama, mistral, phi3, qwen2, qwen3)
from .base import ArchSpec, config_int, get_arch, supported_architectures

__all__ = ["ArchSpec", "config_int", "get_arch", "supported_architectures"]

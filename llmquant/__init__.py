"""llmquant: Hugging Face causal LMs -> GGUF files that llama.cpp runs, with GPTQ/AWQ on ggml grids."""

__version__ = "0.1.0"

from .gc_pause import paused_gc  # noqa: E402

with paused_gc():  # torch's import allocates a few hundred thousand objects
    from .api import quantize  # noqa: E402
    from .calibration import CalibrationConfig  # noqa: E402
    from .errors import LlmquantError  # noqa: E402
    from .imatrix import compute_imatrix  # noqa: E402
    from .report import QuantReport  # noqa: E402

__all__ = ["quantize", "compute_imatrix", "CalibrationConfig", "LlmquantError", "QuantReport", "__version__"]

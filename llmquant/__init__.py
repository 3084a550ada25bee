"""llmquant: Hugging Face causal LMs -> GGUF files that llama.cpp runs, with GPTQ/AWQ on ggml grids."""

__version__ = "0.1.0"

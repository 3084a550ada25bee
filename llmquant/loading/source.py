"""Resolve what the user named (hub id, local folder, nothing) to a checkpoint folder.

Only metadata and safetensors are fetched from a hub; weights are then read
lazily, so resolving never loads a model into memory.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import LlmquantError

# everything but weights; the weights are then the files transformers would load (see weights.py)
_HUB_PATTERNS = ["*.json", "tokenizer.model", "*.jinja", "*.txt", "*.tiktoken"]


def resolve_model(model: str | Path | None) -> Path:
    """A local folder holding config.json for ``model``.

    None means the default model (SmolLM2-135M-Instruct, shipped offline); the
    name of a built-in model (``gemma3-270m``, ...) that model, prepared once
    from its package. Any other string that is not an existing path is treated
    as a hub id.
    """
    if model is None or str(model) == "":
        from .default_model import default_model_dir

        return default_model_dir()
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise LlmquantError(f"{path} is a file, not a model folder (expected a folder with config.json)")
        if not (path / "config.json").is_file():
            raise LlmquantError(f"{path} has no config.json: not a Hugging Face model folder")
        return path
    text = str(model)
    from .default_model import BUILTIN_MODELS, builtin_model, builtin_model_dir

    if builtin_model(text) is not None:
        return builtin_model_dir(text)
    if text.count("/") != 1 or text.startswith((".", "/", "~")):
        names = ", ".join(m.name for m in BUILTIN_MODELS)
        raise LlmquantError(f"model {text!r} not found: no such folder, no built-in model ({names}), "
                            "and not a hub id of the form org/name")
    return _download(text)


def _download(repo_id: str) -> Path:
    """Metadata and model.safetensors first; the index's shards only without it (transformers' order).

    Never every *.safetensors: repos also carry copies such as consolidated.safetensors.
    """
    from .weights import INDEX_FILE, SINGLE_FILE, read_weight_map

    path = _snapshot(repo_id, [*_HUB_PATTERNS, SINGLE_FILE])
    if not (path / "config.json").is_file():
        raise LlmquantError(f"hub repo {repo_id!r} has no config.json")
    if not (path / SINGLE_FILE).is_file() and (path / INDEX_FILE).is_file():
        path = _snapshot(repo_id, [*_HUB_PATTERNS, *sorted(set(read_weight_map(path / INDEX_FILE).values()))])
    return path


def _snapshot(repo_id: str, patterns: list[str]) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as exc:  # network, auth, missing repo: all mean "cannot get it"
        raise LlmquantError(f"cannot fetch model {repo_id!r} from the Hugging Face hub: {_hub_reason(exc)}") from None


def _hub_reason(exc: Exception) -> str:
    """A short reason for a failed hub download (the library's own messages run to paragraphs)."""
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    if isinstance(exc, GatedRepoError):
        return "the repository is gated: accept its terms on the hub and log in (hf auth login)"
    if isinstance(exc, RepositoryNotFoundError):
        return "no such repository (or it is private: log in with hf auth login)"
    if isinstance(exc, LocalEntryNotFoundError):
        return "not in the local cache, and the hub cannot be reached (offline: HF_HUB_OFFLINE or no network)"
    text = " ".join(str(exc).split())
    return (text[:197] + "...") if len(text) > 200 else text or type(exc).__name__


def read_config(model_dir: Path) -> dict:
    """The model's config as the spec reads it, with a one-line error when it is unreadable.

    That is config.json, except for a checkpoint whose architecture's spec quantizes the language
    model inside it (``spec.text_config``: Gemma3ForConditionalGeneration): then the language model's
    config, as transformers builds it from that key (its defaults filled in: the releases' text
    configs leave most sizes to them), under the top level's ``architectures`` and (where given)
    ``tie_word_embeddings``, the one transformers ties the wrapper's head by (and the key itself, as
    config.json has it).
    """
    try:
        cfg = json.loads((model_dir / "config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LlmquantError(f"cannot read {model_dir / 'config.json'}: {exc}") from None
    if not isinstance(cfg, dict):
        raise LlmquantError(f"{model_dir / 'config.json'} is not a JSON object")
    if "text_config" not in cfg:
        return cfg
    from ..export.arch import get_arch

    key = get_arch(cfg).text_config
    return cfg if key is None else _language_model_config(model_dir, cfg, key)


def _language_model_config(model_dir: Path, cfg: dict, key: str) -> dict:
    if not isinstance(cfg.get(key), dict):
        raise LlmquantError(f"config.json has {key}={json.dumps(cfg.get(key))}; expected an object")
    try:
        from transformers import AutoConfig

        text = getattr(AutoConfig.from_pretrained(model_dir), key).to_dict()
    except Exception as exc:  # transformers' own validation of the config: any failure means "unreadable"
        reason = " ".join(str(exc).split())
        reason = (reason[:297] + "...") if len(reason) > 300 else reason or type(exc).__name__
        raise LlmquantError(f"cannot read the language model's config ({key} of {model_dir / 'config.json'}): "
                            f"{reason}") from None
    merged = {k: v for k, v in text.items() if not k.startswith("_") and k not in ("architectures", "tie_word_embeddings")}
    for k in ("architectures", "tie_word_embeddings", "_name_or_path", key):  # key: as config.json has it
        if k in cfg:
            merged[k] = cfg[k]
    return merged

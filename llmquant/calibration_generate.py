"""Calibration sequences sampled from the full-precision model itself.

A quantizer calibrated on one corpus learns that corpus' activations. The
model's own samples (LLM-QAT, arXiv 2305.17888, data-free QAT) cover what the
model puts probability on, whatever it was trained for, and need no text at
all. Two kinds:

- ``generated``: each sequence starts from the tokenizer's BOS token and is
  sampled at temperature 1 (no top-k or top-p, so the model's own distribution)
  for ``seqlen`` tokens; end-of-sequence tokens are not allowed to end it early.
- ``chat``: the model's own chat template around a user turn (a sentence of the
  built-in calibration text), then the assistant's sampled reply: what an
  instruct model sees and says when it is used.

Sampling is seeded per batch and cached under ``<cache>/calibration`` by model
content and every setting (thread count included: the batched matmuls sum in an
order set by it, and a sampled token can flip on the last bit), so a repeated or
resumed run reuses the very same tokens.

Sampling is a whole forward pass per token, so it cannot walk the model one
layer at a time as quantization does. The model is first written, streamed as
every run is, to a q8_0 GGUF in a temporary folder of the cache, and llama.cpp
samples from that file (``llamacpp_sampler.py``): it memory-maps the weights,
which a float32 torch model of the same checkpoint would hold four times over.
The file is deleted once the sequences are cached. q8_0's logits sit close to
the checkpoint's, so the samples are the model's own to within that rounding
(docs/benchmarks.md, generated calibration).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from .errors import LlmquantError

TEMPERATURE = 1.0
BATCH = 32  # sequences sampled at once: wider batches amortize the per-token step on a CPU
KINDS = ("generated", "chat")
_CACHE_VERSION = 2  # bump when the sampling changes, so old caches are not reused


def generated_windows(model_dir: Path, n: int, seqlen: int, seed: int, *, kind: str = "generated",
                      batch: int = BATCH, progress: bool = False) -> torch.Tensor:
    """Token ids [n, seqlen] sampled from the model, read from the cache when it holds them."""
    if kind not in KINDS:
        raise LlmquantError(f"unknown generated source {kind!r}; use one of {', '.join(KINDS)}")
    if n == 0:
        return torch.empty(0, seqlen, dtype=torch.long)
    path = cache_path(model_dir, n, seqlen, seed, kind=kind, batch=batch)
    if path.exists():
        from safetensors.torch import load_file

        ids = load_file(path)["ids"]
        if tuple(ids.shape) == (n, seqlen):
            return ids
    ids = _sample(model_dir, n, seqlen, seed, kind=kind, batch=batch, progress=progress)
    _store(path, ids)
    return ids


def cache_path(model_dir: Path, n: int, seqlen: int, seed: int, *, kind: str, batch: int) -> Path:
    """Where these settings' samples live: one file per (model content, settings)."""
    from .loading.default_model import cache_root
    from .workdir import fingerprint

    files = sorted(Path(model_dir).glob("*.safetensors"))
    key = fingerprint(Path(model_dir), files, {
        "kind": kind, "n": n, "seqlen": seqlen, "seed": seed, "batch": batch, "temperature": TEMPERATURE,
        "threads": torch.get_num_threads(), "sampler": f"llama.cpp {_llama_cpp_version()} q8_0",
        "version": _CACHE_VERSION})
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
    return cache_root() / "calibration" / f"{kind}-{digest}.safetensors"


def _llama_cpp_version() -> str:
    try:
        from llama_cpp import __version__
    except ImportError:
        return "absent"
    return __version__


def _store(path: Path, ids: torch.Tensor) -> None:
    from safetensors.torch import save

    from .paths import check_writable, write_atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    check_writable(path, "calibration cache")
    write_atomic(path, save({"ids": ids.contiguous()}))


def _prompts(tok, n: int, seed: int, kind: str, model_dir: Path) -> list[list[int]]:
    """The start of every sequence: BOS alone, or a templated user turn with the assistant's header."""
    if kind == "generated":
        if tok.bos_token_id is None:
            raise LlmquantError(f"the tokenizer of {model_dir} has no BOS token to start generated calibration from; "
                                "use --calib-source builtin or file:PATH")
        return [[tok.bos_token_id]] * n
    if not getattr(tok, "chat_template", None):
        raise LlmquantError(f"the tokenizer of {model_dir} has no chat template, which --calib-source chat needs; "
                            "use --calib-source generated or builtin")
    seeds = _seed_sentences()
    g = torch.Generator().manual_seed(seed)
    pick = torch.randint(len(seeds), (n,), generator=g).tolist()
    out = []
    for i in pick:
        ids = tok.apply_chat_template([{"role": "user", "content": seeds[i]}], add_generation_prompt=True,
                                      tokenize=True, return_dict=False)
        out.append(list(ids["input_ids"] if isinstance(ids, dict) else ids))
    return out


def _seed_sentences() -> list[str]:
    """User turns for the chat source: the first sentence of each paragraph of the built-in calibration text."""
    from .text import default_text

    out = []
    for para in default_text("calib").split("\n\n"):
        line = " ".join(para.split())
        first = line.split(". ")[0].strip()
        if 20 <= len(first) <= 300 and first[0].isalpha():
            out.append(first.rstrip(".") + ".")
    return out


def _sample(model_dir: Path, n: int, seqlen: int, seed: int, *, kind: str, batch: int,
            progress: bool) -> torch.Tensor:
    import tempfile

    from tqdm import tqdm
    from transformers import AutoTokenizer

    from .api import quantize
    from .llamacpp_sampler import sample_sequences
    from .loading.default_model import cache_root
    from .quiet import quiet_transformers

    with quiet_transformers():
        tok = AutoTokenizer.from_pretrained(model_dir)
    prompts = _prompts(tok, n, seed, kind, model_dir)
    if max(len(p) for p in prompts) >= seqlen:
        raise LlmquantError(f"--calib-seqlen {seqlen} leaves no room to generate after the chat template's "
                            f"{max(len(p) for p in prompts)}-token prompt; use a longer --calib-seqlen")
    rows: list[torch.Tensor] = []
    seen: set[bytes] = set()
    root = cache_root() / "calibration"
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix="sampler-") as tmp:
        gguf = Path(tmp) / "model-q8_0.gguf"
        quantize(model_dir, gguf, type="q8_0", method="rtn", pure=True, progress=False)
        with tqdm(total=sum(seqlen - len(p) for p in prompts), desc=f"{kind} calibration", unit="tok",
                  disable=not progress, dynamic_ncols=True) as bar:
            for b, start in enumerate(range(0, 4 * n, batch)):  # duplicates are dropped and sampled again, within reason
                if len(rows) >= n:
                    break
                chunk = [prompts[(start + j) % n] for j in range(min(batch, 4 * n - start))]
                ids = sample_sequences(gguf, chunk, seqlen, seed * 1_000_003 + b, temperature=TEMPERATURE,
                                       threads=torch.get_num_threads(), on_step=bar.update)
                for row in ids:
                    key = row.numpy().tobytes()
                    if key not in seen and len(rows) < n:
                        seen.add(key)
                        rows.append(row)
    if len(rows) < n:
        raise LlmquantError(f"the model sampled only {len(rows)} distinct calibration sequences of {n}; "
                            "use --calib-source builtin or file:PATH")
    return torch.stack(rows)

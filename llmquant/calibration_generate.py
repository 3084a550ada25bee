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

The whole model is loaded once, in float32, on the CPU. That bounds the source
to models that fit in memory; for a bigger one, sample text with llama.cpp from
a q8_0 file and pass it as ``file:PATH``.
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
_CACHE_VERSION = 1  # bump when the sampling changes, so old caches are not reused


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
        "threads": torch.get_num_threads(), "torch": torch.__version__, "version": _CACHE_VERSION})
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
    return cache_root() / "calibration" / f"{kind}-{digest}.safetensors"


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
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .quiet import quiet_transformers
    from .threads import warm_vector_math

    with quiet_transformers():
        tok = AutoTokenizer.from_pretrained(model_dir)
    prompts = _prompts(tok, n, seed, kind, model_dir)
    if max(len(p) for p in prompts) >= seqlen:
        raise LlmquantError(f"--calib-seqlen {seqlen} leaves no room to generate after the chat template's "
                            f"{max(len(p) for p in prompts)}-token prompt; use a longer --calib-seqlen")
    with quiet_transformers():
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    pad = next(t for t in (tok.pad_token_id, tok.eos_token_id, 0) if t is not None)
    warm_vector_math()
    rows: list[torch.Tensor] = []
    seen: set[bytes] = set()
    starts = range(0, 4 * n, batch)  # duplicates are dropped and sampled again, within reason
    with tqdm(total=n, desc=f"{kind} calibration", unit="seq", disable=not progress, dynamic_ncols=True) as bar:
        for b, start in enumerate(starts):
            if len(rows) >= n:
                break
            chunk = [prompts[(start + j) % n] for j in range(min(batch, 4 * n - start))]
            for row in _sample_batch(model, chunk, seqlen, pad, seed * 1_000_003 + b):
                key = row.numpy().tobytes()
                if key not in seen and len(rows) < n:
                    seen.add(key)
                    rows.append(row)
                    bar.update(1)
    if len(rows) < n:
        raise LlmquantError(f"the model sampled only {len(rows)} distinct calibration sequences of {n}; "
                            "use --calib-source builtin or file:PATH")
    return torch.stack(rows)


@torch.no_grad()
def _sample_batch(model, prompts: list[list[int]], seqlen: int, pad: int, seed: int) -> list[torch.Tensor]:
    """One batch of prompts (left-padded), each continued to exactly ``seqlen`` tokens in all."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    new = seqlen - min(len(p) for p in prompts)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=TEMPERATURE,
                             top_k=0, top_p=1.0, repetition_penalty=1.0, max_new_tokens=new, min_new_tokens=new, pad_token_id=pad)
    return [out[i, width - len(p):][:seqlen].clone() for i, p in enumerate(prompts)]

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

Sampling goes in whole batches of ``batch`` sequences, each seeded by its
index and cached on its own under ``<cache>/calibration`` by model content and
every setting (thread count included: llama.cpp's sums split by it, and a
sampled token can flip on the last bit). So a repeated or resumed run reuses
the very same tokens, and 16 windows are the first 16 of 32: a run of 16 and
a later one of 32 (the imatrix baseline of ``llmquant compare``) share a batch.

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
_CACHE_VERSION = 3  # bump when the sampling changes, so old caches are not reused


def generated_windows(model_dir: Path, n: int, seqlen: int, seed: int, *, kind: str = "generated",
                      batch: int = BATCH, progress: bool = False) -> torch.Tensor:
    """Token ids [n, seqlen] sampled from the model: the first n distinct rows of batches 0, 1, ...

    Duplicates are dropped and more batches sampled, up to four times the rows asked for.
    """
    if kind not in KINDS:
        raise LlmquantError(f"unknown generated source {kind!r}; use one of {', '.join(KINDS)}")
    if n == 0:
        return torch.empty(0, seqlen, dtype=torch.long)
    key = _model_key(Path(model_dir), seqlen, seed, kind, batch)
    rows: list[torch.Tensor] = []
    seen: set[bytes] = set()
    with _Sampler(Path(model_dir), seqlen, seed, kind, batch, progress, -(-n // batch)) as sampler:
        for b in range(-(-4 * n // batch)):
            if len(rows) >= n:
                break
            for row in sampler.batch(b, cache_path(key, b)):
                row_key = row.numpy().tobytes()
                if row_key not in seen and len(rows) < n:
                    seen.add(row_key)
                    rows.append(row)
    if len(rows) < n:
        raise LlmquantError(f"the model sampled only {len(rows)} distinct calibration sequences of {n}; "
                            "use --calib-source builtin or file:PATH")
    return torch.stack(rows)


def _model_key(model_dir: Path, seqlen: int, seed: int, kind: str, batch: int) -> str:
    """The model's content and every setting that decides a batch's tokens, hashed once per call."""
    from .workdir import fingerprint

    files = sorted(model_dir.glob("*.safetensors"))
    key = fingerprint(model_dir, files, {
        "kind": kind, "seqlen": seqlen, "seed": seed, "batch": batch, "temperature": TEMPERATURE,
        "threads": torch.get_num_threads(), "sampler": f"llama.cpp {_llama_cpp_version()} q8_0",
        "version": _CACHE_VERSION})
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]


def cache_path(key: str, b: int) -> Path:
    """Where batch ``b`` of these settings lives."""
    from .loading.default_model import cache_root

    return cache_root() / "calibration" / f"{key}-batch{b}.safetensors"


def _llama_cpp_version() -> str:
    try:
        from llama_cpp import __version__
    except ImportError:
        return "absent"
    return __version__


class _Sampler:
    """Batches from the cache, or sampled in llama.cpp from a q8_0 file written at the first miss.

    The q8_0 file lives in a temporary folder of the cache for the sampler's
    lifetime only: the sequences are what is kept.
    """

    def __init__(self, model_dir: Path, seqlen: int, seed: int, kind: str, batch: int, progress: bool,
                 expected: int) -> None:
        self.model_dir, self.seqlen, self.seed, self.kind, self.size = model_dir, seqlen, seed, kind, batch
        self.progress, self.expected = progress, expected
        self.tok = self.tmp = self.gguf = self.bar = None

    def __enter__(self) -> _Sampler:
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tmp is not None:
            self.tmp.cleanup()

    def batch(self, b: int, path: Path) -> torch.Tensor:
        """Batch ``b``: [size, seqlen] token ids."""
        if path.exists():
            from safetensors.torch import load_file

            ids = load_file(path)["ids"]
            if tuple(ids.shape) == (self.size, self.seqlen):
                return ids
        prompts = self._prompts(b)
        if self.gguf is None:
            self._start(prompts)
        from .llamacpp_sampler import sample_sequences

        ids = sample_sequences(self.gguf, prompts, self.seqlen, self._seed(b), temperature=TEMPERATURE,
                               threads=torch.get_num_threads(), on_step=self.bar.update)
        _store(path, ids)
        return ids

    def _seed(self, b: int) -> int:
        """Batch ``b``'s seed, for its prompts (chat) and its draws."""
        return self.seed * 1_000_003 + b

    def _start(self, prompts: list[list[int]]) -> None:
        import tempfile

        from tqdm import tqdm

        from .api import quantize
        from .loading.default_model import cache_root

        root = cache_root() / "calibration"
        root.mkdir(parents=True, exist_ok=True)
        self.tmp = tempfile.TemporaryDirectory(dir=root, prefix="sampler-")
        self.gguf = Path(self.tmp.name) / "model-q8_0.gguf"
        quantize(self.model_dir, self.gguf, type="q8_0", method="rtn", pure=True, progress=False)
        per_batch = sum(self.seqlen - len(p) for p in prompts)
        self.bar = tqdm(total=per_batch * self.expected, desc=f"{self.kind} calibration", unit="tok",
                        disable=not self.progress, dynamic_ncols=True)

    def _prompts(self, b: int) -> list[list[int]]:
        """The start of every sequence of batch ``b``: BOS alone, or a templated user turn and the assistant's header."""
        if self.tok is None:
            from transformers import AutoTokenizer

            from .quiet import quiet_transformers

            with quiet_transformers():
                self.tok = AutoTokenizer.from_pretrained(self.model_dir)
        prompts = _prompts(self.tok, self.size, self._seed(b), self.kind, self.model_dir)
        if max(len(p) for p in prompts) >= self.seqlen:
            raise LlmquantError(f"--calib-seqlen {self.seqlen} leaves no room to generate after the chat template's "
                                f"{max(len(p) for p in prompts)}-token prompt; use a longer --calib-seqlen")
        return prompts


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
